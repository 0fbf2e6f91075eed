"""CPU tests of the attention reference (sinks + sliding window, plain and paged).

The reference in ``gptoss_3090.attention_reference`` is what the GPU kernels are judged by, so it
is itself checked here against an independent float64 formula written with explicit loops,
straight from the GPT-OSS definition ``p_j = exp(l_j) / (exp(s_h) + sum_k exp(l_k))``. The
split-KV combine math used by the decode kernel is checked the same way, and the vLLM backend's
static contract is checked when vLLM is importable.
"""

from __future__ import annotations

import math

import pytest
import torch
from gptoss_3090.attention_reference import (
    attention_ref,
    gather_paged_kv,
    kv_cache_write_ref,
    paged_attention_ref,
    rope_cos_sin_table,
    rope_neox_ref,
    token_positions,
)


def naive_attention(q, k, v, sinks, q_pos, window, scale):
    """Independent float64 formula: explicit loops over queries/heads, explicit sink term."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = torch.zeros(tq, hq, d, dtype=torch.float64)
    for i in range(tq):
        p = int(q_pos[i])
        lo = 0 if window is None else max(0, p - window + 1)
        keys = list(range(lo, p + 1))
        for h in range(hq):
            kh = h // group
            logits = [scale * float(torch.dot(q64[i, h], k64[j, kh])) for j in keys]
            sink = None if sinks is None else float(sinks[h])
            mx = max(logits + ([sink] if sink is not None else []))
            den = sum(math.exp(x - mx) for x in logits)
            if sink is not None:
                den += math.exp(sink - mx)
            acc = torch.zeros(d, dtype=torch.float64)
            for x, j in zip(logits, keys, strict=True):
                acc += math.exp(x - mx) / den * v64[j, kh]
            out[i, h] = acc
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def make_sinks(hq, kind, gen):
    if kind == "none":
        return None
    if kind == "large":
        return torch.full((hq,), 20.0) + torch.rand(hq, generator=gen)
    if kind == "small":
        return torch.full((hq,), -20.0) - torch.rand(hq, generator=gen)
    return torch.randn(hq, generator=gen) * 2.0


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("sink_kind", ["none", "random", "large", "small"])
def test_plain_reference_matches_naive(window, sink_kind):
    gen = torch.Generator().manual_seed(1234 + (window or 0) + len(sink_kind))
    hq, hkv, d = 8, 2, 16
    lens = [1, 7, 13]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    t = int(cu[-1])
    q = torch.randn(t, hq, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen)
    v = torch.randn(t, hkv, d, generator=gen)
    sinks = make_sinks(hq, sink_kind, gen)
    scale = 0.3
    got = attention_ref(q, k, v, sinks, sliding_window=window, scale=scale, cu_seqlens=cu)
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        want = naive_attention(q[s:e], k[s:e], v[s:e], sinks, range(e - s), window, scale)
        assert rel_err(got[s:e], want) < 1e-5, (b, rel_err(got[s:e], want))


def test_large_sink_shrinks_output_and_small_sink_vanishes():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(9, 4, 8, generator=gen)
    k = torch.randn(9, 1, 8, generator=gen)
    v = torch.randn(9, 1, 8, generator=gen)
    no_sink = attention_ref(q, k, v, None)
    small = attention_ref(q, k, v, torch.full((4,), -30.0))
    large = attention_ref(q, k, v, torch.full((4,), 30.0))
    assert rel_err(small, no_sink) < 1e-6
    assert float(large.abs().max()) < 1e-6


def test_window_one_keeps_only_the_diagonal():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(6, 2, 8, generator=gen)
    k = torch.randn(6, 2, 8, generator=gen)
    v = torch.randn(6, 2, 8, generator=gen)
    out = attention_ref(q, k, v, None, sliding_window=1)
    assert rel_err(out, v.float()) < 1e-6


def build_paged(seq_k, seq_v, hkv, d, block_size, num_blocks, gen, nhd=True):
    """A paged cache holding the given per-request K/V, with shuffled block ids.

    With ``nhd`` the cache is the non-contiguous logical view of a physical
    ``(blocks, block_size, heads, 2d)`` buffer, as vLLM hands it to the backend.
    """
    if nhd:
        phys = torch.randn(num_blocks, block_size, hkv, 2 * d, generator=gen)
        cache = phys.permute(0, 2, 1, 3)
    else:
        cache = torch.randn(num_blocks, hkv, block_size, 2 * d, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max((len(x) + block_size - 1) // block_size for x in seq_k) + 2
    table = torch.full((len(seq_k), max_blocks), 10**6, dtype=torch.int32)  # junk past the end
    nxt = 0
    for r, (kr, vr) in enumerate(zip(seq_k, seq_v, strict=True)):
        n = kr.shape[0]
        nb = (n + block_size - 1) // block_size
        for b in range(nb):
            blk = int(perm[nxt])
            nxt += 1
            table[r, b] = blk
            rows = slice(b * block_size, min(n, (b + 1) * block_size))
            cnt = rows.stop - rows.start
            cache[blk, :, :cnt, :d] = kr[rows].transpose(0, 1)
            cache[blk, :, :cnt, d:] = vr[rows].transpose(0, 1)
    return cache, table


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 4])
def test_paged_reference_matches_naive(block_size, window):
    gen = torch.Generator().manual_seed(block_size + (window or 0))
    hq, hkv, d = 4, 2, 8
    # (q_len, seq_len): decode, full prefill, chunked prefill continuing a context, empty request.
    reqs = [(1, 40), (5, 5), (3, 37), (0, 9), (2, 2)]
    seq_k = [torch.randn(s, hkv, d, generator=gen) for _, s in reqs]
    seq_v = [torch.randn(s, hkv, d, generator=gen) for _, s in reqs]
    cache, table = build_paged(seq_k, seq_v, hkv, d, block_size, 16, gen)
    q_lens = torch.tensor([x for x, _ in reqs])
    qsl = torch.tensor([0, *q_lens.cumsum(0).tolist()], dtype=torch.int32)
    t = int(qsl[-1])
    q = torch.randn(t + 3, hq, d, generator=gen)  # 3 padding rows
    sinks = torch.randn(hq, generator=gen)
    seq_lens = torch.tensor([s for _, s in reqs], dtype=torch.int32)
    got = paged_attention_ref(q, cache, qsl, seq_lens, table, sinks, window, scale=0.125)
    for r, (ql, sl) in enumerate(reqs):
        s = int(qsl[r])
        if ql == 0:
            continue
        pos = range(sl - ql, sl)
        want = naive_attention(q[s : s + ql], seq_k[r], seq_v[r], sinks, pos, window, 0.125)
        assert rel_err(got[s : s + ql], want) < 1e-5
    assert float(got[t:].abs().max()) == 0.0


@pytest.mark.parametrize("nhd", [True, False])
def test_kv_cache_write_ref_round_trip(nhd):
    gen = torch.Generator().manual_seed(11)
    hkv, d, bs, nb = 2, 8, 16, 6
    if nhd:
        cache = torch.zeros(nb, bs, hkv, 2 * d).permute(0, 2, 1, 3)
    else:
        cache = torch.zeros(nb, hkv, bs, 2 * d)
    n = 20
    key = torch.randn(n + 2, hkv, d, generator=gen)  # 2 trailing rows beyond slot_mapping
    value = torch.randn(n + 2, hkv, d, generator=gen)
    slots = torch.randperm(nb * bs, generator=gen)[:n].long()
    slots[3] = -1
    slots[11] = -1
    kv_cache_write_ref(key, value, cache, slots)
    for i in range(n):
        s = int(slots[i])
        if s < 0:
            continue
        assert torch.equal(cache[s // bs, :, s % bs, :d], key[i])
        assert torch.equal(cache[s // bs, :, s % bs, d:], value[i])
    written = int((slots >= 0).sum())
    assert int((cache.abs().sum(-1) != 0).sum()) == written * hkv


def test_gather_paged_kv_order():
    gen = torch.Generator().manual_seed(12)
    k = torch.randn(21, 2, 4, generator=gen)
    v = torch.randn(21, 2, 4, generator=gen)
    cache, table = build_paged([k], [v], 2, 4, 16, 5, gen)
    gk, gv = gather_paged_kv(cache, table[0], 21)
    assert torch.equal(gk, k) and torch.equal(gv, v)


def test_split_combine_math_equals_full_softmax():
    """The decode kernel's split-KV algebra (log2 domain, sink only in the combine)."""
    gen = torch.Generator().manual_seed(13)
    n, d = 300, 8
    logits = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    vals = torch.randn(n, d, generator=gen, dtype=torch.float64)
    sink = 2.5
    with_sink = torch.cat([logits, torch.tensor([sink], dtype=torch.float64)])
    full = torch.softmax(with_sink, 0)[:-1] @ vals
    log2e = 1.0 / math.log(2.0)
    parts = []
    for chunk in torch.split(torch.arange(n), 64):
        x = logits[chunk] * log2e
        m = float(x.max())
        p = torch.pow(2.0, x - m)
        parts.append((m, float(p.sum()), p @ vals[chunk]))
    parts.append((float("-inf"), 0.0, torch.zeros(d, dtype=torch.float64)))  # an empty split
    s2 = sink * log2e
    big_m = max([s2] + [m for m, lsum, _ in parts if lsum > 0])
    den = 2.0 ** (s2 - big_m) + sum(lsum * 2.0 ** (m - big_m) for m, lsum, _ in parts if lsum > 0)
    acc = sum(a * 2.0 ** (m - big_m) for m, lsum, a in parts if lsum > 0)
    assert rel_err(acc / den, full) < 1e-12


# ---------------------------------------------------------------------------------------------
# vLLM backend static contract (only where vLLM 0.26 is importable).
# ---------------------------------------------------------------------------------------------


def _backend():
    pytest.importorskip("vllm")
    from gptoss_3090.vllm.attention_backend import GptOssSinkAttentionBackend

    return GptOssSinkAttentionBackend


def test_rope_ref_matches_vllm_rotary():
    """rope_neox_ref (what the kernels' RoPE is judged by) is vLLM's own neox RoPE
    (``RotaryEmbedding.forward_static``, the code torch.compile turns into the model's RoPE
    kernels) on the same table and positions."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    gen = torch.Generator().manual_seed(5)
    table = rope_cos_sin_table(4096)
    pos = torch.randint(0, 4096, (9,), generator=gen)
    q = torch.randn(9, 4 * 64, generator=gen)
    k = torch.randn(9, 2 * 64, generator=gen)
    q_v, k_v = RotaryEmbedding.forward_static(pos, q.clone(), k.clone(), 64, 64, table, True)
    assert torch.equal(rope_neox_ref(q.view(9, 4, 64), pos, table).reshape(9, -1), q_v)
    assert torch.equal(rope_neox_ref(k.view(9, 2, 64), pos, table).reshape(9, -1), k_v)


def test_token_positions():
    qsl = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32)
    lens = torch.tensor([10, 3, 7, 2], dtype=torch.int32)
    assert token_positions(qsl, lens).tolist() == [9, 0, 1, 2, 0, 1]


def test_paged_attention_rope_on_cpu():
    """paged_attention with ``rope_cos_sin`` on unrotated q/k (the CPU fallback) equals RoPE
    applied first, and leaves its inputs unchanged; its argument errors name the problem."""
    from gptoss_3090 import attention as A

    gen = torch.Generator().manual_seed(8)
    hq, hkv, d, bs = 4, 2, 64, 16
    table = rope_cos_sin_table(64)
    kv = torch.zeros(4, hkv, bs, 2 * d)
    bt = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 4], dtype=torch.int32)
    lens = torch.tensor([20, 3], dtype=torch.int32)
    old = torch.randn(19, hkv, d, generator=gen)
    old_slots = torch.tensor([int(bt[0, j // bs]) * bs + j % bs for j in range(19)])
    A.kv_cache_write(old, old, kv, old_slots)
    q = torch.randn(4, hq, d, generator=gen)
    k = torch.randn(4, hkv, d, generator=gen)
    v = torch.randn(4, hkv, d, generator=gen)
    slots = torch.tensor([int(bt[0, 1]) * bs + 3, 3 * bs, 3 * bs + 1, 3 * bs + 2])
    pos = token_positions(qsl, lens)
    assert pos.tolist() == [19, 0, 1, 2]
    want_kv = kv.clone()
    kr, qr = rope_neox_ref(k, pos, table), rope_neox_ref(q, pos, table)
    A.kv_cache_write(kr, v, want_kv, slots)
    want = paged_attention_ref(qr, want_kv, qsl, lens, bt, None, None, 0.125)
    q0, k0 = q.clone(), k.clone()
    out = torch.zeros_like(q)
    args = (q, kv, out, qsl, lens, bt, None, None, 3, 20, None, 0.125)
    torch.ops.gptoss_3090.paged_attention(*args, k, v, slots, table)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert torch.equal(kv, want_kv)
    assert rel_err(out, want) < 1e-6
    with pytest.raises(ValueError, match="needs the new K/V rows"):
        torch.ops.gptoss_3090.paged_attention(*args, None, None, None, table)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.gptoss_3090.paged_attention(*args, k, v, slots, table.double())
    with pytest.raises(ValueError, match="fewer than max_seq_len"):
        torch.ops.gptoss_3090.paged_attention(*args, k, v, slots, table[:19])
    with pytest.raises(ValueError, match="shape"):
        torch.ops.gptoss_3090.paged_attention(*args, k, v, slots, table[:, :32])


def test_backend_static_contract():
    backend = _backend()
    from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport

    assert issubclass(backend, AttentionBackend)
    assert backend.get_name() == "CUSTOM"
    # forward writes the new K/V rows (folded into the decode launch where it can).
    assert backend.forward_includes_kv_cache_update is True
    assert backend.get_kv_cache_shape(10, 16, 8, 64) == (10, 8, 16, 128)
    with pytest.raises(ValueError):
        backend.get_kv_cache_shape(10, 8, 8, 64)
    assert backend.supports_sink()
    assert backend.supports_head_size(64) and not backend.supports_head_size(128)
    assert torch.bfloat16 in backend.supported_dtypes and torch.float16 in backend.supported_dtypes
    builder = backend.get_builder_cls()
    assert builder._cudagraph_support.value >= AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE.value
    impl_cls = backend.get_impl_cls()
    assert hasattr(impl_cls, "do_kv_cache_update") and hasattr(impl_cls, "forward")


def test_backend_kv_write_setting(monkeypatch):
    """``GPTOSS_3090_ATTN_KV_WRITE``: ``fused`` (default) or ``separate``; anything else names
    the variable."""
    _backend()
    from gptoss_3090.vllm import attention_backend as AB

    monkeypatch.delenv(AB.KV_WRITE_ENV, raising=False)
    assert AB._fold_kv_write() is True
    monkeypatch.setenv(AB.KV_WRITE_ENV, "separate")
    assert AB._fold_kv_write() is False
    monkeypatch.setenv(AB.KV_WRITE_ENV, "later")
    with pytest.raises(ValueError, match=AB.KV_WRITE_ENV):
        AB._fold_kv_write()


def test_backend_min_keys_setting(monkeypatch):
    """``GPTOSS_3090_ATTN_MIN_KEYS``: unset or ``auto`` keeps the kernel default; a multiple of
    16 in 16..4096 reaches the launches when the metadata builder is made (before capture),
    without touching the benchmark overrides; anything else names the variable."""
    backend = _backend()
    from types import SimpleNamespace

    from gptoss_3090 import _native
    from gptoss_3090.vllm import attention_backend as AB

    default = _native.attention_run_min_keys()
    spec = SimpleNamespace(block_size=16, num_kv_heads=8)
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096))
    builder_cls = backend.get_builder_cls()
    try:
        monkeypatch.setenv(AB.MIN_KEYS_ENV, "512")
        assert AB._run_min_keys() == 512
        builder_cls(spec, ["layer.0"], config, torch.device("cpu"))
        assert _native.attention_run_min_keys() == 512
        monkeypatch.setenv(AB.MIN_KEYS_ENV, "auto")
        builder_cls(spec, ["layer.0"], config, torch.device("cpu"))
        assert _native.attention_run_min_keys() == default
        monkeypatch.delenv(AB.MIN_KEYS_ENV)
        assert AB._run_min_keys() is None
        monkeypatch.setenv(AB.MIN_KEYS_ENV, "long")
        with pytest.raises(ValueError, match=AB.MIN_KEYS_ENV):
            AB._run_min_keys()
        for bad in ("500", "0", "8192", "long"):
            monkeypatch.setenv(AB.MIN_KEYS_ENV, bad)
            with pytest.raises(ValueError, match=AB.MIN_KEYS_ENV):
                builder_cls(spec, ["layer.0"], config, torch.device("cpu"))
            # the rejected value never reached the launches
            assert _native.attention_run_min_keys() == default
    finally:
        _native.attention_set_run_min_keys(None)
    assert _native.attention_run_min_keys() == default


def test_backend_rope_setting(monkeypatch):
    """``GPTOSS_3090_ATTN_ROPE``: ``fold`` (default, needs the folded KV write) or ``vllm``;
    anything else names the variable. The impl takes only a RoPE it can run."""
    backend = _backend()
    from types import SimpleNamespace

    from gptoss_3090.vllm import attention_backend as AB

    monkeypatch.delenv(AB.ROPE_ENV, raising=False)
    monkeypatch.delenv(AB.KV_WRITE_ENV, raising=False)
    assert AB._fold_rope() is True
    monkeypatch.setenv(AB.ROPE_ENV, "vllm")
    assert AB._fold_rope() is False
    monkeypatch.setenv(AB.ROPE_ENV, "fold")
    monkeypatch.setattr(AB, "_FOLD_KV_WRITE", False)
    assert AB._fold_rope() is False
    monkeypatch.setenv(AB.ROPE_ENV, "sometimes")
    with pytest.raises(ValueError, match=AB.ROPE_ENV):
        AB._fold_rope()

    impl = backend.get_impl_cls()(64, 64, 0.125, 8, None, None, "auto")
    rope = SimpleNamespace(head_size=64, rotary_dim=64, is_neox_style=True,
                           cos_sin_cache=rope_cos_sin_table(8))
    monkeypatch.setattr(AB, "_FOLD_ROPE", False)
    assert impl.take_rotary_embedding(rope) is False and impl._rotary is None
    monkeypatch.setattr(AB, "_FOLD_ROPE", True)
    gptj = SimpleNamespace(**{**vars(rope), "is_neox_style": False})
    partial = SimpleNamespace(**{**vars(rope), "rotary_dim": 32})
    assert not impl.take_rotary_embedding(gptj) and not impl.take_rotary_embedding(partial)
    assert impl.take_rotary_embedding(rope) is True
    assert impl._rope_cos_sin(torch.device("cpu")) is rope.cos_sin_cache


def test_backend_impl_positional_ctor():
    backend = _backend()
    sinks = torch.zeros(64)
    impl_cls = backend.get_impl_cls()
    impl = impl_cls(64, 64, 0.125, 8, None, 128, "auto", None, "decoder", None, sinks=sinks)
    assert impl.sliding_window == 128 and impl.num_kv_heads == 8 and impl.sinks is sinks
    impl = impl_cls(64, 64, 0.125, 8, None, None, "auto")
    assert impl.sliding_window is None


def test_backend_unsupported_reasons():
    backend = _backend()
    ok = {"num_heads": 64, "num_kv_heads": 8, "head_size": 64}
    assert backend.unsupported_reason(**ok) is None
    assert backend.unsupported_reason(**ok, dtype=torch.float16, kv_cache_dtype="auto") is None
    assert "head size" in backend.unsupported_reason(**{**ok, "head_size": 128})
    assert "power of two" in backend.unsupported_reason(**{**ok, "num_heads": 48})
    assert "multiple" in backend.unsupported_reason(**{**ok, "num_heads": 60})
    assert "fp8" in backend.unsupported_reason(**ok, kv_cache_dtype="fp8")
    assert "differs" in backend.unsupported_reason(
        **ok, dtype=torch.float16, kv_cache_dtype="bfloat16"
    )
    assert "block size" in backend.unsupported_reason(**ok, block_size=24)
    assert "compute capability" in backend.unsupported_reason(**ok, compute_capability=(7, 5))
    assert "encoder" in backend.unsupported_reason(**ok, attn_type="encoder")
    assert backend.unsupported_reason(**ok, logits_soft_cap=30.0) is not None
    with pytest.raises(ValueError, match="head size"):
        backend.get_impl_cls()(64, 128, 0.125, 8, None, None, "auto")


@pytest.mark.parametrize(("fold", "rope"), [(True, False), (False, False), (True, True)])
def test_backend_end_to_end_on_cpu(fold, rope, monkeypatch):
    """Builder -> forward (which writes the new K/V rows itself; with ``fold`` False, as
    ``GPTOSS_3090_ATTN_KV_WRITE=separate``, vLLM calls do_kv_cache_update first and forward
    only reads), on CPU tensors (the ops fall back to the reference there), against the
    reference computed from the inputs directly; the cache then holds the new rows at their
    slots."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import CommonAttentionMetadata

    backend = _backend()
    gen = torch.Generator().manual_seed(99)
    hq, hkv, d, bs, nb = 8, 2, 64, 16, 12
    spec = SimpleNamespace(block_size=bs, num_kv_heads=hkv, head_size=d)
    cfg = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096))
    builder = backend.get_builder_cls()(spec, ["layer.0"], cfg, torch.device("cpu"))
    shape = backend.get_kv_cache_shape(nb, bs, hkv, d)
    kv_cache = torch.zeros(nb, bs, hkv, 2 * d).permute(0, 2, 1, 3)  # NHD physical
    assert tuple(kv_cache.shape) == shape
    # Two requests: a decode continuing a 20-token context, and a 5-token prefill.
    ctx0 = 20
    old_k = torch.randn(ctx0, hkv, d, generator=gen)
    old_v = torch.randn(ctx0, hkv, d, generator=gen)
    table = torch.tensor([[3, 7, 0], [5, 0, 0]], dtype=torch.int32)
    old_slots = torch.tensor([int(table[0, j // bs]) * bs + j % bs for j in range(ctx0)])
    torch.ops.gptoss_3090.kv_cache_write(old_k, old_v, kv_cache, old_slots)
    q_lens, seq_lens = [1, 5], [ctx0 + 1, 5]
    new_slots = [int(table[0, ctx0 // bs]) * bs + ctx0 % bs] + [5 * bs + j for j in range(5)]
    t = sum(q_lens)
    pad = 2
    query = torch.randn(t + pad, hq, d, generator=gen)
    key = torch.randn(t + pad, hkv, d, generator=gen)
    value = torch.randn(t + pad, hkv, d, generator=gen)
    slot_mapping = torch.tensor(new_slots + [-1] * pad, dtype=torch.int64)
    qsl = torch.tensor([0, 1, 6], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=2,
        num_actual_tokens=t,
        max_query_len=5,
        max_seq_len=ctx0 + 1,
        block_table_tensor=table,
        slot_mapping=slot_mapping,
    )
    md = builder.build(0, cm)
    sinks = torch.randn(hq, generator=gen)
    impl = backend.get_impl_cls()(hq, d, 0.125, hkv, None, 4, "auto", None, "decoder", None,
                                  sinks=sinks)
    from gptoss_3090.vllm import attention_backend as AB

    monkeypatch.setattr(AB, "_FOLD_KV_WRITE", fold)
    monkeypatch.setattr(AB, "_FOLD_ROPE", rope)
    if not fold:
        impl.do_kv_cache_update(None, key, value, kv_cache, slot_mapping)
    if rope:
        # The model hands vLLM's rotary module over: q and k arrive unrotated.
        table = rope_cos_sin_table(4096)
        rotary = SimpleNamespace(head_size=d, rotary_dim=d, is_neox_style=True,
                                 cos_sin_cache=table)
        assert impl.take_rotary_embedding(rotary)
        unrotated_q, unrotated_k = query, key
        pos = token_positions(qsl, cm.seq_lens)
        query = torch.cat([rope_neox_ref(query[:t], pos, table), query[t:]])
        key = torch.cat([rope_neox_ref(key[:t], pos, table), key[t:]])
    out = torch.full((t + pad, hq, d), 7.0)
    if rope:
        impl.forward(None, unrotated_q, unrotated_k, value, kv_cache, md, out)
    else:
        impl.forward(None, query, key, value, kv_cache, md, out)
    for i, slot in enumerate(new_slots):
        blk, off = divmod(slot, bs)
        torch.testing.assert_close(kv_cache[blk, :, off, :d], key[i], rtol=0, atol=1e-6)
        assert torch.equal(kv_cache[blk, :, off, d:], value[i])
    # Independent expectation: contiguous K/V per request, naive formula.
    k0 = torch.cat([old_k, key[:1]])
    v0 = torch.cat([old_v, value[:1]])
    want0 = naive_attention(query[:1], k0, v0, sinks, [ctx0], 4, 0.125)
    want1 = naive_attention(query[1:6], key[1:6], value[1:6], sinks, range(5), 4, 0.125)
    assert rel_err(out[:1], want0) < 1e-5
    assert rel_err(out[1:6], want1) < 1e-5
    assert bool((out[t:] == 7.0).all())
    assert impl.forward(None, query, key, value, kv_cache, None, out) is out
    assert float(out.abs().max()) == 0.0
    cap = builder.build_for_cudagraph_capture(cm)
    assert cap.max_seq_len == 4096 and bool((cap.seq_lens == 1).all())
