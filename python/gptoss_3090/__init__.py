"""gptoss-3090: serve Unsloth GPT-OSS bitsandbytes NF4 checkpoints with vLLM on sm_80+ GPUs."""

from typing import TYPE_CHECKING, Any

from gptoss_3090._native import CheckpointError, CudaError, KernelCompileError, __version__

if TYPE_CHECKING:
    from gptoss_3090.checkpoint import Checkpoint, FusedExperts, open_checkpoint


def __getattr__(name: str) -> Any:
    # Lazy: gptoss_3090.checkpoint imports torch (~1-3 s), which `gptoss-3090 inspect` avoids.
    if name in ("Checkpoint", "FusedExperts", "open_checkpoint"):
        from gptoss_3090 import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'gptoss_3090' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CudaError",
    "FusedExperts",
    "KernelCompileError",
    "__version__",
    "open_checkpoint",
]
