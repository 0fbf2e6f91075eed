"""GPT-OSS attention on the GPU: sinks, sliding window, vLLM 0.26's paged KV cache.

Torch custom ops (opaque to ``torch.compile``, safe inside CUDA-graph capture once the kernels
are loaded, e.g. by ``gptoss_3090._native.warmup(ordinal)`` or a first eager call):

* ``torch.ops.gptoss_3090.kv_cache_write(key, value, kv_cache, slot_mapping)`` writes new K/V
  rows into the paged cache (``slot < 0`` rows are skipped).
* ``torch.ops.gptoss_3090.paged_attention(query, kv_cache, output, query_start_loc, seq_lens,
  block_table, sinks, workspace, max_query_len, max_seq_len, sliding_window, scale)``: varlen
  attention over the paged cache (prefill, chunked prefill, prefix caching, decode, mixed).
* ``torch.ops.gptoss_3090.attention_varlen(q, k, v, output, cu_seqlens, seq_lens, sinks,
  workspace, max_seqlen, sliding_window, scale)``: causal attention on plain tensors.

and the notebook function :func:`attention` on plain ``[T, H, 64]`` tensors.

On CPU tensors every op falls back to the fp32 reference in
:mod:`gptoss_3090.attention_reference` (handy in notebooks and CI; slow). Semantics: the sink
of head ``h`` is one extra logit that is not scaled, not masked and has no value; a query at
position ``i`` sees keys ``j <= i`` and, with ``sliding_window = W``, only ``j > i - W``.
"""

from __future__ import annotations

import math
from typing import Optional  # noqa: UP035  (torch's schema inference wants typing.Optional)

import torch

from gptoss_3090 import _native
from gptoss_3090 import runtime as _rt
from gptoss_3090.attention_reference import (
    attention_ref,
    kv_cache_write_ref,
    paged_attention_ref,
    rope_neox_ref,
    token_positions,
)

__all__ = [
    "HEAD_DIM",
    "attention",
    "decode_splits",
    "kv_cache_write",
    "make_workspace",
    "paged_attention",
    "attention_varlen",
]

#: The only head size the kernels support.
HEAD_DIM = 64
#: Default workspace capacity in (request, split) pairs for the decode split-KV path.
DEFAULT_WORKSPACE_REQUEST_SPLITS = 512

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SINK_MODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_WORKSPACES: dict[tuple[int, int], torch.Tensor] = {}


# ---------------------------------------------------------------------------------------------
# Validation helpers (Python is the first line of defence; Rust re-checks sizes and pointers).
# ---------------------------------------------------------------------------------------------


def _dtype_name(name: str, t: torch.Tensor) -> str:
    try:
        return _DTYPE_NAMES[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: dtype must be bfloat16 or float16, found {t.dtype}") from None


def _check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_int32(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: dtype must be int32, found {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimension(s), found shape {tuple(t.shape)}")
    if dim == 1 and t.stride(0) != 1:
        raise ValueError(f"{name}: must be contiguous")
    if dim == 2 and t.stride(1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous")


def _rows_ok(t: torch.Tensor) -> bool:
    """Last dim contiguous, 16-byte aligned rows (what the kernels' 16-byte copies need)."""
    s = t.stride()
    return (
        s[-1] == 1
        and all(x % 8 == 0 for x in s[:-1])
        and t.data_ptr() % 16 == 0
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if _rows_ok(t) else t.contiguous()


def _sink_args(sinks: torch.Tensor | None, num_q_heads: int) -> tuple[int, int]:
    if sinks is None:
        return 0, 0
    if sinks.dim() != 1 or sinks.shape[0] != num_q_heads:
        raise ValueError(f"sinks: expected shape [{num_q_heads}], found {tuple(sinks.shape)}")
    if sinks.stride(0) != 1:
        raise ValueError("sinks: must be contiguous")
    try:
        mode = _SINK_MODES[sinks.dtype]
    except KeyError:
        raise TypeError(
            f"sinks: dtype must be float32, bfloat16 or float16, found {sinks.dtype}"
        ) from None
    return sinks.data_ptr(), mode


def make_workspace(
    device: torch.device | str | int,
    num_kv_heads: int,
    request_splits: int = DEFAULT_WORKSPACE_REQUEST_SPLITS,
) -> torch.Tensor:
    """A zeroed float32 split-KV workspace for ``request_splits`` (request, split) pairs.

    Its size depends only on these arguments (never on data), so one buffer allocated before
    CUDA-graph capture serves every later batch; the decode path lowers its split count so that
    ``num_reqs * splits <= request_splits``. It starts with arrival counters that must be zero
    (the kernels reset them after use), so allocate it with this function, and let only
    stream-ordered launches share it.
    """
    floats = _native.attention_workspace_floats(request_splits, num_kv_heads)
    return torch.zeros(floats, dtype=torch.float32, device=device)


def _default_workspace(device: torch.device, num_kv_heads: int) -> torch.Tensor:
    key = (device.index if device.index is not None else torch.cuda.current_device(), num_kv_heads)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = make_workspace(device, num_kv_heads)
        _WORKSPACES[key] = ws
    return ws


def decode_splits(
    device: torch.device | int,
    num_reqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    sliding_window: int | None,
    max_query_len: int,
    workspace: torch.Tensor | None,
) -> int:
    """The KV split count the decode path uses for these sizes (for tests and benchmarks)."""
    _rt.ensure_cuda_libs()
    ordinal = _rt.ordinal_of(device)
    return _native.attention_decode_splits(
        ordinal,
        num_reqs,
        num_kv_heads,
        max_seq_len,
        sliding_window,
        max_query_len,
        0 if workspace is None else workspace.numel(),
    )


# ---------------------------------------------------------------------------------------------
# Custom ops.
# ---------------------------------------------------------------------------------------------


def _check_new_rows(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> int:
    """Checks K/V rows to write into ``kv_cache`` (kv_cache_write, paged_attention's new rows);
    returns the rows to write, ``slot_mapping.shape[0]``."""
    if key.dtype != kv_cache.dtype or value.dtype != kv_cache.dtype:
        raise TypeError(
            f"key/value dtypes {key.dtype}/{value.dtype} must equal kv_cache's {kv_cache.dtype}"
        )
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key/value: expected equal [N, Hkv, 64] shapes, found {tuple(key.shape)} "
            f"and {tuple(value.shape)}"
        )
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache: expected 4 dimensions, found {tuple(kv_cache.shape)}")
    if key.shape[1] != kv_cache.shape[1]:
        raise ValueError(
            f"key has {key.shape[1]} KV heads, kv_cache {kv_cache.shape[1]} (dimension 1)"
        )
    if slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.dim() != 1:
        raise TypeError(
            f"slot_mapping: expected a 1-D int32/int64 tensor, found {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    n = slot_mapping.shape[0]
    if n > key.shape[0]:
        raise ValueError(f"slot_mapping has {n} rows but key only {key.shape[0]}")
    return n


@torch.library.custom_op("gptoss_3090::kv_cache_write", mutates_args=("kv_cache",))
def kv_cache_write(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes ``key``/``value`` ``[N(+pad), Hkv, 64]`` into the paged ``kv_cache`` in place.

    ``kv_cache`` has vLLM 0.26's logical shape ``(num_blocks, Hkv, block_size, 128)`` (any
    strides with a contiguous last dimension); ``slot_mapping`` (int32 or int64, ``[N]``) gives
    ``block * block_size + offset`` per row, and rows with a negative slot are skipped. Only the
    first ``slot_mapping.shape[0]`` rows of ``key``/``value`` are read.
    """
    if not kv_cache.is_cuda:
        kv_cache_write_ref(key, value, kv_cache, slot_mapping)
        return
    _check_same_device(kv_cache.device, key=key, value=value, slot_mapping=slot_mapping)
    dtype = _dtype_name("kv_cache", kv_cache)
    n = _check_new_rows(key, value, kv_cache, slot_mapping)
    if n == 0:
        return
    key = _rows(key)
    value = _rows(value)
    slot_mapping = slot_mapping.contiguous()
    ordinal, stream = _rt.launch_context(kv_cache.device)
    _native.attention_kv_write(
        ordinal,
        stream,
        dtype,
        key.data_ptr(),
        key.stride(),
        value.data_ptr(),
        value.stride(),
        kv_cache.data_ptr(),
        tuple(kv_cache.shape),
        kv_cache.stride(),
        slot_mapping.data_ptr(),
        slot_mapping.dtype == torch.int64,
        n,
        key.shape[1],
        key.shape[2],
    )


@kv_cache_write.register_fake
def _kv_cache_write_fake(key, value, kv_cache, slot_mapping) -> None:
    return None


@torch.library.custom_op(
    "gptoss_3090::paged_attention", mutates_args=("output", "workspace", "kv_cache")
)
def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    sinks: Optional[torch.Tensor],  # noqa: UP045
    workspace: Optional[torch.Tensor],  # noqa: UP045
    max_query_len: int,
    max_seq_len: int,
    sliding_window: Optional[int],  # noqa: UP045
    scale: float,
    key: Optional[torch.Tensor] = None,  # noqa: UP045
    value: Optional[torch.Tensor] = None,  # noqa: UP045
    slot_mapping: Optional[torch.Tensor] = None,  # noqa: UP045
    rope_cos_sin: Optional[torch.Tensor] = None,  # noqa: UP045
) -> None:
    """Attention of ``query`` ``[T, Hq, 64]`` over the paged cache, written to ``output``.

    Request ``r`` owns query rows ``query_start_loc[r] : query_start_loc[r + 1]`` and has
    ``seq_lens[r]`` tokens in the cache (context + the new ones); its query ``i`` sits at
    position ``seq_lens[r] - q_len + i``. ``block_table`` is int32 ``[num_reqs(+),
    max_blocks]``. ``max_query_len`` / ``max_seq_len`` are upper bounds (host ints; with CUDA
    graphs pass the model's maximum context for ``max_seq_len``). ``workspace`` (see
    :func:`make_workspace`) enables split-KV decode; ``None`` means one split. Rows of
    ``output`` past ``query_start_loc[-1]`` are left untouched.

    Without ``key``/``value``/``slot_mapping`` the cache must already hold the new tokens (see
    :func:`kv_cache_write`). With them (all three, as :func:`kv_cache_write` takes them) the op
    writes the new rows too: a decode-only batch (``max_query_len * Hq / Hkv <= 16``) does it
    inside the decode launch, at the slots the block table gives (vLLM builds ``slot_mapping``
    from the same table), and anything else runs :func:`kv_cache_write` first.

    ``rope_cos_sin`` (needs the new rows; vLLM's float32 ``cos_sin_cache`` ``[P, 64]`` with
    ``P >= max_seq_len``: cos of the 32 frequencies, then their sin) hands GPT-OSS's rotary
    embedding to the op: ``query`` and ``key`` arrive unrotated, and the op rotates them (neox
    style, fp32 math, rounded once) at the positions above. The decode launch does it on the
    way; other batches rotate the queries into ``output`` first and write the rotated keys into
    the cache. ``query`` and ``key`` are not modified.
    """
    new_kv = (key, value, slot_mapping)
    if any(t is not None for t in new_kv) and any(t is None for t in new_kv):
        raise ValueError("paged_attention: pass key, value and slot_mapping together, or none")
    if rope_cos_sin is not None:
        _check_rope(rope_cos_sin, key, query.device, max_seq_len)
    if not query.is_cuda:
        if rope_cos_sin is not None:
            n = int(query_start_loc[-1])
            pos = token_positions(query_start_loc, seq_lens)
            query = query.clone()
            query[:n] = rope_neox_ref(query[:n], pos, rope_cos_sin).to(query.dtype)
            key = key.clone()
            key[:n] = rope_neox_ref(key[:n], pos, rope_cos_sin).to(key.dtype)
        if key is not None:
            kv_cache_write(key, value, kv_cache, slot_mapping)
        ref = paged_attention_ref(
            query, kv_cache, query_start_loc, seq_lens, block_table, sinks, sliding_window, scale
        )
        end = int(query_start_loc[-1])
        output[:end].copy_(ref[:end].to(output.dtype))
        return
    dev = query.device
    _check_same_device(
        dev,
        kv_cache=kv_cache,
        output=output,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_table=block_table,
        sinks=sinks,
        workspace=workspace,
        key=key,
        value=value,
        slot_mapping=slot_mapping,
    )
    # (The checked tensors stay referenced until the launch: a contiguous copy must outlive it.)
    new_kv_args, _keep = (
        ({}, ()) if key is None else _new_kv_args(query, key, value, kv_cache, slot_mapping)
    )
    dtype = _dtype_name("query", query)
    if kv_cache.dtype != query.dtype or output.dtype != query.dtype:
        raise TypeError(
            f"query/kv_cache/output dtypes must match, found {query.dtype}, {kv_cache.dtype}, "
            f"{output.dtype}"
        )
    if query.dim() != 3 or output.dim() != 3 or kv_cache.dim() != 4:
        raise ValueError(
            f"expected query/output [T, H, 64] and kv_cache [blocks, Hkv, block_size, 128], "
            f"found {tuple(query.shape)}, {tuple(output.shape)}, {tuple(kv_cache.shape)}"
        )
    _check_int32("query_start_loc", query_start_loc, 1)
    _check_int32("seq_lens", seq_lens, 1)
    _check_int32("block_table", block_table, 2)
    num_reqs = seq_lens.shape[0]
    if query_start_loc.shape[0] < num_reqs + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries, expected num_reqs + 1 = "
            f"{num_reqs + 1}"
        )
    if workspace is not None and (
        workspace.dtype != torch.float32 or not workspace.is_contiguous()
    ):
        raise TypeError("workspace: expected a contiguous float32 tensor")
    sink_ptr, sink_mode = _sink_args(sinks, query.shape[1])
    query = _rows(query)
    if not _rows_ok(output):
        raise ValueError("output: last dimension must be contiguous with 16-byte aligned rows")
    ordinal, stream = _rt.launch_context(dev)
    _native.attention_forward(
        ordinal,
        stream,
        dtype,
        query.data_ptr(),
        tuple(query.shape),
        query.stride(),
        output.data_ptr(),
        tuple(output.shape),
        output.stride(),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        num_reqs,
        sink_ptr,
        sink_mode,
        0 if workspace is None else workspace.data_ptr(),
        0 if workspace is None else workspace.numel(),
        sliding_window,
        float(scale),
        int(max_query_len),
        int(max_seq_len),
        cache=kv_cache.data_ptr(),
        cache_shape=tuple(kv_cache.shape),
        cache_strides=kv_cache.stride(),
        block_table=block_table.data_ptr(),
        block_table_shape=tuple(block_table.shape),
        block_table_stride=block_table.stride(0),
        **new_kv_args,
        rope_cos_sin=0 if rope_cos_sin is None else rope_cos_sin.data_ptr(),
        rope_positions=0 if rope_cos_sin is None else rope_cos_sin.shape[0],
    )


def _check_rope(
    rope_cos_sin: torch.Tensor, key: torch.Tensor | None, device: torch.device, max_seq_len: int
) -> None:
    """Checks paged_attention's RoPE table (see its docstring)."""
    if key is None:
        raise ValueError(
            "paged_attention: rope_cos_sin needs the new K/V rows (key, value, slot_mapping)"
        )
    if rope_cos_sin.device != device:
        raise ValueError(f"rope_cos_sin is on {rope_cos_sin.device}, expected {device}")
    if rope_cos_sin.dtype != torch.float32:
        raise TypeError(f"rope_cos_sin: dtype must be float32, found {rope_cos_sin.dtype}")
    if rope_cos_sin.dim() != 2 or rope_cos_sin.shape[1] != HEAD_DIM:
        raise ValueError(
            f"rope_cos_sin: expected shape [positions, {HEAD_DIM}], found "
            f"{tuple(rope_cos_sin.shape)}"
        )
    if not rope_cos_sin.is_contiguous() or rope_cos_sin.data_ptr() % 16:
        raise ValueError("rope_cos_sin: must be contiguous and 16-byte aligned")
    if rope_cos_sin.shape[0] < max_seq_len:
        raise ValueError(
            f"rope_cos_sin has {rope_cos_sin.shape[0]} positions, fewer than max_seq_len = "
            f"{max_seq_len}"
        )


def _new_kv_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """Checks paged_attention's new K/V rows; returns attention_forward's keyword arguments and
    the tensors they point into."""
    n = _check_new_rows(key, value, kv_cache, slot_mapping)
    if n < query.shape[0]:
        raise ValueError(f"slot_mapping has {n} rows, fewer than the {query.shape[0]} queries")
    key, value, slot_mapping = _rows(key), _rows(value), slot_mapping.contiguous()
    return {
        "new_key": key.data_ptr(),
        "new_key_strides": key.stride(),
        "new_value": value.data_ptr(),
        "new_value_strides": value.stride(),
        "new_key_shape": tuple(key.shape),
        "slot_mapping": slot_mapping.data_ptr(),
        "slot_is_i64": slot_mapping.dtype == torch.int64,
        "new_rows": n,
    }, (key, value, slot_mapping)


@paged_attention.register_fake
def _paged_attention_fake(
    query,
    kv_cache,
    output,
    query_start_loc,
    seq_lens,
    block_table,
    sinks,
    workspace,
    max_query_len,
    max_seq_len,
    sliding_window,
    scale,
    key=None,
    value=None,
    slot_mapping=None,
    rope_cos_sin=None,
) -> None:
    return None


@torch.library.custom_op(
    "gptoss_3090::attention_varlen", mutates_args=("output", "workspace")
)
def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    output: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: Optional[torch.Tensor],  # noqa: UP045
    workspace: Optional[torch.Tensor],  # noqa: UP045
    max_seqlen: int,
    sliding_window: Optional[int],  # noqa: UP045
    scale: float,
) -> None:
    """Causal self-attention with sinks on plain tensors: ``q [T, Hq, 64]``, ``k/v [T, Hkv,
    64]``, sequences packed by int32 ``cu_seqlens`` ``[B + 1]`` with ``seq_lens = diff``."""
    if not q.is_cuda:
        ref = attention_ref(q, k, v, sinks, sliding_window, scale, cu_seqlens)
        output.copy_(ref.to(output.dtype))
        return
    dev = q.device
    _check_same_device(
        dev, k=k, v=v, output=output, cu_seqlens=cu_seqlens, seq_lens=seq_lens, sinks=sinks,
        workspace=workspace,
    )
    dtype = _dtype_name("q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype or output.dtype != q.dtype:
        raise TypeError("q, k, v and output must have the same dtype")
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"expected q [T, Hq, 64] and k, v [T, Hkv, 64], found {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_int32("cu_seqlens", cu_seqlens, 1)
    _check_int32("seq_lens", seq_lens, 1)
    sink_ptr, sink_mode = _sink_args(sinks, q.shape[1])
    q = _rows(q)
    k = _rows(k)
    v = _rows(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    if not _rows_ok(output):
        raise ValueError("output: last dimension must be contiguous with 16-byte aligned rows")
    ordinal, stream = _rt.launch_context(dev)
    _native.attention_forward(
        ordinal,
        stream,
        dtype,
        q.data_ptr(),
        tuple(q.shape),
        q.stride(),
        output.data_ptr(),
        tuple(output.shape),
        output.stride(),
        cu_seqlens.data_ptr(),
        seq_lens.data_ptr(),
        seq_lens.shape[0],
        sink_ptr,
        sink_mode,
        0 if workspace is None else workspace.data_ptr(),
        0 if workspace is None else workspace.numel(),
        sliding_window,
        float(scale),
        int(max_seqlen),
        int(max_seqlen),
        k=k.data_ptr(),
        k_shape=tuple(k.shape),
        k_strides=k.stride(),
        v=v.data_ptr(),
        v_strides=v.stride(),
    )


@attention_varlen.register_fake
def _attention_varlen_fake(
    q, k, v, output, cu_seqlens, seq_lens, sinks, workspace, max_seqlen, sliding_window, scale
) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Notebook API.
# ---------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    sliding_window: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GPT-OSS attention with sinks on plain (non-paged) tensors.

    Args:
        q: ``[T, Hq, 64]`` queries (bf16 or fp16; CUDA, or CPU for the slow fp32 reference).
        k: ``[T, Hkv, 64]`` keys; ``Hq`` must be a power-of-two multiple (<= 16) of ``Hkv``
            (query head ``h`` uses KV head ``h // (Hq // Hkv)``).
        v: ``[T, Hkv, 64]`` values.
        sinks: ``[Hq]`` sink logits (float32, bf16 or fp16), or ``None`` for plain softmax.
        sliding_window: ``None`` for causal attention, or ``W``: position ``i`` sees keys
            ``i - W < j <= i`` (GPT-OSS sliding layers use 128).
        scale: softmax scale; default ``1 / sqrt(64) = 0.125``.
        cu_seqlens: optional int ``[B + 1]`` offsets packing several sequences into ``T``;
            positions restart at 0 in each.
        max_seqlen: the longest sequence (avoids a device sync when ``cu_seqlens`` is given).
        out: optional ``[T, Hq, 64]`` output buffer.

    Returns:
        ``[T, Hq, 64]`` in ``q``'s dtype.
    """
    if q.dim() != 3 or q.shape[-1] != HEAD_DIM:
        raise ValueError(f"q: expected [T, Hq, {HEAD_DIM}], found {tuple(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    t = q.shape[0]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, t], dtype=torch.int32, device=q.device)
        if max_seqlen is None:
            max_seqlen = t
    else:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).contiguous()
    if max_seqlen is None:
        max_seqlen = int(seq_lens.max()) if seq_lens.numel() else 0
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    workspace = _default_workspace(q.device, k.shape[1]) if q.is_cuda else None
    torch.ops.gptoss_3090.attention_varlen(
        q, k, v, out, cu_seqlens, seq_lens, sinks, workspace, max_seqlen, sliding_window, scale
    )
    return out
