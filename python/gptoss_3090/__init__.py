"""gptoss-3090: serve Unsloth GPT-OSS bitsandbytes NF4 checkpoints with vLLM on sm_80+ GPUs."""

from gptoss_3090._native import CheckpointError, CudaError, KernelCompileError, __version__

__all__ = ["CheckpointError", "CudaError", "KernelCompileError", "__version__"]
