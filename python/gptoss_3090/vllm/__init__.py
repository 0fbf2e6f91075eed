"""vLLM 0.26 plugin glue (entry point `vllm.general_plugins`)."""


def register() -> None:
    """Registers the bnb_moe quantization method, the model and the attention backend."""
