"""The ``bnb_moe`` quantization method for vLLM 0.26.

``BnbMoeConfig`` is a ``vllm.model_executor.layers.quantization.base_config.QuantizationConfig``
registered under the name ``"bnb_moe"`` by :func:`gptoss_3090.vllm.register`. It serves

* GPT-OSS checkpoints in Unsloth's bitsandbytes NF4 layout (``quantization_config.quant_method
  == "bitsandbytes"``), with or without ``--quantization bnb_moe``: the override below claims them
  before vLLM's own bitsandbytes path; and
* unquantized (bf16) GPT-OSS checkpoints in the Hugging Face layout with
  ``--quantization bnb_moe``: there is no ``quantization_config``, so vLLM's
  ``weight_utils.py::get_quant_config`` builds ``BnbMoeConfig()`` with no arguments (our
  ``get_config_filenames()`` is empty) and the weights are quantized to NF4 at load.

How vLLM 0.26 drives it (file / function names in ``vllm/``):

* ``config/model.py::ModelConfig._verify_quantization`` offers the checkpoint's
  ``quantization_config`` to every registered method's ``override_quantization_method``; custom
  names are tried before the built-in overrides, the first non-None answer becomes
  ``model_config.quantization`` (and ``load_format`` stays ``"auto"``, unlike ``"bitsandbytes"``).
* ``config/vllm.py::VllmConfig._get_quantization_config`` builds the config
  (``from_config`` / no-arg), checks ``get_min_capability()`` and the activation dtype, then
  calls ``maybe_update_config`` (process 0 only; workers receive the pickled object).
* ``layers/linear.py::LinearBase.__init__`` asks ``get_quant_method`` for ``qkv_proj`` and
  ``o_proj`` and requires an answer (``UnquantizedLinearMethod`` for skipped modules);
  ``fused_moe/routed_experts.py::RoutedExperts._get_quant_method`` asserts a
  ``FusedMoEMethodBase``; ``layers/attention/attention.py`` must get ``None``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from gptoss_3090.vllm.weights import (
    CheckpointError,
    SafetensorsDir,
    hf_modules_for_vllm_prefix,
    is_hf_module_skipped,
    quantized_weight_bases,
)

logger = logging.getLogger(__name__)

__all__ = ["BnbMoeConfig", "QUANT_NAME", "is_gpt_oss_config"]

#: The name users pass as ``--quantization``.
QUANT_NAME = "bnb_moe"


def is_gpt_oss_config(hf_config: Any) -> bool:
    """True for a transformers GPT-OSS config (model_type or architectures), dict or object."""
    if hf_config is None:
        return False
    if isinstance(hf_config, dict):
        model_type = hf_config.get("model_type")
        archs = hf_config.get("architectures") or []
    else:
        model_type = getattr(hf_config, "model_type", None)
        archs = getattr(hf_config, "architectures", None) or []
    return model_type == "gpt_oss" or "GptOssForCausalLM" in archs


def _flag(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def _nf4_problems(hf_quant_cfg: dict[str, Any]) -> list[str]:
    """Why a bitsandbytes ``quantization_config`` is not NF4 4-bit (empty if it is)."""
    problems = []
    if _flag(hf_quant_cfg, "load_in_8bit", "_load_in_8bit", default=False):
        problems.append("load_in_8bit is true (bnb_moe serves 4-bit NF4 only)")
    if not _flag(hf_quant_cfg, "load_in_4bit", "_load_in_4bit", default=True):
        problems.append("load_in_4bit is false")
    qtype = _flag(hf_quant_cfg, "bnb_4bit_quant_type", default="nf4")
    if str(qtype).lower() != "nf4":
        problems.append(f"bnb_4bit_quant_type is {qtype!r}, expected 'nf4'")
    return problems


class BnbMoeConfig(QuantizationConfig):
    """NF4 attention projections and fused NF4 experts for GPT-OSS.

    Args:
        prequantized: the checkpoint is bitsandbytes NF4 (False: quantize bf16 weights at load).
        nested: whether absmax is double-quantized (bitsandbytes ``compress_statistics``). This is
            the layout our parameters are allocated in; a nested tensor loads into a non-nested
            layer by exact expansion, the reverse is an error.
        skip_modules: ``llm_int8_skip_modules`` (Hugging Face module names).
        compute_dtype: ``bnb_4bit_compute_dtype`` (informational; activations use the model dtype).
    """

    def __init__(
        self,
        prequantized: bool = False,
        nested: bool = True,
        skip_modules: list[str] | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        super().__init__()
        self.prequantized = prequantized
        self.nested = nested
        self.skip_modules = list(skip_modules or [])
        self.compute_dtype = compute_dtype
        #: HF weight keys stored NF4 in the checkpoint, when the files could be scanned
        #: (``maybe_update_config``); they decide over ``skip_modules``.
        self.quantized_bases: frozenset[str] | None = None
        #: The local checkpoint directory, when ``maybe_update_config`` saw one.
        self.checkpoint_path: str | None = None

    def __repr__(self) -> str:
        return (
            f"BnbMoeConfig(prequantized={self.prequantized}, nested={self.nested}, "
            f"skip_modules={self.skip_modules})"
        )

    # -- QuantizationConfig interface ------------------------------------------------------

    def get_name(self) -> str:  # QuantizationMethods is a Literal; custom names are plain str
        return QUANT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        # mma.sync m16n8k16 bf16, cp.async and ldmatrix: sm_80 (Ampere) and newer.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Empty: with no quantization_config in config.json, weight_utils.get_quant_config
        # returns ``BnbMoeConfig()`` (quantize-at-load) instead of searching for a file.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BnbMoeConfig:
        """Builds the config from the checkpoint's bitsandbytes ``quantization_config``."""
        method = str(config.get("quant_method", "")).lower()
        if method != "bitsandbytes":
            raise ValueError(
                f"bnb_moe serves bitsandbytes NF4 GPT-OSS checkpoints (or bf16 ones, quantized "
                f"at load); this checkpoint's quantization_config says quant_method={method!r}"
            )
        problems = _nf4_problems(config)
        if problems:
            raise ValueError("bnb_moe cannot serve this checkpoint: " + "; ".join(problems))
        skip = _flag(config, "llm_int8_skip_modules", default=[]) or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"llm_int8_skip_modules: expected a list of strings, found {skip!r}")
        return cls(
            prequantized=True,
            nested=bool(_flag(config, "bnb_4bit_use_double_quant", default=False)),
            skip_modules=skip,
            compute_dtype=_flag(config, "bnb_4bit_compute_dtype"),
        )

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claims bitsandbytes NF4 GPT-OSS checkpoints (``user_quant`` None or ``bnb_moe``).

        Every other checkpoint is left to vLLM (``None``). When the user explicitly asked for
        ``bnb_moe`` on a checkpoint we cannot serve, raise a clear error here rather than let vLLM
        report a bare name mismatch.
        """
        if user_quant not in (None, QUANT_NAME):
            return None
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        asked = user_quant == QUANT_NAME
        if method != "bitsandbytes":
            if asked and method:
                raise ValueError(
                    f"--quantization bnb_moe serves bitsandbytes NF4 GPT-OSS checkpoints (or "
                    f"unquantized bf16 GPT-OSS checkpoints, quantized at load); this checkpoint "
                    f"is already quantized with quant_method={method!r}: serve it without "
                    f"--quantization bnb_moe"
                )
            return None
        if not is_gpt_oss_config(hf_config):
            if asked:
                model_type = getattr(hf_config, "model_type", None)
                raise ValueError(
                    f"--quantization bnb_moe serves GPT-OSS only (model_type 'gpt_oss'); "
                    f"this checkpoint is model_type {model_type!r}"
                )
            return None
        problems = _nf4_problems(hf_quant_cfg)
        if problems:
            if asked:
                raise ValueError("bnb_moe cannot serve this checkpoint: " + "; ".join(problems))
            return None
        return QUANT_NAME

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # Imported here: these pull in vLLM's layer modules, which must not load at plugin
        # registration time.
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if isinstance(layer, LinearBase):
            if self.linear_is_quantized(prefix):
                from gptoss_3090.vllm.linear_method import Nf4LinearMethod

                return Nf4LinearMethod(self)
            return UnquantizedLinearMethod()
        # ``FusedMoE`` is a factory function in 0.26; the parameters live in RoutedExperts.
        if isinstance(layer, RoutedExperts):
            from gptoss_3090.vllm.moe_method import BnbMoeMethod

            return BnbMoeMethod(self, layer.moe_config)
        # Attention (KV-cache quantization) and anything else: not ours.
        return None

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Checks the model is GPT-OSS and, for a local checkpoint, reads which weights are NF4."""
        if hf_config is not None and not is_gpt_oss_config(hf_config):
            raise ValueError(
                f"--quantization bnb_moe serves GPT-OSS only (model_type 'gpt_oss'); "
                f"{model_name!r} is model_type {getattr(hf_config, 'model_type', None)!r}"
            )
        if not self.prequantized or not os.path.isdir(model_name):
            return
        self.checkpoint_path = model_name
        try:
            keys = SafetensorsDir(model_name).keys()
        except CheckpointError as e:
            # The loader reports this again, with the full story, when it opens the files.
            logger.debug("bnb_moe: could not scan %s for NF4 weights: %s", model_name, e)
            return
        self.quantized_bases = frozenset(quantized_weight_bases(keys))

    # -- helpers -----------------------------------------------------------------------------

    def linear_is_quantized(self, prefix: str) -> bool:
        """Whether the vLLM linear module ``prefix`` is allocated NF4.

        Quantize-at-load quantizes q/k/v/o. For NF4 checkpoints the files decide when scanned (a
        module is NF4 if any of its HF pieces is; a bf16 piece is then quantized at load),
        otherwise ``llm_int8_skip_modules`` with transformers' substring rule.
        """
        hf_modules = hf_modules_for_vllm_prefix(prefix, 0)
        if not self.prequantized:
            return True
        if self.quantized_bases is not None:
            return any(f"{m}.weight" in self.quantized_bases for m in hf_modules)
        return not all(is_hf_module_skipped(m, self.skip_modules) for m in hf_modules)
