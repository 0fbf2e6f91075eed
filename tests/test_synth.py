"""Synthetic checkpoints: layout, bitsandbytes compatibility, the reader, variants, determinism.

References are independent of our code: bitsandbytes' own QuantState.from_dict +
dequantize_4bit reads what we wrote, and the safetensors package parses the shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gptoss_3090 import presets
from gptoss_3090.synth import write_synthetic_checkpoint
from safetensors import safe_open

bnbf = pytest.importorskip("bitsandbytes.functional")

TINY = presets.TINY
L, E = TINY["num_hidden_layers"], TINY["num_local_experts"]
H, INTER = TINY["hidden_size"], TINY["intermediate_size"]
Q = TINY["num_attention_heads"] * TINY["head_dim"]
KV = TINY["num_key_value_heads"] * TINY["head_dim"]


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard listed in the index (also checks the index is complete)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard
                out[key] = f.get_tensor(key)
    assert set(out) == set(index["weight_map"])
    nbytes = sum(t.numel() * t.element_size() for t in out.values())
    assert index["metadata"]["total_size"] == nbytes
    return out


def bnb_dequantize(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Dequantizes ``prefix.weight`` with bitsandbytes' own deserializer and kernel."""
    stem = prefix + ".weight."
    qs = {k[len(stem) :]: v for k, v in tensors.items() if k.startswith(stem)}
    state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    return bnbf.dequantize_4bit(tensors[prefix + ".weight"], state)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return write_synthetic_checkpoint(out, "tiny", seed=3, progress=False)


@pytest.fixture(scope="module")
def tiny_tensors(tiny: Path) -> dict[str, torch.Tensor]:
    return load_dir(tiny)


@pytest.fixture(scope="module")
def ref_tensors(tiny: Path) -> dict[str, torch.Tensor]:
    return load_dir(tiny / "reference")


def quantized_prefixes() -> list[tuple[str, tuple[int, int]]]:
    out = []
    for layer in range(L):
        p = f"model.layers.{layer}"
        for name, shape in (("q_proj", (Q, H)), ("k_proj", (KV, H)), ("v_proj", (KV, H))):
            out.append((f"{p}.self_attn.{name}", shape))
        out.append((f"{p}.self_attn.o_proj", (H, Q)))
        for e in range(E):
            out.append((f"{p}.mlp.experts.gate_up_projs.{e}", (2 * INTER, H)))
            out.append((f"{p}.mlp.experts.down_projs.{e}", (H, INTER)))
    return out


def test_files_and_config(tiny: Path) -> None:
    shards = sorted(tiny.glob("model-*.safetensors"))
    assert len(shards) >= 2, "tiny checkpoint should be sharded to exercise the index"
    assert not list(tiny.glob("*.partial"))
    config = json.loads((tiny / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    assert qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    for name in ("lm_head", "router", "embed_tokens"):
        assert name in qc["llm_int8_skip_modules"]
    assert config["rope_scaling"]["truncate"] is False
    assert config["layer_types"][0] == "sliding_attention"
    assert config["tie_word_embeddings"] is False
    ref_config = json.loads((tiny / "reference" / "config.json").read_text())
    assert "quantization_config" not in ref_config


def test_tokenizer_matches_config(tiny: Path) -> None:
    from tokenizers import Tokenizer

    config = json.loads((tiny / "config.json").read_text())
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"]
    assert tok.token_to_id("<|return|>") == config["eos_token_id"]
    assert tok.token_to_id("<|endoftext|>") == config["pad_token_id"]
    ids = tok.encode("the water is cold <|return|>").ids
    assert ids[-1] == config["eos_token_id"]
    assert max(ids) < config["vocab_size"]
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert config["eos_token_id"] in gen["eos_token_id"]


def test_20b_tokenizer_uses_gptoss_ids(tmp_path: Path) -> None:
    from gptoss_3090 import tokenizer

    tokenizer.save_tokenizer(tmp_path, tokenizer.GPTOSS_SPECIAL_IDS)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    cfg = presets.GPTOSS_20B
    assert tok.token_to_id("<|return|>") == cfg["eos_token_id"] == 200002
    assert tok.token_to_id("<|endoftext|>") == cfg["pad_token_id"] == 199999
    assert max(tok.get_vocab().values()) < cfg["vocab_size"]


def test_presets_are_gptoss_configs() -> None:
    transformers = pytest.importorskip("transformers")
    for preset in (presets.TINY, presets.GPTOSS_20B):
        cfg = transformers.GptOssConfig(**preset)
        assert cfg.rope_parameters["rope_type"] == "yarn"
        assert cfg.rope_parameters["truncate"] is False
        assert cfg.rope_parameters["rope_theta"] == 150000
    big = presets.GPTOSS_20B
    assert (big["vocab_size"], big["hidden_size"], big["intermediate_size"]) == (201088, 2880, 2880)
    assert (big["num_hidden_layers"], big["num_local_experts"], big["num_experts_per_tok"]) == (
        24,
        32,
        4,
    )
    assert (big["num_attention_heads"], big["num_key_value_heads"], big["head_dim"]) == (64, 8, 64)
    # tiny: per-expert NF4 block counts are not a multiple of 256, like the real model.
    assert (2 * INTER * H // 64) % 256 != 0 and (H * INTER // 64) % 256 != 0


def test_keys_and_shapes(tiny_tensors: dict[str, torch.Tensor]) -> None:
    t = tiny_tensors
    assert t["model.embed_tokens.weight"].shape == (TINY["vocab_size"], H)
    assert t["lm_head.weight"].shape == (TINY["vocab_size"], H)
    assert t["model.norm.weight"].shape == (H,)
    for layer in range(L):
        p = f"model.layers.{layer}"
        assert t[f"{p}.mlp.router.linear.weight"].shape == (E, H)
        assert t[f"{p}.mlp.router.linear.weight"].dtype == torch.bfloat16
        assert t[f"{p}.mlp.router.linear.bias"].shape == (E,)
        assert t[f"{p}.self_attn.sinks"].shape == (TINY["num_attention_heads"],)
        assert t[f"{p}.self_attn.q_proj.bias"].shape == (Q,)
        assert t[f"{p}.mlp.experts.gate_up_projs.0.bias"].shape == (2 * INTER,)
        assert t[f"{p}.mlp.experts.down_projs.{E - 1}.bias"].shape == (H,)
    n_blocks = 2 * INTER * H // 64
    stem = "model.layers.0.mlp.experts.gate_up_projs.0.weight"
    assert t[stem].shape == (2 * INTER * H // 2, 1) and t[stem].dtype == torch.uint8
    assert t[stem + ".absmax"].shape == (n_blocks,) and t[stem + ".absmax"].dtype == torch.uint8
    assert t[stem + ".nested_absmax"].shape == (-(-n_blocks // 256),)
    assert torch.equal(t[stem + ".quant_map"], bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(t[stem + ".nested_quant_map"], bnbf.create_dynamic_map(signed=True))
    state = json.loads(bytes(t[stem + ".quant_state.bitsandbytes__nf4"].tolist()))
    assert list(state) == [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]
    assert state["shape"] == [2 * INTER, H] and state["dtype"] == "bfloat16"


def test_trained_looking_values(tiny_tensors: dict[str, torch.Tensor]) -> None:
    t = tiny_tensors
    sinks = torch.cat([t[f"model.layers.{i}.self_attn.sinks"].float() for i in range(L)])
    assert sinks.std() > 0.2 and -1.0 < sinks.mean() < 3.0
    norm = t["model.layers.0.input_layernorm.weight"].float()
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.01
    w = bnb_dequantize(t, "model.layers.0.mlp.experts.down_projs.0").float()
    assert 0.3 / INTER**0.5 < w.std() < 3.0 / INTER**0.5
    bias = t["model.layers.0.mlp.experts.gate_up_projs.0.bias"].float()
    assert 0 < bias.abs().mean() < 0.1


def test_bitsandbytes_reads_every_weight_like_the_reference(
    tiny_tensors: dict[str, torch.Tensor], ref_tensors: dict[str, torch.Tensor]
) -> None:
    for prefix, shape in quantized_prefixes():
        w = bnb_dequantize(tiny_tensors, prefix)
        assert w.shape == shape and w.dtype == torch.bfloat16, prefix
        parts = prefix.split(".")
        if parts[-2] == "gate_up_projs":
            ref = ref_tensors[".".join(parts[:-2]) + ".gate_up_proj"][int(parts[-1])].t()
        elif parts[-2] == "down_projs":
            ref = ref_tensors[".".join(parts[:-2]) + ".down_proj"][int(parts[-1])].t()
        else:
            ref = ref_tensors[prefix + ".weight"]
        assert torch.equal(w, ref), prefix


def test_reference_unquantized_tensors(
    tiny_tensors: dict[str, torch.Tensor], ref_tensors: dict[str, torch.Tensor]
) -> None:
    quantized = {p + ".weight" for p, _ in quantized_prefixes()}
    for key, value in tiny_tensors.items():
        if ".weight." in key or key in quantized or "_projs." in key:
            continue  # NF4 data/statistics, compared above; expert biases, compared below
        ref_key = key.replace(".router.linear.", ".router.")
        assert torch.equal(ref_tensors[ref_key], value), key
    for layer in range(L):
        p = f"model.layers.{layer}.mlp.experts"
        for proj, ref in (("gate_up_projs", "gate_up_proj_bias"), ("down_projs", "down_proj_bias")):
            stacked = torch.stack([tiny_tensors[f"{p}.{proj}.{e}.bias"] for e in range(E)])
            assert torch.equal(ref_tensors[f"{p}.{ref}"], stacked)


def test_deterministic(tmp_path: Path, tiny: Path) -> None:
    again = write_synthetic_checkpoint(
        tmp_path / "again", "tiny", seed=3, reference=False, progress=False
    )
    for shard in sorted(tiny.glob("model-*.safetensors")):
        assert (again / shard.name).read_bytes() == shard.read_bytes(), shard.name
    other = write_synthetic_checkpoint(
        tmp_path / "other", "tiny", seed=4, reference=False, progress=False
    )
    first = sorted(tiny.glob("model-*.safetensors"))[0].name
    assert (other / first).read_bytes() != (tiny / first).read_bytes()


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_synthetic_checkpoint(tmp_path, "tiny", progress=False)
    with pytest.raises(ValueError, match="preset"):
        write_synthetic_checkpoint(tmp_path / "a", "huge", progress=False)
    with pytest.raises(ValueError, match="attention"):
        write_synthetic_checkpoint(tmp_path / "b", "tiny", attention="fp8", progress=False)


def test_overwrite_replaces_own_files_only(tmp_path: Path) -> None:
    out = write_synthetic_checkpoint(tmp_path / "o", "tiny", reference=False, progress=False)
    (out / "notes.txt").write_text("mine")
    write_synthetic_checkpoint(out, "tiny", seed=1, reference=False, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    load_dir(out)


# --- the reader (gptoss_3090.open_checkpoint) on every variant --------------------------------

VARIANTS = {
    "default": {},
    "no-nested": {"nested": False},
    "attention-bf16": {"attention": "bf16"},
    "fp16": {"dtype": "fp16"},
    "fp16-no-nested-bf16-attn": {"dtype": "fp16", "nested": False, "attention": "bf16"},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    kwargs = VARIANTS[request.param]
    out = tmp_path_factory.mktemp("variant") / request.param
    write_synthetic_checkpoint(out, "tiny", seed=5, reference=False, progress=False, **kwargs)
    return out, kwargs


def test_variant_opens_with_reader(variant) -> None:
    from gptoss_3090 import open_checkpoint

    path, kwargs = variant
    tensors = load_dir(path)
    ck = open_checkpoint(path)
    s = ck.summary()
    assert s["layers"] == L and s["experts"] == E
    assert s["hidden_size"] == H and s["intermediate_size"] == INTER
    assert s["vocab_size"] == TINY["vocab_size"]
    assert s["gpu_weight_bytes"] > 0
    dtype = torch.float16 if kwargs.get("dtype") == "fp16" else torch.bfloat16
    nested = kwargs.get("nested", True)
    attn_nf4 = kwargs.get("attention", "nf4") == "nf4"
    stem = "model.layers.1.mlp.experts.gate_up_projs.2"
    assert (tensors[stem + ".weight.absmax"].dtype == torch.uint8) == nested
    for prefix in (stem, "model.layers.2.mlp.experts.down_projs.7"):
        ours = ck.dequantize(prefix + ".weight")
        assert ours.dtype == dtype
        assert torch.equal(ours, bnb_dequantize(tensors, prefix))
    q = "model.layers.3.self_attn.q_proj"
    if attn_nf4:
        assert torch.equal(ck.dequantize(q + ".weight"), bnb_dequantize(tensors, q))
    else:
        assert tensors[q + ".weight"].dtype == dtype
        assert tensors[q + ".weight"].shape == (Q, H)
        assert (q + ".weight.absmax") not in tensors
