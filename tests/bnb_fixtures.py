"""Small GPT-OSS checkpoints in Unsloth's bnb-4bit layout, written with bitsandbytes itself.

Every quantized Linear is quantized by ``bitsandbytes.functional.quantize_4bit`` (CPU,
blocksize 64, ``quant_type="nf4"``) and serialized with ``QuantState.as_dict(packed=True)``
under ``<module>.weight.*``, exactly as bitsandbytes' ``Linear4bit._save_to_state_dict`` names
them; the packed codes go under ``<module>.weight``. Nothing here uses gptoss_3090, so the
reader is tested against files it did not write.

Default shapes: hidden 320, intermediate 320, 2 layers, 4 experts, 8 heads x 64, 2 KV heads,
vocab 512. Per expert the gate_up weight has 640*320/64 = 3200 blocks and down 1600 blocks:
neither is a multiple of 256, so nested statistics straddle experts if indexed globally.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

try:
    import bitsandbytes.functional as bnbf
except ImportError:  # pragma: no cover - bitsandbytes is a test dependency
    bnbf = None

NF4_STATE = "quant_state.bitsandbytes__nf4"


@dataclass(frozen=True)
class Spec:
    """What to write. ``attention`` is ``"nf4"`` or ``"plain"`` (unquantized, in ``dtype``)."""

    hidden: int = 320
    intermediate: int = 320
    layers: int = 2
    experts: int = 4
    experts_per_token: int = 2
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    vocab: int = 512
    sliding_window: int = 128
    nested: bool = True
    dtype: torch.dtype = torch.bfloat16
    attention: str = "nf4"
    seed: int = 0

    def with_(self, **kw: Any) -> Spec:
        """A copy with fields replaced."""
        return replace(self, **kw)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_dict(spec: Spec) -> dict[str, Any]:
    """config.json as Unsloth writes it for GPT-OSS bnb-4bit (quantization_config included)."""
    skip = ["router", "lm_head", "embed_tokens"]
    if spec.attention != "nf4":
        skip.append("self_attn")
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": spec.experts_per_token,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "layer_types": [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.layers)
        ],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.experts_per_token,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "num_local_experts": spec.experts,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": _dtype_name(spec.dtype),
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": spec.nested,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": spec.sliding_window,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "torch_dtype": _dtype_name(spec.dtype),
        "transformers_version": "4.56.0",
        "unsloth_fixed": True,
        "use_cache": True,
        "vocab_size": spec.vocab,
    }


def quantize_linear(
    weight: torch.Tensor,
    prefix: str,
    nested: bool,
    quant_type: str = "nf4",
    blocksize: int = 64,
) -> dict[str, torch.Tensor]:
    """Quantizes ``weight`` with bitsandbytes: the state-dict entries of ``<prefix>.weight``."""
    if bnbf is None:  # pragma: no cover
        raise RuntimeError("bitsandbytes is required to write fixtures")
    packed, qs = bnbf.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    out = {f"{prefix}.weight": packed}
    for k, v in qs.as_dict(packed=True).items():
        out[f"{prefix}.weight.{k}"] = v
    return out


def build_tensors(spec: Spec) -> dict[str, torch.Tensor]:
    """The full state dict (random, trained-looking magnitudes), quantized as ``spec`` says."""
    g = torch.Generator().manual_seed(spec.seed)

    def randn(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(spec.dtype)

    h, i, e = spec.hidden, spec.intermediate, spec.experts
    q_out, kv_out = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": randn(spec.vocab, h),
        "model.norm.weight": (1 + randn(h, scale=0.1).float()).to(spec.dtype),
        "lm_head.weight": randn(spec.vocab, h),
    }
    for layer in range(spec.layers):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = (1 + randn(h, scale=0.1).float()).to(spec.dtype)
        t[f"{p}.post_attention_layernorm.weight"] = (1 + randn(h, scale=0.1).float()).to(
            spec.dtype
        )
        t[f"{p}.self_attn.sinks"] = randn(spec.heads, scale=1.0)
        for name, out_f, in_f in (
            ("q_proj", q_out, h),
            ("k_proj", kv_out, h),
            ("v_proj", kv_out, h),
            ("o_proj", h, q_out),
        ):
            mp = f"{p}.self_attn.{name}"
            w = randn(out_f, in_f)
            if spec.attention == "nf4":
                t.update(quantize_linear(w, mp, spec.nested))
            else:
                t[f"{mp}.weight"] = w
            t[f"{mp}.bias"] = randn(out_f)
        t[f"{p}.mlp.router.linear.weight"] = randn(e, h)
        t[f"{p}.mlp.router.linear.bias"] = randn(e)
        for x in range(e):
            gu = randn(2 * i, h)
            if layer == 0 and x == 1:
                gu[3, :64] = 0  # one all-zero block (sign of zero must survive)
            t.update(quantize_linear(gu, f"{p}.mlp.experts.gate_up_projs.{x}", spec.nested))
            t[f"{p}.mlp.experts.gate_up_projs.{x}.bias"] = randn(2 * i)
            dn = randn(h, i)
            t.update(quantize_linear(dn, f"{p}.mlp.experts.down_projs.{x}", spec.nested))
            t[f"{p}.mlp.experts.down_projs.{x}.bias"] = randn(h)
    return t


def shard_name(i: int, n: int) -> str:
    """transformers' shard file name."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_checkpoint(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any] | None,
    shards: int = 1,
    index: bool | None = None,
) -> Path:
    """Writes config.json and the tensors in ``shards`` files (keys dealt round-robin in sorted
    order, so one weight's quant state spans files). ``index`` defaults to ``shards > 1``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(tensors)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        name = "model.safetensors" if shards == 1 else shard_name(s, shards)
        part = {k: tensors[k].contiguous().clone() for k in keys[s::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    if index if index is not None else shards > 1:
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return path


def write_checkpoint(
    path: str | Path, spec: Spec = Spec(), shards: int = 1, index: bool | None = None
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Builds and saves a checkpoint; returns its directory and the state dict written."""
    tensors = build_tensors(spec)
    return save_checkpoint(path, tensors, config_dict(spec), shards, index), tensors


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read with safetensors (independent of our reader)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def quantized_weight_keys(tensors: Iterable[str]) -> list[str]:
    """Weight keys that carry an NF4 quant state."""
    suffix = f".{NF4_STATE}"
    return sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))


def bnb_quant_state(tensors: dict[str, torch.Tensor], weight_key: str) -> Any:
    """Rebuilds the bitsandbytes ``QuantState`` of ``weight_key`` with ``QuantState.from_dict``."""
    prefix = f"{weight_key}."
    qs_dict = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return bnbf.QuantState.from_dict(qs_dict, device=torch.device("cpu"))


def bnb_dequantize(tensors: dict[str, torch.Tensor], weight_key: str) -> torch.Tensor:
    """bitsandbytes' own ``dequantize_4bit`` of ``weight_key`` (the reference)."""
    qs = bnb_quant_state(tensors, weight_key)
    return bnbf.dequantize_4bit(tensors[weight_key], qs)
