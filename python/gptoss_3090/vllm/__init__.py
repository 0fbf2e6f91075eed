"""vLLM 0.26 plugin glue (entry point ``vllm.general_plugins`` -> :func:`register`).

vLLM calls :func:`register` once in every process it starts (``vllm/plugins/__init__.py``
``load_general_plugins``: the API server / ``LLM`` process, the engine core, each GPU worker and the
model-inspection subprocess of ``model_executor/models/registry.py``). So it is idempotent, cheap,
never initialises CUDA (it also runs in the API-server process) and registers everything lazily:

* the ``bnb_moe`` quantization method (``register_quantization_config``);
* the GPT-OSS model class, as the lazy ``"module:Class"`` string, under vLLM's own architecture
  name ``GptOssForCausalLM`` (``ModelRegistry.register_model`` replaces the stock entry; our class
  is a subclass that behaves exactly as stock unless the quantization is ``bnb_moe``);
* our sink/sliding-window attention backend under ``AttentionBackendEnum.CUSTOM`` (dotted path,
  ``v1/attention/backends/registry.py::register_backend``);
* the 24 GiB defaults hook for GPT-OSS (see :mod:`gptoss_3090.vllm.defaults`).

On a vLLM outside 0.26.x it logs one warning and registers nothing: an exception here would break
every model vLLM serves, and 0.26's internals (``FusedMoE`` as a factory, ``RoutedExperts``, the
attention backend enum) are what our glue is written against.
"""

from __future__ import annotations

import logging
import re

__all__ = [
    "ATTENTION_BACKEND_PATH",
    "MODEL_ARCH",
    "MODEL_CLASS_PATH",
    "SUPPORTED_VLLM",
    "is_supported_vllm_version",
    "register",
]

# Under "vllm." so that vLLM's logging configuration (format, VLLM_LOGGING_LEVEL) applies.
logger = logging.getLogger("vllm.gptoss_3090")

#: The vLLM versions this plugin supports (the ``gptoss-3090[vllm]`` extra pins the same range).
SUPPORTED_VLLM = ">=0.26,<0.27"
_SUPPORTED_MAJOR_MINOR = (0, 26)

#: vLLM's architecture name for GPT-OSS; we register our conditional subclass under it.
MODEL_ARCH = "GptOssForCausalLM"
#: Lazy ``module:Class`` form required by ``ModelRegistry.register_model`` for lazy loading.
MODEL_CLASS_PATH = "gptoss_3090.vllm.model:GptOssBnbForCausalLM"
#: Dotted class path for ``register_backend`` (the attention registry uses dots, not a colon).
ATTENTION_BACKEND_PATH = "gptoss_3090.vllm.attention_backend.GptOssSinkAttentionBackend"

_registered = False
_warned = False


def _vllm_version() -> str:
    """The version of the vLLM being run (monkeypatched by the tests)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def is_supported_vllm_version(version: str) -> bool:
    """True for any 0.26.x (including pre/dev/local builds such as ``0.26.1.dev3+gabc``)."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)", version)
    return bool(m) and (int(m.group(1)), int(m.group(2))) == _SUPPORTED_MAJOR_MINOR


def register() -> None:
    """Registers ``bnb_moe``, the GPT-OSS model class and the attention backend with vLLM.

    Idempotent and CUDA-free. On an unsupported vLLM version: one warning, nothing registered.
    """
    global _registered, _warned
    if _registered:
        return
    version = _vllm_version()
    if not is_supported_vllm_version(version):
        if not _warned:
            _warned = True
            logger.warning(
                "gptoss-3090 supports vLLM %s but vLLM %s is installed: the bnb_moe "
                "quantization method, its GPT-OSS model class and attention backend are NOT "
                "registered (other models are unaffected). Install a supported vLLM with "
                "`pip install 'gptoss-3090[vllm]'` (vllm%s).",
                SUPPORTED_VLLM,
                version,
                SUPPORTED_VLLM,
            )
        return
    _registered = True
    try:
        _warn_unknown_settings()
        _register_quantization()
        _register_model()
        _register_attention_backend()
        _install_defaults_hook()
    except Exception:
        # A bug here must not take every other model down with it.
        logger.exception(
            "gptoss-3090: registration with vLLM %s failed; bnb_moe unavailable", version
        )


def _warn_unknown_settings() -> None:
    """One warning naming ``GPTOSS_3090_*`` variables the package does not read: a misspelt
    setting would otherwise silently change nothing."""
    from gptoss_3090.settings import unknown_message, unknown_settings

    unknown = unknown_settings()
    if unknown:
        logger.warning("gptoss-3090: %s", unknown_message(unknown))


def _register_quantization() -> None:
    from vllm.model_executor.layers.quantization import register_quantization_config

    from gptoss_3090.vllm.quant_config import QUANT_NAME, BnbMoeConfig

    register_quantization_config(QUANT_NAME)(BnbMoeConfig)


def _register_model() -> None:
    from vllm import ModelRegistry

    # Replaces the stock entry (registry.py logs this at debug level only). Our class subclasses
    # vLLM's GptOssForCausalLM and is stock unless quant_config is bnb_moe, so the architecture
    # name, MODELS_CONFIG_MAP hooks and reasoning parser all stay as they are.
    ModelRegistry.register_model(MODEL_ARCH, MODEL_CLASS_PATH)


def _register_attention_backend() -> None:
    import importlib.util

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    try:
        current = AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:  # CUSTOM not registered yet
        current = None
    if current not in (None, ATTENTION_BACKEND_PATH):
        logger.warning(
            "gptoss-3090: AttentionBackendEnum.CUSTOM is already registered to %s; not "
            "replacing it (our GPT-OSS model class still uses its own backend directly)",
            current,
        )
        return
    module = ATTENTION_BACKEND_PATH.rsplit(".", 1)[0]
    if importlib.util.find_spec(module) is None:  # backend not part of this build
        logger.debug("gptoss-3090: %s not found; attention backend not registered", module)
        return
    register_backend(AttentionBackendEnum.CUSTOM, ATTENTION_BACKEND_PATH)


def _install_defaults_hook() -> None:
    from gptoss_3090.vllm.defaults import install_config_hook

    install_config_hook()
