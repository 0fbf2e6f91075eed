"""gptoss-3090: serve Unsloth GPT-OSS bitsandbytes NF4 checkpoints with vLLM on sm_80+ GPUs."""

from gptoss_3090._native import CheckpointError, CudaError, KernelCompileError, __version__
from gptoss_3090.checkpoint import Checkpoint, FusedExperts, open_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CudaError",
    "FusedExperts",
    "KernelCompileError",
    "__version__",
    "open_checkpoint",
]
