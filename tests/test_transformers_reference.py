"""transformers loads the tiny reference; our fp32 CPU MoE (from the fused view) matches its MLP.

The reference model is the independent ground truth: transformers' GptOss modules compute the
MoE block from the HF-layout weights in OUT/reference, while ``reference_moe`` computes it from
the NF4 checkpoint through ``Checkpoint.fused_experts``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gptoss_3090 import presets
from gptoss_3090.reference import reference_moe
from gptoss_3090.synth import write_synthetic_checkpoint
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

TINY = presets.TINY
L, E, K = TINY["num_hidden_layers"], TINY["num_local_experts"], TINY["num_experts_per_tok"]
H = TINY["hidden_size"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "tiny"
    return write_synthetic_checkpoint(out, "tiny", progress=False)


@pytest.fixture(scope="module")
def ref_tensors(tiny: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted((tiny / "reference").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def load_model(tiny: Path, dtype: torch.dtype):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tiny / "reference", dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def model_f32(tiny: Path):
    return load_model(tiny, torch.float32)


@pytest.fixture(scope="module")
def model_bf16(tiny: Path):
    return load_model(tiny, torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoint(tiny: Path):
    from gptoss_3090 import open_checkpoint

    return open_checkpoint(tiny)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_forward_pass_finite_logits(tiny: Path, model_bf16) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny / "reference")
    enc = tok("the cold river runs past the old mill and the green field", return_tensors="pt")
    assert enc["input_ids"].max() < TINY["vocab_size"]
    # longer than the sliding window, so sliding and full layers differ
    ids = torch.cat([enc["input_ids"], torch.randint(0, TINY["vocab_size"], (1, 150))], dim=1)
    with torch.no_grad():
        logits = model_bf16(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], TINY["vocab_size"])
    assert torch.isfinite(logits).all()
    assert logits.float().std() > 0.1  # not a degenerate model


def test_reference_weights_equal_dequantized_nf4(checkpoint, ref_tensors) -> None:
    for layer in range(L):
        p = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"{p}.self_attn.{name}.weight"
            assert torch.equal(checkpoint.dequantize(key), ref_tensors[key]), key
        for proj, ref_key in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            fused = checkpoint.fused_experts(layer, proj)
            ref = ref_tensors[f"{p}.mlp.experts.{ref_key}"]
            bias = torch.as_tensor(fused.bias)
            assert torch.equal(bias, ref_tensors[f"{p}.mlp.experts.{ref_key}_bias"])
            for e in range(E):
                ours = torch.as_tensor(fused.dequantize(e))
                assert torch.equal(ours, ref[e].t()), (layer, proj, e)
                single = checkpoint.dequantize(f"{p}.mlp.experts.{proj}_projs.{e}.weight")
                assert torch.equal(single, ours)


def moe_inputs(layer: int, checkpoint, n: int = 96):
    x = torch.randn(n, H)
    router_w = checkpoint.tensor(f"model.layers.{layer}.mlp.router.linear.weight")
    router_b = checkpoint.tensor(f"model.layers.{layer}.mlp.router.linear.bias")
    gate_up = checkpoint.fused_experts(layer, "gate_up")
    down = checkpoint.fused_experts(layer, "down")
    return x, router_w, router_b, gate_up, down


@pytest.mark.parametrize(("layer", "scale"), [(0, 1.0), (L - 1, 1.0), (1, 40.0)])
def test_reference_moe_matches_transformers_fp32(
    layer: int, scale: float, checkpoint, model_f32
) -> None:
    """scale 40 drives gate/up past the 7.0 SwiGLU clamps."""
    x, router_w, router_b, gate_up, down = moe_inputs(layer, checkpoint)
    x = x * scale
    mlp = model_f32.model.layers[layer].mlp
    with torch.no_grad():
        expected, _ = mlp(x[None])
        _, _, hf_experts = mlp.router(x)
    ours, routing = reference_moe(x, router_w, router_b, gate_up, down, K, return_routing=True)
    assert torch.equal(routing.experts.sort(dim=1).values, hf_experts.sort(dim=1).values)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert rel_err(ours, expected[0]) <= 1e-5


def test_reference_moe_matches_transformers_bf16(checkpoint, model_bf16) -> None:
    x, router_w, router_b, gate_up, down = moe_inputs(0, checkpoint, n=128)
    xb = x.to(torch.bfloat16)
    mlp = model_bf16.model.layers[0].mlp
    with torch.no_grad():
        expected, _ = mlp(xb[None])
        _, _, hf_experts = mlp.router(xb)
    ours, routing = reference_moe(xb, router_w, router_b, gate_up, down, K, return_routing=True)
    # bf16 router logits may reorder near-tied experts; compare tokens routed alike.
    same = (routing.experts.sort(dim=1).values == hf_experts.sort(dim=1).values).all(dim=1)
    assert same.float().mean() >= 0.9
    assert rel_err(ours[same], expected[0][same].float()) <= 1e-2
