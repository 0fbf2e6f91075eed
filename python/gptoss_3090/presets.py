"""Model presets in Hugging Face GptOss ``config.json`` form.

Two presets are provided:

``GPTOSS_20B``
    The exact shapes of GPT-OSS-20B (vocab 201,088, hidden 2,880, expert intermediate 2,880,
    24 layers, 32 experts top-4, 64 query heads, 8 KV heads, head_dim 64), written with the
    keys of the published ``config.json`` (legacy ``rope_scaling`` + ``rope_theta``, which
    transformers 5 converts to ``rope_parameters``; ``"truncate": false`` is explicit because
    transformers defaults it to true when absent).

``TINY``
    The same architecture shrunk for tests: hidden 320, intermediate 320, 4 layers, 8 experts
    top-4, 8 query heads, 2 KV heads, head_dim 64, the same sliding window, YaRN and
    max_position_embeddings. 320 is chosen so that a gate_up expert has 3,200 NF4 blocks =
    12.5 nested blocks of 256, i.e. (like the real 2,880) per-expert block counts are not a
    multiple of 256. Its vocabulary is the small word-level tokenizer of
    :mod:`gptoss_3090.tokenizer` (1,024 ids), and eos/pad are ids of that tokenizer.

The presets are plain dicts; use :func:`get_preset` to obtain a private deep copy.
"""

from __future__ import annotations

import copy
from typing import Any

from gptoss_3090 import tokenizer as _tok

__all__ = ["GPTOSS_20B", "PRESETS", "TINY", "get_preset", "special_ids_for"]


def _layer_types(n: int) -> list[str]:
    """GPT-OSS alternates sliding and full attention, starting with a sliding layer."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


_YARN = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "rope_type": "yarn",
    "truncate": False,
}


def _config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_local_experts: int,
    num_experts_per_tok: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    eos_token_id: int,
    pad_token_id: int,
) -> dict[str, Any]:
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": eos_token_id,
        "experts_per_token": num_experts_per_tok,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_types": _layer_types(num_hidden_layers),
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": num_attention_heads,
        "num_experts_per_tok": num_experts_per_tok,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "num_local_experts": num_local_experts,
        "output_router_logits": False,
        "pad_token_id": pad_token_id,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(_YARN),
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


GPTOSS_20B: dict[str, Any] = _config(
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=24,
    num_local_experts=32,
    num_experts_per_tok=4,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    eos_token_id=_tok.GPTOSS_SPECIAL_IDS["<|return|>"],
    pad_token_id=_tok.GPTOSS_SPECIAL_IDS["<|endoftext|>"],
)

TINY: dict[str, Any] = _config(
    vocab_size=_tok.TINY_VOCAB_SIZE,
    hidden_size=320,
    intermediate_size=320,
    num_hidden_layers=4,
    num_local_experts=8,
    num_experts_per_tok=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    eos_token_id=_tok.TINY_SPECIAL_IDS["<|return|>"],
    pad_token_id=_tok.TINY_SPECIAL_IDS["<|endoftext|>"],
)

#: Preset name (as used by ``gptoss-3090 synth --preset``) -> config dict.
PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY, "20b": GPTOSS_20B}


def get_preset(name: str) -> dict[str, Any]:
    """Returns a deep copy of the named preset (``"tiny"`` or ``"20b"``).

    Raises:
        ValueError: the name is not a known preset.
    """
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown preset {name!r}; expected one of: {known}") from None


def special_ids_for(config: dict[str, Any]) -> dict[str, int]:
    """The special-token ids the tokenizer written next to ``config`` must use.

    The real GPT-OSS ids when the vocabulary holds them (20b), else the tiny ids (1015..1023).

    Raises:
        ValueError: the vocabulary is smaller than the tiny tokenizer's 1,024 ids.
    """
    vocab = config["vocab_size"]
    if vocab > max(_tok.GPTOSS_SPECIAL_IDS.values()):
        return dict(_tok.GPTOSS_SPECIAL_IDS)
    if vocab >= _tok.TINY_VOCAB_SIZE:
        return dict(_tok.TINY_SPECIAL_IDS)
    raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({_tok.TINY_VOCAB_SIZE})")
