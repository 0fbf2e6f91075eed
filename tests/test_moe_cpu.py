"""CPU tests of the MoE op's host side: workspace sizing, regimes, argument validation, the fake
implementation, and the fp32 reference the GPU tests compare against (checked here against
bitsandbytes' dequantization and transformers' GptOssMLP). Kernels are compile-checked in
tests/test_kernels_compile.py; their numerics are tested in tests/gpu/test_moe_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from gptoss_3090 import moe as M

E, H, I = 8, 128, 192  # noqa: E741 - GPT-OSS names


def make_layer(nested: bool = True, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w_gu = torch.randn(E, 2 * I, H, generator=g) * (3.0 / H**0.5)
    w_dn = torch.randn(E, H, I, generator=g) * (3.0 / I**0.5)
    gu = M.quantize_nf4_experts(w_gu, torch.randn(E, 2 * I, generator=g) * 0.5, nested=nested)
    dn = M.quantize_nf4_experts(w_dn, torch.randn(E, H, generator=g) * 0.1, nested=nested)
    rw = (torch.randn(E, H, generator=g) / H**0.5).to(dtype)
    rb = torch.randn(E, generator=g) * 0.1
    return M.MoeLayerWeights(gu, dn, M._dynamic_map_signed(), rw, rb, top_k=4), w_gu, w_dn


def op_args(layer: M.MoeLayerWeights, x: torch.Tensor, ws: torch.Tensor, **kw):
    gu, dn = layer.gate_up, layer.down
    args = dict(
        x=x, workspace=ws,
        gu_packed=gu.packed, gu_absmax=gu.absmax, gu_nested_absmax=gu.nested_absmax,
        gu_nested_offset=gu.nested_offset, gu_bias=gu.bias,
        dn_packed=dn.packed, dn_absmax=dn.absmax, dn_nested_absmax=dn.nested_absmax,
        dn_nested_offset=dn.nested_offset, dn_bias=dn.bias, nested_map=layer.nested_map,
        router_weight=layer.router_weight, router_bias=layer.router_bias, router_logits=None,
        topk_ids=None, topk_weights=None, top_k=4,
    )
    args.update(kw)
    return args


def test_workspace_bytes_covers_every_buffer() -> None:
    for t in (1, 3, 16, 17, 64, 8192):
        nb = M.moe_workspace_bytes(t, 2880, 2880, 32, 4)
        # at least h [T*4, I] and out [T*4, H] in bf16 plus the routing and grouping lists
        assert nb >= t * 4 * 2880 * 2 * 2 + t * 4 * 8 + (t * 4 + 32 * 127) * 4
        assert nb % 256 == 0
    assert M.moe_workspace_bytes(0, 2880, 2880, 32, 4) > 0
    assert M.moe_workspace_bytes(8192, 2880, 2880, 32, 4) < 400e6


def test_regimes_depend_only_on_sizes() -> None:
    for tuning in ("sm80", "sm86", "sm90"):
        assert M.moe_regime(1, 4, 32, tuning) == "decode"
        assert M.moe_regime(16, 4, 32, tuning) == "decode"
        assert M.moe_regime(17, 4, 32, tuning) == "stream"
        assert M.moe_regime(128, 4, 32, tuning) == "stream"
        assert M.moe_regime(129, 4, 32, tuning).startswith("prefill_m")
    assert M.moe_regime(8192, 4, 32, "sm86") == "prefill_m64s2"
    # The 128-token tile from 64 average rows per expert, where two blocks fit an SM.
    for tuning in ("sm80", "sm90"):
        assert M.moe_regime(511, 4, 32, tuning) == "prefill_m64s2"
        assert M.moe_regime(512, 4, 32, tuning) == "prefill_m128s2"
        assert M.moe_regime(8192, 4, 32, tuning) == "prefill_m128s2"
    with pytest.raises(ValueError, match="tuning"):
        M.moe_regime(1, 4, 32, "sm75")


def test_bad_stream_limit_raises() -> None:
    """GPTOSS_3090_MOE_STREAM_MAX_TOKENS is read once per process (so this runs in its own): a
    value that is not a token count is a ValueError naming the variable, not a silent default."""
    import os
    import subprocess
    import sys

    code = (
        "from gptoss_3090 import moe as M\n"
        "for call in (lambda: M.moe_regime(20, 4, 32, 'sm86'),\n"
        "             lambda: M.moe_workspace_bytes(20, 2880, 2880, 32, 4)):\n"
        "    try:\n"
        "        call(); print('no error')\n"
        "    except ValueError as e:\n"
        "        print('ValueError', e)\n"
    )
    env = {**os.environ, "GPTOSS_3090_MOE_STREAM_MAX_TOKENS": "lots"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert len(out) == 2, out
    for line in out:
        assert line.startswith("ValueError") and "GPTOSS_3090_MOE_STREAM_MAX_TOKENS" in line, line


def test_dequantize_matches_bitsandbytes() -> None:
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    layer, _, _ = make_layer(nested=True)
    gu = layer.gate_up
    e = 3
    n, k = gu.shape[1], gu.shape[2]
    state2 = bnb_f.QuantState(
        absmax=gu.nested_absmax[e].clone(), code=layer.nested_map.clone(), blocksize=256,
        dtype=torch.float32,
    )
    qs = bnb_f.QuantState(
        absmax=gu.absmax[e].clone(), shape=torch.Size([n, k]),
        code=torch.tensor(M.NF4_CODE, dtype=torch.float32), blocksize=64, quant_type="nf4",
        dtype=torch.bfloat16, offset=gu.nested_offset[e].clone(), state2=state2,
    )
    ref = bnb_f.dequantize_4bit(gu.packed[e].clone().view(-1, 1), qs)
    assert torch.equal(gu.dequantize(e, torch.bfloat16), ref)


def test_quantizer_is_close_to_the_weights() -> None:
    layer, w_gu, _ = make_layer(nested=False)
    err = (layer.gate_up.dequantize(1) - w_gu[1]).norm() / w_gu[1].norm()
    assert err < 0.12  # NF4 with blocksize 64 on gaussian weights: ~9% rms error


def test_reference_matches_transformers() -> None:
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    layer, _, _ = make_layer(seed=1)
    x = torch.randn(37, H).to(torch.bfloat16)
    ref, ids, _ = M.reference_forward(x, layer)
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                       num_experts_per_tok=4, swiglu_limit=7.0)
    mlp = GptOssMLP(cfg).float()
    with torch.no_grad():
        assert layer.router_weight is not None and layer.router_bias is not None
        mlp.router.weight.copy_(layer.router_weight.float())
        mlp.router.bias.copy_(layer.router_bias)
        for e in range(E):
            mlp.experts.gate_up_proj[e].copy_(layer.gate_up.dequantize(e).T)
            mlp.experts.down_proj[e].copy_(layer.down.dequantize(e).T)
        mlp.experts.gate_up_proj_bias.copy_(layer.gate_up.bias)
        mlp.experts.down_proj_bias.copy_(layer.down.bias)
        y, scores = mlp(x.float()[None])
    assert float((y[0] - ref).norm() / ref.norm()) < 1e-5


def test_reference_matches_synth_reference_moe() -> None:
    ref_mod = pytest.importorskip("gptoss_3090.reference")
    layer, _, _ = make_layer(seed=2)

    class View:
        def __init__(self, t: M.Nf4Experts) -> None:
            self.t, self.shape, self.bias = t, t.shape, t.bias

        def dequantize(self, e: int) -> torch.Tensor:
            return self.t.dequantize(e)

    x = torch.randn(9, H)
    ours, _, _ = M.reference_forward(x, layer)
    assert layer.router_weight is not None
    theirs = ref_mod.reference_moe(
        x, layer.router_weight, layer.router_bias, View(layer.gate_up), View(layer.down), 4
    )
    if isinstance(theirs, tuple):
        theirs = theirs[0]
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


def test_fake_impl_on_meta_tensors() -> None:
    layer, _, _ = make_layer(seed=3)
    x = torch.empty(5, H, dtype=torch.bfloat16, device="meta")
    ws = torch.empty(M.moe_workspace_bytes(5, H, I, E, 4), dtype=torch.uint8, device="meta")

    def meta(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty_like(t, device="meta")

    args = {k: (meta(v) if isinstance(v, torch.Tensor) else v)
            for k, v in op_args(layer, x, ws).items()}
    y = torch.ops.gptoss_3090.moe_forward(**args)
    assert y.shape == (5, H) and y.dtype == torch.bfloat16 and y.device.type == "meta"


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (lambda a, L: {"x": a["x"].float()}, TypeError, "x: expected dtype"),
        (lambda a, L: {"x": a["x"][None]}, ValueError, r"x: expected \[T, H\]"),
        (lambda a, L: {"workspace": a["workspace"].int()}, TypeError, "workspace: expected dtype"),
        (lambda a, L: {"workspace": a["workspace"][:100]}, ValueError, "workspace: expected"),
        (lambda a, L: {"gu_packed": a["gu_packed"][:, :-2]}, ValueError, "gate_up.packed: exp"),
        (lambda a, L: {"dn_absmax": a["dn_absmax"].half()}, TypeError, "down.absmax: expected"),
        (lambda a, L: {"dn_bias": a["dn_bias"][:3]}, ValueError, "down.bias: expected shape"),
        (lambda a, L: {"router_weight": None}, ValueError, "routing: pass"),
        (lambda a, L: {"router_weight": a["router_weight"].float()}, TypeError, "router_weight"),
        (lambda a, L: {"router_logits": torch.zeros(5, E + 1)}, ValueError, "router_logits"),
        (lambda a, L: {"topk_ids": torch.zeros(5, 4, dtype=torch.int32)}, ValueError, "both"),
        (
            lambda a, L: {"topk_ids": torch.zeros(5, 4), "topk_weights": torch.zeros(5, 4)},
            TypeError,
            "topk_ids: expected dtype",
        ),
        (lambda a, L: {"top_k": 9}, ValueError, "top_k"),
        (lambda a, L: {}, ValueError, "CUDA tensor"),
    ],
)
def test_validation_errors(change, exc, match) -> None:
    layer, _, _ = make_layer(seed=4)
    x = torch.randn(5, H).to(torch.bfloat16)
    ws = torch.empty(M.moe_workspace_bytes(5, H, I, E, 4), dtype=torch.uint8)
    args = op_args(layer, x, ws)
    args.update(change(args, layer))
    with pytest.raises(exc, match=match):
        M._check_args(
            args["x"], args["workspace"],
            tuple(args[f"gu_{n}"] for n in ("packed", "absmax", "nested_absmax", "nested_offset",
                                             "bias")),
            tuple(args[f"dn_{n}"] for n in ("packed", "absmax", "nested_absmax", "nested_offset",
                                             "bias")),
            args["nested_map"], args["router_weight"], args["router_bias"],
            args["router_logits"], args["topk_ids"], args["topk_weights"], args["top_k"],
        )


def test_moe_rejects_cpu_tensors_before_any_launch() -> None:
    layer, _, _ = make_layer(seed=5)
    x = torch.randn(3, H).to(torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        M.moe(x, layer)


def test_native_validation_names_the_argument() -> None:
    from gptoss_3090 import _native

    base = {
        "device": 0, "stream": 0, "dtype": "bfloat16", "tokens": 4, "hidden": 100,
        "intermediate": 128, "experts": 8, "top_k": 4, "x": 256, "x_stride": 128, "y": 256,
        "route_mode": 2, "router_weight": 0, "router_bias": 0, "router_logits": 0,
        "logits_f32": False, "topk_ids": 256, "topk_weights": 256, "nested_map": 256,
        "workspace": 256, "workspace_bytes": 1 << 30, "weights_order": "rows",
    }
    for pre in ("gu", "dn"):
        base.update({f"{pre}_packed": 256, f"{pre}_absmax": 256, f"{pre}_nested_absmax": 256,
                     f"{pre}_nested_offset": 256, f"{pre}_bias": 256, f"{pre}_nested": True,
                     f"{pre}_nnb": 1})
    with pytest.raises(ValueError, match="hidden size"):
        _native.moe_forward(base)
    missing = dict(base)
    del missing["gu_bias"]
    with pytest.raises(ValueError, match="missing argument 'gu_bias'"):
        _native.moe_forward(missing)
    with pytest.raises(ValueError, match="weights_order: expected 'rows' or 'chunks'"):
        _native.moe_forward({**base, "hidden": 128, "weights_order": "columns"})
    with pytest.raises(ValueError, match="dtype"):
        _native.moe_forward({**base, "hidden": 128, "dtype": "float32"})


@pytest.mark.parametrize("nested", [True, False])
def test_from_fused_tiny_checkpoint_is_exact(tmp_path, nested: bool) -> None:
    """The device container built from the checkpoint's fused view dequantizes bit-identically."""
    synth = pytest.importorskip("gptoss_3090.synth")
    from gptoss_3090 import open_checkpoint

    path = synth.write_synthetic_checkpoint(tmp_path / "tiny", "tiny", nested=nested,
                                            progress=False)
    ck = open_checkpoint(path)
    gu, dn = ck.fused_experts(1, "gate_up"), ck.fused_experts(1, "down")
    w = M.MoeLayerWeights.from_fused(gu, dn, device="cpu")
    rows = M.MoeLayerWeights.from_fused(gu, dn, device="cpu", weights_order="rows")
    assert (w.order, rows.order) == ("chunks", "rows")
    assert w.gate_up.nested == nested and w.down.nested == nested
    for e in range(w.experts):
        for layer in (w, rows):
            assert torch.equal(layer.gate_up.dequantize(e, torch.bfloat16), gu.dequantize(e))
            assert torch.equal(layer.down.dequantize(e, torch.bfloat16), dn.dequantize(e))
    assert torch.equal(w.gate_up.bias, gu.bias.float())
    with pytest.raises(ValueError, match="weights_order"):
        M.MoeLayerWeights.from_fused(gu, dn, device="cpu", weights_order="cols")


def _row_and_chunk_major(e: int, n: int, k: int, gate_up: bool) -> tuple[torch.Tensor, ...]:
    """Random packed experts [e, n * k / 2] and their chunk-major reorder (same shape)."""
    packed = torch.randint(0, 256, (e, n * k // 2), dtype=torch.uint8)
    cm = M.chunk_major_packed(packed, n, k, gate_up)
    assert cm.shape == packed.shape
    return packed, cm


@pytest.mark.parametrize("gate_up", [True, False])
@pytest.mark.parametrize("k", [128, 192])
def test_chunk_major_order_matches_the_kernel_addressing(gate_up: bool, k: int) -> None:
    # Emulates moe_str's STR_CHUNK_MAJOR copy addresses (kernels/moe.cu, common.cuh str_issue):
    # each lane piece (fragment row fr, 16-byte piece c4) of chunk j must hold the row-order
    # bytes of memory row str_mem_row(fr), k bytes [64 j + 16 c4, +16).
    e, n, row = 2, 32, k // 2
    packed, cm = _row_and_chunk_major(e, n, k, gate_up)
    nkb = k // 64
    for ex in range(e):
        for r0 in range(0, n, 16):
            for j in range((nkb + 1) // 2):
                second = 2 * j + 1 < nkb
                for fr in range(16):
                    mr = r0 + (2 * (fr & 7) + (fr >> 3) if gate_up else fr)
                    for c4 in range(4 if second else 2):
                        src = r0 * row + 64 * fr + 16 * c4 + 1024 * j - (0 if second else 32 * fr)
                        want = packed[ex, mr * row + 64 * j + 16 * c4 :][:16]
                        assert torch.equal(cm[ex, src : src + 16], want), (ex, r0, j, fr, c4)


@pytest.mark.parametrize("gate_up", [True, False])
@pytest.mark.parametrize("k", [128, 192, 2880])
def test_rows_packed_undoes_the_chunk_major_order(gate_up: bool, k: int) -> None:
    packed, cm = _row_and_chunk_major(3, 48, k, gate_up)
    assert torch.equal(M.rows_packed(cm, 48, k, gate_up), packed)
    in_place = packed.clone()
    assert M.chunk_major_(in_place, 48, k, gate_up) is in_place
    assert torch.equal(in_place, cm)


@pytest.mark.parametrize("nested", [True, False])
def test_chunk_major_weights_dequantize_and_run_the_reference_unchanged(nested: bool) -> None:
    layer, _, _ = make_layer(nested=nested, seed=11)
    chunks = layer.chunk_major()
    assert (layer.order, chunks.order) == ("rows", "chunks")
    assert chunks.gate_up.gate_up_pairs and not chunks.down.gate_up_pairs
    assert not torch.equal(chunks.gate_up.packed, layer.gate_up.packed)
    for e in (0, E - 1):
        assert torch.equal(chunks.gate_up.dequantize(e), layer.gate_up.dequantize(e))
        assert torch.equal(chunks.down.dequantize(e), layer.down.dequantize(e))
    x = torch.randn(6, H).to(torch.bfloat16)
    y_rows, _, _ = M.reference_forward(x, layer)
    y_chunks, _, _ = M.reference_forward(x, chunks)
    assert torch.equal(y_rows, y_chunks)
    assert chunks.chunk_major() is chunks  # already chunk-major: nothing to do
    original = layer.gate_up.packed
    assert layer.chunk_major(in_place=True) is layer and layer.gate_up.packed is original
    assert torch.equal(layer.gate_up.packed, chunks.gate_up.packed)


def test_mixed_or_unknown_orders_are_rejected() -> None:
    import dataclasses

    layer, _, _ = make_layer(seed=12)
    chunks = layer.chunk_major()
    with pytest.raises(ValueError, match="one byte order"):
        dataclasses.replace(layer, gate_up=chunks.gate_up).check()
    with pytest.raises(ValueError, match="order: expected one of"):
        dataclasses.replace(layer, down=dataclasses.replace(layer.down, order="cols")).check()
    with pytest.raises(ValueError, match="order: expected one of"):
        dataclasses.replace(layer.down, order="cols").dequantize(0)
    unpaired = dataclasses.replace(chunks.gate_up, gate_up_pairs=False)
    with pytest.raises(ValueError, match="must pair"):
        dataclasses.replace(chunks, gate_up=unpaired).check()
    x = torch.randn(3, H).to(torch.bfloat16)
    with pytest.raises(ValueError, match="gate_up is in 'chunks' order and down in 'rows'"):
        M.moe(x, dataclasses.replace(layer, gate_up=chunks.gate_up))


def test_chunk_major_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="positive multiple of 16"):
        M.chunk_major_packed(torch.zeros(1, 8 * 64, dtype=torch.uint8), 8, 128, False)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        M.chunk_major_packed(torch.zeros(1, 0, dtype=torch.uint8), 0, 128, False)
    with pytest.raises(ValueError, match="contiguous"):
        M.chunk_major_packed(torch.zeros(16 * 64, 2, dtype=torch.uint8).t(), 16, 128, False)
    with pytest.raises(ValueError, match="packed: expected uint8"):
        M.chunk_major_packed(torch.zeros(1, 10, dtype=torch.uint8), 16, 128, False)


@pytest.mark.parametrize("gate_up", [True, False])
@pytest.mark.parametrize("k", [128, 192])
def test_chunk_major_order_matches_the_gemm_addressing(gate_up: bool, k: int) -> None:
    # Emulates moe_gemm's STR_CHUNK_MAJOR B-tile copies (kernels/moe.cu, b_tile): thread piece
    # bq of row r in k tile kt must read the row-order bytes [32 kt + 16 bq, +16) of row r.
    n, row = 32, k // 2
    packed, cm = _row_and_chunk_major(1, n, k, gate_up)
    full = k // 128
    for r in range(n):
        mr = r & 15
        fr = (mr >> 1) + 8 * (mr & 1) if gate_up else mr
        for kt in range(k // 64):
            for bq in range(2):
                src = (r - mr) * row + 64 * fr + 16 * bq
                src += (kt >> 1) * 1024 + (kt & 1) * 32 - (32 * fr if (kt >> 1) == full else 0)
                want = packed[0, r * row + 32 * kt + 16 * bq :][:16]
                assert torch.equal(cm[0, src : src + 16], want), (r, kt, bq)


@pytest.mark.parametrize(
    ("setting", "answer"),
    [
        ("GPTOSS_3090_MOE_GEMM=m128s4", "prefill_m128s4"),
        ("GPTOSS_3090_MOE_GEMM=bogus", "ValueError: GPTOSS_3090_MOE_GEMM="),
    ],
)
def test_gemm_knob_parses_or_names_the_variable(setting: str, answer: str) -> None:
    # Read once per process (as test_bad_stream_limit_raises), so each setting gets its own.
    import os
    import subprocess
    import sys

    name, value = setting.split("=", 1)
    code = (
        "from gptoss_3090 import moe as M\n"
        "try:\n    print(M.moe_regime(2048, 4, 32, 'sm90'))\n"
        "except Exception as e:\n    print(f'{type(e).__name__}: {e}')\n"
    )
    env = {**os.environ, name: value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip().startswith(answer), out.stdout + out.stderr
