"""vLLM 0.26 attention backend for GPT-OSS: learned sinks + sliding window on sm_80+.

``GptOssSinkAttentionBackend`` is registered by the plugin under
``AttentionBackendEnum.CUSTOM`` (dotted path
``gptoss_3090.vllm.attention_backend.GptOssSinkAttentionBackend``) and runs the package's own
CUDA kernels (``gptoss_3090.attention``):

* KV-cache layout: the same logical shape as TRITON_ATTN, ``(num_blocks, num_kv_heads,
  block_size, 2 * head_size)`` with ``K = [..., :hs]`` and ``V = [..., hs:]``, and the same
  physical stride order (``VLLM_KV_CACHE_LAYOUT``, NHD by default); block sizes that are
  multiples of 16.
* ``forward_includes_kv_cache_update = True``: :meth:`GptOssSinkAttentionImpl.forward` writes
  the new K/V rows itself. In a decode-only batch (every captured decode graph) the decode
  kernel does it in the same launch, one kernel per layer instead of two; other batches write
  first (``attn_kv_write``). ``GPTOSS_3090_ATTN_KV_WRITE=separate`` (read at import) restores
  vLLM's separate ``do_kv_cache_update`` call, for comparison.
* CUDA graphs: ``UNIFORM_SINGLE_TOKEN_DECODE`` (pure decode batches are captured in full; the
  decode grid depends only on the request count, never on sequence lengths). Mixed batches run
  eagerly between piecewise graphs.
* Supports head size 64, bf16/fp16 (KV cache in the model dtype), sinks, sliding window, decoder
  self-attention, compute capability 8.0 and newer, and ``num_heads / num_kv_heads`` a power of
  two up to 16 (GPT-OSS: 64 / 8). :meth:`GptOssSinkAttentionBackend.unsupported_reason` names
  the first unsupported property of a configuration, so the plugin can fall back to
  TRITON_ATTN with a clear log line.

This module imports vLLM at import time; import it only where vLLM is installed (the plugin
registers it by dotted path, so vLLM imports it lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

try:
    from vllm.logger import init_logger
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionLayer,
        AttentionMetadataBuilder,
        AttentionType,
        CommonAttentionMetadata,
        MultipleOf,
    )
    from vllm.v1.attention.backends.utils import get_kv_cache_layout
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "gptoss_3090.vllm.attention_backend needs vLLM 0.26 (pip install 'gptoss-3090[vllm]')"
    ) from exc

from gptoss_3090 import _native
from gptoss_3090 import attention as _attn

logger = init_logger(__name__)

__all__ = [
    "GptOssSinkAttentionBackend",
    "GptOssSinkAttentionImpl",
    "GptOssSinkAttentionMetadata",
    "GptOssSinkAttentionMetadataBuilder",
]

_HEAD_SIZE = _attn.HEAD_DIM

#: ``fused`` (default): forward writes the new K/V rows (in the decode launch where it can);
#: ``separate``: vLLM calls do_kv_cache_update before forward. Read once, at import: vLLM reads
#: the backend's ``forward_includes_kv_cache_update`` class attribute.
KV_WRITE_ENV = "GPTOSS_3090_ATTN_KV_WRITE"


def _fold_kv_write() -> bool:
    mode = os.environ.get(KV_WRITE_ENV, "fused").strip() or "fused"
    if mode not in ("fused", "separate"):
        raise ValueError(f"{KV_WRITE_ENV}={mode!r}: expected fused (default) or separate")
    return mode == "fused"


_FOLD_KV_WRITE = _fold_kv_write()

#: ``fold`` (default): GPT-OSS's rotary embedding runs inside our attention op (the decode
#: launch rotates q and the new keys on the way; other batches in one launch before the
#: attention), so the model's two per-layer RoPE kernels go; ``vllm``: vLLM's rotary op as
#: before. Needs the folded KV write. Read at import.
ROPE_ENV = "GPTOSS_3090_ATTN_ROPE"


def _fold_rope() -> bool:
    mode = os.environ.get(ROPE_ENV, "fold").strip() or "fold"
    if mode not in ("fold", "vllm"):
        raise ValueError(f"{ROPE_ENV}={mode!r}: expected fold (default) or vllm")
    return mode == "fold" and _FOLD_KV_WRITE


_FOLD_ROPE = _fold_rope()

#: Fewest keys one decode split takes at run time (a multiple of 16, 16-4096; unset or ``auto``:
#: the kernel default, 256). Shorter contexts fill fewer splits; a longer floor trades the
#: split merge for a longer serial pass per CTA. Applied when the first metadata builder is made,
#: before any graph is captured (captured graphs keep the value as a launch parameter).
MIN_KEYS_ENV = "GPTOSS_3090_ATTN_MIN_KEYS"


def _run_min_keys() -> int | None:
    """``MIN_KEYS_ENV`` as an integer (``None``: unset or ``auto``). The range is the kernel
    side's to check (``_apply_run_min_keys``), so that it is written once."""
    raw = os.environ.get(MIN_KEYS_ENV, "").strip()
    if raw in ("", "auto"):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{MIN_KEYS_ENV}={raw!r}: expected auto or a multiple of 16 in 16..4096"
        ) from None


def _apply_run_min_keys() -> None:
    """Hands ``MIN_KEYS_ENV`` to the launches; an out-of-range value raises ValueError naming
    the variable (the range is checked in src/ops/attention.rs)."""
    keys = _run_min_keys()
    try:
        _native.attention_set_run_min_keys(keys)
    except ValueError as e:
        raise ValueError(f"{MIN_KEYS_ENV}={keys}: {e}") from None


_CACHE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GptOssSinkAttentionMetadata:
    """Per-batch metadata of one KV-cache group (vLLM's ``CommonAttentionMetadata`` subset)."""

    num_actual_tokens: int
    """Query rows to process (vLLM pads the batch past this with CUDA graphs)."""
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    """Upper bound of ``seq_lens``: the model's maximum when capturing a CUDA graph, so the
    decode split count suits every context a replay may see."""
    query_start_loc: torch.Tensor
    """int32 ``[num_reqs + 1]``."""
    seq_lens: torch.Tensor
    """int32 ``[num_reqs]``: context plus new tokens."""
    block_table: torch.Tensor
    """int32 ``[num_reqs, max_blocks]``."""
    slot_mapping: torch.Tensor
    workspace: torch.Tensor
    """float32 split-KV workspace, allocated once per builder (CUDA-graph safe)."""
    causal: bool = True


class GptOssSinkAttentionMetadataBuilder(
    AttentionMetadataBuilder[GptOssSinkAttentionMetadata]
):
    """Builds :class:`GptOssSinkAttentionMetadata`; owns the split-KV workspace."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        _apply_run_min_keys()
        # Sized by constants only (never by data): one buffer serves every batch and every
        # captured graph; the decode path lowers its split count to fit.
        self.workspace = _attn.make_workspace(device, self.num_kv_heads)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> GptOssSinkAttentionMetadata:
        """Wraps the common metadata (no device work, no host sync)."""
        cm = common_attn_metadata
        return GptOssSinkAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_reqs=cm.num_reqs,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            workspace=self.workspace,
            causal=bool(cm.causal) if isinstance(cm.causal, bool) else True,
        )

    def build_for_cudagraph_capture(
        self, common_attn_metadata: CommonAttentionMetadata
    ) -> GptOssSinkAttentionMetadata:
        """Metadata for capture: split count chosen for the longest context, short dummy
        sequences (like TRITON_ATTN, so the warm-up run before capture stays cheap)."""
        md = self.build(0, common_attn_metadata)
        md.max_seq_len = max(md.max_seq_len, self.max_model_len)
        md.seq_lens.fill_(1)
        return md


class GptOssSinkAttentionImpl(AttentionImpl[GptOssSinkAttentionMetadata]):
    """Attention with sinks + sliding window through the package's CUDA kernels."""

    supports_dcp: bool = False

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra: object,
    ) -> None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        reason = GptOssSinkAttentionBackend.unsupported_reason(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            kv_cache_dtype=kv_cache_dtype,
            attn_type=attn_type,
            alibi=alibi_slopes is not None,
            logits_soft_cap=logits_soft_cap,
        )
        if reason is not None:
            raise ValueError(f"GptOssSinkAttentionBackend: {reason}")
        if extra.get("use_alibi_sqrt"):
            raise ValueError("GptOssSinkAttentionBackend: ALiBi is not supported")
        if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != num_heads):
            raise ValueError(
                f"GptOssSinkAttentionBackend: sinks must have shape [{num_heads}], found "
                f"{tuple(sinks.shape)}"
            )
        if sliding_window is not None and sliding_window <= 0:
            sliding_window = None
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sinks = sinks
        self.alibi_slopes = None
        self.logits_soft_cap = 0
        self._rotary: torch.nn.Module | None = None
        self._rope_table: torch.Tensor | None = None

    def take_rotary_embedding(self, rotary_emb: torch.nn.Module) -> bool:
        """Makes :meth:`forward` apply ``rotary_emb`` (vLLM's GPT-OSS RoPE module: neox style
        over all 64 dims) to the queries and new keys, which then arrive unrotated. Returns
        False, changing nothing, where that cannot be done (``GPTOSS_3090_ATTN_ROPE=vllm``, the
        separate KV write, another RoPE shape); the caller then keeps vLLM's rotary op."""
        if not _FOLD_ROPE or self.kv_sharing_target_layer_name is not None:
            return False
        if (
            getattr(rotary_emb, "head_size", None) != _HEAD_SIZE
            or getattr(rotary_emb, "rotary_dim", None) != _HEAD_SIZE
            or getattr(rotary_emb, "is_neox_style", None) is not True
            or getattr(rotary_emb, "cos_sin_cache", None) is None
        ):
            return False
        self._rotary = rotary_emb
        self._rope_table = None
        return True

    def _rope_cos_sin(self, device: torch.device) -> torch.Tensor:
        """vLLM's float32 cos/sin table on ``device`` (the module's own buffer where it is
        already float32 there; computed again in float32 if vLLM rounded it)."""
        table = self._rope_table
        if table is None or table.device != device:
            rotary = self._rotary
            assert rotary is not None
            cache = rotary.cos_sin_cache
            if cache.dtype != torch.float32:
                cache = rotary._compute_cos_sin_cache()
            table = cache.to(device=device, dtype=torch.float32).contiguous()
            self._rope_table = table
        return table

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Writes the new K/V rows into the paged cache (``slot < 0``: padding, skipped). vLLM
        calls it only with ``GPTOSS_3090_ATTN_KV_WRITE=separate``; by default forward writes."""
        if self.kv_sharing_target_layer_name is not None or key is None or value is None:
            return
        if kv_cache.numel() == 0:
            return
        torch.ops.gptoss_3090.kv_cache_write(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: GptOssSinkAttentionMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query [T, Hq, 64]`` over the cache into ``output [T, Hq, 64]`` (rows past
        ``num_actual_tokens`` are left untouched)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                "GptOssSinkAttentionBackend does not fuse output quantization"
            )
        if attn_metadata is None:
            return output.fill_(0)  # profiling / dummy run
        n = attn_metadata.num_actual_tokens
        # With the folded write (forward_includes_kv_cache_update) the op writes the new rows.
        writes = (
            _FOLD_KV_WRITE
            and self.kv_sharing_target_layer_name is None
            and key is not None
            and value is not None
            and kv_cache.numel() > 0
        )
        rope = None
        if self._rotary is not None:
            if not writes:
                raise RuntimeError(
                    "GptOssSinkAttentionImpl: the rotary embedding was handed to the attention, "
                    "which then needs the new K/V rows"
                )
            rope = self._rope_cos_sin(query.device)
        torch.ops.gptoss_3090.paged_attention(
            query[:n],
            kv_cache,
            output[:n],
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            attn_metadata.block_table,
            self.sinks,
            attn_metadata.workspace,
            attn_metadata.max_query_len,
            attn_metadata.max_seq_len,
            self.sliding_window,
            self.scale,
            key if writes else None,
            value if writes else None,
            attn_metadata.slot_mapping if writes else None,
            rope,
        )
        return output


class GptOssSinkAttentionBackend(AttentionBackend):
    """GPT-OSS attention (sinks, sliding window) on sm_80+ through gptoss-3090's kernels."""

    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = _FOLD_KV_WRITE

    @staticmethod
    def get_name() -> str:
        """The ``AttentionBackendEnum`` member this backend is registered under."""
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[GptOssSinkAttentionImpl]:
        return GptOssSinkAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[GptOssSinkAttentionMetadataBuilder]:
        return GptOssSinkAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size % 16 == 0

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        """TRITON_ATTN's logical shape ``(num_blocks, Hkv, block_size, 2 * head_size)``."""
        if block_size % 16 != 0:
            raise ValueError(f"Block size must be a multiple of 16, got {block_size}.")
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(
        include_num_layers_dimension: bool = False,
    ) -> tuple[int, ...]:
        """Physical order as TRITON_ATTN (NHD by default); the kernels take any strides."""
        layout = get_kv_cache_layout()
        if layout == "NHD":
            return (1, 0, 3, 2, 4) if include_num_layers_dimension else (0, 2, 1, 3)
        if layout == "HND":
            return (1, 2, 0, 3, 4) if include_num_layers_dimension else (0, 1, 2, 3)
        raise ValueError(f"Unknown cache layout: {layout}")

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [_HEAD_SIZE]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size == _HEAD_SIZE

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability is not None and capability.major >= 8

    @classmethod
    def supports_combination(
        cls,
        head_size,
        dtype,
        kv_cache_dtype,
        block_size,
        use_mla,
        has_sink,
        use_sparse,
        use_mm_prefix,
        device_capability,
    ) -> str | None:
        cache_dtype = _CACHE_DTYPES.get(kv_cache_dtype or "auto")
        if cache_dtype is not None and cache_dtype != dtype:
            return f"kv cache dtype {kv_cache_dtype} differs from the model dtype {dtype}"
        return None

    @classmethod
    def unsupported_reason(
        cls,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype | None = None,
        kv_cache_dtype: str | None = "auto",
        block_size: int | None = None,
        attn_type: str = AttentionType.DECODER,
        compute_capability: tuple[int, int] | None = None,
        alibi: bool = False,
        logits_soft_cap: float | None = None,
    ) -> str | None:
        """Why this configuration cannot use the backend, or ``None`` if it can.

        The plugin calls this before handing the backend to a layer and falls back to
        TRITON_ATTN (logging the reason) when it returns a string.
        """
        if head_size != _HEAD_SIZE:
            return f"head size {head_size} (only {_HEAD_SIZE} is supported)"
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            return f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        group = num_heads // num_kv_heads
        if group & (group - 1) or group > 16:
            return f"{group} query heads per KV head (needs a power of two <= 16)"
        if dtype is not None and dtype not in cls.supported_dtypes:
            return f"dtype {dtype} (needs bfloat16 or float16)"
        if kv_cache_dtype not in (None, *_CACHE_DTYPES):
            return f"kv cache dtype {kv_cache_dtype} (needs auto, bfloat16 or float16)"
        cache_dtype = _CACHE_DTYPES.get(kv_cache_dtype or "auto")
        if dtype is not None and cache_dtype is not None and cache_dtype != dtype:
            return f"kv cache dtype {kv_cache_dtype} differs from the model dtype {dtype}"
        if block_size is not None and block_size % 16 != 0:
            return f"block size {block_size} (needs a multiple of 16)"
        if attn_type != AttentionType.DECODER:
            return f"attention type {attn_type} (decoder self-attention only)"
        if compute_capability is not None and tuple(compute_capability) < (8, 0):
            major, minor = compute_capability
            return f"compute capability {major}.{minor} (needs 8.0 or newer)"
        if alibi:
            return "ALiBi slopes are not supported"
        if logits_soft_cap:
            return "logits soft-capping is not supported"
        return None
