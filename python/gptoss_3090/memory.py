"""GPU memory plan: how many KV-cache tokens a card leaves after the weights.

:func:`memory_plan` takes ``Checkpoint.summary()`` (or any dict with the same keys) and a
budget in GiB (the memory vLLM may use: ``gpu_memory_utilization * card``), and splits it:

``budget = weights + cuda_context + activations + sliding-window KV + full-attention KV``

* **weights**: ``summary["gpu_weight_bytes"]`` (what the runtime keeps on the GPU: NF4 bytes and
  statistics, bf16 embedding / lm_head / router / norms / biases).
* **cuda_context** (:data:`CUDA_CONTEXT_GIB` = 0.5 GiB): CUDA context, cuBLAS/NVRTC module and
  workspace memory that is not a torch allocation but counts against vLLM's budget.
* **activations** (:data:`ACTIVATION_GIB` = 2.5 GiB): vLLM's profiled peak of a forward pass at
  ``max_num_batched_tokens`` plus CUDA-graph pools and sampler buffers. Stock vLLM 0.26 reported
  4.0 GiB on a 24 GiB budget, but that includes the Marlin MXFP4 workspace and a 1024-sequence
  capture range; our NF4 path dequantizes tile by tile inside the kernels (no whole-expert
  bf16 copies), so a 4096-8192-token prefill chunk needs roughly: gate_up activations for
  ``tokens * top_k`` rows x 5760 x 2 B (0.19-0.38 GB), q/k/v/o and residual buffers (< 0.3 GB),
  logits for 256 sequences x 201,088 x 4 B (0.2 GB), plus graph pools; 2.5 GiB leaves margin.
* **sliding-window KV**: sliding layers keep only ``sliding_window`` tokens per sequence; with
  paged blocks of :data:`BLOCK_SIZE` tokens a sequence holds at most
  ``sliding_window + BLOCK_SIZE`` of them per sliding layer (one partially filled block at each
  end). Counted for the sequences that fill the cache.
* **full-attention KV**: ``kv_heads * head_dim * 2 (K and V) * kv_dtype_bytes`` per token and
  full layer (GPT-OSS-20B: 12 layers x 8 x 64 x 2 x 2 B = 24,576 B/token).

The result says how many tokens the full-attention cache holds and whether one
``max_model_len``-token request fits. It is a floor-style estimate: vLLM's hybrid allocator
reserves more (30.7 KB/token on the stock run), so expect a somewhat smaller number there.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ACTIVATION_GIB", "BLOCK_SIZE", "CUDA_CONTEXT_GIB", "GIB", "memory_plan"]

GIB = 1 << 30
#: CUDA context + library workspaces outside torch's allocator (GiB).
CUDA_CONTEXT_GIB = 0.5
#: Peak activations, CUDA-graph pools and sampler buffers (GiB); see the module docs.
ACTIVATION_GIB = 2.5
#: vLLM's default KV-cache block size (tokens).
BLOCK_SIZE = 16


def _get(summary: dict[str, Any], *names: str) -> Any:
    """First present key among ``names`` (summary names, then HF config names)."""
    for name in names:
        if name in summary and summary[name] is not None:
            return summary[name]
    config = summary.get("config")
    if isinstance(config, dict):
        for name in names:
            if name in config and config[name] is not None:
                return config[name]
    return None


def memory_plan(
    summary: dict[str, Any],
    budget_gib: float = 24.0,
    max_model_len: int = 131072,
    kv_dtype_bytes: int = 2,
    activation_gib: float = ACTIVATION_GIB,
    cuda_context_gib: float = CUDA_CONTEXT_GIB,
) -> dict[str, Any]:
    """Splits a GPU budget between weights, overheads and the KV cache.

    Args:
        summary: ``Checkpoint.summary()``; needs ``gpu_weight_bytes``, ``layers``,
            ``kv_heads``, ``head_dim`` and (optionally) ``layer_types`` / ``sliding_window``.
            HF config names (``num_hidden_layers``, ``num_key_value_heads``) are accepted too.
        budget_gib: memory the server may use, in GiB (24 for an RTX 3090 at utilization 1.0).
        max_model_len: context length that must fit for one request.
        kv_dtype_bytes: bytes per KV element (2 for bf16/fp16, 1 for fp8).
        activation_gib: activation / CUDA-graph allowance (GiB).
        cuda_context_gib: CUDA context allowance (GiB).

    Returns:
        A dict of byte counts and derived numbers: ``weights_bytes``, ``overhead_bytes``,
        ``kv_budget_bytes``, ``kv_bytes_per_token`` (full layers), ``sliding_bytes_per_seq``,
        ``kv_cache_tokens``, ``fits_max_model_len``, ``max_concurrency_at_max_len`` (how many
        ``max_model_len`` requests fit at once) and the inputs.

    Raises:
        ValueError: a needed field is missing or the budget is not positive.
    """
    if budget_gib <= 0:
        raise ValueError(f"budget_gib must be positive, got {budget_gib}")
    if max_model_len <= 0:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")
    weights = _get(summary, "gpu_weight_bytes")
    layers = _get(summary, "layers", "num_hidden_layers")
    kv_heads = _get(summary, "kv_heads", "num_key_value_heads")
    head_dim = _get(summary, "head_dim")
    missing = [
        n
        for n, v in (
            ("gpu_weight_bytes", weights),
            ("layers", layers),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
        )
        if v is None
    ]
    if missing:
        raise ValueError(f"summary lacks {', '.join(missing)}")
    layer_types = _get(summary, "layer_types") or ["full_attention"] * int(layers)
    window = _get(summary, "sliding_window")
    n_sliding = sum(1 for t in layer_types if t == "sliding_attention") if window else 0
    n_full = int(layers) - n_sliding

    per_layer_token = int(kv_heads) * int(head_dim) * 2 * kv_dtype_bytes
    kv_per_token = n_full * per_layer_token
    sliding_tokens = min(int(window) + BLOCK_SIZE, max_model_len) if window else 0
    sliding_per_seq = n_sliding * sliding_tokens * per_layer_token

    budget = int(budget_gib * GIB)
    overhead = int((activation_gib + cuda_context_gib) * GIB)
    kv_budget = budget - int(weights) - overhead
    per_request = max_model_len * kv_per_token + sliding_per_seq
    if kv_budget <= 0:
        tokens = 0
        concurrency = 0.0
    elif kv_per_token == 0:  # only sliding layers: the context length does not matter
        tokens = max_model_len if kv_budget >= sliding_per_seq else 0
        concurrency = kv_budget / sliding_per_seq if sliding_per_seq else math.inf
    else:
        tokens = max(0, (kv_budget - sliding_per_seq) // kv_per_token)
        concurrency = kv_budget / per_request
    return {
        "budget_bytes": budget,
        "weights_bytes": int(weights),
        "activation_bytes": int(activation_gib * GIB),
        "cuda_context_bytes": int(cuda_context_gib * GIB),
        "overhead_bytes": overhead,
        "kv_budget_bytes": max(kv_budget, 0),
        "full_attention_layers": n_full,
        "sliding_attention_layers": n_sliding,
        "sliding_window": window,
        "kv_dtype_bytes": kv_dtype_bytes,
        "kv_bytes_per_token": kv_per_token,
        "sliding_bytes_per_seq": sliding_per_seq,
        "kv_cache_tokens": int(tokens),
        "max_model_len": max_model_len,
        "kv_bytes_at_max_model_len": per_request,
        "fits_max_model_len": bool(kv_budget > 0 and tokens >= max_model_len),
        "max_concurrency_at_max_len": round(concurrency, 3),
    }
