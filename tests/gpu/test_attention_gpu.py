"""GPU tests of the attention kernels (sinks + sliding window on vLLM 0.26's paged KV cache).

Every case compares against the fp32 eager reference (``gptoss_3090.attention_reference``) and,
when vLLM imports, against vLLM's TRITON_ATTN kernel (``unified_attention``) on the same paged
inputs. The metric is the relative Frobenius error ``||out - ref|| / ||ref||`` over the real
rows, with tolerance 1e-2 for bf16 (and fp16). Inputs are fresh random tensors.

Run: ``PYTHONPATH=python python3 -m pytest -q -s tests/gpu/test_attention_gpu.py`` (``-s``
prints a table of the errors per case).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from gptoss_3090 import attention as A  # noqa: E402
from gptoss_3090 import runtime  # noqa: E402
from gptoss_3090.attention_reference import (  # noqa: E402
    VllmTritonAttention,
    attention_ref,
    kv_cache_write_ref,
    paged_attention_ref,
    random_paged_batch,
    rope_cos_sin_table,
    rope_neox_ref,
    token_positions,
    vllm_triton_available,
)

DEV = "cuda"
HQ, HKV = 64, 8
SCALE = 0.125
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2}
HAS_TRITON = vllm_triton_available()
_ROWS: list[str] = []


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = (out.double() - ref.double()).norm()
    return float(d / ref.double().norm().clamp_min(1e-30))


def report(case: str, err_ref: float, err_triton: float | None) -> None:
    tri = "   n/a   " if err_triton is None else f"{err_triton:9.2e}"
    line = f"{case:<58} vs fp32 ref {err_ref:9.2e}   vs triton {tri}"
    _ROWS.append(line)
    print(line)


@pytest.fixture(scope="module", autouse=True)
def _warm_and_table():
    # Load the attention entries with a first eager call (the kernels compile and load on first
    # use; graph capture needs them loaded). runtime.warmup() would do it for every family.
    runtime.ensure_cuda_libs()
    yield
    print("\n=== attention GPU errors (rel. Frobenius) ===")
    for line in _ROWS:
        print(line)


def make_sinks(kind: str, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "large":
        s = 20.0 + torch.rand(HQ, generator=gen)
    elif kind == "small":
        s = -20.0 - torch.rand(HQ, generator=gen)
    else:
        s = torch.randn(HQ, generator=gen)
    return s.to(DEV, torch.bfloat16)  # vLLM keeps GPT-OSS sinks as a bf16 parameter


def run_case(
    name: str,
    q_lens: list[int],
    seq_lens: list[int],
    *,
    block_size: int = 16,
    window: int | None = None,
    sinks: str = "random",
    dtype: torch.dtype = torch.bfloat16,
    workspace: bool = True,
    pad_tokens: int = 0,
    seed: int = 0,
    seq_bound: int = 0,
    ws: torch.Tensor | None = None,
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b = random_paged_batch(
        q_lens, seq_lens, HQ, HKV, block_size, dtype, DEV, generator=gen, pad_tokens=pad_tokens
    )
    s = make_sinks(sinks, gen)
    if ws is None and workspace:
        ws = A.make_workspace(DEV, HKV)
    sentinel = 3.0
    out = torch.full_like(b["query"], sentinel)
    # seq_bound: the split plan of a longer context bound, as vLLM's graphs captured for
    # max_model_len run shorter contexts.
    torch.ops.gptoss_3090.paged_attention(
        b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"], b["block_table"],
        s, ws, b["max_query_len"], max(b["max_seq_len"], seq_bound), window, SCALE,
    )
    torch.cuda.synchronize()
    n = int(b["query_start_loc"][-1])
    ref = paged_attention_ref(
        b["query"], b["kv_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"], s,
        window, SCALE,
    )
    err = rel_err(out[:n], ref[:n])
    assert torch.isfinite(out[:n].float()).all(), name
    if pad_tokens:
        assert bool((out[n:] == sentinel).all()), "padding rows were written"
    err_tri = None
    if HAS_TRITON:
        tri = VllmTritonAttention(HQ, HKV, DEV)
        out_t = torch.zeros_like(b["query"][:n])
        tri(
            b["query"][:n], b["kv_cache"], out_t, b["query_start_loc"], b["seq_lens"],
            b["block_table"], s, b["max_query_len"], b["max_seq_len"], window, SCALE,
        )
        torch.cuda.synchronize()
        err_tri = rel_err(out[:n], out_t.float())
    report(name, err, err_tri)
    assert err <= TOL[dtype], f"{name}: rel err {err:.3e} vs fp32 reference"
    if err_tri is not None:
        assert err_tri <= TOL[dtype], f"{name}: rel err {err_tri:.3e} vs vLLM Triton"
    return out


@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("seq", [1, 127, 128, 129, 4000])
def test_prefill_lengths(seq, window):
    run_case(f"prefill {seq} w={window}", [seq], [seq], window=window, seed=seq)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("ctx", [1, 127, 128, 129, 4000])
def test_decode_lengths(ctx, window, block_size):
    run_case(
        f"decode ctx={ctx} w={window} bs={block_size}", [1], [ctx], block_size=block_size,
        window=window, seed=ctx + block_size,
    )


@pytest.mark.parametrize("window", [None, 128])
def test_decode_131072(window):
    run_case(f"decode ctx=131072 w={window}", [1], [131072], window=window, seed=7)


@pytest.mark.parametrize("window", [None, 128])
def test_decode_short_contexts_planned_for_131072(window):
    """A split plan for 131072 keys (33 splits per KV head at batch 1 on an H100) run on short
    contexts: only the first splits hold keys, the rest exit, the used ones merge. One
    workspace for every launch, so its arrival counters must be back at zero after each."""
    ws = A.make_workspace(DEV, HKV)
    for i, ctx in enumerate([1, 16, 100, 256, 257, 384, 1000, 4000, 9000, 300, 2]):
        for batch in (1, 3):
            run_case(
                f"decode ctx={ctx} x{batch} bound 131072 w={window}", [1] * batch,
                [ctx + 37 * j for j in range(batch)], window=window, seq_bound=131072, ws=ws,
                seed=100 + i,
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 128])
def test_mixed_batch(window, block_size, dtype):
    # decodes (short, long, window edge), a fresh prefill, a chunked prefill continuing a
    # context (prefix caching looks the same), a 2-token speculative step, an empty request.
    q_lens = [1, 1, 300, 1, 257, 2, 0, 1, 64]
    seq_lens = [5, 3000, 300, 129, 1257, 700, 40, 128, 64 + 3000]
    run_case(
        f"mixed w={window} bs={block_size} {str(dtype)[6:]}", q_lens, seq_lens,
        block_size=block_size, window=window, dtype=dtype, pad_tokens=5, seed=block_size,
    )


@pytest.mark.parametrize("sinks", ["large", "small", "none"])
@pytest.mark.parametrize("window", [None, 128])
def test_extreme_sinks(sinks, window):
    run_case(f"sinks={sinks} w={window}", [1, 200, 1], [900, 1200, 3], window=window,
             sinks=sinks, seed=11)


def test_large_sink_makes_output_small():
    out = run_case("sinks=large, |out| check", [1, 50], [600, 50], sinks="large", seed=12)
    assert float(out[:51].float().abs().max()) < 1e-3


@pytest.mark.parametrize("window", [None, 128])
def test_single_split_equals_reference(window):
    run_case(f"decode no workspace (1 split) w={window}", [1, 1], [20000, 77], window=window,
             workspace=False, seed=13)


def test_decode_batch_many_requests():
    gen = torch.Generator().manual_seed(3)
    ctx = [int(x) for x in torch.randint(1, 9000, (64,), generator=gen)]
    run_case("decode batch 64 random ctx", [1] * 64, ctx, seed=14)


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kv_cache_write(dtype, slot_dtype):
    gen = torch.Generator().manual_seed(21)
    nb, bs, n = 40, 16, 300
    phys = torch.randn(nb, bs, HKV, 128, generator=gen).to(DEV, dtype)
    cache = phys.permute(0, 2, 1, 3)  # vLLM's NHD physical layout, logical (B, H, N, 2hs)
    ref_cache = cache.clone()
    qkv = torch.randn(n + 7, (HQ + 2 * HKV) * 64, generator=gen).to(DEV, dtype)
    key = qkv[:, HQ * 64 : (HQ + HKV) * 64].view(n + 7, HKV, 64)  # strided views, like vLLM
    value = qkv[:, (HQ + HKV) * 64 :].view(n + 7, HKV, 64)
    slots = torch.randperm(nb * bs, generator=gen)[:n].to(slot_dtype)
    slots[::17] = -1
    slots = slots.to(DEV)
    torch.ops.gptoss_3090.kv_cache_write(key, value, cache, slots)
    kv_cache_write_ref(key, value, ref_cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(cache, ref_cache)


@pytest.mark.parametrize("window", [None, 128, 5])
@pytest.mark.parametrize("heads", [(64, 8), (8, 8), (16, 4), (16, 1)])
def test_plain_api(heads, window):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(hq + hkv)
    lens = [1, 2, 150, 1000, 17]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q = torch.randn(t, hq, 64, generator=gen).to(DEV, torch.bfloat16)
    k = torch.randn(t, hkv, 64, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(t, hkv, 64, generator=gen).to(DEV, torch.bfloat16)
    s = torch.randn(hq, generator=gen).to(DEV)
    out = A.attention(q, k, v, s, sliding_window=window, cu_seqlens=cu.to(DEV))
    ref = attention_ref(q, k, v, s, window, 0.125, cu)
    err = rel_err(out, ref)
    report(f"plain api Hq={hq} Hkv={hkv} w={window}", err, None)
    assert err <= 1e-2


def test_cuda_graph_capture_replay():
    gen = torch.Generator().manual_seed(31)
    n_req, bs = 8, 16
    ctx = [1000, 5, 4000, 129, 77, 3000, 128, 20000]
    b = random_paged_batch([1] * n_req, ctx, HQ, HKV, bs, torch.bfloat16, DEV, generator=gen)
    s = make_sinks("random", gen)
    ws = A.make_workspace(DEV, HKV)
    out = torch.zeros_like(b["query"])
    key = torch.randn(n_req, HKV, 64, generator=gen).to(DEV, torch.bfloat16)
    val = torch.randn(n_req, HKV, 64, generator=gen).to(DEV, torch.bfloat16)
    # slot of each request's last token (already counted in seq_lens)
    slots = torch.tensor(
        [int(b["block_table"][r, (c - 1) // bs]) * bs + (c - 1) % bs for r, c in enumerate(ctx)],
        dtype=torch.int64, device=DEV,
    )
    max_model_len = 131072

    def step():
        torch.ops.gptoss_3090.kv_cache_write(key, val, b["kv_cache"], slots)
        torch.ops.gptoss_3090.paged_attention(
            b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"],
            b["block_table"], s, ws, 1, max_model_len, None, SCALE,
        )

    step()  # eager first call (loads the kernels)
    torch.cuda.synchronize()
    eager = out.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        out.zero_()
        with torch.cuda.graph(g, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), "replay differs from eager"
    # New data in the same buffers (new queries, shorter contexts): replay must follow.
    b["query"].copy_(torch.randn(b["query"].shape, generator=gen).to(DEV, torch.bfloat16))
    b["seq_lens"].copy_(torch.tensor([c // 2 + 1 for c in ctx], dtype=torch.int32))
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    out.zero_()
    step()
    torch.cuda.synchronize()
    assert torch.equal(replayed, out), "replay with new data differs from eager"
    ref = paged_attention_ref(
        b["query"], b["kv_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"], s,
        None, SCALE,
    )
    err = rel_err(out, ref)
    report("cuda graph replay (new data) ", err, None)
    assert err <= 1e-2


def _new_rows(b: dict, gen: torch.Generator, pad: int, slot_dtype: torch.dtype):
    """New K/V rows for every query token of batch `b` (plus `pad` padding rows), a key view
    with vLLM's strides (a slice of a fused q/k/v buffer), and their slots from the block table
    (-1 for padding), as vLLM builds slot_mapping."""
    qsl = b["query_start_loc"].tolist()
    seq = b["seq_lens"].tolist()
    bs = b["kv_cache"].shape[2]
    t = qsl[-1] + pad
    fused = torch.randn(t, (HQ + 2 * HKV) * 64, generator=gen).to(DEV, b["query"].dtype)
    key = fused[:, HQ * 64 : (HQ + HKV) * 64].view(t, HKV, 64)
    value = fused[:, (HQ + HKV) * 64 :].view(t, HKV, 64)
    slots = []
    for r in range(len(seq)):
        q_len = qsl[r + 1] - qsl[r]
        for pos in range(seq[r] - q_len, seq[r]):
            slots.append(int(b["block_table"][r, pos // bs]) * bs + pos % bs)
    slots += [-1] * pad
    return key, value, torch.tensor(slots, dtype=slot_dtype, device=DEV)


# Batches of the new-row tests (q_lens, seq_lens, window, max_seq_len bound): decode-only ones
# run in the decode launch, the mixed ones write (and rotate) before the varlen launch.
NEW_ROW_BATCHES = [
    ([1], [1], None, 0),
    ([1], [300], None, 131072),
    ([1], [9000], 128, 131072),
    ([1] * 5, [17, 256, 257, 4000, 33], None, 131072),
    ([2, 1, 2], [2, 700, 129], None, 8192),
    ([1, 2, 1], [5000, 3000, 1], 128, 8192),
    ([1, 300, 1, 2], [9000, 300, 100, 40], None, 0),  # mixed
    ([40, 1], [1040, 77], 128, 0),  # mixed
]


@pytest.mark.parametrize(("q_lens", "seq_lens", "window", "bound"), NEW_ROW_BATCHES)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_folded_kv_write(q_lens, seq_lens, window, bound, slot_dtype):
    """paged_attention with the new K/V rows (the write folded into the decode launch, or run
    first for a mixed batch) leaves the same cache and the same output, bit for bit, as
    kv_cache_write followed by paged_attention; the cache's stale rows at the new slots are
    never read. Also under CUDA-graph capture and replay."""
    gen = torch.Generator().manual_seed(sum(seq_lens) + len(q_lens))
    b = random_paged_batch(q_lens, seq_lens, HQ, HKV, 16, torch.bfloat16, DEV, generator=gen,
                           pad_tokens=2)
    key, value, slots = _new_rows(b, gen, 2, slot_dtype)
    live = slots >= 0
    flat = b["kv_cache"].permute(0, 2, 1, 3).reshape(-1, HKV, 128)  # [slot, head, K|V] (NHD)
    flat[slots[live].long()] = 1e4  # stale rows: a read of them would show
    s = make_sinks("random", gen)
    args = (b["query_start_loc"], b["seq_lens"], b["block_table"], s)
    bound = max(bound, b["max_seq_len"])

    def run(fold: bool, cache: torch.Tensor, out: torch.Tensor, ws: torch.Tensor) -> None:
        if not fold:
            torch.ops.gptoss_3090.kv_cache_write(key, value, cache, slots)
        torch.ops.gptoss_3090.paged_attention(
            b["query"], cache, out, *args, ws, b["max_query_len"], bound, window, SCALE,
            key if fold else None, value if fold else None, slots if fold else None,
        )

    results = {}
    for fold in (False, True):
        cache, out = b["kv_cache"].clone(), torch.full_like(b["query"], 3.0)
        run(fold, cache, out, A.make_workspace(DEV, HKV))
        torch.cuda.synchronize()
        results[fold] = (cache, out)
    assert torch.equal(results[True][1], results[False][1]), "outputs differ"
    assert torch.equal(results[True][0], results[False][0]), "caches differ"
    n = int(b["query_start_loc"][-1])
    assert bool((results[True][1][n:] == 3.0).all()), "padding rows were written"
    ref = paged_attention_ref(b["query"], results[False][0], *args, window, SCALE)
    err = rel_err(results[True][1][:n], ref[:n])
    report(f"folded kv write q={q_lens[:4]} w={window} {slot_dtype}", err, None)
    assert err <= 1e-2

    # Captured once, replayed on a fresh copy of the stale cache: the same bits again.
    cache, out, ws = b["kv_cache"].clone(), torch.zeros_like(b["query"]), A.make_workspace(DEV, HKV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(g, stream=stream):
        run(True, cache, out, ws)
    torch.cuda.current_stream().wait_stream(stream)
    cache.copy_(b["kv_cache"])
    out.fill_(3.0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, results[True][1]) and torch.equal(cache, results[True][0])


def rope_table(positions: int) -> torch.Tensor:
    return rope_cos_sin_table(positions, device=DEV)


@pytest.mark.parametrize(
    ("q_lens", "seq_lens", "window", "bound"), [*NEW_ROW_BATCHES, ([700], [700], None, 0)]
)
def test_folded_rope(q_lens, seq_lens, window, bound):
    """paged_attention with rope_cos_sin on unrotated q/k equals RoPE in fp32 (the reference,
    rounded to bf16 as vLLM's rotary op stores it) followed by kv_cache_write + paged_attention:
    the same cache within one bf16 rounding and the output within the usual tolerance of the
    fp32 reference, in the decode launch (decode-only batches) and through attn_rope_write
    (mixed batches). The op leaves query and key unchanged; graph replay gives the same bits."""
    gen = torch.Generator().manual_seed(sum(seq_lens) * 3 + len(q_lens))
    b = random_paged_batch(q_lens, seq_lens, HQ, HKV, 16, torch.bfloat16, DEV, generator=gen,
                           pad_tokens=2)
    key, value, slots = _new_rows(b, gen, 2, torch.int64)
    live = slots >= 0
    flat = b["kv_cache"].permute(0, 2, 1, 3).reshape(-1, HKV, 128)
    flat[slots[live].long()] = 1e4  # stale rows: a read of them would show
    s = make_sinks("random", gen)
    args = (b["query_start_loc"], b["seq_lens"], b["block_table"], s)
    bound = max(bound, b["max_seq_len"])
    table = rope_table(bound)
    n = int(b["query_start_loc"][-1])
    pos = token_positions(b["query_start_loc"], b["seq_lens"])

    # Reference inputs: rotated in fp32, stored in bf16, written by kv_cache_write.
    q_rot = b["query"].clone()
    q_rot[:n] = rope_neox_ref(b["query"][:n], pos, table).to(torch.bfloat16)
    k_rot = key.clone()
    k_rot[:n] = rope_neox_ref(key[:n], pos, table).to(torch.bfloat16)
    ref_cache = b["kv_cache"].clone()
    torch.ops.gptoss_3090.kv_cache_write(k_rot, value, ref_cache, slots)
    ref = paged_attention_ref(q_rot, ref_cache, *args, window, SCALE)

    q_before, k_before = b["query"].clone(), key.clone()
    cache, out = b["kv_cache"].clone(), torch.full_like(b["query"], 3.0)

    def run(cache: torch.Tensor, out: torch.Tensor, ws: torch.Tensor) -> None:
        torch.ops.gptoss_3090.paged_attention(
            b["query"], cache, out, *args, ws, b["max_query_len"], bound, window, SCALE,
            key, value, slots, table,
        )

    run(cache, out, A.make_workspace(DEV, HKV))
    torch.cuda.synchronize()
    assert torch.equal(b["query"], q_before) and torch.equal(key, k_before), "inputs modified"
    assert bool((out[n:] == 3.0).all()), "padding rows were written"
    # Rotated keys in the cache: the reference's, up to one bf16 rounding of an fp32 result
    # whose last bits may differ (FMA contraction).
    torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=8e-3, atol=1e-3)
    err = rel_err(out[:n], ref[:n])
    report(f"folded rope q={q_lens[:4]} w={window}", err, None)
    assert err <= 1e-2

    cache2, out2 = b["kv_cache"].clone(), torch.zeros_like(b["query"])
    ws = A.make_workspace(DEV, HKV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(g, stream=stream):
        run(cache2, out2, ws)
    torch.cuda.current_stream().wait_stream(stream)
    cache2.copy_(b["kv_cache"])
    out2.fill_(3.0)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out2, out) and torch.equal(cache2, cache)


def test_folded_rope_forced_sm86_tuning():
    """The RoPE paths under the RTX 3090's launch configuration (other split plans)."""
    runtime.set_tuning("sm86")
    try:
        test_folded_rope([1] * 5, [17, 256, 257, 4000, 33], None, 131072)
        test_folded_rope([1, 300, 1, 2], [9000, 300, 100, 40], 128, 0)
    finally:
        runtime.set_tuning(None)


def test_folded_rope_table_on_another_device():
    """A CPU table for CUDA tensors names the problem (the other argument errors are checked
    before any device work, in the CPU tests)."""
    gen = torch.Generator().manual_seed(72)
    b = random_paged_batch([1, 1], [10, 20], HQ, HKV, 16, torch.bfloat16, DEV, generator=gen)
    key, value, slots = _new_rows(b, gen, 0, torch.int64)
    out = torch.zeros_like(b["query"])
    with pytest.raises(ValueError, match="rope_cos_sin is on cpu"):
        torch.ops.gptoss_3090.paged_attention(
            b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"],
            b["block_table"], None, None, 1, 20, None, SCALE, key, value, slots,
            rope_cos_sin_table(20),
        )


def test_folded_kv_write_argument_errors():
    gen = torch.Generator().manual_seed(71)
    b = random_paged_batch([1, 1], [10, 20], HQ, HKV, 16, torch.bfloat16, DEV, generator=gen)
    key, value, slots = _new_rows(b, gen, 0, torch.int64)
    out = torch.zeros_like(b["query"])
    base = (b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"],
            b["block_table"], None, None, 1, 20, None, SCALE)
    with pytest.raises(ValueError, match="together"):
        torch.ops.gptoss_3090.paged_attention(*base, key, None, slots)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.gptoss_3090.paged_attention(*base, key.half(), value.half(), slots)
    with pytest.raises(ValueError, match="KV heads"):
        torch.ops.gptoss_3090.paged_attention(*base, key[:, :4], value[:, :4], slots)
    with pytest.raises(ValueError, match="fewer than"):
        torch.ops.gptoss_3090.paged_attention(*base, key, value, slots[:1])
    with pytest.raises(TypeError, match="slot_mapping"):
        torch.ops.gptoss_3090.paged_attention(*base, key, value, slots.float())


def test_forced_sm86_tuning():
    runtime.set_tuning("sm86")
    try:
        run_case("forced sm86: mixed full", [1, 300, 1, 2], [9000, 300, 100, 40], seed=41)
        run_case("forced sm86: mixed sliding", [1, 300, 1], [9000, 1300, 100], window=128,
                 seed=42)
        run_case("forced sm86: decode 131072", [1], [131072], seed=43)
    finally:
        runtime.set_tuning(None)


def test_opcheck():
    gen = torch.Generator().manual_seed(51)
    b = random_paged_batch([1, 40], [300, 40], HQ, HKV, 16, torch.bfloat16, DEV, generator=gen)
    out = torch.zeros_like(b["query"])
    s = make_sinks("random", gen)
    ws = A.make_workspace(DEV, HKV)
    torch.library.opcheck(
        torch.ops.gptoss_3090.paged_attention.default,
        (b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"],
         b["block_table"], s, ws, 40, 300, 128, SCALE),
        test_utils=("test_schema", "test_faketensor"),
    )
    # With the new K/V rows (the folded cache write) of a decode batch.
    b = random_paged_batch([1, 1], [300, 40], HQ, HKV, 16, torch.bfloat16, DEV, generator=gen)
    key, value, slots = _new_rows(b, gen, 0, torch.int64)
    out = torch.zeros_like(b["query"])
    torch.library.opcheck(
        torch.ops.gptoss_3090.paged_attention.default,
        (b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"],
         b["block_table"], s, ws, 1, 300, 128, SCALE, key, value, slots),
        test_utils=("test_schema", "test_faketensor"),
    )
    # With RoPE handed to the op.
    torch.library.opcheck(
        torch.ops.gptoss_3090.paged_attention.default,
        (b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"],
         b["block_table"], s, ws, 1, 300, 128, SCALE, key, value, slots, rope_table(300)),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(61)
    b = random_paged_batch([1, 40], [300, 40], HQ, HKV, 16, torch.bfloat16, DEV, generator=gen)
    s = make_sinks("random", gen)
    ws = A.make_workspace(DEV, HKV)

    def f(q, kv, qsl, sl, bt):
        o = torch.empty_like(q)
        torch.ops.gptoss_3090.paged_attention(q, kv, o, qsl, sl, bt, s, ws, 40, 300, None, SCALE)
        return o * 1.0

    args = (b["query"], b["kv_cache"], b["query_start_loc"], b["seq_lens"], b["block_table"])
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    torch.cuda.synchronize()
    assert torch.equal(eager, compiled)
