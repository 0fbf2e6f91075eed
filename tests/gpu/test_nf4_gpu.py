"""NF4 GPU kernels against real references (skipped without CUDA).

References, all computed independently of the kernels under test:
* dequantize: bitsandbytes' CUDA ``dequantize_4bit`` when it imports with CUDA,
  ``gptoss_3090.nf4`` (exact CPU implementation) when present, and always the documented formula
  in fp32 torch math (product, then one round-to-nearest-even cast);
* quantize: a vectorised torch transcription of bitsandbytes' CUDA semantics (below),
  ``gptoss_3090.nf4.quantize`` when present, bitsandbytes' CUDA ``quantize_4bit`` when it imports
  with CUDA;
* linear: dequantize, then matmul in fp32 (relative error <= 1e-2 in bf16/fp16).

Run: ``PYTHONPATH=python python3 -m pytest -q tests/gpu/test_nf4_gpu.py`` (``-s`` prints tables).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    from gptoss_3090 import ops, runtime
    from gptoss_3090.ops import Nf4FusedWeight, Nf4Weight

DEV = "cuda"
SHAPES = [(5760, 2880), (2880, 2880), (4096, 2880), (2880, 4096), (512, 2880)]
ODD_SHAPES = [(8, 64), (24, 192), (40, 128), (136, 320), (72, 64), (200, 448)]
MS = [1, 3, 16, 17, 64, 256, 2048]
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


@pytest.fixture(params=[None, "sm86"], ids=["auto-tuning", "forced-sm86"])
def tuning(request):
    """Runs each test with the GPU's own launch configs and with the RTX 3090 (sm_86) ones."""
    with runtime.forced_tuning(request.param):
        yield request.param


@pytest.fixture(scope="module", autouse=True)
def _warm():
    runtime.warmup()
    info = runtime.device_info()
    print(
        f"\n[device] {info['name']} {info['arch']} tuning={info['tuning']} "
        f"SMs={info['sm_count']} smem_optin={info['max_shared_per_block_optin']}"
    )


def capture(fn):
    """A CUDA graph of ``fn()`` and what it returned: ``fn`` runs once on the capture's side
    stream first (outside capture, so every kernel is loaded), then is captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# References.
# ---------------------------------------------------------------------------------------------


def ref_absmax(absmax, nested_absmax, nested_map, offset, nb_per_expert, n_experts):
    """Per-block fp32 absmax, bitsandbytes' formula: map[code] * scale (fp32), then + offset."""
    if absmax.dtype == torch.float32:
        return absmax.cpu()
    codes = absmax.cpu().long().view(n_experts, nb_per_expert)
    nnb = -(-nb_per_expert // 256)
    scale = nested_absmax.cpu().view(n_experts, nnb)
    idx = torch.arange(nb_per_expert) // 256
    prod = nested_map.cpu()[codes] * scale[:, idx]  # fp32 multiply (rounded)
    off = offset.cpu().view(n_experts, 1) if isinstance(offset, torch.Tensor) else offset
    return (prod + off).reshape(-1)  # fp32 add (rounded): never fused


def ref_dequant(packed, absmax_f32, numel_total, dtype):
    p = packed.cpu().reshape(-1)
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:numel_total].long()
    am = absmax_f32.repeat_interleave(64)[:numel_total]
    return (NF4[codes] * am).to(dtype)  # fp32 product, one RNE cast


def bnb_cuda_dequant(packed, absmax_f32, shape, dtype):
    """bitsandbytes' own CUDA dequantization (absmax already expanded to f32), or None.

    Its CUDA kernel is the semantics we follow (fp32 product, one round-to-nearest-even cast).
    Its CPU library is not: for fp16 output it rounds some elements differently (seen with
    bitsandbytes 0.50.2 on the GPU host), so it is not used as a reference.
    """
    try:
        import bitsandbytes.functional as F
        from bitsandbytes.functional import QuantState
    except Exception:
        return None
    try:
        qs = QuantState(
            absmax=absmax_f32.to(DEV),
            shape=torch.Size(shape),
            code=NF4.to(DEV),
            blocksize=64,
            quant_type="nf4",
            dtype=dtype,
        )
        return F.dequantize_4bit(packed.to(DEV).reshape(-1, 1), qs, quant_type="nf4").cpu()
    except Exception:  # no CUDA build of bitsandbytes here
        return None


def bnb_search8(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA 8-bit encoder (7-step binary search + fp32 midpoint), vectorised."""
    n = x.numel()
    pivot = torch.full((n,), 127, dtype=torch.long)
    up = torch.full((n,), 255, dtype=torch.long)
    lo = torch.zeros(n, dtype=torch.long)
    lower = torch.full((n,), -1.0)
    upper = torch.full((n,), 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lo = torch.where(right, pivot, lo)
        lower = torch.where(right, val, lower)
        up = torch.where(right, up, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(up == 255, code[255], upper)
    lower = torch.where(lo == 0, code[0], lower)
    mid_up = (upper + val) * 0.5
    mid_lo = (lower + val) * 0.5
    res_r = torch.where(x > mid_up, up, pivot)
    res_l = torch.where(x < mid_lo, lo, pivot)
    return torch.where(x > val, res_r, res_l).to(torch.uint8)


def ref_quantize(w: torch.Tensor, nested: bool, offset_override: float | None = None):
    """bitsandbytes CUDA quantize_4bit semantics in torch (CPU): see kernels/nf4.cu."""
    x = w.detach().cpu().float().reshape(-1)
    n = x.numel()
    nb = -(-n // 64)
    xp = torch.zeros(nb * 64)
    xp[:n] = x
    blocks = xp.view(nb, 64)
    amax = blocks.abs().amax(dim=1)
    inv = 1.0 / amax
    v = blocks * inv[:, None]
    mids = (NF4[:-1] + NF4[1:]) * 0.5
    codes = (v[..., None] > mids).sum(-1).to(torch.uint8).reshape(-1)[: 2 * ((n + 1) // 2)]
    if codes.numel() < 2 * ((n + 1) // 2):
        codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not nested:
        return packed, amax, None, None
    offset = float(amax.double().sum() / nb) if offset_override is None else offset_override
    offset = torch.tensor(offset, dtype=torch.float32)
    v2 = amax - offset
    nnb = -(-nb // 256)
    v2p = torch.zeros(nnb * 256)
    v2p[:nb] = v2
    s = v2p.view(nnb, 256).abs().amax(1)
    xq = (v2p.view(nnb, 256) * (1.0 / s)[:, None]).reshape(-1)[:nb]
    qcodes = bnb_search8(ops.dynamic_map_signed().cpu(), xq)
    return packed, qcodes, s, float(offset)


def rand_nf4(shape, nested: bool, seed: int, n_experts: int = 1):
    """Random but valid NF4 buffers on the GPU: random codes, realistic statistics."""
    g = gen(seed)
    numel = math.prod(shape)
    total = numel * n_experts
    packed = torch.randint(0, 256, ((total + 1) // 2,), generator=g, dtype=torch.uint8)
    nb = -(-numel // 64)
    if not nested:
        absmax = (torch.rand(nb * n_experts, generator=g) * 0.1 + 1e-3).float()
        return packed.to(DEV), absmax.to(DEV), None, None, None
    codes = torch.randint(0, 256, (nb * n_experts,), generator=g, dtype=torch.uint8)
    nnb = -(-nb // 256)
    scale = (torch.rand(nnb * n_experts, generator=g) * 0.05 + 0.01).float()
    offsets = (torch.rand(n_experts, generator=g) * 0.05 + 0.02).float()
    nmap = ops.dynamic_map_signed().to(DEV)
    return packed.to(DEV), codes.to(DEV), scale.to(DEV), nmap, offsets.to(DEV)


def make_weight(n, k, dtype, nested=True, seed=0, scale=0.02) -> Nf4Weight:
    g = gen(seed)
    w = (torch.randn(n, k, generator=g) * scale).to(dtype).to(DEV)
    return ops.nf4_quantize(w, nested=nested)


# ---------------------------------------------------------------------------------------------
# Dequantize.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(5760, 2880), (512, 2880), (3, 100), (1, 7), (257, 64)])
def test_dequant_single_bit_exact(shape, nested, dtype):
    packed, absmax, nabs, nmap, offsets = rand_nf4(shape, nested, seed=hash((shape, nested)) % 1000)
    off = float(offsets[0]) if nested else None
    out = ops.nf4_dequantize(packed, absmax, shape, dtype, nabs, nmap, off)
    numel = math.prod(shape)
    nb = -(-numel // 64)
    am = ref_absmax(absmax, nabs, nmap, torch.tensor([off]) if nested else None, nb, 1)
    ref = ref_dequant(packed, am, numel, dtype).reshape(shape)
    assert out.shape == torch.Size(shape) and out.dtype == dtype
    assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16))
    bnb = bnb_cuda_dequant(packed, am, shape, dtype)
    if bnb is not None:
        assert torch.equal(out.cpu().view(torch.int16), bnb.view(torch.int16))
    # the offset as a device tensor gives the same bits
    if nested:
        out2 = ops.nf4_dequantize(packed, absmax, shape, dtype, nabs, nmap, offsets[:1])
        assert torch.equal(out2, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize(
    "shapes", [[(4096, 2880), (512, 2880), (512, 2880)], [(3, 100), (1, 7), (257, 64)], [(64, 64)]]
)
def test_dequant_segments_one_launch_bit_exact(shapes, nested, dtype):
    """1-3 tensors dequantized by one launch (the dequantize + cuBLAS path of the fused q/k/v)
    give each tensor's own dequantize bits, in consecutive slices of one buffer; the odd sizes
    take the per-segment tail path."""
    from gptoss_3090 import _native
    from gptoss_3090 import runtime as rt

    tensors = [rand_nf4(sh, nested, seed=17 + i) for i, sh in enumerate(shapes)]
    sizes = [math.prod(sh) for sh in shapes]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 8) * 8)  # 16-byte aligned slices
    out = torch.full((starts[-1],), float("nan"), dtype=dtype, device=DEV)
    parts, want = [], []
    for (packed, absmax, nabs, nmap, offsets), sh, n, at in zip(
        tensors, shapes, sizes, starts[:-1], strict=True
    ):
        off = float(offsets[0]) if nested else 0.0
        stats = (packed.data_ptr(), absmax.data_ptr(), nabs.data_ptr() if nested else 0,
                 nmap.data_ptr() if nested else 0, 0, off, nested)
        parts.append((stats, n, out[at:].data_ptr()))
        want.append(ops.nf4_dequantize(packed, absmax, sh, dtype, nabs, nmap,
                                       off if nested else None).reshape(-1))
    ordinal, stream = rt.launch_context(out.device)
    _native.cuda_nf4_dequantize_segments(ordinal, stream, ops._DTYPE_NAME[dtype], parts)
    torch.cuda.synchronize()
    for w, n, at in zip(want, sizes, starts[:-1], strict=True):
        assert torch.equal(out[at : at + n].view(torch.int16), w.view(torch.int16))


def test_dequant_matches_gptoss_cpu_reference():
    nf4 = pytest.importorskip("gptoss_3090.nf4")
    if not hasattr(nf4, "dequantize"):
        pytest.skip("gptoss_3090.nf4.dequantize not available")
    for nested in (True, False):
        packed, absmax, nabs, nmap, offsets = rand_nf4((300, 192), nested, seed=5)
        off = float(offsets[0]) if nested else None
        out = ops.nf4_dequantize(packed, absmax, (300, 192), torch.bfloat16, nabs, nmap, off)
        ref = nf4.dequantize(
            packed.cpu(),
            absmax.cpu(),
            (300, 192),
            torch.bfloat16,
            NF4,
            nested_absmax=None if nabs is None else nabs.cpu(),
            nested_quant_map=None if nmap is None else nmap.cpu(),
            nested_offset=off,
        )
        assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(5760, 2880), (2880, 2880), (64, 320)])
def test_dequant_fused_experts_bit_exact(shape, nested):
    e = 4
    packed, absmax, nabs, nmap, offsets = rand_nf4(shape, nested, seed=11, n_experts=e)
    out = ops.nf4_dequantize_experts(packed, absmax, shape, e, torch.bfloat16, nabs, nmap, offsets)
    assert out.shape == torch.Size([e, *shape])
    numel = math.prod(shape)
    nb = numel // 64
    am = ref_absmax(absmax, nabs, nmap, offsets, nb, e)
    ref = ref_dequant(packed, am, numel * e, torch.bfloat16).reshape(e, *shape)
    assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16))
    # each expert equals the single-tensor dequantization of its own slice
    nnb = -(-nb // 256)
    for i in range(e):
        single = ops.nf4_dequantize(
            packed[i * numel // 2 : (i + 1) * numel // 2].clone(),
            absmax[i * nb : (i + 1) * nb].clone(),
            shape,
            torch.bfloat16,
            None if nabs is None else nabs[i * nnb : (i + 1) * nnb].clone(),
            nmap,
            float(offsets[i]) if nested else None,
        )
        assert torch.equal(single, out[i])


# ---------------------------------------------------------------------------------------------
# Quantize.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(2880, 2880), (512, 2880), (130, 70), (1, 3), (64, 64)])
def test_quantize_matches_reference(shape, nested, dtype):
    g = gen(sum(shape) + nested)
    w = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    if w.numel() >= 128:
        w.view(-1)[64:128] = 0  # an all-zero block: CUDA semantics give code 0
    q = ops.nf4_quantize(w.to(DEV), nested=nested)
    packed, absmax, nabs, offset = ref_quantize(w, nested)
    assert torch.equal(q.packed.cpu(), packed), "4-bit codes differ"
    if not nested:
        assert torch.equal(q.absmax.cpu(), absmax)
        return
    # offset: float64 sum, rounded once; allow one ulp
    assert abs(q.nested_offset - offset) <= abs(offset) * 2**-23 + 1e-30
    # nested codes and scales with the kernel's own offset (isolates the 8-bit encoder)
    _, qcodes, s, _ = ref_quantize(w, nested, offset_override=q.nested_offset)
    assert torch.equal(q.nested_absmax.cpu(), s)
    assert torch.equal(q.absmax.cpu(), qcodes), "nested 8-bit codes differ"
    # round trip: dequantization error bounded by the code spacing
    deq = q.dequantize().float().cpu()
    assert (deq - w.float()).abs().max() <= w.float().abs().max() * 0.2


def test_quantize_matches_gptoss_cpu_quantizer():
    nf4 = pytest.importorskip("gptoss_3090.nf4")
    if not hasattr(nf4, "quantize"):
        pytest.skip("gptoss_3090.nf4.quantize not available")
    g = gen(3)
    w = (torch.randn(700, 320, generator=g) * 0.02).to(torch.bfloat16)
    for nested in (True, False):
        q = ops.nf4_quantize(w.to(DEV), nested=nested)
        ref = nf4.quantize(w, nested=nested)
        assert torch.equal(q.packed.cpu().reshape(-1), ref["weight"].reshape(-1))
        if nested:
            ref_off = float(ref["quant_state"]["nested_offset"])
            assert abs(q.nested_offset - ref_off) <= abs(ref_off) * 2**-23
            if q.nested_offset == ref_off:
                assert torch.equal(q.absmax.cpu(), ref["absmax"])
                assert torch.equal(q.nested_absmax.cpu(), ref["nested_absmax"])
        else:
            assert torch.equal(q.absmax.cpu(), ref["absmax"])
        # the CPU dict builds a GPU weight that dequantizes identically
        w2 = Nf4Weight.from_dict(ref, device=DEV)
        if not nested or q.nested_offset == ref_off:
            assert torch.equal(w2.dequantize(), q.dequantize())


def test_quantize_matches_bitsandbytes_cuda():
    try:
        import bitsandbytes.functional as F

        x = torch.randn(256, 320, dtype=torch.bfloat16, device=DEV) * 0.02
        qb, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    except Exception as e:  # no CUDA build of bitsandbytes here
        pytest.skip(f"bitsandbytes CUDA quantize unavailable: {e}")
    q = ops.nf4_quantize(x, nested=True)
    assert torch.equal(q.packed.reshape(-1), qb.reshape(-1))
    off = float(st.offset)
    assert abs(q.nested_offset - off) <= abs(off) * 2**-22
    if q.nested_offset == off:
        assert torch.equal(q.absmax, st.absmax)
        assert torch.equal(q.nested_absmax, st.state2.absmax)
    qb2, st2 = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    q2 = ops.nf4_quantize(x, nested=False)
    assert torch.equal(q2.packed.reshape(-1), qb2.reshape(-1))
    assert torch.equal(q2.absmax, st2.absmax)


# ---------------------------------------------------------------------------------------------
# Linear.
# ---------------------------------------------------------------------------------------------


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def linear_ref(x, w_deq, bias):
    y = x.float() @ w_deq.float().t()
    if bias is not None:
        y = y + bias.float()
    return y


_RESULTS: list[tuple] = []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_matches_dequant_matmul(shape, dtype, tuning):
    n, k = shape
    w = make_weight(n, k, dtype, nested=(n % 2 == 0), seed=n + k)
    w_deq = w.dequantize()
    g = gen(k)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV)
    for m in MS:
        x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
        y = ops.nf4_linear(x, w, bias)
        ref = linear_ref(x, w_deq, bias)
        err = rel_err(y, ref)
        _RESULTS.append((f"{n}x{k}", m, str(dtype)[6:], tuning or "auto", err))
        assert y.shape == (m, n) and y.dtype == dtype
        assert torch.isfinite(y).all()
        assert err <= 1e-2, f"M={m}: relative error {err:.3e}"


@pytest.mark.parametrize("path", ["decode", "mma_l", "mma_m", "mma_s", "dequant_matmul"])
def test_linear_every_path(path, tuning):
    n, k = 520, 2880  # N not a multiple of the tile: ragged column tiles
    w = make_weight(n, k, torch.bfloat16, nested=True, seed=7)
    w_deq = w.dequantize()
    g = gen(99)
    bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
    for m in [1, 5, 8, 9, 16] if path == "decode" else [1, 17, 100, 300]:
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV)
        y = ops.nf4_linear(x, w, bias, path=path)
        err = rel_err(y, linear_ref(x, w_deq, bias))
        assert err <= 1e-2, f"{path} M={m}: {err:.3e}"
        # no bias, 3-D input
        y3 = ops.nf4_linear(x.view(1, m, k), w, None, path=path)
        err3 = rel_err(y3.view(m, n), linear_ref(x, w_deq, None))
        assert err3 <= 1e-2


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(528, 2880), (208, 320)])  # K / 64 = 45, 5: a half chunk
def test_linear_stream_path(shape, dtype, nested, tuning):
    """The streaming kernel (the M <= 16 default for weights of 16-row multiples) against
    dequantize-then-matmul in fp32, with and without bias, for one, two and four token tiles
    (M up to 32, partial tiles included)."""
    n, k = shape
    w = make_weight(n, k, dtype, nested=nested, seed=11)
    w_deq = w.dequantize()
    g = gen(5)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV)
    for m in [1, 3, 8, 9, 16, 17, 25, 32]:
        x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
        for b in (bias, None):
            y = ops.nf4_linear(x, w, b, path="stream")
            err = rel_err(y, linear_ref(x, w_deq, b))
            assert err <= 1e-2, f"stream {n}x{k} M={m}: {err:.3e}"
        # auto picks the same kernel for such weights: bit-identical
        y_stream = ops.nf4_linear(x, w, bias, path="stream")
        assert torch.equal(ops.nf4_linear(x, w, bias, path="auto"), y_stream)
    with pytest.raises(ValueError, match="M <= 32"):
        ops.nf4_linear(torch.randn(33, k, dtype=dtype, device=DEV), w, bias, path="stream")


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(528, 2880), (208, 320), (2880, 4096)])
def test_linear_wide_path(shape, dtype, nested, tuning):
    """The wide streaming kernel (eight token tiles, activations staged per block) against
    dequantize-then-matmul in fp32, with and without bias: partial tiles, a half chunk
    (K / 64 = 45 and 5), a last block with idle warps (528 and 208 rows: 33 and 13 groups),
    every forced K split including none, and run-to-run determinism."""
    n, k = shape
    w = make_weight(n, k, dtype, nested=nested, seed=12)
    w_deq = w.dequantize()
    g = gen(6)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV)
    for m in [1, 8, 33, 47, 64]:
        x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
        for b in (bias, None):
            y = ops.nf4_linear(x, w, b, path="wide")
            err = rel_err(y, linear_ref(x, w_deq, b))
            assert err <= 1e-2, f"wide {n}x{k} M={m}: {err:.3e}"
        again = ops.nf4_linear(x, w, bias, path="wide")
        assert torch.equal(again, ops.nf4_linear(x, w, bias, path="wide"))
        if ops.STREAM_MAX_M < m and runtime.use_wide_linear(torch.cuda.current_device()):
            # what auto runs for these M on sm90 tunings: the same bits
            assert torch.equal(ops.nf4_linear(x, w, bias), again)
    with pytest.raises(ValueError, match="M <= 64"):
        ops.nf4_linear(torch.randn(65, k, dtype=dtype, device=DEV), w, bias, path="wide")


def test_linear_wide_path_splits_and_graph():
    """The wide kernel without and with a K split (shapes whose automatic split differs), and
    CUDA-graph capture and replay."""
    from gptoss_3090 import _native

    k = 2880
    # plans for one and for several K splits, both run below
    dev = torch.cuda.current_device()
    one = _native.cuda_nf4_linear_plan(dev, 64, 16 * 8 * 200, 256, "wide")
    many = _native.cuda_nf4_linear_plan(dev, 64, 128, k, "wide")
    assert one["splits"] == 1 and one["workspace_floats"] == 0
    split_ws = 0 if many["cluster_reduce"] else many["splits"] * 64 * 128
    assert many["splits"] > 1 and many["workspace_floats"] == split_ws
    w1 = make_weight(16 * 8 * 200, 256, torch.bfloat16, seed=5)
    x1 = torch.randn(64, 256, dtype=torch.bfloat16, device=DEV)
    y1 = ops.nf4_linear(x1, w1, path="wide")
    assert rel_err(y1, linear_ref(x1, w1.dequantize(), None)) <= 1e-2
    w = make_weight(2880, k, torch.bfloat16, seed=4)
    bias = torch.randn(2880, dtype=torch.bfloat16, device=DEV)
    xg = torch.randn(64, k, dtype=torch.bfloat16, device=DEV)
    eager = ops.nf4_linear(xg, w, bias, path="wide")
    graph, yg = capture(lambda: ops.nf4_linear(xg, w, bias, path="wide"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, eager)
    xg.copy_(torch.randn_like(xg))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, ops.nf4_linear(xg, w, bias, path="wide"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_splitk_reduce_vec_gives_the_same_bits(monkeypatch, dtype):
    """The default split-K reduce (GPTOSS_3090_SPLITK_REDUCE=vec) sums the partials four outputs
    per thread, in the same order as the scalar reduce (=scalar): the same bits after the wide
    and the tensor-core split launches, with and without bias, and unset means vec. N = 130
    (not a multiple of 4) falls back to the scalar reduce; an unknown setting is a ValueError
    naming the variable."""
    from gptoss_3090 import _native

    k = 2880
    dev = torch.cuda.current_device()
    g = gen(31)
    # the wide path's splits go through the workspace and the reduce launch only without clusters
    monkeypatch.setenv("GPTOSS_3090_WIDE_REDUCE", "launch")
    cases = [
        ("wide", 48, 128),
        ("wide", 64, 2880),
        ("mma", 64, 128),
        ("mma", 200, 256),
        ("mma", 64, 130),
    ]
    for path, m, n in cases:
        assert _native.cuda_nf4_linear_plan(dev, m, n, k, path)["splits"] > 1, (path, m, n)
        w = make_weight(n, k, dtype, seed=n + m)
        x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
        bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV)
        for b in (bias, None):
            ys = {}
            for mode in ("scalar", "vec"):
                monkeypatch.setenv("GPTOSS_3090_SPLITK_REDUCE", mode)
                ys[mode] = ops.nf4_linear(x, w, b, path=path)
            err = rel_err(ys["vec"], linear_ref(x, w.dequantize(), b))
            assert err <= 1e-2, f"{path} {m}x{n}: {err:.3e}"
            assert torch.equal(ys["vec"], ys["scalar"]), (path, m, n, b is None)
            monkeypatch.delenv("GPTOSS_3090_SPLITK_REDUCE")
            assert torch.equal(ops.nf4_linear(x, w, b, path=path), ys["vec"])
    monkeypatch.setenv("GPTOSS_3090_SPLITK_REDUCE", "fast")
    with pytest.raises(ValueError, match="GPTOSS_3090_SPLITK_REDUCE"):
        ops.nf4_linear(x, w, bias, path="mma")


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_cluster_reduce_gives_the_same_bits(monkeypatch, dtype, nested):
    """On sm_90 the wide kernel sums its K splits inside thread-block clusters
    (GPTOSS_3090_WIDE_REDUCE=cluster, the default there) where the GPU runs all of the launch's
    clusters at once (the driver's count; else the workspace and the reduce launch): the same
    adds in the same order as the workspace + reduce launch (=launch), so the same bits, with
    and without bias, for vLLM's q/k/v (three segments), its o projection (8 splits, a last row
    tile with idle warps), 5760 rows and M not a multiple of 8; the plan then asks for no
    workspace. Also against dequantize-then-matmul in fp32 and under CUDA-graph replay. With
    GPTOSS_3090_NF4_SPLITS set (2 to 8) every case runs in clusters. An unknown setting is a
    ValueError naming the variable."""
    from gptoss_3090 import _native

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need sm_90")
    if runtime.tuning() != "sm90":
        pytest.skip("a forced tuning stands for a GPU without clusters")
    forced = bool(os.environ.get("GPTOSS_3090_NF4_SPLITS", "").strip())
    dev = torch.cuda.current_device()
    g = gen(41)
    cases = [
        ((4096, 512, 512), 2880, 64),
        ((4096, 512, 512), 2880, 37),
        ((2880,), 4096, 64),
        ((5760,), 2880, 48),
        ((2880,), 4096, 33),
    ]
    clustered = 0
    for rows, k, m in cases:
        n = sum(rows)
        plan = _native.cuda_nf4_linear_plan(dev, m, n, k, "wide")
        monkeypatch.setenv("GPTOSS_3090_WIDE_REDUCE", "launch")
        plain = _native.cuda_nf4_linear_plan(dev, m, n, k, "wide")
        monkeypatch.delenv("GPTOSS_3090_WIDE_REDUCE")
        assert plain["splits"] == plan["splits"] > 1, (plan, plain)
        assert not plain["cluster_reduce"] and plain["workspace_floats"] > 0, plain
        at_once = _native.max_active_clusters(
            dev, "nf4", "nf4_linear_wide_bf16", plan["splits"], plan["threads"], plan["smem"]
        )
        fits = at_once >= plan["grid"][0]
        assert plan["cluster_reduce"] == (forced or fits), (plan, at_once)
        print(f"[wide cluster] {rows}x{k} M={m}: {plan['grid']} clusters at once {at_once}")
        if not plan["cluster_reduce"]:
            continue
        clustered += 1
        assert plan["workspace_floats"] == 0, plan
        parts = [make_weight(r, k, dtype, nested=nested, seed=r + m) for r in rows]
        w_deq = torch.cat([p.dequantize() for p in parts])
        x = torch.randn(m, k, generator=g).to(dtype).to(DEV)
        bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEV)
        for b in (bias, None):
            y = ops.nf4_linear(x, parts, b, path="wide")
            monkeypatch.setenv("GPTOSS_3090_WIDE_REDUCE", "launch")
            y_launch = ops.nf4_linear(x, parts, b, path="wide")
            monkeypatch.delenv("GPTOSS_3090_WIDE_REDUCE")
            assert torch.equal(y, y_launch), (rows, k, m, b is None)
            err = rel_err(y, linear_ref(x, w_deq, b))
            assert err <= 1e-2, f"cluster {rows}x{k} M={m}: {err:.3e}"
        # graph capture and replay of a clustered launch
        graph, yg = capture(lambda x=x, w=parts, b=bias: ops.nf4_linear(x, w, b, path="wide"))
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, ops.nf4_linear(x, parts, bias, path="wide"))
    # the o projection's clusters of 8 fit an H100/H200 in one wave
    assert clustered > 0
    monkeypatch.setenv("GPTOSS_3090_WIDE_REDUCE", "dsmem")
    with pytest.raises(ValueError, match="GPTOSS_3090_WIDE_REDUCE"):
        ops.nf4_linear(x, parts, bias, path="wide")


@pytest.mark.parametrize("m", [1, 5, 17, 48, 64])
def test_pdl_launches_wait_for_their_inputs(monkeypatch, m):
    """GPTOSS_3090_PDL=on or linear (the default; sm_90 tunings) lets the linear's kernels start
    while the previous kernel in the stream drains, and each reads x only after
    griddepcontrol.wait. Here the kernel just before every call rewrites x in place, so a read
    before the wait would see the previous call's x: call after call, the outputs equal those
    with PDL off bit for bit
    (streaming, wide with its split-K reduce or clusters), in eager mode and in a CUDA graph.
    An unknown setting is a ValueError naming the variable."""
    g = gen(71 + m)
    for rows, k in [((4096, 512, 512), 2880), ((2880,), 4096)]:
        parts = [make_weight(r, k, torch.bfloat16, seed=r + k) for r in rows]
        n = sum(rows)
        bias = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
        xs = [torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV) for _ in range(6)]
        x = torch.empty_like(xs[0])
        runs = {}
        for mode in ("off", "on"):
            monkeypatch.setenv("GPTOSS_3090_PDL", mode)
            ys = []
            for xi in xs:
                x.copy_(xi)
                ys.append(ops.nf4_linear(x, parts, bias))
            runs[mode] = ys
        for i, (a, b) in enumerate(zip(runs["off"], runs["on"], strict=True)):
            assert torch.equal(a, b), (rows, k, m, i)
        monkeypatch.delenv("GPTOSS_3090_PDL")
        src = torch.zeros_like(x)

        def step(x=x, src=src, parts=parts, bias=bias):
            x.copy_(src)
            return ops.nf4_linear(x, parts, bias)

        graph, yg = capture(step)
        for i, xi in enumerate(xs):
            src.copy_(xi)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(yg, runs["off"][i]), (rows, k, m, i, "graph")
    monkeypatch.setenv("GPTOSS_3090_PDL", "maybe")
    with pytest.raises(ValueError, match="GPTOSS_3090_PDL"):
        ops.nf4_linear(x, parts, bias)


@pytest.mark.parametrize("path, m", [("stream", 5), ("wide", 48)])
def test_linear_stream_path_and_wide_fused_strided(path, m):
    """Three segments (a q/k/v-like fused weight) and a strided x through the streaming paths;
    weights they cannot serve (rows not a multiple of 16, mixed statistics) get clear errors."""
    k = 2880
    parts = [make_weight(r, k, torch.bfloat16, seed=20 + r) for r in (256, 64, 64)]
    w_deq = torch.cat([p.dequantize() for p in parts])
    big = torch.randn(m, 2 * k, dtype=torch.bfloat16, device=DEV)
    x = big[:, 8 : 8 + k]
    y = ops.nf4_linear(x, parts, path=path)
    assert rel_err(y, linear_ref(x, w_deq, None)) <= 1e-2
    ragged = make_weight(520, k, torch.bfloat16, seed=21)
    mixed = [parts[0], make_weight(64, k, torch.bfloat16, nested=False, seed=3)]
    for bad in (ragged, mixed):
        with pytest.raises(ValueError, match=f"{path} path"):
            ops.nf4_linear(x, bad, path=path)


def test_linear_strided_input():
    w = make_weight(256, 512, torch.bfloat16, seed=3)
    big = torch.randn(10, 1024, dtype=torch.bfloat16, device=DEV)
    x = big[:, 256:768]  # row stride 1024, 16-byte aligned
    for path in ("decode", "mma_s"):
        y = ops.nf4_linear(x, w, path=path)
        assert rel_err(y, linear_ref(x, w.dequantize(), None)) <= 1e-2


@pytest.mark.parametrize("m", [1, 7, 16, 64, 512])
def test_linear_fused_qkv_three_segments(m, tuning):
    k = 2880
    q = make_weight(4096, k, torch.bfloat16, nested=True, seed=1)
    kk = make_weight(512, k, torch.bfloat16, nested=True, seed=2)
    v = make_weight(512, k, torch.bfloat16, nested=False, seed=3)  # mixed statistics
    fused = Nf4FusedWeight((q, kk, v))
    w_deq = fused.dequantize()
    g = gen(m)
    bias = (torch.randn(fused.out_features, generator=g) * 0.1).to(torch.bfloat16).to(DEV)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV)
    y = ops.nf4_linear(x, fused, bias)
    assert y.shape == (m, 5120)
    assert rel_err(y, linear_ref(x, w_deq, bias)) <= 1e-2
    # equal to three separate linears, concatenated
    parts = [ops.nf4_linear(x, p) for p in (q, kk, v)]
    sep = torch.cat(parts, dim=1).float() + bias.float()
    assert rel_err(y, sep) <= 1e-2


def test_linear_cuda_graph_replay_identical(tuning):
    w = make_weight(2880, 2880, torch.bfloat16, seed=4)
    bias = torch.randn(2880, dtype=torch.bfloat16, device=DEV)
    for m in (1, 16, 300):
        x = torch.randn(m, 2880, dtype=torch.bfloat16, device=DEV)
        eager = ops.nf4_linear(x, w, bias)
        deq_eager = w.dequantize()
        graph, (y, d) = capture(lambda x=x: (ops.nf4_linear(x, w, bias), w.dequantize()))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
        assert torch.equal(d, deq_eager)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, ops.nf4_linear(x, w, bias))


def test_quantize_under_graph_capture():
    w = torch.randn(512, 640, dtype=torch.bfloat16, device=DEV)
    ref = ops.nf4_quantize(w, nested=True)
    nmap = ops.dynamic_map_signed(DEV)
    ws = torch.empty(512 * 640 // 64, dtype=torch.float32, device=DEV)
    torch.ops.gptoss_3090.nf4_quantize(w, True, nmap, ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.gptoss_3090.nf4_quantize(w, True, nmap, ws)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], ref.packed)
    assert torch.equal(out[1], ref.absmax)


def test_opcheck_all_ops():
    w = make_weight(256, 320, torch.bfloat16, seed=8)
    x = torch.randn(5, 320, dtype=torch.bfloat16, device=DEV)
    bias = torch.randn(256, dtype=torch.bfloat16, device=DEV)
    torch.library.opcheck(
        torch.ops.gptoss_3090.nf4_linear.default,
        (x, w._op_tensors(), [w.nested_offset], bias, "auto"),
    )
    wp = make_weight(128, 192, torch.bfloat16, nested=False, seed=9)
    torch.library.opcheck(
        torch.ops.gptoss_3090.nf4_linear.default,
        (
            torch.randn(40, 192, dtype=torch.bfloat16, device=DEV),
            wp._op_tensors(),
            [0.0],
            None,
            "auto",
        ),
    )
    torch.library.opcheck(
        torch.ops.gptoss_3090.nf4_dequantize.default,
        (
            w.packed,
            w.absmax,
            w.nested_absmax,
            w.nested_quant_map,
            None,
            w.nested_offset,
            [256, 320],
            1,
            torch.bfloat16,
        ),
    )
    wf = torch.randn(64, 320, dtype=torch.float16, device=DEV)
    ws = torch.empty(64 * 320 // 64, dtype=torch.float32, device=DEV)
    torch.library.opcheck(
        torch.ops.gptoss_3090.nf4_quantize.default,
        (wf, True, ops.dynamic_map_signed(DEV), ws),
    )


def test_torch_compile_opaque():
    w = make_weight(512, 640, torch.bfloat16, seed=12)
    x = torch.randn(4, 640, dtype=torch.bfloat16, device=DEV)

    def f(x):
        return ops.nf4_linear(x, w) * 2

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_from_dict_roundtrip_and_checkpoint_keys():
    w = make_weight(96, 128, torch.float16, nested=True, seed=13)
    d = w.to_dict()
    w2 = Nf4Weight.from_dict(d, device=DEV)
    assert torch.equal(w2.dequantize(), w.dequantize())
    # safetensors-style keys with a module prefix and the JSON blob
    import json

    blob = json.dumps(d["quant_state"]).encode()
    flat = {
        "m.weight": d["weight"],
        "m.weight.absmax": d["absmax"],
        "m.weight.quant_map": d["quant_map"],
        "m.weight.nested_absmax": d["nested_absmax"],
        "m.weight.nested_quant_map": d["nested_quant_map"],
        "m.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(blob), dtype=torch.uint8),
    }
    w3 = Nf4Weight.from_dict(flat, device=DEV, prefix="m.")
    assert torch.equal(w3.dequantize(), w.dequantize())


def test_bad_arguments_on_gpu_raise_cleanly():
    w = make_weight(128, 128, torch.bfloat16, seed=14)
    x = torch.randn(3, 128, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(TypeError):
        ops.nf4_linear(x.half(), w)
    with pytest.raises(ValueError):
        ops.nf4_linear(torch.randn(3, 192, dtype=torch.bfloat16, device=DEV), w)
    with pytest.raises(ValueError):
        ops.nf4_linear(x, w, torch.zeros(127, dtype=torch.bfloat16, device=DEV))
    xs = torch.randn(3 * 128 + 1, dtype=torch.bfloat16, device=DEV)[1:].view(3, 128)
    y = ops.nf4_linear(xs, w)  # misaligned activations are copied, not rejected
    assert rel_err(y, linear_ref(xs, w.dequantize(), None)) <= 1e-2
    with pytest.raises(ValueError):
        ops.nf4_dequantize(
            w.packed[1:],
            w.absmax,
            (128, 128),
            torch.bfloat16,
            w.nested_absmax,
            w.nested_quant_map,
            w.nested_offset,
        )
    from gptoss_3090 import _native

    with pytest.raises(ValueError):  # the native layer re-checks: K not a multiple of 64
        _native.cuda_nf4_linear(
            torch.cuda.current_device(),
            torch.cuda.current_stream().cuda_stream,
            "bfloat16",
            x.data_ptr(),
            128,
            3,
            96,
            x.data_ptr(),
            128,
            0,
            [(w.packed.data_ptr(), w.absmax.data_ptr(), 0, 0, 0, 0.0, False, 128)],
            "auto",
        )


def test_print_summary():
    """Prints the linear accuracy table collected above (run with -s)."""
    if not _RESULTS:
        pytest.skip("no linear results collected")
    worst: dict[tuple, float] = {}
    for shape, _m, dt, tu, err in _RESULTS:
        key = (shape, dt, tu)
        worst[key] = max(worst.get(key, 0.0), err)
    print("\nshape        dtype     tuning  worst rel err over M in", MS)
    for (shape, dt, tu), err in sorted(worst.items()):
        print(f"{shape:12s} {dt:9s} {tu:7s} {err:.2e}")
    if os.environ.get("GPTOSS_3090_TEST_TABLE"):
        with open(os.environ["GPTOSS_3090_TEST_TABLE"], "w") as f:
            for row in _RESULTS:
                f.write(",".join(str(c) for c in row) + "\n")
