"""``gptoss-3090 demo``: from ``pip install`` to generated tokens with no download.

1. Builds (once) the tiny synthetic GPT-OSS checkpoint in Unsloth's NF4 layout, with a small
   tokenizer and its dequantized Hugging Face twin in ``reference/``, in a cache folder
   (default ``~/.cache/gptoss_3090/demo-tiny``; reused when present). ``--model PATH`` uses any
   checkpoint instead.
2. Opens it with our reader (validation, summary).
3. With an sm_80+ GPU and vLLM 0.26: serves it with ``vllm.LLM(..., quantization="bnb_moe")``
   (our plugin: fused NF4 MoE, NF4 linears, sink/sliding-window attention) and prints a short
   greedy generation and tokens/s.
4. Without a GPU (or with ``--cpu``): greedy decoding with transformers' GptOss on
   ``reference/`` (the exact dequantization of the same weights), after checking that our
   reader's dequantized experts equal those reference weights bit for bit; then says what a GPU
   would add.

The tiny model has random weights: its text is meaningless word salad. That is expected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CACHE_DIR", "ensure_tiny_checkpoint", "main"]

#: Where the tiny checkpoint is built by default.
DEFAULT_CACHE_DIR = Path("~/.cache/gptoss_3090/demo-tiny")
#: vLLM settings small enough for any 16+ GiB card next to other work.
DEMO_MAX_MODEL_LEN = 512
DEMO_GPU_MEMORY_UTILIZATION = 0.3


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The tiny synthetic checkpoint in ``cache_dir``, built with a progress bar unless a
    complete one is already there (``config.json``, the safetensors index and ``reference/``)."""
    from gptoss_3090.synth import write_synthetic_checkpoint

    out = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()
    done = out / "config.json"
    if done.is_file() and (out / "reference" / "config.json").is_file():
        _say(f"reusing the tiny checkpoint in {out}")
        return out
    _say(f"building the tiny synthetic checkpoint in {out} (Unsloth NF4 layout, once)")
    start = time.perf_counter()
    write_synthetic_checkpoint(
        out, preset="tiny", seed=0, reference=True, progress=True, overwrite=True
    )
    _say(f"built in {time.perf_counter() - start:.1f} s")
    return out


def _gpu_ready() -> tuple[bool, str]:
    """(can serve through vLLM here, why not)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 0):
        return False, f"GPU 0 is sm_{major}{minor}; the kernels need sm_80+"
    try:
        import importlib.metadata

        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False, "vLLM is not installed (pip install 'gptoss-3090[vllm]')"
    from gptoss_3090.vllm import SUPPORTED_VLLM, is_supported_vllm_version

    if not is_supported_vllm_version(version):
        return False, f"vLLM {version} is installed; the plugin supports vllm{SUPPORTED_VLLM}"
    return True, ""


def _describe(path: Path) -> dict[str, Any]:
    from gptoss_3090 import open_checkpoint

    summary = open_checkpoint(path).summary()
    _say(
        f"checkpoint: {summary.get('layers')} layers, {summary.get('experts')} experts "
        f"(top {summary.get('experts_per_token')}), hidden {summary.get('hidden_size')}, "
        f"vocab {summary.get('vocab_size')}, nested NF4 {summary.get('nested')}"
    )
    return summary


def _describe_quiet(path: Path) -> dict[str, Any]:
    from gptoss_3090 import open_checkpoint

    return open_checkpoint(path).summary()


def _run_vllm(path: Path, prompt: str, max_tokens: int, max_model_len: int | None) -> int:
    from vllm import LLM, SamplingParams

    _say("loading with vLLM (quantization='bnb_moe'; kernels compile once, then are cached)")
    start = time.perf_counter()
    llm = LLM(
        model=str(path),
        quantization="bnb_moe",
        max_model_len=max_model_len or DEMO_MAX_MODEL_LEN,
        gpu_memory_utilization=DEMO_GPU_MEMORY_UTILIZATION,
        enforce_eager=False,
    )
    _say(f"engine ready in {time.perf_counter() - start:.1f} s")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm (CUDA graphs, first-call costs)
    start = time.perf_counter()
    outputs = llm.generate([prompt], params, use_tqdm=False)
    secs = time.perf_counter() - start
    out = outputs[0].outputs[0]
    n = len(out.token_ids)
    print(f"prompt:    {prompt}")
    print(f"generated: {out.text}")
    _say(f"{n} tokens in {secs:.3f} s = {n / secs:.1f} tokens/s (one request, greedy)")
    return 0


def _check_reader_matches_reference(path: Path) -> None:
    """Layer 0, expert 0: our fused dequantization vs the reference tensors (bit-exact)."""
    import torch
    from safetensors import safe_open

    from gptoss_3090 import open_checkpoint

    ckpt = open_checkpoint(path)
    ref_files = sorted((path / "reference").glob("*.safetensors"))
    key = "model.layers.0.mlp.experts.gate_up_proj"
    ref = None
    for f in ref_files:
        with safe_open(str(f), framework="pt") as h:
            if key in h.keys():
                ref = h.get_tensor(key)
    if ref is None:
        return
    ours = torch.as_tensor(ckpt.fused_experts(0, "gate_up").dequantize(0))
    same = torch.equal(ours, ref[0].t())
    _say(
        "our NF4 reader vs reference, layer 0 expert 0 gate_up: "
        + ("bit-identical" if same else "DIFFERENT (please report)")
    )


def _run_cpu(path: Path, prompt: str, max_tokens: int, why: str) -> int:
    import torch

    try:
        import transformers
    except ImportError:
        _say(
            f"{why}, and the CPU reference needs transformers (it comes with vLLM: "
            "pip install 'gptoss-3090[vllm]', or pip install transformers)"
        )
        return 1
    ref = path / "reference"
    if not (ref / "config.json").is_file():
        from gptoss_3090.memory import memory_plan

        plan = memory_plan(_describe_quiet(path), budget_gib=24.0, max_model_len=131072)
        _say(
            f"on a 24 GiB card: weights {plan['weights_bytes'] / (1 << 30):.2f} GiB, KV cache "
            f"{plan['kv_cache_tokens']:,} tokens; a 131,072-token context "
            + ("fits" if plan["fits_max_model_len"] else "does not fit")
        )
        _say(
            f"{why}, and {path} has no reference/ (dequantized HF copy) for a CPU run. "
            "On a GPU: `gptoss-3090 demo --model PATH` serves it with vLLM."
        )
        return 0
    _say(f"{why}: running the CPU reference (transformers GptOss on {ref})")
    _check_reader_matches_reference(path)
    tok = transformers.AutoTokenizer.from_pretrained(str(ref))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(max_tokens):  # greedy, full recompute: tiny model, few tokens
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    secs = time.perf_counter() - start
    n_prompt = int(tok(prompt, return_tensors="pt")["input_ids"].shape[1])
    text = tok.decode(ids[0, n_prompt:].tolist(), skip_special_tokens=True)
    print(f"prompt:    {prompt}")
    print(f"generated: {text}")
    _say(f"{max_tokens} tokens in {secs:.2f} s on the CPU (fp32 reference, random weights)")
    _say(
        "with an sm_80+ GPU and vLLM 0.26 this demo serves the NF4 checkpoint itself through "
        "vLLM (--quantization bnb_moe): fused NF4 MoE and NF4 linear kernels, attention with "
        "sinks and sliding window, CUDA graphs, and prints tokens/s. Check the machine with "
        "`gptoss-3090 doctor`."
    )
    return 0


def main(args: argparse.Namespace) -> int:
    """Runs the demo for parsed CLI ``args`` (see ``gptoss-3090 demo --help``)."""
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.model:
        path = Path(args.model).expanduser()
        if not path.is_dir():
            raise ValueError(f"--model {path}: not a directory")
    else:
        path = ensure_tiny_checkpoint(args.cache_dir)
    _describe(path)
    ok, why = _gpu_ready()
    if getattr(args, "cpu", False):
        ok, why = False, "--cpu given"
    if ok:
        return _run_vllm(path, args.prompt, args.max_tokens, args.max_model_len)
    return _run_cpu(path, args.prompt, args.max_tokens, why)


if __name__ == "__main__":  # pragma: no cover
    from gptoss_3090.cli import main as _cli

    sys.exit(_cli(["demo", *sys.argv[1:]]))
