"""Bad arguments to the NF4 ops are rejected in Python with ValueError/TypeError before any
native code runs (CPU tensors here: no GPU needed), and the native launchers re-check; so is a
bad value of the linear's dequantize threshold, and of the attention's tuning overrides."""

from __future__ import annotations

import pytest
import torch
from gptoss_3090 import _native, ops
from gptoss_3090.ops import Nf4FusedWeight, Nf4Weight


def cpu_weight(n=64, k=128, nested=True, dtype=torch.bfloat16) -> Nf4Weight:
    numel = n * k
    nb = numel // 64
    return Nf4Weight(
        packed=torch.randint(0, 256, (numel // 2,), dtype=torch.uint8),
        absmax=torch.randint(0, 256, (nb,), dtype=torch.uint8)
        if nested
        else torch.rand(nb, dtype=torch.float32),
        shape=(n, k),
        dtype=dtype,
        nested_absmax=torch.rand(-(-nb // 256)) if nested else None,
        nested_quant_map=ops.dynamic_map_signed() if nested else None,
        nested_offset=0.05 if nested else None,
    )


def test_dynamic_map_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(ops.dynamic_map_signed(), bnbf.create_dynamic_map(signed=True))
    # and our fallback implementation on its own
    assert torch.equal(ops._dynamic_map_cpu(), bnbf.create_dynamic_map(signed=True))


def test_linear_rejects_cpu_tensors():
    w = cpu_weight()
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        ops.nf4_linear(x, w)


def test_linear_rejects_wrong_dtypes():
    w = cpu_weight()
    with pytest.raises(TypeError, match="dtype"):
        ops.nf4_linear(torch.randn(2, 128), w)  # float32 activations
    with pytest.raises(TypeError):
        ops.nf4_linear(torch.randn(2, 128, dtype=torch.float16), w)  # weight is bf16
    with pytest.raises(TypeError):
        ops.nf4_linear(torch.randn(2, 128, dtype=torch.bfloat16), w, torch.zeros(64))  # f32 bias
    with pytest.raises(TypeError):
        ops.nf4_linear(torch.randn(2, 128, dtype=torch.bfloat16), "not a weight")


def test_linear_rejects_unknown_paths():
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="path: unknown value 'wid'; expected one of auto, "):
        ops.nf4_linear(x, cpu_weight(), path="wid")
    assert "wide" in ops.LINEAR_PATHS and "dequant_matmul" in ops.LINEAR_PATHS


def test_linear_rejects_wrong_shapes():
    w = cpu_weight()
    with pytest.raises(ValueError, match="in_features"):
        ops.nf4_linear(torch.randn(2, 192, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="bias"):
        ops.nf4_linear(
            torch.randn(2, 128, dtype=torch.bfloat16), w, torch.zeros(63, dtype=torch.bfloat16)
        )
    with pytest.raises(ValueError, match="path"):
        ops.nf4_linear(torch.randn(2, 128, dtype=torch.bfloat16), w, path="fastest")
    # K not a multiple of 64 cannot run the fused kernels
    w2 = cpu_weight(n=64, k=96)
    with pytest.raises(ValueError, match="multiple of 64"):
        ops.nf4_linear(torch.randn(2, 96, dtype=torch.bfloat16), w2)


def test_linear_rejects_misaligned_weights():
    w = cpu_weight()
    shifted = torch.empty(w.packed.numel() + 16, dtype=torch.uint8)[1:][: w.packed.numel()]
    shifted.copy_(w.packed)
    with pytest.raises(ValueError, match="aligned"):
        Nf4Weight(
            packed=shifted,
            absmax=w.absmax,
            shape=w.shape,
            dtype=w.dtype,
            nested_absmax=w.nested_absmax,
            nested_quant_map=w.nested_quant_map,
            nested_offset=w.nested_offset,
        )


def test_weight_construction_is_validated():
    w = cpu_weight()
    with pytest.raises(ValueError, match="absmax"):
        Nf4Weight(packed=w.packed, absmax=w.absmax[:-1], shape=w.shape, dtype=w.dtype,
                  nested_absmax=w.nested_absmax, nested_quant_map=w.nested_quant_map,
                  nested_offset=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="nested"):
        Nf4Weight(packed=w.packed, absmax=w.absmax, shape=w.shape, dtype=w.dtype)
    with pytest.raises(ValueError, match="nested_offset"):
        Nf4Weight(packed=w.packed, absmax=w.absmax, shape=w.shape, dtype=w.dtype,
                  nested_absmax=w.nested_absmax, nested_quant_map=w.nested_quant_map)  # fmt: skip
    with pytest.raises(TypeError):
        Nf4Weight(packed=w.packed.to(torch.int8), absmax=w.absmax, shape=w.shape, dtype=w.dtype)
    with pytest.raises(TypeError):
        Nf4Weight(packed=w.packed, absmax=w.absmax.float(), shape=w.shape, dtype=torch.float32)
    with pytest.raises(ValueError, match="bytes"):
        Nf4Weight(packed=w.packed, absmax=w.absmax, shape=(65, 128), dtype=w.dtype,
                  nested_absmax=w.nested_absmax, nested_quant_map=w.nested_quant_map,
                  nested_offset=0.1)  # fmt: skip
    with pytest.raises(ValueError):
        Nf4FusedWeight((w, cpu_weight(n=64, k=192)))
    with pytest.raises(ValueError):
        Nf4FusedWeight((w, w, w, w))


def test_from_dict_rejects_fp4_and_bad_blocksize():
    w = cpu_weight(nested=False)
    d = w.to_dict()
    w2 = Nf4Weight.from_dict(d, device="cpu")
    assert torch.equal(w2.packed.reshape(-1), w.packed) and torch.equal(w2.absmax, w.absmax)
    bad = dict(d, quant_state=dict(d["quant_state"], quant_type="fp4"))
    with pytest.raises(ValueError, match="nf4"):
        Nf4Weight.from_dict(bad, device="cpu")
    bad = dict(d, quant_state=dict(d["quant_state"], blocksize=128))
    with pytest.raises(ValueError):
        Nf4Weight.from_dict(bad, device="cpu")
    bad = dict(d, quant_map=torch.linspace(-1, 1, 16))
    with pytest.raises(ValueError, match="quant_map"):
        Nf4Weight.from_dict(bad, device="cpu")
    with pytest.raises(ValueError):
        Nf4Weight.from_dict({}, device="cpu")


def test_dequantize_rejects_bad_arguments():
    w = cpu_weight()
    with pytest.raises(ValueError, match="CUDA"):
        ops.nf4_dequantize(w.packed, w.absmax, w.shape, torch.bfloat16, w.nested_absmax,
                           w.nested_quant_map, w.nested_offset)  # fmt: skip
    with pytest.raises(TypeError):
        ops.nf4_dequantize(w.packed, w.absmax, w.shape, torch.float32, w.nested_absmax,
                           w.nested_quant_map, w.nested_offset)  # fmt: skip
    with pytest.raises(ValueError, match="nested_offset"):
        ops.nf4_dequantize(w.packed, w.absmax, w.shape, torch.bfloat16, w.nested_absmax,
                           w.nested_quant_map)  # fmt: skip
    with pytest.raises(ValueError, match="bytes"):
        ops.nf4_dequantize(w.packed, w.absmax, (64, 256), torch.bfloat16, w.nested_absmax,
                           w.nested_quant_map, 0.1)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of 64"):
        ops.nf4_dequantize_experts(w.packed, w.absmax, (3, 7), 2, torch.bfloat16)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(TypeError):
        ops.nf4_quantize(torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="CUDA"):
        ops.nf4_quantize(torch.zeros(64, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        ops.nf4_quantize(torch.zeros(0, dtype=torch.bfloat16))


def test_custom_ops_are_registered_with_fake_impls():
    for name in ("nf4_dequantize", "nf4_linear", "nf4_quantize"):
        assert hasattr(torch.ops.gptoss_3090, name)
    w = cpu_weight()
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(3, 5, 128, dtype=torch.bfloat16, device="cuda")
        ws = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in w._op_tensors()]
        y = torch.ops.gptoss_3090.nf4_linear(x, ws, [0.05], None, "auto")
        assert y.shape == (3, 5, 64) and y.dtype == torch.bfloat16
        d = torch.ops.gptoss_3090.nf4_dequantize(
            ws[0], ws[1], ws[2], ws[3], None, 0.05, [64, 128], 1, torch.float16
        )
        assert d.shape == (64, 128) and d.dtype == torch.float16
        q = torch.ops.gptoss_3090.nf4_quantize(
            torch.empty(100, 64, device="cuda"),
            True,
            torch.empty(256, device="cuda"),
            torch.empty(100, device="cuda"),
        )
        assert [t.shape[0] for t in q] == [3200, 100, 1, 1]


def test_native_launchers_recheck_arguments():
    """The Rust launchers validate too (no GPU needed for these checks to fire first)."""
    seg = (16, 16, 0, 0, 0, 0.0, False, 64)
    for bad, why in [
        (dict(k=96), "multiple of 64"),
        (dict(x=8), "aligned"),
        (dict(ldx=100), "stride"),
        (dict(segments=[]), "segments"),
        (dict(segments=[seg] * 4), "segments"),
        (dict(dtype="float32"), "dtype"),
        (dict(path="nope"), "path"),
    ]:
        kw = dict(
            ordinal=0, stream=0, dtype="bfloat16", x=16, ldx=128, m=1, k=128, y=16, ldy=64,
            bias=0, segments=[seg], path="auto",
        )  # fmt: skip
        kw.update(bad)
        with pytest.raises(ValueError) as ei:
            _native.cuda_nf4_linear(**kw)
        assert why in str(ei.value).lower(), (bad, str(ei.value))
    with pytest.raises(ValueError, match="multiple of 64"):
        _native.cuda_nf4_dequantize(0, 0, "bfloat16", (16, 16, 0, 0, 0, 0.0, False), 100, 2, 16)
    with pytest.raises(ValueError, match="nested_absmax"):
        _native.cuda_nf4_dequantize(0, 0, "bfloat16", (16, 16, 0, 0, 0, 0.0, True), 128, 1, 16)
    with pytest.raises(ValueError, match="aligned"):
        _native.cuda_nf4_dequantize(0, 0, "bfloat16", (16, 16, 0, 0, 0, 0.0, False), 128, 1, 8)
    plain = (16, 16, 0, 0, 0, 0.0, False)
    with pytest.raises(ValueError, match="1..=3 tensors"):
        _native.cuda_nf4_dequantize_segments(0, 0, "bfloat16", [])
    with pytest.raises(ValueError, match="1..=3 tensors"):
        _native.cuda_nf4_dequantize_segments(0, 0, "bfloat16", [(plain, 64, 16)] * 4)
    with pytest.raises(ValueError, match="segment 1.*aligned"):
        _native.cuda_nf4_dequantize_segments(0, 0, "bfloat16", [(plain, 64, 16), (plain, 64, 8)])
    with pytest.raises(ValueError, match="segment 0.*nested_absmax"):
        _native.cuda_nf4_dequantize_segments(
            0, 0, "bfloat16", [((16, 16, 0, 0, 0, 0.0, True), 128, 16)]
        )
    with pytest.raises(ValueError, match="null"):
        _native.cuda_nf4_quantize(0, 0, "float32", 16, 64, True, 16, 16, 0, 16, 16, 16)
    with pytest.raises(ValueError, match="weight dtype"):
        _native.cuda_nf4_quantize(0, 0, "int8", 16, 64, False, 16, 16, 0, 0, 0, 0)
    for cluster_y, threads in [(0, 256), (9, 256), (2, 0), (2, 2048)]:
        with pytest.raises(ValueError, match="cluster_y must be 1..=8"):
            _native.max_active_clusters(0, "nf4", "nf4_linear_wide_bf16", cluster_y, threads, 0)


@pytest.mark.parametrize("raw", ["sixty-four", "0", "-5"])
def test_bad_dequant_threshold_is_a_clear_error(monkeypatch, raw):
    from gptoss_3090 import runtime

    monkeypatch.setenv("GPTOSS_3090_DEQUANT_MIN_M", raw)
    runtime._dequant_min_m.cache_clear()
    try:
        with pytest.raises(ValueError, match="GPTOSS_3090_DEQUANT_MIN_M"):
            runtime.use_dequant_matmul(64, 0)
    finally:
        runtime._dequant_min_m.cache_clear()


def test_dequant_threshold_is_read_from_the_environment(monkeypatch):
    from gptoss_3090 import runtime

    monkeypatch.setenv("GPTOSS_3090_DEQUANT_MIN_M", "128")
    runtime._dequant_min_m.cache_clear()
    try:
        assert runtime._dequant_min_m() == 128
        monkeypatch.delenv("GPTOSS_3090_DEQUANT_MIN_M")
        assert runtime._dequant_min_m() == 128  # read once per process
        runtime._dequant_min_m.cache_clear()
        assert runtime._dequant_min_m() == 64
    finally:
        runtime._dequant_min_m.cache_clear()


def test_streamable_mirrors_the_native_rule():
    """``ops._streamable`` decides whether the op skips the split-K workspace because the
    runtime streams: every part a multiple of 16 rows, all nested or all plain (src/ops/nf4.rs
    ``stream_eligible``)."""

    def segs(*weights: Nf4Weight) -> tuple[list, list[int]]:
        return [(w.packed, w.absmax) for w in weights], [w.shape[0] for w in weights]

    assert ops._streamable(*segs(cpu_weight(64), cpu_weight(16)))
    assert ops._streamable(*segs(cpu_weight(64, nested=False)))
    assert not ops._streamable(*segs(cpu_weight(64), cpu_weight(8)))  # 8 rows
    assert not ops._streamable(*segs(cpu_weight(64), cpu_weight(64, nested=False)))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"splits": 0}, "splits = 0"),
        ({"decode_stages": 5}, "decode_stages = 5"),
        ({"varlen_rows": 32}, "varlen_rows = 32"),
        ({"min_keys": 40}, "min_keys = 40"),
        ({"min_keys": 8192}, "min_keys = 8192"),
    ],
)
def test_attention_overrides_reject_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        _native.attention_set_overrides(**kwargs)
    _native.attention_set_overrides()  # back to automatic


@pytest.mark.parametrize(
    "make, exc, needle",
    [
        (lambda x, w: (x.float(), w, None), TypeError, "expected dtype"),
        (lambda x, w: (x, w.half(), None), TypeError, "differs from x"),
        (lambda x, w: (x, w[:, :32], None), ValueError, "features"),
        (lambda x, w: (x, w, torch.zeros(31)), ValueError, r"bias must be \[32\]"),
        (lambda x, w: (x, w, torch.zeros(32, dtype=torch.float16)), TypeError, "bias dtype"),
        (lambda x, w: (x[0], w, None), ValueError, r"x must be \[T, H\]"),
        (lambda x, w: (x, w, None), ValueError, "CUDA tensor"),
    ],
)
def test_router_logits_rejects_bad_arguments(make, exc, needle):
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    with pytest.raises(exc, match=needle):
        ops.router_logits(*make(x, w))


def test_router_launcher_rechecks_arguments():
    base = dict(
        device=0, stream=0, dtype="bfloat16", tokens=1, hidden=64, experts=32, x=4096,
        x_stride=64, weight=8192, bias=0, bias_act=False, logits=16384, logits_f32=False,
    )  # fmt: skip
    for change, needle in (
        ({"hidden": 60}, "multiple of 8"),
        ({"x": 4100}, "aligned"),
        ({"weight": 0}, "null"),
        ({"experts": 0}, "experts"),
        ({"dtype": "float32"}, "dtype"),
        # With a top-k: its size and both routing pointers are checked too.
        ({"top_k": 9, "topk_ids": 32768, "topk_weights": 65536}, "top_k"),
        ({"top_k": 4, "topk_ids": 0, "topk_weights": 65536}, "ids"),
        ({"top_k": 4, "topk_ids": 32768, "topk_weights": 65538}, "aligned"),
        ({"top_k": 0, "topk_ids": 32768, "topk_weights": 65536}, "top_k"),
    ):
        with pytest.raises(ValueError, match=needle):
            _native.moe_router_logits(**{**base, **change})


def test_router_topk_rejects_bad_arguments_and_unpacks():
    """moe.router_topk checks like router_logits plus its top_k; router_topk_unpack reads the
    packed int32 layout back (ids, weights, logits, each contiguous) and names a wrong one."""
    from gptoss_3090 import moe as M

    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        M.router_topk(x, w, None, 4)
    with pytest.raises(TypeError, match="expected dtype"):
        M.router_topk(x.float(), w, None, 4)
    t, e, k = 3, 32, 4
    packed = torch.arange(t * M.router_topk_width(e, k), dtype=torch.int32).view(t, -1)
    ids, wts, logits = M.router_topk_unpack(packed, e, k)
    assert ids.shape == (t, k) and ids.is_contiguous() and ids.dtype == torch.int32
    assert wts.shape == (t, k) and wts.is_contiguous() and wts.dtype == torch.float32
    assert logits.shape == (t, e) and logits.is_contiguous() and logits.dtype == torch.bfloat16
    ids.fill_(7)
    wts.fill_(0.25)
    logits.fill_(1.5)
    flat = packed.view(-1)
    assert torch.equal(flat[: t * k], torch.full((t * k,), 7, dtype=torch.int32))
    assert torch.equal(flat[t * k : 2 * t * k].view(torch.float32), torch.full((t * k,), 0.25))
    assert torch.equal(
        flat[2 * t * k :].view(torch.bfloat16), torch.full((t * e,), 1.5, dtype=torch.bfloat16)
    )
    for bad in (packed[:, 1:].contiguous(), packed.float(), packed.t()):
        with pytest.raises(ValueError, match="router top-k"):
            M.router_topk_unpack(bad, e, k)


def test_wide_linear_only_on_sm90_tunings():
    """The wide streaming linear is the sm90 choice for 32 < M <= 64; a forced sm86 or sm80
    tuning and the dequant_matmul strategy keep the earlier paths (no GPU needed)."""
    from gptoss_3090 import runtime

    before = runtime.linear_strategy()
    try:
        runtime.set_tuning("sm90")
        assert runtime.use_wide_linear(0)
        runtime.set_linear_strategy("dequant_matmul")
        assert not runtime.use_wide_linear(0)
        runtime.set_linear_strategy("kernel")
        assert runtime.use_wide_linear(0)
        for other in ("sm86", "sm80"):
            runtime.set_tuning(other)
            assert not runtime.use_wide_linear(0)
    finally:
        runtime.set_tuning(None)
        runtime.set_linear_strategy(before)


def test_auto_linear_path_follows_the_runtime_strategy():
    """``ops.auto_linear_path`` is the op's ``auto`` choice (and the benchmark's label): the wide
    kernel for 32 < M <= 64 on sm90 tunings, dequantize + cuBLAS from the threshold on sm90,
    streaming for M <= 32 on 16-row parts, else the first decode kernel (M <= 16) or the
    tensor-core plan (no GPU needed: the tunings are forced)."""
    from gptoss_3090 import runtime

    before = runtime.linear_strategy()
    runtime._dequant_min_m.cache_clear()
    try:
        runtime.set_tuning("sm90")
        assert ops.auto_linear_path(1, True, 0) == "stream"
        assert ops.auto_linear_path(32, True, 0) == "stream"
        assert ops.auto_linear_path(8, False, 0) == "decode"
        assert ops.auto_linear_path(20, False, 0) == "mma"
        assert ops.auto_linear_path(33, True, 0) == "wide"
        assert ops.auto_linear_path(64, True, 0) == "wide"
        assert ops.auto_linear_path(64, False, 0) == "dequant_matmul"
        assert ops.auto_linear_path(65, True, 0) == "dequant_matmul"
        runtime.set_linear_strategy("kernel")
        assert ops.auto_linear_path(65, True, 0) == "mma"
        runtime.set_linear_strategy("dequant_matmul")
        assert ops.auto_linear_path(20, True, 0) == "dequant_matmul"
        assert ops.auto_linear_path(16, True, 0) == "stream"
        runtime.set_linear_strategy(before)
        runtime.set_tuning("sm86")
        assert ops.auto_linear_path(48, True, 0) == "mma"
        assert ops.auto_linear_path(2048, True, 0) == "mma"
        for bad in (0, -3, 2.0, True):
            with pytest.raises(ValueError, match="m must be an integer >= 1"):
                ops.auto_linear_path(bad, True, 0)
    finally:
        runtime.set_tuning(None)
        runtime.set_linear_strategy(before)
        runtime._dequant_min_m.cache_clear()
