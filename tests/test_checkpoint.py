"""The checkpoint reader against checkpoints written by bitsandbytes itself (CPU).

References: bitsandbytes' ``dequantize_4bit`` of the ``QuantState`` rebuilt with
``QuantState.from_dict`` from the files (read back with safetensors), and the raw tensors as
safetensors loads them. Nothing is compared against values our code produced earlier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

import bnb_fixtures as fx  # noqa: E402
from gptoss_3090 import Checkpoint, CheckpointError, FusedExperts, open_checkpoint  # noqa: E402


@dataclass(frozen=True)
class Variant:
    nested: bool
    dtype: torch.dtype
    attention: str
    shards: int

    @property
    def id(self) -> str:
        return (
            f"{'nested' if self.nested else 'plain'}-{fx._dtype_name(self.dtype)}-"
            f"attn_{self.attention}-{self.shards}shard"
        )


VARIANTS = [
    Variant(True, torch.bfloat16, "nf4", 1),
    Variant(False, torch.bfloat16, "nf4", 2),
    Variant(True, torch.float16, "plain", 2),
    Variant(False, torch.float16, "plain", 1),
]


@dataclass
class Written:
    variant: Variant
    spec: fx.Spec
    path: Path
    tensors: dict[str, torch.Tensor]
    ckpt: Checkpoint


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.id)
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Written:
    v: Variant = request.param
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    spec = fx.Spec(nested=v.nested, dtype=v.dtype, attention=v.attention, seed=seed)
    path, _ = fx.write_checkpoint(tmp_path_factory.mktemp(v.id), spec, shards=v.shards)
    # Reference tensors are what safetensors reads back from the files.
    tensors = fx.load_tensors(path)
    return Written(v, spec, path, tensors, open_checkpoint(path))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (distinguishes -0.0 from 0.0, NaN payloads)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_files_are_what_the_variant_says(written: Written) -> None:
    files = sorted(p.name for p in written.path.glob("*.safetensors"))
    assert len(files) == written.variant.shards
    assert (written.path / "model.safetensors.index.json").exists() == (written.variant.shards > 1)
    # The fixture's per-expert block counts are not multiples of 256.
    s = written.spec
    assert (2 * s.intermediate * s.hidden // 64) % 256 != 0
    assert (s.hidden * s.intermediate // 64) % 256 != 0


def test_config_is_config_json(written: Written) -> None:
    assert written.ckpt.config == json.loads((written.path / "config.json").read_text())


def test_summary(written: Written) -> None:
    s, v, spec = written.ckpt.summary(), written.variant, written.spec
    assert s["layers"] == spec.layers
    assert s["experts"] == spec.experts
    assert s["experts_per_token"] == spec.experts_per_token
    assert s["hidden_size"] == spec.hidden
    assert s["intermediate_size"] == spec.intermediate
    assert s["heads"] == spec.heads
    assert s["kv_heads"] == spec.kv_heads
    assert s["head_dim"] == spec.head_dim
    assert s["vocab_size"] == spec.vocab
    assert s["sliding_window"] == spec.sliding_window
    assert s["layer_types"] == fx.config_dict(spec)["layer_types"]
    assert s["nf4"] == {"attention": v.attention == "nf4", "experts": True}
    assert s["nested"] is v.nested
    assert s["dtype"] == fx._dtype_name(v.dtype)
    assert s["files"] == v.shards
    assert s["tensors"] == len(written.tensors)

    total = sum(p.stat().st_size for p in written.path.glob("*.safetensors"))
    assert s["total_file_bytes"] == total
    assert sum(s["bytes"].values()) == total

    # Recompute bytes by category and the GPU estimate from the raw tensors.
    t = written.tensors
    nbytes = {k: v.numel() * v.element_size() for k, v in t.items()}
    qweights = set(fx.quantized_weight_keys(t))

    def cat(key: str) -> str:
        if key.endswith(".bias") or "norm" in key or key.endswith("sinks"):
            return "norms_sinks_biases"
        if ".mlp.experts." in key:
            return "experts"
        if ".self_attn." in key:
            return "attention"
        if ".mlp.router." in key:
            return "router"
        return {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head"}[key]

    by_cat: dict[str, int] = {}
    for k, n in nbytes.items():
        by_cat[cat(k)] = by_cat.get(cat(k), 0) + n
    for c, n in by_cat.items():
        assert s["bytes"][c] == n, c
    assert s["bytes"]["other"] == total - sum(nbytes.values())

    gpu = 0
    owned: set[str] = set()
    for w in qweights:
        comps = [w, f"{w}.absmax"] + ([f"{w}.nested_absmax"] if v.nested else [])
        gpu += sum(nbytes[c] for c in comps) + (4 if v.nested else 0)
        owned.update(k for k in t if k == w or k.startswith(w + "."))
    # Shared maps: once per attention weight, once per (layer, projection) for experts.
    n_map_owners = (4 * spec.layers if v.attention == "nf4" else 0) + 2 * spec.layers
    gpu += n_map_owners * (64 + (1024 if v.nested else 0))
    gpu += sum(2 * x.numel() for k, x in t.items() if k not in owned)
    assert s["gpu_weight_bytes"] == gpu


def test_keys_and_raw_tensors(written: Written) -> None:
    ck = written.ckpt
    assert ck.keys() == sorted(written.tensors)
    for key, ref in written.tensors.items():
        got = ck.tensor(key)
        assert bits_equal(got, ref), key
        assert key in ck
    assert "nope" not in ck
    with pytest.raises(CheckpointError, match="'model.layers.0.nope'"):
        ck.tensor("model.layers.0.nope")


def test_dequantize_bit_exact_vs_bitsandbytes(written: Written) -> None:
    ck, t = written.ckpt, written.tensors
    weights = fx.quantized_weight_keys(t)
    n_attn = 4 * written.spec.layers if written.variant.attention == "nf4" else 0
    assert len(weights) == n_attn + 2 * written.spec.layers * written.spec.experts
    for w in weights:
        ref = fx.bnb_dequantize(t, w)
        got = ck.dequantize(w)
        assert got.dtype == written.variant.dtype == ref.dtype, w
        assert got.shape == ref.shape, w
        assert bits_equal(got, ref), w
        assert ck.is_nf4(w)


def test_dequantize_keeps_signed_zero(written: Written) -> None:
    # Layer 0 expert 1 gate_up row 3 starts with an all-zero block (see bnb_fixtures).
    w = "model.layers.0.mlp.experts.gate_up_projs.1.weight"
    got = written.ckpt.dequantize(w)[3, :64]
    ref = fx.bnb_dequantize(written.tensors, w)[3, :64]
    assert bool((got == 0).all())
    assert bits_equal(got, ref)


def test_dequantize_unquantized_and_unknown(written: Written) -> None:
    ck, t = written.ckpt, written.tensors
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.router.linear.weight",
                "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.sinks"):
        assert not ck.is_nf4(key)
        assert bits_equal(ck.dequantize(key), t[key])
    if written.variant.attention == "plain":
        key = "model.layers.0.self_attn.o_proj.weight"
        assert bits_equal(ck.dequantize(key), t[key])
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_projs\.9"):
        ck.dequantize("model.layers.0.mlp.experts.gate_up_projs.9.weight")


@pytest.mark.parametrize("proj", ["gate_up", "down"])
def test_fused_view_equals_per_expert(written: Written, proj: str) -> None:
    ck, t, spec = written.ckpt, written.tensors, written.spec
    n, k = (2 * spec.intermediate, spec.hidden) if proj == "gate_up" else (
        spec.hidden, spec.intermediate)
    for layer in range(spec.layers):
        f = ck.fused_experts(layer, proj)
        assert isinstance(f, FusedExperts)
        assert f.shape == (spec.experts, n, k)
        assert f.nested is written.variant.nested
        assert f.dtype == written.variant.dtype
        assert (f.layer, f.proj) == (layer, proj)
        nb = n * k // 64
        for e in range(spec.experts):
            w = f"model.layers.{layer}.mlp.experts.{proj}_projs.{e}.weight"
            # Buffers are the per-expert tensors, concatenated / stacked.
            assert torch.equal(f.packed[e], t[w].reshape(-1))
            assert bits_equal(f.absmax[e], t[f"{w}.absmax"])
            assert bits_equal(f.bias[e], t[w.replace(".weight", ".bias")])
            assert bits_equal(f.quant_map, t[f"{w}.quant_map"])
            if written.variant.nested:
                assert bits_equal(f.nested_absmax[e], t[f"{w}.nested_absmax"])
                assert bits_equal(f.nested_quant_map, t[f"{w}.nested_quant_map"])
                qs = fx.bnb_quant_state(t, w)
                assert f.nested_offset[e].item() == qs.offset.item()
                assert f.nested_absmax.shape == (spec.experts, -(-nb // 256))
            else:
                assert f.nested_absmax is None and f.nested_offset is None
                assert f.nested_quant_map is None
            # Dequantized from the fused buffers == per-expert == bitsandbytes.
            got = f.dequantize(e)
            assert bits_equal(got, ck.dequantize(w)), (layer, proj, e)
            assert bits_equal(got, fx.bnb_dequantize(t, w)), (layer, proj, e)


def test_fused_layout_describes_buffers(written: Written) -> None:
    ck, spec = written.ckpt, written.spec
    lay = ck.fused_layout(1, "down")
    e, n, k = lay["shape"]
    assert (e, n, k) == (spec.experts, spec.hidden, spec.intermediate)
    assert lay["nested"] is written.variant.nested
    assert lay["dtype"] == fx._dtype_name(written.variant.dtype)
    f = ck.fused_experts(1, "down")
    assert set(lay["buffers"]) == set(f.buffers)
    for name, spec_b in lay["buffers"].items():
        tb = f.buffers[name]
        assert list(tb.shape) == list(spec_b["shape"]), name
        assert str(tb.dtype).removeprefix("torch.") == spec_b["dtype"], name
        assert tb.numel() * tb.element_size() == spec_b["nbytes"], name
    assert lay["total_bytes"] == f.nbytes


@pytest.mark.parametrize("threads", [1, 3])
def test_fill_into_caller_buffers(written: Written, threads: int) -> None:
    ck = written.ckpt
    ref = ck.fused_experts(0, "gate_up")
    out = ck.empty_fused_buffers(0, "gate_up")
    for tensor in out.values():
        tensor.view(torch.uint8).fill_(0xAB)
    f = FusedExperts.fill_into(ck, 0, "gate_up", out, threads=threads)
    for name, tensor in ref.buffers.items():
        assert f.buffers[name] is out[name]
        assert bits_equal(out[name], tensor), name
    # Reuse the same buffers for another layer with the same layout.
    ck.fused_experts(1, "gate_up", out=out)
    other = ck.fused_experts(1, "gate_up")
    for name, tensor in other.buffers.items():
        assert bits_equal(out[name], tensor), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_fill_into_pinned_buffers(written: Written) -> None:
    ck = written.ckpt
    out = ck.empty_fused_buffers(1, "down", pin_memory=True)
    assert all(t.is_pinned() for t in out.values())
    f = ck.fused_experts(1, "down", out=out)
    ref = ck.fused_experts(1, "down")
    for name, tensor in ref.buffers.items():
        assert bits_equal(f.buffers[name], tensor)


def test_fill_rejects_bad_buffers(written: Written) -> None:
    ck = written.ckpt
    good = ck.empty_fused_buffers(0, "down")
    bad = dict(good)
    bad["packed"] = torch.empty(good["packed"].numel() + 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="'packed'"):
        ck.fused_experts(0, "down", out=bad)
    bad = dict(good)
    bad["bias"] = good["bias"].float()
    with pytest.raises(ValueError, match="'bias'"):
        ck.fused_experts(0, "down", out=bad)
    bad = dict(good)
    bad["absmax"] = torch.empty(good["absmax"].shape[1], good["absmax"].shape[0],
                                dtype=good["absmax"].dtype).t()
    with pytest.raises(ValueError, match="'absmax'"):
        ck.fused_experts(0, "down", out=bad)
    bad = dict(good)
    del bad["quant_map"]
    with pytest.raises(ValueError, match="quant_map"):
        ck.fused_experts(0, "down", out=bad)


@pytest.mark.parametrize(
    ("layer", "proj", "match"),
    [
        (-1, "gate_up", "layer"),
        (2, "gate_up", "layer"),
        ("0", "down", "layer"),
        (True, "down", "layer"),
        (0, "gate", "projection"),
        (0, "up", "projection"),
        (0, None, "projection"),
    ],
)
def test_bad_layer_or_projection(written: Written, layer: object, proj: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        written.ckpt.fused_experts(layer, proj)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        written.ckpt.fused_layout(layer, proj)  # type: ignore[arg-type]


def test_bad_expert_index(written: Written) -> None:
    f = written.ckpt.fused_experts(0, "down")
    for bad in (-1, written.spec.experts, 1.0):
        with pytest.raises(ValueError, match="expert"):
            f.dequantize(bad)  # type: ignore[arg-type]


def test_native_direct_is_consistent(written: Written) -> None:
    # The Rust layout query and the native fill agree with the Python wrapper.
    from gptoss_3090 import _native

    nat = _native.NativeCheckpoint(str(written.path))
    assert nat.keys() == written.ckpt.keys()
    with pytest.raises(ValueError, match="layer"):
        nat.fused_layout(99, "down")
    with pytest.raises(ValueError, match="projection"):
        nat.fused_layout(0, "mid")
