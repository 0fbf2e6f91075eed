"""Bad-input corpus: every damaged or wrong checkpoint raises CheckpointError (a ValueError) whose
message names the offending tensor key or file, never a crash or another exception."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

import bnb_fixtures as fx  # noqa: E402
from gptoss_3090 import CheckpointError, open_checkpoint  # noqa: E402

SPEC = fx.Spec(
    hidden=128, intermediate=192, layers=1, experts=2, heads=4, kv_heads=2, head_dim=32,
    vocab=64, experts_per_token=1,
)
L0 = "model.layers.0"
GU1 = f"{L0}.mlp.experts.gate_up_projs.1"
DN0 = f"{L0}.mlp.experts.down_projs.0"
Q = f"{L0}.self_attn.q_proj"


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return fx.build_tensors(SPEC.with_(seed=int(torch.randint(0, 2**31 - 1, (1,)).item())))


@pytest.fixture
def tensors(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(base)


def save(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
         shards: int = 1, index: bool | None = None) -> Path:
    return fx.save_checkpoint(path, tensors, fx.config_dict(SPEC) if config is None else config,
                              shards, index)


def expect(path: Path, *fragments: str) -> str:
    """Opening ``path`` raises CheckpointError (a ValueError) mentioning every fragment."""
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def drop(tensors: dict[str, torch.Tensor], prefix: str) -> None:
    for k in [k for k in tensors if k == prefix or k.startswith(prefix + ".")]:
        del tensors[k]


def requantize(tensors: dict[str, torch.Tensor], module: str, shape: tuple[int, int],
               **kw: object) -> None:
    """Replaces ``module``'s weight with a fresh bitsandbytes quantization (options in ``kw``)."""
    drop(tensors, f"{module}.weight")
    w = (torch.randn(*shape) * 0.02).to(kw.pop("dtype", SPEC.dtype))  # type: ignore[arg-type]
    tensors.update(fx.quantize_linear(w, module, **kw))  # type: ignore[arg-type]


def test_sanity_base_opens(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    ck = open_checkpoint(save(tmp_path, tensors))
    assert ck.summary()["experts"] == SPEC.experts


# --- damaged files ---

@pytest.mark.parametrize("keep", [0, 5, 20, -100, -1])
def test_truncated_shard(tmp_path: Path, tensors: dict[str, torch.Tensor], keep: int) -> None:
    path = save(tmp_path, tensors)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    expect(path, str(f))


def test_garbage_bytes(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors)
    f = path / "model.safetensors"
    f.write_bytes(random.Random(1).randbytes(4096))
    expect(path, str(f))


def test_bad_header_json(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors)
    f = path / "model.safetensors"
    header = b'{"a": not json}'
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    expect(path, str(f))


def test_offsets_past_end_of_file(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors)
    f = path / "model.safetensors"
    header = json.dumps(
        {"model.norm.weight": {"dtype": "BF16", "shape": [1000000], "data_offsets": [0, 2000000]}}
    ).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    expect(path, str(f))


def test_wrong_header_sizes(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors)
    f = path / "model.safetensors"
    header = json.dumps(
        {"model.norm.weight": {"dtype": "BF16", "shape": [128], "data_offsets": [0, 100]}}
    ).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    expect(path, str(f))


def test_fuzzed_headers_never_crash(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Random byte flips in the header and random truncations: open or CheckpointError."""
    path = save(tmp_path, tensors)
    f = path / "model.safetensors"
    original = f.read_bytes()
    (hlen,) = struct.unpack("<Q", original[:8])
    rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    for _ in range(40):
        data = bytearray(original)
        if rng.random() < 0.7:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(0, 8 + hlen)] = rng.randrange(256)
        else:
            data = data[: rng.randrange(0, len(data))]
        f.write_bytes(bytes(data))
        try:
            open_checkpoint(path)
        except CheckpointError:
            pass


# --- config ---

def test_missing_config(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors)
    (path / "config.json").unlink()
    expect(path, "config.json")


def test_bad_config_json(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors)
    (path / "config.json").write_text('{"model_type": "gpt_oss",')
    expect(path, "config.json", "JSON")


def test_non_gpt_oss_config(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cfg = fx.config_dict(SPEC) | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    expect(save(tmp_path, tensors, cfg), "config.json", "gpt_oss", "'llama'")


def test_inconsistent_config(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cfg = fx.config_dict(SPEC) | {"layer_types": ["full_attention"] * 3}
    expect(save(tmp_path, tensors, cfg), "config.json", "layer_types")


def test_config_quant_type_fp4(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    cfg = fx.config_dict(SPEC)
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    expect(save(tmp_path, tensors, cfg), "bnb_4bit_quant_type", "fp4")


def test_config_shapes_disagree_with_tensors(
    tmp_path: Path, tensors: dict[str, torch.Tensor]
) -> None:
    cfg = fx.config_dict(SPEC) | {"intermediate_size": SPEC.intermediate * 2}
    expect(save(tmp_path, tensors, cfg), "model.layers.0.mlp.experts.gate_up_projs.0.weight",
           f"[{4 * SPEC.intermediate}, {SPEC.hidden}]")


def test_not_a_directory(tmp_path: Path) -> None:
    expect(tmp_path / "nothing-here", "nothing-here")


def test_no_shards(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(fx.config_dict(SPEC)))
    expect(tmp_path, str(tmp_path), "safetensors")


# --- quant states ---

def test_fp4_instead_of_nf4(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    requantize(tensors, GU1, (2 * SPEC.intermediate, SPEC.hidden), nested=True, quant_type="fp4")
    msg = expect(save(tmp_path, tensors), f"{GU1}.weight.quant_state.bitsandbytes__fp4")
    assert "expected nf4" in msg and "found fp4" in msg


def test_blocksize_128(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    requantize(tensors, GU1, (2 * SPEC.intermediate, SPEC.hidden), nested=True, blocksize=128)
    expect(save(tmp_path, tensors), f"{GU1}.weight.quant_state.bitsandbytes__nf4",
           "blocksize 64", "blocksize 128")


def test_float32_original_dtype(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    requantize(tensors, DN0, (SPEC.hidden, SPEC.intermediate), nested=False, dtype=torch.float32)
    expect(save(tmp_path, tensors), f"{DN0}.weight.quant_state", "float32")


def edit_state(tensors: dict[str, torch.Tensor], weight: str, **changes: object) -> None:
    key = f"{weight}.{fx.NF4_STATE}"
    state = json.loads(bytes(tensors[key].tolist()).decode())
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def test_nested_blocksize_128(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    edit_state(tensors, f"{GU1}.weight", nested_blocksize=128)
    expect(save(tmp_path, tensors), f"{GU1}.weight.quant_state", "nested_blocksize 256")


def test_nested_dtype_float16(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    edit_state(tensors, f"{GU1}.weight", nested_dtype="float16")
    expect(save(tmp_path, tensors), f"{GU1}.weight.quant_state", "nested_dtype float32")


def test_missing_nested_offset(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    edit_state(tensors, f"{GU1}.weight", nested_offset=None)
    expect(save(tmp_path, tensors), f"{GU1}.weight.quant_state", "nested_offset")


def test_quant_state_shape_disagrees(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    edit_state(tensors, f"{DN0}.weight", shape=[SPEC.intermediate, SPEC.hidden])
    expect(save(tmp_path, tensors), f"{DN0}.weight")


def test_garbage_quant_state_json(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{DN0}.weight.{fx.NF4_STATE}"] = torch.tensor(list(b"{bad json"), dtype=torch.uint8)
    expect(save(tmp_path, tensors), f"{DN0}.weight.{fx.NF4_STATE}", "JSON")


def test_wrong_absmax_length(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{GU1}.weight.absmax"] = tensors[f"{GU1}.weight.absmax"][:-1]
    expect(save(tmp_path, tensors), f"{GU1}.weight.absmax", "uint8")


def test_wrong_absmax_dtype(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{GU1}.weight.absmax"] = tensors[f"{GU1}.weight.absmax"].float()
    expect(save(tmp_path, tensors), f"{GU1}.weight.absmax", "found float32")


def test_wrong_nested_absmax_length(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{GU1}.weight.nested_absmax"
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    expect(save(tmp_path, tensors), key)


def test_wrong_packed_size(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{GU1}.weight"] = tensors[f"{GU1}.weight"][:-2]
    expect(save(tmp_path, tensors), f"'{GU1}.weight'", "uint8")


def test_packed_as_bfloat16_storage(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{Q}.weight"
    tensors[key] = tensors[key].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    expect(save(tmp_path, tensors), f"'{key}'", "bfloat16")


def test_wrong_quant_map(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{Q}.weight.quant_map"
    tensors[key] = tensors[key].flip(0).contiguous()
    expect(save(tmp_path, tensors), key, "NF4 code table")


def test_wrong_nested_quant_map_shape(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{Q}.weight.nested_quant_map"
    tensors[key] = tensors[key][:128]
    expect(save(tmp_path, tensors), key, "[256]")


def test_quantized_router_rejected(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    requantize(tensors, f"{L0}.mlp.router.linear", (SPEC.experts, SPEC.hidden), nested=True)
    expect(save(tmp_path, tensors), f"{L0}.mlp.router.linear.weight", "never quantized")


def test_missing_quant_state(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    del tensors[f"{GU1}.weight.{fx.NF4_STATE}"]
    expect(save(tmp_path, tensors), f"{GU1}.weight", "no quant state")


def test_missing_absmax(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    del tensors[f"{GU1}.weight.absmax"]
    expect(save(tmp_path, tensors), f"{GU1}.weight.absmax", "missing")


# --- inventory ---

def test_missing_expert(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    drop(tensors, GU1)
    expect(save(tmp_path, tensors), f"{GU1}.weight", "missing")


def test_missing_sinks(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    del tensors[f"{L0}.self_attn.sinks"]
    expect(save(tmp_path, tensors), f"{L0}.self_attn.sinks", "missing")


@pytest.mark.parametrize("bias", [f"{DN0}.bias", f"{Q}.bias", f"{L0}.mlp.router.linear.bias"])
def test_missing_bias(tmp_path: Path, tensors: dict[str, torch.Tensor], bias: str) -> None:
    del tensors[bias]
    expect(save(tmp_path, tensors), bias, "missing")


def test_wrong_sinks_shape(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{L0}.self_attn.sinks"
    tensors[key] = tensors[key][:-1]
    expect(save(tmp_path, tensors), key, f"[{SPEC.heads}]")


def test_missing_norm_and_lm_head(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    del tensors["lm_head.weight"]
    expect(save(tmp_path / "a", tensors), "lm_head.weight", "missing")
    tensors = dict(tensors)
    tensors["lm_head.weight"] = torch.zeros(SPEC.vocab, SPEC.hidden, dtype=SPEC.dtype)
    del tensors["model.norm.weight"]
    expect(save(tmp_path / "b", tensors), "model.norm.weight", "missing")


def test_unexpected_tensor(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(4, dtype=SPEC.dtype)
    expect(save(tmp_path, tensors), "model.layers.0.mlp.shared_expert.weight", "unexpected")


def test_expert_index_out_of_range(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    extra = f"{L0}.mlp.experts.down_projs.{SPEC.experts}.bias"
    tensors[extra] = tensors[f"{DN0}.bias"].clone()
    expect(save(tmp_path, tensors), extra, "expert index", f"num_local_experts is {SPEC.experts}")


def test_layer_index_out_of_range(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    extra = "model.layers.1.input_layernorm.weight"
    tensors[extra] = tensors[f"{L0}.input_layernorm.weight"].clone()
    expect(save(tmp_path, tensors), extra, "num_hidden_layers")


def test_hf_fused_layout_is_named(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for x in range(SPEC.experts):
        drop(tensors, f"{L0}.mlp.experts.gate_up_projs.{x}")
    tensors[f"{L0}.mlp.experts.gate_up_proj"] = torch.zeros(
        SPEC.experts, SPEC.hidden, 2 * SPEC.intermediate, dtype=SPEC.dtype)
    expect(save(tmp_path, tensors), f"{L0}.mlp.experts.gate_up_projs.0.weight",
           "Hugging Face fused expert layout")


# --- shards and index ---

@pytest.mark.parametrize("with_index", [False, True])
def test_duplicated_expert_in_two_shards(
    tmp_path: Path, tensors: dict[str, torch.Tensor], with_index: bool
) -> None:
    path = save(tmp_path, tensors, shards=2, index=with_index)
    dup = {k: v.clone() for k, v in tensors.items() if k.startswith(GU1 + ".")}
    a = path / fx.shard_name(0, 2)
    b = path / fx.shard_name(1, 2)
    # Rewrite shard 2 with its own tensors plus a copy of every key of expert 1 from shard 1.
    from safetensors.torch import load_file, save_file

    mine = load_file(str(b))
    extra = {k: v for k, v in dup.items() if k not in mine}
    assert extra
    save_file(mine | extra, str(b))
    msg = expect(path, a.name, b.name)
    assert any(f"'{k}'" in msg for k in extra)


def test_index_points_to_missing_file(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors, shards=2)
    (path / fx.shard_name(1, 2)).unlink()
    expect(path, fx.shard_name(1, 2))


def test_index_lists_key_absent_from_its_shard(
    tmp_path: Path, tensors: dict[str, torch.Tensor]
) -> None:
    path = save(tmp_path, tensors, shards=2)
    idx = path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["model.layers.0.self_attn.extra"] = fx.shard_name(0, 2)
    idx.write_text(json.dumps(data))
    expect(path, "model.layers.0.self_attn.extra", fx.shard_name(0, 2))


def test_index_maps_key_to_wrong_shard(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors, shards=2)
    idx = path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    key = next(k for k, f in data["weight_map"].items() if f == fx.shard_name(0, 2))
    data["weight_map"][key] = fx.shard_name(1, 2)
    idx.write_text(json.dumps(data))
    expect(path, key, fx.shard_name(0, 2), fx.shard_name(1, 2))


def test_index_misses_a_key(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = save(tmp_path, tensors, shards=2)
    idx = path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    key = sorted(data["weight_map"])[3]
    del data["weight_map"][key]
    idx.write_text(json.dumps(data))
    expect(path, key, "model.safetensors.index.json")


@pytest.mark.parametrize("text", ["{oops", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}',
                                  '{"weight_map": {"a": "../x.safetensors"}}'])
def test_bad_index_json(tmp_path: Path, tensors: dict[str, torch.Tensor], text: str) -> None:
    path = save(tmp_path, tensors, shards=2)
    (path / "model.safetensors.index.json").write_text(text)
    expect(path, "model.safetensors.index.json")


# --- fused experts that cannot be fused ---

def test_mixed_nesting_in_one_layer(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    requantize(tensors, GU1, (2 * SPEC.intermediate, SPEC.hidden), nested=False)
    ck = open_checkpoint(save(tmp_path, tensors))  # each tensor is valid on its own
    with pytest.raises(CheckpointError, match=rf"'{GU1}\.weight'.*not nested"):
        ck.fused_experts(0, "gate_up")
    ck.fused_experts(0, "down")  # the other projection is fine


def test_mixed_dtypes_in_one_layer(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    requantize(tensors, GU1, (2 * SPEC.intermediate, SPEC.hidden), nested=True,
               dtype=torch.float16)
    ck = open_checkpoint(save(tmp_path, tensors))
    with pytest.raises(CheckpointError, match=rf"'{GU1}\.weight'.*float16"):
        ck.fused_layout(0, "gate_up")


def test_different_nested_quant_map(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{GU1}.weight.nested_quant_map"
    m = tensors[key].clone()
    m[0] = -0.5
    tensors[key] = m
    ck = open_checkpoint(save(tmp_path, tensors))
    with pytest.raises(CheckpointError, match=rf"'{GU1}\.weight\.nested_quant_map'"):
        ck.fused_experts(0, "gate_up")


def test_plain_experts_cannot_be_fused(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for x in range(SPEC.experts):
        m = f"{L0}.mlp.experts.down_projs.{x}"
        drop(tensors, f"{m}.weight")
        tensors[f"{m}.weight"] = torch.zeros(SPEC.hidden, SPEC.intermediate, dtype=SPEC.dtype)
    ck = open_checkpoint(save(tmp_path, tensors))
    assert ck.summary()["nf4"]["experts"] is False
    with pytest.raises(CheckpointError, match=rf"'{DN0}\.weight'.*NF4"):
        ck.fused_experts(0, "down")
