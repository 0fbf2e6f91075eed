"""fp32 eager PyTorch reference for GPT-OSS attention with sinks and a sliding window.

These functions define the semantics the CUDA kernels are tested against (see
``shared/reference/gpt-oss-math.md``):

* logits ``l_j = scale * q . k_j`` over the visible keys ``j``;
* the per-head sink ``s_h`` is one extra logit that is **not** scaled, **not** masked and has
  no value vector: ``p_j = exp(l_j) / (exp(s_h) + sum_k exp(l_k))``, ``o = sum_j p_j v_j``;
* a query at absolute position ``i`` sees key ``j`` iff ``j <= i`` and, on sliding layers,
  ``j > i - sliding_window`` (itself plus ``sliding_window - 1`` earlier tokens);
* GQA: query head ``h`` uses KV head ``h // (Hq // Hkv)``.

Everything is computed in float32 (inputs are upcast) and returned as float32. They run on
any device (CPU in CI, the GPU in the GPU tests) and work on queries in chunks so that a
4,000-token prefill or a 131,072-token decode does not materialise a huge score matrix.

Paged layout (vLLM 0.26, TRITON_ATTN's logical shape): ``kv_cache`` is
``(num_blocks, num_kv_heads, block_size, 2 * head_size)`` with ``K = kv_cache[..., :hs]`` and
``V = kv_cache[..., hs:]``; token ``j`` of request ``r`` lives in block
``block_table[r, j // block_size]`` at offset ``j % block_size``. A request with ``q_len`` new
tokens and ``seq_len`` total tokens has its query ``i`` at position ``seq_len - q_len + i``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "VllmTritonAttention",
    "attention_ref",
    "gather_paged_kv",
    "kv_cache_write_ref",
    "paged_attention_ref",
    "random_paged_batch",
    "rope_cos_sin_table",
    "rope_neox_ref",
    "token_positions",
    "sink_attention_one_seq",
    "vllm_triton_available",
]


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Absolute position of every query token (int64 ``[query_start_loc[-1]]``): query ``i`` of
    request ``r`` sits at ``seq_lens[r] - q_len(r) + i``, the positions vLLM gives its rotary op."""
    qsl = query_start_loc.to(torch.int64).cpu()
    lens = seq_lens.to(torch.int64).cpu()
    out = []
    for r in range(lens.shape[0]):
        q_len = int(qsl[r + 1] - qsl[r])
        start = int(lens[r]) - q_len
        out.append(torch.arange(start, start + q_len, dtype=torch.int64))
    if not out:
        return torch.zeros(0, dtype=torch.int64, device=query_start_loc.device)
    return torch.cat(out).to(query_start_loc.device)


def rope_cos_sin_table(
    positions: int, theta: float = 150000.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A float32 ``[positions, 64]`` table in vLLM's ``cos_sin_cache`` layout (plain RoPE with
    base ``theta``, no YaRN scaling): for tests and benchmarks of the folded RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def rope_neox_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's RoPE (neox style over the whole head) of ``x [T, H, 64]`` at ``positions [T]``,
    with vLLM's ``cos_sin_cache`` layout (row ``p`` = cos of the 32 frequencies, then their sin):
    ``x_lo' = x_lo cos - x_hi sin``, ``x_hi' = x_hi cos + x_lo sin`` in fp32, returned in fp32."""
    half = x.shape[-1] // 2
    cs = cos_sin.float()[positions.long()]  # [T, 64]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    xf = x.float()
    lo, hi = xf[..., :half], xf[..., half:]
    return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1)


# Queries processed at once per sequence (bounds the [Hq, chunk, seq] fp32 score matrix).
_QUERY_CHUNK = 512


def sink_attention_one_seq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    q_positions: torch.Tensor,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Attention of one sequence's queries over its keys (positions ``0 .. len(k) - 1``).

    Args:
        q: ``[Tq, Hq, D]`` queries.
        k: ``[Tk, Hkv, D]`` keys; key ``j`` sits at position ``j``.
        v: ``[Tk, Hkv, D]`` values.
        sinks: ``[Hq]`` sink logits, or ``None`` for plain softmax.
        q_positions: ``[Tq]`` int absolute positions of the queries.
        sliding_window: ``None`` (causal) or the window size ``W`` (keys ``(i - W, i]``).
        scale: softmax scale applied to ``q . k`` (not to the sink).

    Returns:
        ``[Tq, Hq, D]`` float32.
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if hq % hkv != 0:
        raise ValueError(f"num_q_heads {hq} is not a multiple of num_kv_heads {hkv}")
    group = hq // hkv
    dev = q.device
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Tk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Tk, D]
    key_pos = torch.arange(tk, device=dev)
    out = torch.empty(tq, hq, d, dtype=torch.float32, device=dev)
    sink_col = None
    if sinks is not None:
        sink_col = sinks.float().to(dev).view(hq, 1, 1)
    for c0 in range(0, tq, _QUERY_CHUNK):
        c1 = min(c0 + _QUERY_CHUNK, tq)
        qf = q[c0:c1].float().transpose(0, 1)  # [Hq, c, D]
        logits = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, c, Tk]
        qp = q_positions[c0:c1].to(dev).view(-1, 1)
        visible = key_pos.view(1, -1) <= qp
        if sliding_window is not None:
            visible &= key_pos.view(1, -1) > qp - sliding_window
        logits = logits.masked_fill(~visible.unsqueeze(0), float("-inf"))
        if sink_col is not None:
            logits = torch.cat([logits, sink_col.expand(hq, c1 - c0, 1)], dim=-1)
        probs = torch.softmax(logits, dim=-1)
        if sink_col is not None:
            probs = probs[..., :-1]  # the sink has no value vector
        probs = torch.nan_to_num(probs, nan=0.0)  # a row with nothing visible and no sink
        out[c0:c1] = torch.matmul(probs, vf).transpose(0, 1)
    return out


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    sliding_window: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal self-attention with sinks on plain ``[T, H, D]`` tensors (fp32 result).

    ``cu_seqlens`` (``[B + 1]`` int, starting at 0) packs several sequences; without it the
    whole tensor is one sequence. Positions restart at 0 in every sequence.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    t = q.shape[0]
    bounds = [0, t] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        if e <= s:
            continue
        pos = torch.arange(e - s, device=q.device)
        out[s:e] = sink_attention_one_seq(q[s:e], k[s:e], v[s:e], sinks, pos, sliding_window, scale)
    return out


def gather_paged_kv(
    kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` K and V rows of one request: two ``[seq_len, Hkv, D]`` tensors."""
    _, hkv, bs, two_d = kv_cache.shape
    d = two_d // 2
    nblk = (seq_len + bs - 1) // bs
    blocks = block_table_row[:nblk].long().to(kv_cache.device)
    kv = kv_cache[blocks]  # [nblk, Hkv, bs, 2D]
    kv = kv.permute(0, 2, 1, 3).reshape(nblk * bs, hkv, two_d)[:seq_len]
    return kv[..., :d], kv[..., d:]


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    sinks: torch.Tensor | None,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Varlen attention over vLLM 0.26's paged KV cache (fp32 result, shape of ``q``).

    Rows of ``q`` past ``query_start_loc[-1]`` (padding) are returned as zeros.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    qsl = [int(x) for x in query_start_loc.tolist()]
    sl = [int(x) for x in seq_lens.tolist()]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for r in range(len(sl)):
        s, e = qsl[r], qsl[r + 1]
        q_len = e - s
        if q_len <= 0:
            continue
        k, v = gather_paged_kv(kv_cache, block_table[r], sl[r])
        pos = torch.arange(sl[r] - q_len, sl[r], device=q.device)
        out[s:e] = sink_attention_one_seq(q[s:e], k, v, sinks, pos, sliding_window, scale)
    return out


def kv_cache_write_ref(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes ``key``/``value`` rows into the paged cache in place; negative slots are skipped.

    Only the first ``slot_mapping.shape[0]`` rows of ``key``/``value`` are written.
    """
    _, _, bs, two_d = kv_cache.shape
    d = two_d // 2
    n = slot_mapping.shape[0]
    slots = slot_mapping.long().to(kv_cache.device)
    keep = slots >= 0
    idx = torch.nonzero(keep).flatten()
    blk = slots[idx] // bs
    off = slots[idx] % bs
    kv_cache[blk, :, off, :d] = key[:n][idx].to(kv_cache.dtype)
    kv_cache[blk, :, off, d:] = value[:n][idx].to(kv_cache.dtype)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the GPU tests and the benchmark.
# ---------------------------------------------------------------------------------------------


def random_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    generator: torch.Generator | None = None,
    nhd: bool = True,
    extra_blocks: int = 3,
    pad_tokens: int = 0,
    head_size: int = 64,
) -> dict:
    """Random queries and a random paged KV cache for a vLLM-style batch.

    Request ``r`` has ``q_lens[r]`` new tokens and ``seq_lens[r]`` tokens in the cache (so a
    decode is ``(1, ctx + 1)``, a fresh prefill ``(n, n)`` and a chunked prefill continuing a
    context ``(n, ctx + n)``). Blocks are assigned in a shuffled order; block-table entries past
    a request's blocks point at block 0, as vLLM's padding does. With ``nhd`` the cache is the
    non-contiguous logical view ``(blocks, Hkv, block_size, 2 * hs)`` of a physical
    ``(blocks, block_size, Hkv, 2 * hs)`` buffer (vLLM's default layout). ``pad_tokens`` extra
    query rows follow the real ones (padding, as with CUDA graphs).

    Returns a dict with ``query``, ``kv_cache``, ``query_start_loc``, ``seq_lens``,
    ``block_table`` (int32, on ``device``), ``max_query_len`` and ``max_seq_len``.
    """
    if len(q_lens) != len(seq_lens) or any(q > s for q, s in zip(q_lens, seq_lens, strict=True)):
        raise ValueError("need one q_len per request and q_len <= seq_len")
    blocks_per = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per) + extra_blocks + 1  # block 0 stays a padding block
    shape = (num_blocks, block_size, num_kv_heads, 2 * head_size)
    if nhd:
        phys = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
        kv_cache = phys.to(device=device, dtype=dtype).permute(0, 2, 1, 3)
    else:
        phys = torch.randn(
            (num_blocks, num_kv_heads, block_size, 2 * head_size),
            generator=generator,
            dtype=torch.float32,
            device="cpu",
        )
        kv_cache = phys.to(device=device, dtype=dtype)
    perm = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    max_blocks = max(blocks_per + [1])
    table = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
    nxt = 0
    for r, nb in enumerate(blocks_per):
        table[r, :nb] = torch.tensor(perm[nxt : nxt + nb], dtype=torch.int32)
        nxt += nb
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    t = qsl[-1] + pad_tokens
    query = torch.randn((t, num_q_heads, head_size), generator=generator, dtype=torch.float32)
    return {
        "query": query.to(device=device, dtype=dtype),
        "kv_cache": kv_cache,
        "query_start_loc": torch.tensor(qsl, dtype=torch.int32, device=device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "block_table": table.to(device),
        "max_query_len": max(q_lens + [0]),
        "max_seq_len": max(seq_lens + [0]),
    }


def vllm_triton_available() -> bool:
    """Whether vLLM's Triton ``unified_attention`` can be imported here."""
    try:
        from vllm.v1.attention.ops.triton_unified_attention import (  # noqa: F401
            unified_attention,
        )
    except Exception:
        return False
    return True


class VllmTritonAttention:
    """vLLM 0.26's TRITON_ATTN kernel (``unified_attention``) on the same paged inputs.

    Mirrors what ``TritonAttentionImpl.forward`` passes: K/V views from
    ``kv_cache.transpose(1, 2).split(hs, -1)``, ``window_size = (W - 1, 0)``, unit descales and
    the 3D (split) buffers its metadata builder preallocates (16 segments, threshold
    ``128 // Hkv`` sequences).
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, device, head_size: int = 64):
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        self._fn = unified_attention
        self.seq_threshold_3d = 128 // num_kv_heads
        self.segments = 16
        self.segm_output = torch.empty(
            (self.seq_threshold_3d, num_q_heads, self.segments, head_size),
            dtype=torch.float32,
            device=device,
        )
        self.segm_max = torch.empty(
            (self.seq_threshold_3d, num_q_heads, self.segments), dtype=torch.float32, device=device
        )
        self.segm_expsum = torch.empty_like(self.segm_max)
        self.unit = torch.ones(1, dtype=torch.float32, device=device)

    def __call__(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        output: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        sinks: torch.Tensor | None,
        max_query_len: int,
        max_seq_len: int,
        sliding_window: int | None,
        scale: float,
    ) -> torch.Tensor:
        hs = query.shape[-1]
        key_cache, value_cache = kv_cache.transpose(1, 2).split(hs, dim=-1)
        descale = self.unit.expand((seq_lens.shape[0], kv_cache.shape[1]))
        self._fn(
            q=query,
            k=key_cache,
            v=value_cache,
            out=output,
            cu_seqlens_q=query_start_loc,
            max_seqlen_q=max_query_len,
            seqused_k=seq_lens,
            max_seqlen_k=max_seq_len,
            softmax_scale=scale,
            causal=True,
            window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1),
            block_table=block_table,
            softcap=0,
            q_descale=None,
            k_descale=descale,
            v_descale=descale,
            seq_threshold_3D=self.seq_threshold_3d,
            num_par_softmax_segments=self.segments,
            softmax_segm_output=self.segm_output,
            softmax_segm_max=self.segm_max,
            softmax_segm_expsum=self.segm_expsum,
            sinks=sinks,
        )
        return output
