"""Defaults that let ``vllm serve <ckpt> --quantization bnb_moe --max-model-len 131072`` fit 24 GiB.

Two knobs, both applied only when the quantization is ``bnb_moe``:

* **CUDA-graph capture sizes.** ``model_executor/models/config.py::GptOssForCausalLMConfig.
  verify_and_update_config`` raises ``max_cudagraph_capture_size`` to 1024 for every GPT-OSS run
  unless the user set ``cudagraph_capture_sizes`` or ``max_cudagraph_capture_size``. Every capture
  size runs the model once (MoE scratch, attention split buffers sized by it, the graph pool), so on
  a small budget we cap it instead. The hook wraps vLLM's config class in ``MODELS_CONFIG_MAP`` (the
  dict ``config/vllm.py::VllmConfig.try_verify_and_update_config`` reads): stock behaviour first,
  then our cap when the user set neither option. Other architectures and other quantizations are
  untouched.
* **MoE workspace.** Our MoE scratch grows with the token count (gate_up output, activations, down
  output: about 4 x top_k x (2I + 2H) bytes per token in bf16). vLLM profiles peak memory with
  ``max_num_batched_tokens`` tokens, so unbounded scratch would be charged against the KV cache.
  :func:`moe_chunk_tokens` bounds the tokens one MoE call processes at once; larger batches are
  processed in chunks of that size (see :mod:`gptoss_3090.vllm.moe_method`).

The budget is ``total GPU memory x gpu_memory_utilization``. A 24 GiB card at the default 0.9
gives 21.6 GiB; the 24 GiB emulation on an 80 GB H100 uses 0.29 (23.2 GiB).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.gptoss_3090")

__all__ = [
    "SMALL_BUDGET_BYTES",
    "SMALL_CAPTURE_MAX",
    "install_config_hook",
    "max_capture_size_for_budget",
    "moe_chunk_tokens",
    "memory_budget_bytes",
]

GiB = 1 << 30

#: Budgets up to this size get the small-card defaults (a 32 GB card at 0.9 is 28.8 GiB).
SMALL_BUDGET_BYTES = 30 * GiB
#: Largest CUDA-graph capture size on a small budget (vLLM's non-GPT-OSS default is 512).
SMALL_CAPTURE_MAX = 256
#: Largest capture size on bigger budgets: vLLM's usual default rather than GPT-OSS's 1024.
LARGE_CAPTURE_MAX = 512
#: MoE tokens per call on a small budget / otherwise. The prefill GEMMs gain per token up to 8192
#: tokens per call (H100, m128s2: 1.02 us per token at 2048, 0.88 at 8192); with 2048-token
#: chunks the 23 GiB budget's prefill was 0.94x stock, with 8192 1.07x (bench/results/
#: h100_2026-11-27_session8). Scratch: 90 MiB at 2048 tokens, 360 MiB at 8192, 720 MiB at 16384
#: (vLLM's default tokens per step, so one call per step on large budgets).
SMALL_MOE_CHUNK = 8192
LARGE_MOE_CHUNK = 16384


def max_capture_size_for_budget(budget_bytes: int | None) -> int:
    """The ``max_cudagraph_capture_size`` we use for a memory budget (None = unknown = small)."""
    if budget_bytes is None or budget_bytes <= SMALL_BUDGET_BYTES:
        return SMALL_CAPTURE_MAX
    return LARGE_CAPTURE_MAX


def moe_chunk_tokens(budget_bytes: int | None) -> int:
    """Tokens one MoE call processes at once (bounds the MoE scratch memory)."""
    if budget_bytes is None or budget_bytes <= SMALL_BUDGET_BYTES:
        return SMALL_MOE_CHUNK
    return LARGE_MOE_CHUNK


def memory_budget_bytes(vllm_config: Any, total_bytes: int | None = None) -> int | None:
    """``total GPU memory x gpu_memory_utilization``; None when the total cannot be read.

    In process 0 the total comes from vLLM's platform (NVML on CUDA, no CUDA context); callers in
    the GPU worker may pass ``torch.cuda.mem_get_info()[1]``.
    """
    if total_bytes is None:
        try:
            from vllm.platforms import current_platform

            total_bytes = int(current_platform.get_device_total_memory())
        except Exception:  # no GPU / unsupported platform: unknown
            return None
    util = getattr(getattr(vllm_config, "cache_config", None), "gpu_memory_utilization", 0.9)
    return int(total_bytes * float(util))


def _is_bnb_moe(vllm_config: Any) -> bool:
    model_config = getattr(vllm_config, "model_config", None)
    return getattr(model_config, "quantization", None) == "bnb_moe"


def apply_small_budget_defaults(vllm_config: Any, user_set_capture: bool) -> None:
    """Caps the CUDA-graph capture size for ``bnb_moe`` unless the user chose it."""
    if not _is_bnb_moe(vllm_config) or user_set_capture:
        return
    budget = memory_budget_bytes(vllm_config)
    cap = max_capture_size_for_budget(budget)
    cc = vllm_config.compilation_config
    scheduler = getattr(vllm_config, "scheduler_config", None)
    max_tokens = getattr(scheduler, "max_num_batched_tokens", None)
    if isinstance(max_tokens, int) and max_tokens > 0:
        cap = min(cap, max_tokens)
    cc.max_cudagraph_capture_size = cap
    logger.info(
        "gptoss-3090: bnb_moe on a %s budget: max CUDA-graph capture size %d (set "
        "max_cudagraph_capture_size or cudagraph_capture_sizes to override)",
        "unknown" if budget is None else f"{budget / GiB:.1f} GiB",
        cap,
    )


def install_config_hook() -> None:
    """Wraps vLLM's GPT-OSS config hook in ``MODELS_CONFIG_MAP`` (idempotent)."""
    from vllm.model_executor.models import config as models_config

    stock = models_config.MODELS_CONFIG_MAP.get("GptOssForCausalLM")
    if stock is None or getattr(stock, "_gptoss_3090_hook", False):
        return

    class GptOssBnbMoeConfigHook(stock):  # type: ignore[misc, valid-type]
        """vLLM's ``GptOssForCausalLMConfig`` plus the bnb_moe 24 GiB capture-size cap."""

        _gptoss_3090_hook = True

        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            cc = vllm_config.compilation_config
            user_set = (
                cc.cudagraph_capture_sizes is not None or cc.max_cudagraph_capture_size is not None
            )
            stock.verify_and_update_config(vllm_config)
            apply_small_budget_defaults(vllm_config, user_set)

    models_config.MODELS_CONFIG_MAP["GptOssForCausalLM"] = GptOssBnbMoeConfigHook
