"""GPT-OSS model class for ``bnb_moe``: a conditional subclass of vLLM 0.26's ``GptOssForCausalLM``.

Registered by :func:`gptoss_3090.vllm.register` under vLLM's own architecture name
``GptOssForCausalLM`` (``ModelRegistry.register_model`` replaces the stock entry). Unless
``vllm_config.quant_config`` is our ``BnbMoeConfig`` it *is* the stock class: ``__init__`` and
``load_weights`` go straight to ``vllm/model_executor/models/gpt_oss.py``, so MXFP4, bf16 and every
other GPT-OSS checkpoint is served exactly as before.

With ``bnb_moe``:

* **Modules.** The stock ``GptOssModel`` / ``TransformerBlock`` / ``OAIAttention`` / ``MLPBlock``
  with our quant methods (NF4 ``qkv_proj``/``o_proj``, fused NF4 experts, and the bf16 router
  through our router op unless ``GPTOSS_3090_ROUTER=vllm``). The only structural
  change is ``OAIAttention._build_attention``: on sm_80-sm_89, with no attention backend chosen by
  the user, the ``Attention`` layers get our sink/sliding-window backend (registered as
  ``AttentionBackendEnum.CUSTOM``) through ``Attention(..., attn_backend=cls)``. vLLM never picks
  CUSTOM on its own; ``--attention-backend TRITON_ATTN`` (or any explicit choice) keeps vLLM's
  selection, and an unavailable/invalid backend falls back to it with a log line.
* **Loading** (:class:`BnbCheckpointLoader`). vLLM's own GPT-OSS loader
  (``GptOssModel._load_weights_other``) silently skips unknown names and cannot place Unsloth's
  per-expert tensors, and ``DefaultModelLoader`` only tracks unloaded weights when
  ``quantization is None``. So ``load_weights`` ignores vLLM's weight iterator (a lazy generator:
  nothing is read) and reads the checkpoint itself, one decoder layer after another, with a
  progress bar: per-expert NF4 tensors are copied into the fused expert buffers (no repacking),
  ``mlp.router.linear.*`` is renamed to ``mlp.router.*``, sinks and biases load, q/k/v become
  segments of ``qkv_proj``. bf16 weights that go to NF4 buffers (the Hugging Face layout with
  ``--quantization bnb_moe``, or modules an NF4 checkpoint left unquantized) are quantized on the
  GPU one tensor (one expert) at a time. Every checkpoint key must be used and every model
  parameter filled, else one error names each missing / unexpected tensor.

Only tensor_parallel_size=1, pipeline_parallel_size=1, no expert parallelism.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.gpt_oss import (
    GptOssForCausalLM,
    GptOssModel,
    OAIAttention,
    TransformerBlock,
)
from vllm.model_executor.models.utils import maybe_prefix
from vllm.v1.attention.backend import AttentionType

from gptoss_3090.settings import SETTINGS
from gptoss_3090.vllm.quant_config import QUANT_NAME
from gptoss_3090.vllm.weights import (
    CheckpointError,
    GptOssDims,
    Kind,
    LoadPlan,
    LogicalTensor,
    Nf4Parts,
    SafetensorsDir,
    SourceRef,
    dequantize_nf4_cpu,
    fill_nf4_slot,
    nf4_slot,
    plan_checkpoint,
    read_nf4_parts,
)

logger = logging.getLogger("vllm.gptoss_3090")

__all__ = [
    "PRECOMPILE_ENV",
    "BnbCheckpointLoader",
    "GptOssBnbForCausalLM",
    "choose_attention_backend",
    "graph_settings",
    "record_graph_settings",
]

#: Set to ``triton`` (or ``vllm``) to keep vLLM's attention selection for bnb_moe models.
ATTENTION_ENV = "GPTOSS_3090_ATTENTION"


def _is_bnb_moe(vllm_config: Any) -> bool:
    qc = getattr(vllm_config, "quant_config", None)
    return qc is not None and qc.get_name() == QUANT_NAME


# ----------------------------------------------------------------------------------------------
# The compile cache key
# ----------------------------------------------------------------------------------------------

#: Key of our entry in ``vllm_config.additional_config``.
COMPILE_KEY = "gptoss_3090"
#: Our environment variables that cannot change a compiled graph: paths (the kernel cache,
#: NVRTC, the kernel sources, which our opaque ops compile at run time), how the plugin starts
#: (the background kernel compile) and benchmark metadata.
_NOT_GRAPH_SETTINGS = frozenset(
    s.name for s in SETTINGS if s.kind in ("path", "startup", "metadata")
)


def graph_settings(environ: Any = None) -> dict[str, str]:
    """What of ours can change the graph torch.compile traces: the package version and every
    ``GPTOSS_3090_*`` environment variable but paths and benchmark metadata."""
    environ = os.environ if environ is None else environ
    settings = {
        name: str(value)
        for name, value in sorted(environ.items())
        if name.startswith("GPTOSS_3090_") and name not in _NOT_GRAPH_SETTINGS
    }
    from gptoss_3090 import __version__

    settings["version"] = __version__
    return settings


def record_graph_settings(vllm_config: Any) -> None:
    """Puts :func:`graph_settings` into ``vllm_config.additional_config``, which
    ``VllmConfig.compute_hash`` hashes into torch.compile's cache key.

    vLLM keys its compile caches (Inductor's and the AOT-compiled Dynamo graph) by vLLM's own
    ``VLLM_*`` variables, the configs and the traced source files, not by ours. Settings read at
    model build (``GPTOSS_3090_ATTN_ROPE``, ``GPTOSS_3090_ATTN_KV_WRITE``, ``GPTOSS_3090_ROUTER``,
    ``GPTOSS_3090_MOE_ROUTING``) choose which ops the same source traces, so without this an
    engine started with another value silently replays the graph cached by the last one: with
    RoPE moved into our attention op, ``GPTOSS_3090_ATTN_ROPE=vllm`` replayed a graph without
    vLLM's rotary op and ran no RoPE at all (session 29), and the reverse rotates twice.
    """
    extra = getattr(vllm_config, "additional_config", None)
    if extra is None:
        vllm_config.additional_config = extra = {}
    if not isinstance(extra, dict):
        logger.warning(
            "gptoss-3090: additional_config is a %s, not a dict; torch.compile's cache key "
            "cannot include GPTOSS_3090_* settings, so set VLLM_DISABLE_COMPILE_CACHE=1 when "
            "changing them",
            type(extra).__name__,
        )
        return
    extra[COMPILE_KEY] = graph_settings()


# ----------------------------------------------------------------------------------------------
# Attention backend choice
# ----------------------------------------------------------------------------------------------

_backend_logged = False


def choose_attention_backend(
    vllm_config: Any,
    head_size: int,
    dtype: torch.dtype,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
) -> type | None:
    """Our attention backend class for bnb_moe GPT-OSS, or None to keep vLLM's choice.

    Ours is used when the user chose no backend (``attention_config.backend`` None and no
    per-kind map), ``GPTOSS_3090_ATTENTION`` is not ``triton``/``vllm``, the GPU is sm_80-sm_89
    (sm_90+ has FlashAttention with sinks), the class imports and it validates this configuration.
    """
    global _backend_logged

    def fallback(reason: str) -> None:
        global _backend_logged
        if not _backend_logged:
            _backend_logged = True
            logger.info("gptoss-3090: keeping vLLM's attention backend selection: %s", reason)

    attn_cfg = getattr(vllm_config, "attention_config", None)
    if attn_cfg is not None and (attn_cfg.backend is not None or attn_cfg.backend_per_kind):
        fallback("an attention backend was chosen explicitly")
        return None
    if os.environ.get(ATTENTION_ENV, "").lower() in ("triton", "vllm", "off", "0"):
        fallback(f"{ATTENTION_ENV}={os.environ[ATTENTION_ENV]}")
        return None
    from vllm.platforms import current_platform

    cap = current_platform.get_device_capability()
    if cap is None or not (80 <= cap.to_int() < 90):
        fallback(f"compute capability {cap} is outside sm_80-sm_89")
        return None
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        cls = AttentionBackendEnum.CUSTOM.get_class()
    except (ImportError, ValueError, AttributeError) as e:
        fallback(f"our attention backend is unavailable ({e})")
        return None
    cache_config = getattr(vllm_config, "cache_config", None)
    cache_dtype = getattr(cache_config, "cache_dtype", "auto")
    block_size = (
        cache_config.block_size
        if cache_config is not None and getattr(cache_config, "user_specified_block_size", False)
        else None
    )
    try:
        reasons = []
        # the backend's own check (attention issue): names the first unsupported property
        unsupported = getattr(cls, "unsupported_reason", None)
        if unsupported is not None and num_heads is not None and num_kv_heads is not None:
            why = unsupported(
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_size=head_size,
                dtype=dtype,
                kv_cache_dtype=cache_dtype,
                block_size=block_size,
                attn_type=AttentionType.DECODER,
                compute_capability=(cap.major, cap.minor),
            )
            if why:
                reasons.append(why)
        reasons += cls.validate_configuration(
            head_size=head_size,
            dtype=dtype,
            kv_cache_dtype=cache_dtype,
            block_size=block_size,
            use_mla=False,
            has_sink=True,
            use_sparse=False,
            use_mm_prefix=False,
            use_per_head_quant_scales=False,
            device_capability=cap,
            attn_type=AttentionType.DECODER,
            has_sliding_window=True,
        )
    except Exception as e:  # a backend bug must not stop the model from loading
        reasons = [f"validate_configuration raised {e!r}"]
    if reasons:
        fallback("our attention backend rejected this configuration: " + "; ".join(reasons))
        return None
    if not _backend_logged:
        _backend_logged = True
        logger.info(
            "gptoss-3090: using attention backend %s (sinks + sliding window)", cls.__name__
        )
    return cls


_rope_logged = False


class _BnbOAIAttention(OAIAttention):
    """OAIAttention whose Attention layer gets our backend when :func:`choose_attention_backend`
    says so. Same arguments as the stock ``_build_attention`` otherwise.

    With our backend the rotary embedding moves into the attention op
    (``GPTOSS_3090_ATTN_ROPE=fold``, the default): ``forward`` hands q and k over unrotated and
    the op rotates them with the same table and positions, which removes the two RoPE kernels
    per layer that torch.compile would generate.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        impl = getattr(self.attn, "impl", None)
        take = getattr(impl, "take_rotary_embedding", None)
        self.rope_in_attention = bool(take is not None and take(self.rotary_emb))
        global _rope_logged
        if self.rope_in_attention and not _rope_logged:
            _rope_logged = True
            logger.info(
                "gptoss-3090: RoPE runs inside the attention op "
                "(GPTOSS_3090_ATTN_ROPE=vllm keeps vLLM's rotary op)"
            )

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.rope_in_attention:
            return super().forward(hidden_states, positions)
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        attn_output = self.attn(q, k, v)  # rotates q and k at the tokens' positions
        output, _ = self.o_proj(attn_output)
        return output

    def _build_attention(
        self, config: Any, cache_config: Any, quant_config: Any, prefix: str
    ) -> Attention:
        from vllm.config import get_current_vllm_config

        backend = choose_attention_backend(
            get_current_vllm_config(),
            self.head_dim,
            torch.get_default_dtype(),
            self.num_local_attention_heads,
            self.num_local_key_value_heads,
        )
        sliding_window = config.sliding_window if self.layer_idx % 2 == 0 else None
        return Attention(
            self.num_local_attention_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_local_key_value_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=sliding_window,
            attn_type=AttentionType.DECODER,
            prefix=f"{prefix}.attn",
            sinks=self.sinks,
            attn_backend=backend,
        )


class _BnbTransformerBlock(TransformerBlock):
    attention_cls = _BnbOAIAttention


class _BnbGptOssModel(GptOssModel):
    # GptOssModel is @support_torch_compile; the decorator patches its __init__/__call__ in
    # place, so this subclass compiles the same way (decorators.py::_support_torch_compile).
    block_cls = _BnbTransformerBlock


# ----------------------------------------------------------------------------------------------
# The model class
# ----------------------------------------------------------------------------------------------


class GptOssBnbForCausalLM(GptOssForCausalLM):
    """vLLM's ``GptOssForCausalLM``, plus the bnb_moe modules and loader when quantized so."""

    def __init__(self, vllm_config: Any, prefix: str = "") -> None:
        self._bnb_moe = _is_bnb_moe(vllm_config)
        if not self._bnb_moe:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            return
        _check_parallelism(vllm_config)
        record_graph_settings(vllm_config)
        # What GptOssForCausalLM.__init__ does (gpt_oss.py, 0.26), with our GptOssModel subclass.
        super(GptOssForCausalLM, self).__init__()
        self.vllm_config = vllm_config
        self.config = vllm_config.model_config.hf_config
        self.model = _BnbGptOssModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            self.config.vocab_size,
            self.config.hidden_size,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        self.logits_processor = LogitsProcessor(self.config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        _install_router_method(self.model)
        # Before the weights load (vLLM loads them after __init__), so the two overlap.
        start_kernel_compile(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if not self._bnb_moe:
            return super().load_weights(weights)
        # DefaultModelLoader.load_weights hands us get_all_weights(...), a generator not yet
        # started: closing it unread costs nothing. Its timer starts inside that generator, so
        # start it here, else vLLM logs "Loading weights took <seconds since boot>".
        frame = getattr(weights, "gi_frame", None)
        owner = frame.f_locals.get("self") if frame is not None else None
        if owner is not None and hasattr(owner, "counter_before_loading_weights"):
            owner.counter_before_loading_weights = time.perf_counter()
        close = getattr(weights, "close", None)
        if callable(close):
            close()
        model_config = self.vllm_config.model_config
        load_config = self.vllm_config.load_config
        path = resolve_checkpoint_dir(model_config, load_config)
        loader = BnbCheckpointLoader(
            self,
            GptOssDims.from_hf_config(self.config),
            path,
            prequantized=bool(self.vllm_config.quant_config.prequantized),
            use_tqdm=bool(getattr(load_config, "use_tqdm_on_load", True)),
        )
        return loader.load()


# ----------------------------------------------------------------------------------------------
# Kernel compile alongside the weight load
# ----------------------------------------------------------------------------------------------

#: ``on`` (default): :func:`start_kernel_compile` compiles the kernel families the model will run
#: on a background thread while its weights load; ``off``: each family compiles at its first use.
PRECOMPILE_ENV = "GPTOSS_3090_PRECOMPILE"


def served_kernel_families(model: nn.Module) -> list[str]:
    """The kernel families (``_native.kernel_sources()`` names) the built ``model`` launches:
    the MoE's (``moe_chunks`` for chunk-major experts, ``moe`` for rows), ``moe_chunks`` for our
    router, ``nf4`` for NF4 linear layers or weights quantized at load, ``attention`` for our
    attention backend. A float16 model's MoE and router entries live in the ``_f16`` programs
    of the MoE families. Empty with the reference kernels (``GPTOSS_3090_REFERENCE_KERNELS``)."""
    from gptoss_3090.vllm.attention_backend import GptOssSinkAttentionImpl
    from gptoss_3090.vllm.linear_method import (
        Nf4LinearMethod,
        RouterLinearMethod,
        use_reference_kernels,
    )
    from gptoss_3090.vllm.moe_method import BnbMoeMethod, moe_weights_order

    if use_reference_kernels():
        return []
    model_config = getattr(getattr(model, "vllm_config", None), "model_config", None)
    # src/cuda/mod.rs SOURCES: moe.cu's fp16 entries compile as programs of their own.
    moe_dtype = "_f16" if getattr(model_config, "dtype", None) == torch.float16 else ""
    families: list[str] = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, BnbMoeMethod):
            order = moe_weights_order()
            families.append(("moe_chunks" if order == "chunks" else "moe") + moe_dtype)
        elif isinstance(method, RouterLinearMethod):
            families.append("moe_chunks" + moe_dtype)  # src/ops/router.rs ROUTER_FAMILY
        elif isinstance(method, Nf4LinearMethod):
            families.append("nf4")
        elif isinstance(getattr(module, "impl", None), GptOssSinkAttentionImpl):
            families.append("attention")
    quant_config = getattr(getattr(model, "vllm_config", None), "quant_config", None)
    if quant_config is not None and not getattr(quant_config, "prequantized", True):
        families.append("nf4")  # the GPU quantizer
    return list(dict.fromkeys(families))


def start_kernel_compile(model: nn.Module) -> Any:
    """Starts compiling :func:`served_kernel_families` for the current GPU on a background
    thread (:func:`gptoss_3090.runtime.compile_in_background`), unless
    ``GPTOSS_3090_PRECOMPILE=off``. Returns the thread, or None.

    Why: a fresh install compiles each family at its first use, and vLLM's first forward (the
    memory profile, after the weights load) reaches them one after another: about 90 s of one
    core for an RTX 3090's families. Started here, they compile side by side during the load.
    Never raises: whatever goes wrong here happens again, with its real error, at first use.
    """
    mode = os.environ.get(PRECOMPILE_ENV, "on").strip().lower() or "on"
    if mode in ("off", "0", "false", "no"):
        return None
    try:
        from gptoss_3090.runtime import compile_in_background

        families = served_kernel_families(model)
        if not families or not torch.cuda.is_available():
            return None
        thread = compile_in_background(families, torch.cuda.current_device(), log=logger)
        if thread is not None:
            logger.info(
                "gptoss-3090: compiling kernels %s for %s while the weights load "
                "(%s=off: at first use)", ", ".join(families), thread.arch, PRECOMPILE_ENV,
            )
        return thread
    except Exception as e:  # noqa: BLE001 - never break model construction over a head start
        logger.warning("gptoss-3090: kernels not compiled ahead (%s); they compile at first use", e)
        return None


def _install_router_method(model: nn.Module) -> None:
    """Runs each layer's ``mlp.router`` (built by vLLM with ``quant_config=None``) through our
    router op (:class:`~gptoss_3090.vllm.linear_method.RouterLinearMethod`), unless
    ``GPTOSS_3090_ROUTER=vllm``; with the ``router`` routing it also picks the layer's top-k
    (``mlp.experts_per_token``) for our MoE method."""
    from gptoss_3090.vllm.linear_method import router_method

    if router_method() is None:
        return
    for layer in getattr(model, "layers", []):
        mlp = getattr(layer, "mlp", None)
        router = getattr(mlp, "router", None)
        if router is not None:
            # vLLM 0.26's gpt_oss.MLPBlock keeps config.num_experts_per_tok here.
            top_k = int(getattr(mlp, "experts_per_token", 0) or 0)
            router.quant_method = router_method(top_k)


def _check_parallelism(vllm_config: Any) -> None:
    pc = vllm_config.parallel_config
    bad = []
    if pc.tensor_parallel_size != 1:
        bad.append(f"tensor_parallel_size={pc.tensor_parallel_size}")
    if pc.pipeline_parallel_size != 1:
        bad.append(f"pipeline_parallel_size={pc.pipeline_parallel_size}")
    if getattr(pc, "enable_expert_parallel", False):
        bad.append("enable_expert_parallel")
    if getattr(pc, "data_parallel_size", 1) != 1:
        bad.append(f"data_parallel_size={pc.data_parallel_size}")
    if bad:
        raise NotImplementedError(
            "bnb_moe serves GPT-OSS on one GPU; unsupported: " + ", ".join(bad)
        )


def resolve_checkpoint_dir(model_config: Any, load_config: Any) -> str:
    """The local directory of the checkpoint (downloading from the Hub if needed)."""
    model = model_config.model
    if os.path.isdir(model):
        return model
    from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

    return download_weights_from_hf(
        model,
        load_config.download_dir,
        ["*.safetensors", "*.json"],
        model_config.revision,
        ignore_patterns=load_config.ignore_patterns,
    )


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------

#: ``quantize(weight [out, in] on the target device) -> Nf4Parts`` (nested statistics).
Quantizer = Callable[[torch.Tensor], Nf4Parts]

_SHARD_INDEX = {"q": 0, "k": 1, "v": 2, None: 0}


def default_quantizer() -> Quantizer:
    """Our NF4 quantizer with bitsandbytes' CUDA semantics: the GPU kernel
    (``gptoss_3090.ops.nf4_quantize``) for CUDA tensors, the exact Rust CPU quantizer
    (``gptoss_3090.nf4.quantize``, same codes) for CPU tensors."""
    from gptoss_3090 import nf4 as cpu_nf4
    from gptoss_3090.ops import nf4_quantize

    def quantize(w: torch.Tensor) -> Nf4Parts:
        if w.is_cuda:
            q = nf4_quantize(w, nested=True)
            offset = q.nested_offset
            return Nf4Parts(
                packed=q.packed,
                absmax=q.absmax,
                nested_absmax=q.nested_absmax,
                nested_quant_map=q.nested_quant_map,
                nested_offset=float(offset.item() if isinstance(offset, torch.Tensor) else offset),
                shape=tuple(w.shape),
            )
        d = cpu_nf4.quantize(w, nested=True)
        return Nf4Parts(
            packed=d["weight"],
            absmax=d["absmax"],
            nested_absmax=d["nested_absmax"],
            nested_quant_map=d["nested_quant_map"],
            nested_offset=float(d["quant_state"]["nested_offset"]),
            shape=tuple(w.shape),
        )

    return quantize


def open_source(path: str, prequantized: bool) -> SafetensorsDir:
    """The checkpoint's tensors; NF4 checkpoints are first validated by our Rust reader."""
    if prequantized:
        try:
            from gptoss_3090 import open_checkpoint
        except ImportError:
            open_checkpoint = None
        if open_checkpoint is not None:
            # Validates config, shapes, byte counts, quant-state JSON and expert completeness;
            # raises gptoss_3090.CheckpointError naming the tensor.
            open_checkpoint(path)
    return SafetensorsDir(path)


class BnbCheckpointLoader:
    """Fills a bnb_moe GPT-OSS model (``root``) from a checkpoint, layer after layer.

    Args:
        root: the model (``GptOssBnbForCausalLM`` or any module tree with the same names).
        dims: the model sizes.
        path: the checkpoint directory (or pass ``source``).
        prequantized: the checkpoint is a bitsandbytes NF4 one (validated by our Rust reader).
        source: an object with ``keys()``, ``tensor(key)``, ``expert_slice(key, e)``.
        quantizer: quantizes a bf16 ``[out, in]`` weight to NF4 (default: our GPU quantizer).
        use_tqdm: show a progress bar.
    """

    def __init__(
        self,
        root: nn.Module,
        dims: GptOssDims,
        path: str | None = None,
        *,
        prequantized: bool = True,
        source: Any = None,
        quantizer: Quantizer | None = None,
        use_tqdm: bool = True,
    ) -> None:
        self.root = root
        self.dims = dims
        self.path = path
        if source is None:
            if path is None:
                raise ValueError("BnbCheckpointLoader needs a path or a source")
            source = open_source(path, prequantized)
        self.source = source
        self._quantizer = quantizer
        self.use_tqdm = use_tqdm
        self.params = dict(root.named_parameters())
        self.stats = {"nf4": 0, "quantized": 0, "dequantized": 0, "dense": 0}

    # -- public ----------------------------------------------------------------------------

    def plan(self) -> LoadPlan:
        """Matches the checkpoint to the model; raises naming missing/unexpected tensors."""
        plan = plan_checkpoint(self.source.keys(), self.dims)
        plan.raise_if_incomplete(self.path)
        return plan

    def load(self) -> set[str]:
        """Loads every tensor; returns the names of all model parameters (all filled)."""
        plan = self.plan()
        start = time.perf_counter()
        groups = plan.by_layer()
        order = [None, *range(self.dims.num_layers)]
        covered: set[str] = set()
        bar = self._progress(len(plan.items))
        try:
            for layer in order:
                for t, ref in groups.get(layer, []):
                    covered |= self._load_one(t, ref)
                    if bar is not None:
                        bar.update(1)
                if bar is not None and layer is not None:
                    bar.set_postfix_str(f"layer {layer + 1}/{self.dims.num_layers}")
        finally:
            if bar is not None:
                bar.close()
            close = getattr(self.source, "close", None)
            if callable(close):
                close()
        self._check_covered(covered)
        logger.info(
            "gptoss-3090: loaded %d tensors in %.1f s (%d NF4 as stored, %d quantized at load, "
            "%d dequantized, %d dense)",
            len(plan.items),
            time.perf_counter() - start,
            self.stats["nf4"],
            self.stats["quantized"],
            self.stats["dequantized"],
            self.stats["dense"],
        )
        return set(self.params)

    # -- internals -------------------------------------------------------------------------

    def _progress(self, total: int) -> Any:
        if not self.use_tqdm:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc="gptoss-3090: loading bnb_moe weights", unit="tensor")

    @property
    def quantizer(self) -> Quantizer:
        if self._quantizer is None:
            self._quantizer = default_quantizer()
        return self._quantizer

    def _param(self, name: str) -> torch.nn.Parameter:
        try:
            return self.params[name]
        except KeyError:
            raise RuntimeError(
                f"bnb_moe loader: the model has no parameter {name!r} (vLLM layout changed?)"
            ) from None

    def _rows(self, t: LogicalTensor) -> tuple[int, int] | None:
        """Row range of a q/k/v shard inside the fused qkv tensors."""
        if t.shard not in ("q", "k", "v"):
            return None
        q, kv = self.dims.q_size, self.dims.kv_size
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[t.shard]

    def _dense_tensor(self, t: LogicalTensor, ref: SourceRef) -> torch.Tensor:
        if ref.fmt == "fused":
            assert ref.expert is not None
            tensor = self.source.expert_slice(ref.key, ref.expert)
            if t.kind is Kind.EXPERT_WEIGHT:
                tensor = tensor.t()  # HF stores x @ W: [in, out]
        else:
            tensor = self.source.tensor(ref.key)
        if tuple(tensor.shape) != tuple(t.shape):
            raise CheckpointError(
                f"'{ref.key}'{'' if ref.expert is None else f'[{ref.expert}]'}: expected shape "
                f"{list(t.shape)}, found {list(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"'{ref.key}': expected a float tensor, found {tensor.dtype}")
        return tensor

    def _load_one(self, t: LogicalTensor, ref: SourceRef) -> set[str]:
        if t.kind is Kind.DENSE:
            return self._load_dense(t, ref)
        if t.kind is Kind.LINEAR_WEIGHT:
            module = self.root.get_submodule(t.dest)
            layout = getattr(module, "nf4_layout", None)
            if layout is None:  # kept unquantized (skip list): dense weight rows
                return self._load_unquantized_linear(t, ref, module)
            params = {n: getattr(module, n) for n in layout.param_shapes()}
            slot = nf4_slot(t.dest, params, layout, _SHARD_INDEX[t.shard], None)
            self._fill(slot, t, ref)
            return {f"{t.dest}.{n}" for n in params}
        # Kind.EXPERT_WEIGHT
        module = self.root.get_submodule(t.dest)
        layout = module.nf4_layouts[t.shard]
        params = {n: getattr(module, f"{t.shard}_{n}") for n in layout.param_shapes()}
        slot = nf4_slot(f"{t.dest}.{t.shard}", params, layout, 0, t.expert)
        self._fill(slot, t, ref)
        return {f"{t.dest}.{t.shard}_{n}" for n in params}

    def _fill(self, slot: Any, t: LogicalTensor, ref: SourceRef) -> None:
        if ref.fmt == "nf4":
            parts = read_nf4_parts(self.source, ref.key, t.shape)  # type: ignore[arg-type]
            fill_nf4_slot(slot, parts, ref.key)
            self.stats["nf4"] += 1
            return
        weight = self._dense_tensor(t, ref)
        parts = self.quantizer(weight.to(slot.qweight.device).contiguous())
        fill_nf4_slot(slot, parts, ref.key)
        self.stats["quantized"] += 1

    def _load_unquantized_linear(
        self, t: LogicalTensor, ref: SourceRef, module: nn.Module
    ) -> set[str]:
        name = f"{t.dest}.weight"
        dest = self._param(name).data
        rows = self._rows(t)
        if rows is not None:
            dest = dest.narrow(0, *rows)
        if ref.fmt == "nf4":
            parts = read_nf4_parts(self.source, ref.key, t.shape)  # type: ignore[arg-type]
            value = dequantize_nf4_cpu(
                parts.packed,
                parts.absmax,
                parts.shape,
                dest.dtype,
                parts.nested_absmax,
                parts.nested_quant_map,
                parts.nested_offset,
            )
            self.stats["dequantized"] += 1
        else:
            value = self._dense_tensor(t, ref)
            self.stats["dense"] += 1
        self._copy(dest, value, ref.key)
        return {name}

    def _load_dense(self, t: LogicalTensor, ref: SourceRef) -> set[str]:
        dest = self._param(t.dest).data
        if t.expert is not None:
            dest = dest[t.expert]
        else:
            rows = self._rows(t)
            if rows is not None:
                dest = dest.narrow(0, *rows)
        self._copy(dest, self._dense_tensor(t, ref), ref.key)
        self.stats["dense"] += 1
        return {t.dest}

    @staticmethod
    def _copy(dest: torch.Tensor, value: torch.Tensor, key: str) -> None:
        if tuple(dest.shape) != tuple(value.shape):
            raise CheckpointError(
                f"'{key}': expected shape {list(dest.shape)}, found {list(value.shape)}"
            )
        dest.copy_(value)

    def _check_covered(self, covered: set[str]) -> None:
        left = sorted(set(self.params) - covered)
        if left:
            raise RuntimeError(
                "bnb_moe loader: these model parameters were not filled from the checkpoint: "
                + ", ".join(left[:20])
                + (f" ... and {len(left) - 20} more" if len(left) > 20 else "")
            )
