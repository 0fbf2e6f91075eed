"""GPU tests of the fused NF4 MoE op (``torch.ops.gptoss_3090.moe_forward``).

References (never our own output): transformers' ``GptOssMLP`` (router + experts) run in fp32
on the exactly dequantized weights, and ``gptoss_3090.moe.reference_forward`` (plain fp32 torch
on the same dequantized weights; itself checked against transformers on the CPU in
tests/test_moe_cpu.py). Accuracy: ``||y - ref|| / ||ref|| <= 1e-2`` in bf16, and the same
expert choice except at near-ties. Run: ``PYTHONPATH=python pytest -q tests/gpu/test_moe_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gptoss_3090 import moe as M  # noqa: E402
from gptoss_3090 import runtime  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
TOL = 1e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layer(
    e: int,
    h: int,
    i: int,
    *,
    nested: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    w_scale: float = 1.0,
    seed: int = 0,
) -> M.MoeLayerWeights:
    """Random GPT-OSS-like layer: NF4 experts quantized on the GPU, bf16 router."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    w_gu = torch.randn(e, 2 * i, h, device=DEV, generator=g) * (w_scale / h**0.5)
    w_dn = torch.randn(e, h, i, device=DEV, generator=g) * (w_scale / i**0.5)
    b_gu = torch.randn(e, 2 * i, device=DEV, generator=g) * 0.5
    b_dn = torch.randn(e, h, device=DEV, generator=g) * 0.1
    gu = M.quantize_nf4_experts(w_gu, b_gu, nested=nested)
    dn = M.quantize_nf4_experts(w_dn, b_dn, nested=nested)
    rw = (torch.randn(e, h, device=DEV, generator=g) / h**0.5).to(dtype)
    rb = torch.randn(e, device=DEV, generator=g) * 0.1
    return M.MoeLayerWeights(gu, dn, M._dynamic_map_signed().to(DEV), rw, rb, top_k=4)


def rand_x(t: int, h: int, dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(t, h, device=DEV, generator=g).to(dtype)


def rand_routing(
    tokens: int, g: torch.Generator, experts: int = 32, first: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given routing drawn from ``g``: per token 4 distinct experts of ``first .. experts - 1``
    (int32 ids) and softmax weights, ids drawn first."""
    draws = [torch.randperm(experts - first, device=DEV, generator=g)[:4] for _ in range(tokens)]
    ids = (torch.stack(draws) + first).to(torch.int32)
    return ids, torch.softmax(torch.randn(tokens, 4, device=DEV, generator=g), dim=-1)


def transformers_mlp(layer: M.MoeLayerWeights, x: torch.Tensor) -> torch.Tensor:
    """transformers' GptOssMLP in fp32 with the dequantized weights (HF stores transposes)."""
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    e, h, i = layer.experts, layer.hidden, layer.intermediate
    cfg = GptOssConfig(
        hidden_size=h,
        intermediate_size=i,
        num_local_experts=e,
        num_experts_per_tok=layer.top_k,
        swiglu_limit=7.0,
    )
    mlp = GptOssMLP(cfg).to(DEV).float()
    with torch.no_grad():
        assert layer.router_weight is not None and layer.router_bias is not None
        mlp.router.weight.copy_(layer.router_weight.float())
        mlp.router.bias.copy_(layer.router_bias.float())
        for ex in range(e):
            mlp.experts.gate_up_proj[ex].copy_(layer.gate_up.dequantize(ex).T)
            mlp.experts.down_proj[ex].copy_(layer.down.dequantize(ex).T)
        mlp.experts.gate_up_proj_bias.copy_(layer.gate_up.bias)
        mlp.experts.down_proj_bias.copy_(layer.down.bias)
        y, _ = mlp(x.float()[None])
    return y[0]


def router_logits_fp32(layer: M.MoeLayerWeights, x: torch.Tensor) -> torch.Tensor:
    assert layer.router_weight is not None and layer.router_bias is not None
    return x.float() @ layer.router_weight.float().T + layer.router_bias


def check_choice(ours: torch.Tensor, logits: torch.Tensor, k: int, tie_tol: float = 1e-3) -> None:
    """Our expert set equals the fp32 top-k, except where the k-th and (k+1)-th logits tie."""
    ref = torch.topk(logits, k, dim=-1)
    srt = torch.sort(logits, dim=-1, descending=True).values
    gap = srt[:, k - 1] - srt[:, k] if logits.shape[1] > k else torch.full_like(srt[:, 0], 1e9)
    same = (torch.sort(ours.long(), dim=1).values == torch.sort(ref.indices, dim=1).values).all(1)
    near_tie = gap.abs() <= tie_tol * srt[:, 0].abs().clamp_min(1.0)
    bad = ~(same | near_tie)
    assert not bool(bad.any()), f"{int(bad.sum())} tokens chose different experts"
    # Whatever we chose must be a valid top-k up to the tie tolerance.
    chosen = logits.gather(1, ours.long())
    slack = tie_tol * srt[:, 0].abs().clamp_min(1)
    assert bool((chosen.min(1).values >= srt[:, k - 1] - slack).all())


def moe_and_reference(
    layer: M.MoeLayerWeights, x: torch.Tensor, tuning: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our op routing with the layer's router, and the fp32 reference on the routing it chose:
    ``(y, ids, weights, reference)``."""
    ws = layer.workspace(int(x.shape[0]))
    y = M.moe(x, layer, workspace=ws, tuning=tuning)
    ids, wts = M.workspace_routing(ws, int(x.shape[0]), layer.top_k)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    return y, ids, wts, ref


SMALL = (8, 320, 192)  # E, H, I: partial row tiles (320 = 2.5 x 128), K tails (320 % 128 = 64)


@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 64, 8192])
def test_matches_transformers_router_weights(tokens: int) -> None:
    layer = make_layer(*SMALL, w_scale=3.0)  # large enough that the +-7 clamps engage
    x = rand_x(tokens, layer.hidden)
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, workspace=ws)
    torch.cuda.synchronize()
    ids, wts = M.workspace_routing(ws, tokens, 4)
    logits = router_logits_fp32(layer, x)
    check_choice(ids, logits, 4)
    ref_hf = transformers_mlp(layer, x)
    err = rel_err(y, ref_hf)
    print(f"T={tokens}: rel err vs transformers {err:.2e}")
    assert err <= TOL
    # Same routing as ours -> compare more tightly with the torch reference.
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    assert rel_err(y, ref) <= TOL
    assert rel_err(wts, torch.softmax(logits.gather(1, ids.long()), dim=-1)) <= 1e-5


@pytest.mark.parametrize("tokens", [1, 3, 64, 8192])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_router_logits_mode(tokens: int, logits_dtype: torch.dtype) -> None:
    layer = make_layer(*SMALL, seed=3)
    x = rand_x(tokens, layer.hidden, seed=4)
    logits = router_logits_fp32(layer, x).to(logits_dtype)
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, router_logits=logits, workspace=ws)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    check_choice(ids, logits.float(), 4, tie_tol=0.0)
    ref, _, _ = M.reference_forward(x, layer, router_logits=logits.float())
    assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("tokens", [1, 5, 64, 8192])
def test_given_routing_all_tokens_one_expert_set(tokens: int) -> None:
    """Every token routed to the same experts (one huge group) and most experts idle."""
    layer = make_layer(32, 320, 192, seed=5)
    x = rand_x(tokens, layer.hidden, seed=6)
    ids = torch.tensor([7, 30, 2, 19], dtype=torch.int32, device=DEV).repeat(tokens, 1)
    wts = torch.softmax(torch.randn(tokens, 4, device=DEV), dim=-1)
    y = M.moe(x, layer, topk_ids=ids, topk_weights=wts)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("tokens", [2, 64])
def test_given_routing_single_expert_and_invalid_ids(tokens: int) -> None:
    """One expert for every slot of one token; ids outside [0, E) (expert parallel) are skipped."""
    layer = make_layer(*SMALL, seed=7)
    x = rand_x(tokens, layer.hidden, seed=8)
    ids = torch.randint(0, 8, (tokens, 4), dtype=torch.int32, device=DEV)
    ids[0] = 5
    ids[1, 2] = -1
    ids[-1, 0] = 8
    wts = torch.rand(tokens, 4, device=DEV)
    y = M.moe(x, layer, topk_ids=ids, topk_weights=wts)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_given_routing_without_any_valid_expert(tokens: int) -> None:
    """Every id outside [0, E): no expert runs, and y is zeros in every regime."""
    layer = make_layer(*SMALL, seed=11)
    x = rand_x(tokens, layer.hidden, seed=12)
    ids = torch.full((tokens, 4), -1, dtype=torch.int32, device=DEV)
    wts = torch.rand(tokens, 4, device=DEV)
    ws = layer.workspace(tokens)
    ws.fill_(0x7F)  # no stale zeros to hide a missing write
    y = M.moe(x, layer, topk_ids=ids, topk_weights=wts, workspace=ws)
    assert bool((y == 0).all())


@pytest.mark.parametrize("tokens", [1, 64])
def test_tied_logits(tokens: int) -> None:
    layer = make_layer(*SMALL, seed=9)
    x = rand_x(tokens, layer.hidden, seed=10)
    logits = torch.zeros(tokens, layer.experts, device=DEV)
    logits[:, 5] = 1.0  # one clear winner, then a 7-way tie for the remaining 3 slots
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, router_logits=logits, workspace=ws)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    assert bool((ids[:, 0] == 5).all())
    assert all(len(set(r)) == 4 for r in ids.tolist())  # distinct experts even when tied
    # Ties go to the lower expert index, in that order (as the routing kernels document).
    assert ids.tolist() == [[5, 0, 1, 2]] * tokens
    check_choice(ids, logits, 4, tie_tol=0.0)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("tokens", [1, 16, 64, 300])
def test_nan_and_infinite_logits(tokens: int) -> None:
    """A NaN logit counts as -inf (never chosen while finite ones remain); a token whose
    logits are all -inf gets the lowest k experts with equal weights instead of NaN. Covers the
    decode (per-block), grouped (moe_group) and separate routing launches."""
    layer = make_layer(*SMALL, seed=11)
    x = rand_x(tokens, layer.hidden, seed=12)
    g = torch.Generator(device=DEV).manual_seed(13)
    logits = torch.randn(tokens, layer.experts, device=DEV, generator=g)
    logits[:, 3] = float("nan")
    logits[0] = float("-inf")
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, router_logits=logits, workspace=ws)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert torch.equal(wts[0], torch.full_like(wts[0], 0.25))
    assert not bool((ids[1:] == 3).any())
    finite = logits[1:].nan_to_num(nan=float("-inf"))
    check_choice(ids[1:], finite, 4, tie_tol=0.0)
    assert bool(torch.isfinite(y).all())
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    assert rel_err(y, ref) <= TOL


@pytest.mark.parametrize("tokens", [1, 16, 64, 256])
def test_cuda_graph_capture_and_replay(tokens: int) -> None:
    layer = make_layer(*SMALL, seed=11)
    x = rand_x(tokens, layer.hidden, seed=12)
    ws = layer.workspace(tokens)
    eager = M.moe(x, layer, workspace=ws).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        M.moe(x, layer, workspace=ws)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = M.moe(x, layer, workspace=ws)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)
    x.copy_(rand_x(tokens, layer.hidden, seed=13))  # new inputs, new routing, same graph
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, M.moe(x, layer, workspace=ws))


@pytest.mark.parametrize("tokens", [4, 8192])
def test_deterministic(tokens: int) -> None:
    layer = make_layer(32, 320, 192, seed=14)
    x = rand_x(tokens, layer.hidden, seed=15)
    a = M.moe(x, layer)
    b = M.moe(x, layer)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tokens", [1, 64, 8192])
@pytest.mark.parametrize("tuning", ["sm86", "sm80", "sm90"])
def test_forced_tunings(tokens: int, tuning: str) -> None:
    layer = make_layer(*SMALL, seed=16)
    x = rand_x(tokens, layer.hidden, seed=17)
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, workspace=ws, tuning=tuning)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    assert rel_err(y, ref) <= TOL
    # A forced sm86 plans for a 3090's blocks per SM (ops::residency), so its K split, and with
    # it the fp32 summation order, may differ from this GPU's own plan.
    assert rel_err(y, M.moe(x, layer, workspace=ws)) <= TOL


@pytest.mark.parametrize("tokens", [1, 64, 1000])
def test_fp16_and_plain_absmax(tokens: int) -> None:
    layer = make_layer(*SMALL, nested=False, dtype=torch.float16, seed=18)
    x = rand_x(tokens, layer.hidden, dtype=torch.float16, seed=19)
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, workspace=ws)
    assert y.dtype == torch.float16
    ids, wts = M.workspace_routing(ws, tokens, 4)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    assert rel_err(y, ref) <= TOL


def test_strided_x_and_zero_tokens() -> None:
    layer = make_layer(*SMALL, seed=20)
    big = rand_x(40, 2 * layer.hidden, seed=21)
    x = big[:, : layer.hidden]  # row stride 640 elements
    y = M.moe(x, layer)
    ref, _, _ = M.reference_forward(x, layer)
    assert rel_err(y, ref) <= TOL
    empty = M.moe(x[:0], layer)
    assert empty.shape == (0, layer.hidden)


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [1, 4, 16, 128, 2048])
def test_full_20b_shapes(tokens: int) -> None:
    layer = make_layer(32, 2880, 2880, seed=22)
    x = rand_x(tokens, 2880, seed=23)
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, workspace=ws)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    check_choice(ids, router_logits_fp32(layer, x), 4)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    err = rel_err(y, ref)
    print(f"20b T={tokens}: rel err {err:.2e}")
    assert err <= TOL
    y86 = M.moe(x, layer, workspace=ws, tuning="sm86")
    assert rel_err(y86, ref) <= TOL  # a 3090's plan: its own K split (ops::residency)


@pytest.mark.parametrize("tokens", [1, 2, 9, 16])
@pytest.mark.parametrize("nested", [True, False])
def test_decode_variants_agree(monkeypatch, tokens: int, nested: bool) -> None:
    """The streaming kernels (default), the lean decode kernels and the first ones compute the
    same block: each within TOL of the fp32 reference on the same routing, and close to each
    other."""
    layer = make_layer(32, 2880, 2880, seed=31, nested=nested)
    x = rand_x(tokens, 2880, seed=32)
    ws = layer.workspace(tokens)
    ys = {}
    for variant in ("3", "2", "1"):
        monkeypatch.setenv("GPTOSS_3090_MOE_DECODE", variant)
        ys[variant] = M.moe(x, layer, workspace=ws)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    errs = {v: rel_err(y, ref) for v, y in ys.items()}
    e31, e32 = rel_err(ys["3"], ys["1"]), rel_err(ys["3"], ys["2"])
    print(f"T={tokens} nested={nested}: vs fp32 {errs}, str vs v1 {e31:.2e}, vs v2 {e32:.2e}")
    assert max(errs.values()) <= TOL and e31 <= TOL and e32 <= TOL
    monkeypatch.setenv("GPTOSS_3090_MOE_DECODE", "4")
    with pytest.raises(ValueError, match="GPTOSS_3090_MOE_DECODE"):
        M.moe(x, layer, workspace=ws)


@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 17, 40, 64, 128])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("tuning", ["auto", "sm86"])
def test_streaming_launches_agree(monkeypatch, tokens: int, nested: bool, tuning: str) -> None:
    """The streaming phases as one block per item (split) and both phases in one launch of
    persistent blocks (fused, ticket counter), each forced in every regime: the same items, K
    splits and staged columns, so the same bits; both within TOL of the fp32 reference. At 20b
    shapes with 32 experts the fused grid is smaller than its item count, so blocks take
    several items of each phase."""
    layer = make_layer(32, 2880, 2880, seed=41, nested=nested)
    x = rand_x(tokens, 2880, seed=42)
    ws = layer.workspace(tokens)
    ys = {}
    for launch in ("split", "fused", "auto"):
        monkeypatch.setenv("GPTOSS_3090_MOE_STREAM_LAUNCH", launch)
        ys[launch] = M.moe(x, layer, workspace=ws, tuning=tuning)
        ys[launch + " again"] = M.moe(x, layer, workspace=ws, tuning=tuning)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    errs = {k: f"{rel_err(y, ref):.2e}" for k, y in ys.items() if "again" not in k}
    print(f"T={tokens} nested={nested} {tuning}: {errs}")
    for launch in ("split", "fused", "auto"):
        assert rel_err(ys[launch], ref) <= TOL
        assert torch.equal(ys[launch], ys[launch + " again"])  # fused: counters zeroed again
        assert torch.equal(ys[launch], ys["split"])
    monkeypatch.setenv("GPTOSS_3090_MOE_STREAM_LAUNCH", "2")
    with pytest.raises(ValueError, match="GPTOSS_3090_MOE_STREAM_LAUNCH"):
        M.moe(x, layer, workspace=ws)


def test_fused_streaming_launch_with_a_dirty_workspace(monkeypatch) -> None:
    """The fused kernel's counters live in the caller's workspace: garbage there (a reused
    buffer, torch.empty) must not change the result, since the op zeroes them in stream order
    before each launch."""
    monkeypatch.setenv("GPTOSS_3090_MOE_STREAM_LAUNCH", "fused")
    layer = make_layer(*SMALL, seed=43)
    x = rand_x(3, layer.hidden, seed=44)
    clean = M.moe(x, layer, workspace=layer.workspace(3))
    dirty = layer.workspace(3)
    dirty.fill_(0xA5)
    assert torch.equal(M.moe(x, layer, workspace=dirty), clean)


@pytest.mark.parametrize("tokens", [17, 40, 128])
def test_stream_regime_matches_reference_small_shapes(tokens: int) -> None:
    """The streaming regime (moe_group + moe_str_*) on ragged shapes: K / 64 odd (a half
    chunk per row), 8 experts so most get more than 16 tokens (several passes)."""
    layer = make_layer(*SMALL, seed=33)
    assert M.moe_regime(tokens, 4, SMALL[0], "sm86") == "stream"
    y, _, _, ref = moe_and_reference(layer, rand_x(tokens, layer.hidden, seed=34))
    err = rel_err(y, ref)
    print(f"stream T={tokens}: rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("tokens", [17, 40, 64, 128])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("tuning", ["auto", "sm86"])
def test_stream_pass_items_give_the_same_bits(
    monkeypatch, tokens: int, nested: bool, tuning: str
) -> None:
    """GPTOSS_3090_MOE_PASS_ITEMS=1 runs each pass of an expert as its own block row. The
    routing piles pairs onto expert 0 (every token) and expert 1 (every other token), so they
    need several passes at both column-tile widths; the result must equal the default launch
    bit for bit and stay within TOL of the fp32 reference."""
    layer = make_layer(32, SMALL[1], SMALL[2], seed=51, nested=nested)
    x = rand_x(tokens, layer.hidden, seed=52)
    ids, wts = rand_routing(tokens, torch.Generator(device=DEV).manual_seed(53), first=2)
    ids[:, 0] = 0
    ids[::2, 1] = 1
    assert M.moe_regime(tokens, 4, 32, tuning if tuning != "auto" else "sm90") == "stream"
    ws = layer.workspace(tokens)
    ys = {}
    for items in ("0", "1"):
        monkeypatch.setenv("GPTOSS_3090_MOE_PASS_ITEMS", items)
        ys[items] = M.moe(x, layer, topk_ids=ids, topk_weights=wts, workspace=ws, tuning=tuning)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    err = rel_err(ys["1"], ref)
    print(f"pass items T={tokens} nested={nested} {tuning}: rel err {err:.2e}")
    assert err <= TOL
    assert torch.equal(ys["1"], ys["0"])
    monkeypatch.setenv("GPTOSS_3090_MOE_PASS_ITEMS", "2")
    with pytest.raises(ValueError, match="GPTOSS_3090_MOE_PASS_ITEMS"):
        M.moe(x, layer, topk_ids=ids, topk_weights=wts, workspace=ws, tuning=tuning)


@pytest.mark.parametrize("tokens", [1, 2, 4, 16, 40, 64])
def test_pdl_launches_wait_for_their_inputs(monkeypatch, tokens: int) -> None:
    """GPTOSS_3090_PDL=on (sm_90 tunings; the default, linear, leaves the MoE plain) lets the
    streaming kernels and the combine start while the kernel before them drains; each reads the
    routing, the activations and the partial outputs only after griddepcontrol.wait. The kernel
    just before every call rewrites x and the routing in place, so an early read would see the
    previous call's: call after call the outputs equal those with PDL off bit for bit, in eager
    mode and in a CUDA graph (captured with PDL on), and stay within TOL of the fp32
    reference."""
    layer = make_layer(32, SMALL[1], SMALL[2], seed=81)
    g = torch.Generator(device=DEV).manual_seed(82)
    calls = []
    for i in range(5):
        xi = rand_x(tokens, layer.hidden, seed=83 + i)
        calls.append((xi, *rand_routing(tokens, g)))
    x, ids, wts = (torch.empty_like(t) for t in calls[0])
    ws = layer.workspace(tokens)
    runs = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("GPTOSS_3090_PDL", mode)
        ys = []
        for xi, ii, wi in calls:
            x.copy_(xi)
            ids.copy_(ii)
            wts.copy_(wi)
            ys.append(M.moe(x, layer, topk_ids=ids, topk_weights=wts, workspace=ws))
        runs[mode] = ys
    for i, (a, b) in enumerate(zip(runs["off"], runs["on"], strict=True)):
        assert torch.equal(a, b), (tokens, i)
        ref, _, _ = M.reference_forward(
            calls[i][0], layer, topk_ids=calls[i][1], topk_weights=calls[i][2]
        )
        assert rel_err(b, ref) <= TOL
    srcs = [torch.empty_like(t) for t in (x, ids, wts)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        M.moe(x, layer, topk_ids=ids, topk_weights=wts, workspace=ws)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for dst, src in zip((x, ids, wts), srcs, strict=True):
            dst.copy_(src)
        yg = M.moe(x, layer, topk_ids=ids, topk_weights=wts, workspace=ws)
    for i, call in enumerate(calls):
        for src, t in zip(srcs, call, strict=True):
            src.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, runs["off"][i]), (tokens, i, "graph")


@pytest.mark.parametrize("tokens", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("tuning", ["auto", "sm86"])
def test_folded_combine_gives_the_same_bits(
    monkeypatch, tokens: int, nested: bool, tuning: str
) -> None:
    """GPTOSS_3090_MOE_FOLD_COMBINE=on makes the split streaming down launch sum each token's k
    outputs itself (the last block of each grid column) instead of a moe_combine launch. With
    the split launches forced at every count, on a workspace full of 0xff (the counters must be
    zeroed by the gate_up launch), call after call, chunk-major and row order, from given
    routing and from router logits, and in a CUDA graph replayed with new inputs, the output
    equals the combine launch's bit for bit and stays within TOL of the fp32 reference."""
    layer = make_layer(32, SMALL[1], SMALL[2], seed=91, nested=nested)
    g = torch.Generator(device=DEV).manual_seed(92)
    monkeypatch.setenv("GPTOSS_3090_MOE_STREAM_LAUNCH", "split")
    calls = []
    for i in range(3):
        xi = rand_x(tokens, layer.hidden, seed=93 + i)
        calls.append((xi, *rand_routing(tokens, g)))
    ws = layer.workspace(tokens)
    ws.fill_(0xFF)
    chunks = layer.chunk_major()
    runs: dict[str, list[torch.Tensor]] = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("GPTOSS_3090_MOE_FOLD_COMBINE", mode)
        ys = []
        for lay in (layer, chunks):
            for xi, ii, wi in calls:
                ys.append(M.moe(xi, lay, topk_ids=ii, topk_weights=wi, workspace=ws, tuning=tuning))
            ys.append(M.moe(calls[0][0], lay, workspace=ws, tuning=tuning))  # router logits
        runs[mode] = ys
    for i, (a, b) in enumerate(zip(runs["off"], runs["on"], strict=True)):
        assert torch.equal(a, b), (tokens, i)
    for i, (xi, ii, wi) in enumerate(calls):
        ref, _, _ = M.reference_forward(xi, layer, topk_ids=ii, topk_weights=wi)
        err = rel_err(runs["on"][i], ref)
        assert err <= TOL, (i, err)
    print(f"folded combine T={tokens} nested={nested} {tuning}: rel err {err:.2e}")
    # A captured graph replays the fold: the counters are zeroed again on every replay.
    monkeypatch.setenv("GPTOSS_3090_MOE_FOLD_COMBINE", "on")
    x, ids, wts = (t.clone() for t in calls[0])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        M.moe(x, chunks, topk_ids=ids, topk_weights=wts, workspace=ws, tuning=tuning)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = M.moe(x, chunks, topk_ids=ids, topk_weights=wts, workspace=ws, tuning=tuning)
    for i, call in enumerate(calls):
        for dst, src in zip((x, ids, wts), call, strict=True):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, runs["off"][len(calls) + 1 + i]), (tokens, i, "graph")
    monkeypatch.setenv("GPTOSS_3090_MOE_FOLD_COMBINE", "sometimes")
    with pytest.raises(ValueError, match="GPTOSS_3090_MOE_FOLD_COMBINE"):
        M.moe(x, chunks, topk_ids=ids, topk_weights=wts, workspace=ws, tuning=tuning)


@pytest.mark.parametrize("tokens", [1, 2, 8, 32])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("tuning", ["auto", "sm86"])
def test_deep_ring_gives_the_same_bits(monkeypatch, tokens: int, nested: bool, tuning: str) -> None:
    """GPTOSS_3090_MOE_DEEP_RING=on runs the split one-tile streaming launches with the deep-ring
    kernels (seven weight stages per warp on sm_90, three of them compact in static shared
    memory; elsewhere the same kernels as the plain ones). Row order and chunk-major, one and two
    tiles' worth of routed pairs, staged and global activations: the output equals the plain
    kernels' bit for bit and stays within TOL of the fp32 reference."""
    layer = make_layer(32, 2880, SMALL[2], seed=121, nested=nested)
    x = rand_x(tokens, layer.hidden, seed=122)
    ids, wts = rand_routing(tokens, torch.Generator(device=DEV).manual_seed(123))
    ids[:, 0] = 0  # expert 0 gets every token: more columns than a block stages
    monkeypatch.setenv("GPTOSS_3090_MOE_STREAM_LAUNCH", "split")
    assert M.moe_regime(tokens, 4, 32, "sm90") in ("decode", "stream")  # one tile up to 40
    ws = layer.workspace(tokens)
    ys = {}
    for lay_name, lay in (("rows", layer), ("chunks", layer.chunk_major())):
        for mode in ("off", "on"):
            monkeypatch.setenv("GPTOSS_3090_MOE_DEEP_RING", mode)
            ys[lay_name, mode] = M.moe(
                x, lay, topk_ids=ids, topk_weights=wts, workspace=ws, tuning=tuning
            )
        assert torch.equal(ys[lay_name, "on"], ys[lay_name, "off"]), lay_name
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    err = rel_err(ys["chunks", "on"], ref)
    print(f"deep ring T={tokens} nested={nested} {tuning}: rel err {err:.2e}")
    assert err <= TOL
    monkeypatch.setenv("GPTOSS_3090_MOE_DEEP_RING", "deeper")
    with pytest.raises(ValueError, match="GPTOSS_3090_MOE_DEEP_RING"):
        M.moe(x, layer, topk_ids=ids, topk_weights=wts, workspace=ws, tuning=tuning)


@pytest.mark.parametrize("tokens", [17, 20, 32, 48])
def test_stream_regime_one_tile_many_experts(tokens: int) -> None:
    """The streaming regime with one column tile per pass (32 experts averaging at most 6 pairs,
    moe_str_*_n1 on moe_group's lists), both byte orders, against the fp32 reference."""
    layer = make_layer(32, SMALL[1], SMALL[2], seed=35)
    assert M.moe_regime(tokens, 4, 32, "sm90") == "stream"
    x = rand_x(tokens, layer.hidden, seed=36)
    y, ids, wts, ref = moe_and_reference(layer, x)
    err = rel_err(y, ref)
    print(f"stream one tile T={tokens}: rel err {err:.2e}")
    assert err <= TOL
    y_given = M.moe(x, layer, topk_ids=ids, topk_weights=wts)
    y_chunks = M.moe(x, layer.chunk_major(), topk_ids=ids, topk_weights=wts)
    assert torch.equal(y_chunks, y_given)


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_full_20b_shapes_positive_inputs(tokens: int) -> None:
    """Same-sign activations make rounding biases add up over K = 2880 instead of averaging out
    (the decode kernels' NF4 code table must be unbiased, see DEC_GAMMA_BF16 in moe.cu)."""
    layer = make_layer(32, 2880, 2880, seed=26)
    x = (rand_x(tokens, 2880, seed=27).float().abs() + 0.5).to(torch.bfloat16)
    ws = layer.workspace(tokens)
    y = M.moe(x, layer, workspace=ws)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    ref, _, _ = M.reference_forward(x, layer, topk_ids=ids, topk_weights=wts)
    err = rel_err(y, ref)
    print(f"20b positive T={tokens}: rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("tuning", ["auto", "sm86"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 9, 16, 17, 64, 128, 300, 2048])
def test_chunk_major_order_gives_the_same_bits(tokens: int, nested: bool, tuning: str) -> None:
    """The chunk-major weights (what the vLLM plugin serves) run the same arithmetic in the same
    order as the rows order, in every regime (decode, stream, each prefill tile): the outputs
    are equal bit for bit, and the rows order is checked against the fp32 reference. SMALL has
    K / 64 odd for both tensors, so the half chunk at each row end is covered."""
    layer = make_layer(*SMALL, nested=nested, seed=40)
    chunks = layer.chunk_major()
    assert chunks.order == "chunks" and layer.order == "rows"
    assert not torch.equal(chunks.gate_up.packed, layer.gate_up.packed)
    x = rand_x(tokens, layer.hidden, seed=41)
    ws = layer.workspace(tokens)
    y_rows = M.moe(x, layer, workspace=ws, tuning=tuning)
    ids, wts = M.workspace_routing(ws, tokens, 4)
    y_chunks = M.moe(x, chunks, topk_ids=ids, topk_weights=wts, tuning=tuning)
    y_given = M.moe(x, layer, topk_ids=ids, topk_weights=wts, tuning=tuning)
    assert torch.equal(y_chunks, y_given)
    ref, _, _ = M.reference_forward(x, chunks, topk_ids=ids, topk_weights=wts)
    assert rel_err(y_chunks, ref) <= TOL
    assert rel_err(y_rows, ref) <= TOL


@pytest.mark.parametrize("tokens", [1, 16, 32, 64, 2048])
def test_chunk_major_20b_shapes(tokens: int) -> None:
    """GPT-OSS-20B shapes, chunk-major reordered in place (as the plugin does at load)."""
    layer = make_layer(32, 2880, 2880, seed=42)
    x = rand_x(tokens, 2880, seed=43)
    y_rows, _, _, ref = moe_and_reference(layer, x)
    same = layer.chunk_major(in_place=True)
    assert same is layer and layer.order == "chunks"
    y_chunks = M.moe(x, layer)
    assert torch.equal(y_chunks, y_rows)
    err = rel_err(y_chunks, ref)
    print(f"20b chunk-major T={tokens}: rel err {err:.2e}")
    assert err <= TOL


def test_chunk_major_errors(monkeypatch) -> None:
    layer = make_layer(*SMALL, seed=44)
    chunks = layer.chunk_major()
    x = rand_x(4, layer.hidden)
    mixed = M.MoeLayerWeights(chunks.gate_up, layer.down, layer.nested_map, layer.router_weight,
                              layer.router_bias)  # fmt: skip
    with pytest.raises(ValueError, match="order"):
        M.moe(x, mixed)
    monkeypatch.setenv("GPTOSS_3090_MOE_DECODE", "2")
    with pytest.raises(ValueError, match="rows order only"):
        M.moe(x, chunks)
    M.moe(x, layer)  # the older kernels still run the rows order
    monkeypatch.delenv("GPTOSS_3090_MOE_DECODE")
    gu, dn = chunks.gate_up, chunks.down
    with pytest.raises(ValueError, match="weights_order"):
        torch.ops.gptoss_3090.moe_forward(
            x, layer.workspace(4), gu.packed, gu.absmax, gu.nested_absmax, gu.nested_offset,
            gu.bias, dn.packed, dn.absmax, dn.nested_absmax, dn.nested_offset, dn.bias,
            layer.nested_map, layer.router_weight, layer.router_bias, None, None, None, 4,
            "auto", "columns",
        )  # fmt: skip


def test_errors_on_gpu() -> None:
    layer = make_layer(*SMALL, seed=24)
    x = rand_x(4, layer.hidden)
    with pytest.raises(TypeError, match="x: expected dtype"):
        M.moe(x.float(), layer)
    with pytest.raises(ValueError, match="workspace: expected at least"):
        M.moe(x, layer, workspace=layer.workspace(1))
    with pytest.raises(ValueError, match="topk_ids"):
        M.moe(
            x,
            layer,
            topk_ids=torch.zeros(4, 3, dtype=torch.int32, device=DEV),
            topk_weights=torch.zeros(4, 3, device=DEV),
        )
    with pytest.raises(ValueError, match="CUDA tensor"):
        M.moe(x, layer, router_logits=torch.zeros(4, layer.experts))


def test_opcheck() -> None:
    layer = make_layer(*SMALL, seed=25)
    x = rand_x(8, layer.hidden)
    ws = layer.workspace(8)
    gu, dn = layer.gate_up, layer.down
    args = (
        x,
        ws,
        gu.packed,
        gu.absmax,
        gu.nested_absmax,
        gu.nested_offset,
        gu.bias,
        dn.packed,
        dn.absmax,
        dn.nested_absmax,
        dn.nested_offset,
        dn.bias,
        layer.nested_map,
        layer.router_weight,
        layer.router_bias,
        None,
        None,
        None,
        4,
    )
    chunks = layer.chunk_major()
    chunk_args = (*args[:2], chunks.gate_up.packed, *args[3:7], chunks.down.packed, *args[8:],
                  "auto", "chunks")  # fmt: skip
    torch.library.opcheck(
        torch.ops.gptoss_3090.moe_forward.default,
        chunk_args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    torch.library.opcheck(
        torch.ops.gptoss_3090.moe_forward.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 300])
def test_tiny_checkpoint_against_reference_moe(tmp_path, tokens: int) -> None:
    """End to end from a synthetic Unsloth checkpoint: fused view -> device -> op, against the
    CPU fp32 reference of ``gptoss_3090.reference`` on the checkpoint's bf16 weights."""
    synth = pytest.importorskip("gptoss_3090.synth")
    reference = pytest.importorskip("gptoss_3090.reference")
    from gptoss_3090 import open_checkpoint

    path = synth.write_synthetic_checkpoint(tmp_path / "tiny", "tiny", progress=False)
    ck = open_checkpoint(path)
    layer = 2
    gu, dn = ck.fused_experts(layer, "gate_up"), ck.fused_experts(layer, "down")
    rw = ck.tensor(f"model.layers.{layer}.mlp.router.linear.weight")
    rb = ck.tensor(f"model.layers.{layer}.mlp.router.linear.bias")
    w = M.MoeLayerWeights.from_fused(gu, dn, rw, rb, device=DEV)
    x = rand_x(tokens, w.hidden, seed=30)
    ws = w.workspace(tokens)
    y = M.moe(x, w, workspace=ws)
    ids, _ = M.workspace_routing(ws, tokens, 4)
    ref, routing = reference.reference_moe(x.cpu(), rw, rb, gu, dn, 4, return_routing=True)
    check_choice(ids.cpu(), routing.logits, 4)
    err = rel_err(y.cpu(), ref)
    print(f"tiny checkpoint T={tokens}: rel err {err:.2e}")
    assert err <= TOL


# ---------------------------------------------------------------------------------------------
# Router logits (torch.ops.gptoss_3090.moe_router), against F.linear in fp32 / cuBLAS.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_kind", ["act", "f32", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 64, 200])
def test_router_logits_match_fp32_linear(tokens: int, dtype: torch.dtype, bias_kind: str) -> None:
    g = torch.Generator(device=DEV).manual_seed(tokens)
    e, h = 32, 2880
    x = torch.randn(tokens, h, device=DEV, generator=g).to(dtype)
    w = (torch.randn(e, h, device=DEV, generator=g) / h**0.5).to(dtype)
    b = torch.randn(e, device=DEV, generator=g)
    bias = {"act": b.to(dtype), "f32": b, "none": None}[bias_kind]
    out = M.router_logits(x, w, bias)
    assert out.dtype == dtype and out.shape == (tokens, e)
    if bias is not None and tokens > M.ROUTER_KERNEL_MAX_TOKENS:
        bias = bias.to(dtype)  # F.linear's path rounds a float32 bias to x's dtype first
    ref = x.float() @ w.float().t() + (bias.float() if bias is not None else 0.0)
    # One rounding of an fp32 sum: at most half an ulp of the output dtype (relative 2^-8 in
    # bf16, 2^-11 in fp16; 5% for the fp32 summation order).
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    worst = float(((out.float() - ref).abs() / ref.abs().clamp_min(1.0)).max())
    assert worst <= 1.05 * half_ulp, f"{worst:.3e} vs half an ulp {half_ulp:.3e}"
    # vLLM's own router runs F.linear (cuBLAS) in the same dtype: the top-4 agree except at
    # near-ties of that rounding.
    cublas = torch.nn.functional.linear(x, w, bias.to(dtype) if bias is not None else None)
    assert rel_err(out, cublas.float()) <= 1e-2


def test_router_logits_strided_x_graph_and_determinism() -> None:
    g = torch.Generator(device=DEV).manual_seed(5)
    e, h = 32, 2880
    base = torch.randn(4, h + 64, device=DEV, generator=g).to(torch.bfloat16)
    x = base[:, :h]  # row stride h + 64, as a slice of a wider buffer
    w = (torch.randn(e, h, device=DEV, generator=g) / h**0.5).to(torch.bfloat16)
    b = torch.randn(e, device=DEV, generator=g).to(torch.bfloat16)
    eager = M.router_logits(x, w, b)
    ref = x.float() @ w.float().t() + b.float()
    assert rel_err(eager, ref) <= 1e-2
    assert torch.equal(eager, M.router_logits(x, w, b)), "not deterministic"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = M.router_logits(x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager), "replay differs from eager"
    base.copy_(torch.randn(base.shape, device=DEV, generator=g).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, M.router_logits(x, w, b)), "replay with new x differs"


@pytest.mark.parametrize("experts", [32, 12, 40])
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 16, 64, 65])
def test_router_topk_routes_as_the_moe_op(monkeypatch, tokens: int, experts: int) -> None:
    """M.router_topk: the router's logits and their top-k. Its logits equal M.router_logits'
    bit for bit; its ids and weights equal the MoE op's own routing from those logits
    (M.workspace_routing after a logits-mode call) bit for bit, and torch's stable sort +
    softmax of the logits within float rounding. Rows with tied logits (two router rows equal)
    pick the lower expert. The one-launch cluster kernel (sm_90, at most 32 experts) and the
    logits + routing launches (GPTOSS_3090_ROUTER_TOPK_CLUSTER=off, 40 experts, other GPUs)
    give the same bits; call after call, and in a CUDA graph replayed with new x. 65 tokens
    take the F.linear + torch.topk path."""
    g = torch.Generator(device=DEV).manual_seed(100 + tokens + experts)
    e, h, k = experts, 2880, 4
    w = (torch.randn(e, h, device=DEV, generator=g) / h**0.5).to(torch.bfloat16)
    w[7] = w[3]  # experts 3 and 7 tie on every token
    b = torch.randn(e, device=DEV, generator=g).to(torch.bfloat16)
    b[7] = b[3]
    layer = make_layer(e, 256, 128, seed=101)

    def check(x: torch.Tensor, packed: torch.Tensor) -> None:
        ids, wts, logits = M.router_topk_unpack(packed, e, k)
        assert torch.equal(logits, M.router_logits(x, w, b))
        # A stable descending sort ranks tied logits by expert index, as the kernels do.
        ref_v, ref_i = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
        ref_v, ref_i = ref_v[:, :k], ref_i[:, :k]
        assert torch.equal(logits.float().gather(1, ids.long()), ref_v)  # a top-k
        assert torch.allclose(wts, torch.softmax(ref_v, dim=-1), rtol=1e-5, atol=1e-6)
        if tokens <= M.ROUTER_KERNEL_MAX_TOKENS:
            assert torch.equal(ids, ref_i.int()), "selection or its order differs"
            ws = layer.workspace(tokens)
            xs = rand_x(tokens, 256, seed=102)
            M.moe(xs, layer, router_logits=logits, workspace=ws)
            ws_ids, ws_wts = M.workspace_routing(ws, tokens, k)
            assert torch.equal(ids, ws_ids) and torch.equal(wts, ws_wts)

    xs = [rand_x(tokens, h, seed=103 + i) for i in range(3)]
    runs = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("GPTOSS_3090_ROUTER_TOPK_CLUSTER", mode)
        runs[mode] = [M.router_topk(x, w, b, k) for x in xs]
        for x, packed in zip(xs, runs[mode], strict=True):
            check(x, packed)
    for a, c in zip(runs["off"], runs["on"], strict=True):
        assert torch.equal(a, c), "the cluster launch and the two launches differ"
    x = xs[0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        M.router_topk(x, w, b, k)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = M.router_topk(x, w, b, k)
    for xi in xs[::-1]:
        x.copy_(xi)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, M.router_topk(xi, w, b, k)), "replay differs from eager"
    with pytest.raises(ValueError, match="top_k"):
        M.router_topk(x, w, b, 9)
    with pytest.raises(ValueError, match="top_k"):
        M.router_topk(x, w, b, 0)
    assert M.router_topk(x[:0], w, b, k).shape == (0, M.router_topk_width(e, k))
    torch.library.opcheck(
        torch.ops.gptoss_3090.moe_router_topk.default,
        (x, w, b, k),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_router_topk_runs_in_one_launch_on_sm90() -> None:
    """On sm_90 (its own tuning) with up to 32 experts the native launcher routes in the
    router's own launch (returns True); under a forced sm86 tuning it does not. Either way the
    ids are the stable top-k of the logits it wrote. (More than 32 experts:
    test_router_topk_routes_as_the_moe_op's 40-expert case.)"""
    e, h, k, t = 32, 2880, 4, 1
    g = torch.Generator(device=DEV).manual_seed(120)
    w = (torch.randn(e, h, device=DEV, generator=g) / h**0.5).to(torch.bfloat16)
    x = rand_x(t, h, seed=121)
    ids = torch.empty(t, k, dtype=torch.int32, device=DEV)
    wts = torch.empty(t, k, dtype=torch.float32, device=DEV)
    logits = torch.empty(t, e, dtype=torch.bfloat16, device=DEV)

    def launch(experts: int) -> bool:
        fused = M._native().moe_router_logits(
            torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream, "bfloat16",
            t, h, experts, M._ptr(x), x.stride(0), M._ptr(w), 0, False, M._ptr(logits), False,
            k, M._ptr(ids), M._ptr(wts),
        )
        torch.cuda.synchronize()
        ref_v, ref_i = torch.sort(logits[:, :experts].float(), dim=-1, descending=True, stable=True)
        assert torch.equal(ids, ref_i[:, :k].int())
        return fused

    assert launch(e) == (runtime.tuning() == "sm90")
    assert launch(12) == (runtime.tuning() == "sm90")  # fewer experts than the cluster holds
    with runtime.forced_tuning("sm86"):
        assert not launch(e)


def test_router_logits_errors_and_opcheck() -> None:
    x = rand_x(4, 2880)
    w = torch.randn(32, 2880, device=DEV).to(torch.bfloat16)
    # Rows the kernel cannot read (8-byte offset) and large T go to F.linear: same logits.
    odd = M.router_logits(x[:, 4:], w[:, 4:].contiguous())
    assert rel_err(odd, x[:, 4:].float() @ w[:, 4:].float().t()) <= 1e-2
    big = rand_x(M.ROUTER_KERNEL_MAX_TOKENS + 1, 2880)
    assert rel_err(M.router_logits(big, w), big.float() @ w.float().t()) <= 1e-2
    wide_x, wide_w = rand_x(3, 4104), torch.randn(8, 4104, device=DEV).to(torch.bfloat16)
    assert rel_err(M.router_logits(wide_x, wide_w), wide_x.float() @ wide_w.float().t()) <= 1e-2
    with pytest.raises(ValueError, match="is on"):
        M.router_logits(x, w.cpu())
    assert M.router_logits(x[:0], w).shape == (0, 32)
    for bias in (None, torch.randn(32, device=DEV), torch.randn(32, device=DEV).bfloat16()):
        torch.library.opcheck(
            torch.ops.gptoss_3090.moe_router.default,
            (x, w, bias),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
