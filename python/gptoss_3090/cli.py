"""The ``gptoss-3090`` command line.

Subcommands:

* ``inspect PATH [--json] [--budget-gib 24] [--max-model-len 131072]``: checkpoint summary and
  GPU memory plan (human table or JSON ``{"summary": ..., "memory_plan": ...}``).
* ``synth OUT --preset tiny|20b [--seed N] [--no-nested] [--attention nf4|bf16]
  [--dtype bf16|fp16] [--reference/--no-reference] [--force] [--quiet]``: write a synthetic
  checkpoint (see :mod:`gptoss_3090.synth`).
* ``doctor [--checkpoint PATH] [--json]``: PASS/FAIL/SKIP checks (see :mod:`gptoss_3090.doctor`).
* ``demo [--model PATH] [--prompt TEXT] [--max-tokens N] [--cache-dir DIR]``: tiny-checkpoint
  generation (see :mod:`gptoss_3090.demo`).
* ``settings [--kind K] [--json]``: the ``GPTOSS_3090_*`` environment variables, their kinds,
  current values and what they do (see :mod:`gptoss_3090.settings`); exit 1 when an unknown
  one is set.
* ``bench [--out DIR] ...``: benchmarks that fit this machine, JSON + PNG plots (see
  :mod:`gptoss_3090.bench_cli`).
* ``compile [--arch sm_XY] [--dtype bf16|fp16] [--weights-order chunks|rows] [--all]``: fill
  the kernel cache ahead of the first ``vllm serve`` (no GPU needed with ``--arch``).

Adding a subcommand: write ``_add_<name>(subparsers)`` that creates its parser and sets
``func=<handler>`` (``handler(args) -> int``), and append it to :data:`SUBCOMMANDS`.
Handlers import heavy modules (torch, vLLM) lazily so ``inspect`` stays fast.

Errors a user can cause (a bad path, a damaged checkpoint, bad arguments) print one line on
stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SUBCOMMANDS", "build_parser", "main", "served_programs"]

PROG = "gptoss-3090"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _size(n: float) -> str:
    """Decimal size with a unit that keeps 3 significant digits readable."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise a checkpoint and plan GPU memory",
        description="Print a checkpoint summary and a GPU memory plan "
        "(weights, KV-cache tokens left, whether a max_model_len context fits).",
    )
    p.add_argument("path", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--budget-gib", type=float, default=24.0, help="GPU memory budget in GiB (default 24)"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=131072,
        help="context length that must fit (default 131072)",
    )
    p.set_defaults(func=_cmd_inspect)


def _format_inspect(summary: dict[str, Any], plan: dict[str, Any]) -> str:
    s = summary.get
    lines = []
    total = s("total_file_bytes")
    files = s("files")
    tensors = s("tensors")
    extra = ", ".join(
        x
        for x in (
            f"{files} files" if files is not None else "",
            f"{tensors} tensors" if tensors is not None else "",
            _size(total) if total is not None else "",
        )
        if x
    )
    lines.append(f"checkpoint    {s('path', '?')}" + (f" ({extra})" if extra else ""))
    lines.append(
        f"model         GPT-OSS: {s('layers')} layers, {s('experts')} experts "
        f"(top {s('experts_per_token')}), hidden {s('hidden_size')}, "
        f"intermediate {s('intermediate_size')}"
    )
    lines.append(
        f"attention     {s('heads')} heads / {s('kv_heads')} KV heads x {s('head_dim')}, "
        f"sliding window {s('sliding_window')}, vocab {s('vocab_size')}"
    )
    nf4 = s("nf4") or {}
    if isinstance(nf4, dict):
        fmt = ", ".join(f"{k} {'NF4' if v else 'not NF4'}" for k, v in nf4.items())
    else:
        fmt = str(nf4)
    lines.append(f"format        {fmt}; nested {s('nested')}; dtype {s('dtype')}")
    by_cat = s("bytes") or {}
    if by_cat:
        parts = [f"{k} {_size(v)}" for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])]
        for i in range(0, len(parts), 4):
            head = "bytes         " if i == 0 else "              "
            lines.append(head + ", ".join(parts[i : i + 4]))
    if s("gpu_weight_bytes") is not None:
        lines.append(f"GPU weights   {_gib(s('gpu_weight_bytes'))}")
    lines.append("")
    lines.append(
        f"memory plan   budget {_gib(plan['budget_bytes'])}, "
        f"max_model_len {plan['max_model_len']:,}"
    )
    rows = [
        ("weights", plan["weights_bytes"]),
        ("CUDA context", plan["cuda_context_bytes"]),
        ("activations", plan["activation_bytes"]),
        ("KV cache", plan["kv_budget_bytes"]),
    ]
    for name, value in rows:
        lines.append(f"  {name:<14}{_gib(value):>12}")
    lines.append(
        f"  KV per token  {plan['kv_bytes_per_token']:,} B "
        f"({plan['full_attention_layers']} full-attention layers)"
        + (
            f" + {plan['sliding_bytes_per_seq'] / 1e6:.1f} MB per sequence "
            f"({plan['sliding_attention_layers']} sliding layers)"
            if plan["sliding_attention_layers"]
            else ""
        )
    )
    lines.append(f"  KV tokens     {plan['kv_cache_tokens']:,}")
    verdict = "fits" if plan["fits_max_model_len"] else "does NOT fit"
    lines.append(
        f"  a {plan['max_model_len']:,}-token context {verdict} "
        f"({plan['max_concurrency_at_max_len']:.2f} such requests at once)"
    )
    return "\n".join(lines)


def _load_summary(path: str) -> dict[str, Any]:
    """``open_checkpoint(path).summary()`` without importing torch.

    The summary is computed by the native reader (``Checkpoint.summary()`` is the same JSON);
    going to it directly keeps ``inspect`` at a fraction of a second on 20b, where importing
    torch alone takes 1-3 s.
    """
    from gptoss_3090 import _native

    native = getattr(_native, "NativeCheckpoint", None)
    if native is None:  # pragma: no cover - older extension
        from gptoss_3090 import open_checkpoint

        return open_checkpoint(path).summary()
    return json.loads(native(path).summary_json())


def _cmd_inspect(args: argparse.Namespace) -> int:
    from gptoss_3090.memory import memory_plan

    summary = _load_summary(args.path)
    plan = memory_plan(summary, budget_gib=args.budget_gib, max_model_len=args.max_model_len)
    if args.json:
        print(json.dumps({"summary": summary, "memory_plan": plan}, indent=2))
    else:
        print(_format_inspect(summary, plan))
    return 0


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------


def _add_synth(sub: Any) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic GPT-OSS checkpoint (Unsloth bnb-4bit layout)",
        description="Write a random GPT-OSS checkpoint in Unsloth's bitsandbytes NF4 layout, "
        "with a small tokenizer and (optionally) OUT/reference: the same model dequantized in "
        "the Hugging Face layout.",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--preset", required=True, choices=["tiny", "20b"], help="model shapes")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--no-nested",
        dest="nested",
        action="store_false",
        help="f32 absmax instead of double quantization",
    )
    p.add_argument(
        "--attention",
        choices=["nf4", "bf16"],
        default="nf4",
        help="quantize q/k/v/o (nf4, default) or keep them unquantized (bf16: in --dtype)",
    )
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="model dtype")
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write OUT/reference (default: on for tiny, off for 20b: +42 GB)",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier synth output in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    from gptoss_3090.synth import write_synthetic_checkpoint

    start = time.perf_counter()
    out = write_synthetic_checkpoint(
        args.out,
        preset=args.preset,
        seed=args.seed,
        nested=args.nested,
        attention=args.attention,
        dtype=args.dtype,
        reference=args.reference,
        progress=not args.quiet,
        overwrite=args.force,
    )
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    ref = out / "reference"
    note = f"; reference in {ref}" if (ref / "config.json").exists() else ""
    print(
        f"wrote {out} ({_gb(size)}) in {time.perf_counter() - start:.1f} s{note}",
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------------------------------------
# doctor, demo, bench (handlers live in their own modules)
# ---------------------------------------------------------------------------------------------


def _add_doctor(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="check GPU, driver, NVRTC, torch/vLLM, plugin registration, kernels, memory",
        description="One PASS/FAIL/SKIP line per check; exit status 0 when nothing failed.",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="also plan GPU memory for this checkpoint")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=131072,
        help="context length the memory plan must fit (default 131072)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from gptoss_3090 import doctor

    return doctor.main(args.checkpoint, as_json=args.json, max_model_len=args.max_model_len)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="build a tiny checkpoint and generate with it (vLLM on a GPU, CPU reference else)",
        description="Builds (once) a tiny synthetic GPT-OSS checkpoint in the Unsloth NF4 layout "
        "and generates a few tokens: through vLLM with the bnb_moe plugin on a GPU, with the "
        "CPU reference forward otherwise.",
    )
    p.add_argument("--model", metavar="PATH", help="use this checkpoint instead of the tiny one")
    p.add_argument("--prompt", default="The RTX 3090 has", help="prompt text")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the tiny checkpoint lives (default ~/.cache/gptoss_3090/demo-tiny)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="vLLM max_model_len (default: small)"
    )
    p.add_argument("--cpu", action="store_true", help="use the CPU reference even with a GPU")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gptoss_3090 import demo

    return demo.main(args)


def _add_settings(sub: Any) -> None:
    from gptoss_3090.settings import KINDS

    p = sub.add_parser(
        "settings",
        help="list the GPTOSS_3090_* environment variables, their kinds and current values",
        description="Every GPTOSS_3090_* variable the package reads (none is needed to serve): "
        "name, kind, value in this environment and what it does. docs/RUNTIME.md explains "
        "the defaults. Exit status 1 when a GPTOSS_3090_* variable set here is not one of "
        "them (a misspelt setting changes nothing).",
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        help="only settings of this kind",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_settings)


def _cmd_settings(args: argparse.Namespace) -> int:
    from gptoss_3090 import settings

    rows = [s for s in settings.SETTINGS if args.kind is None or s.kind == args.kind]
    unknown = settings.unknown_settings()
    if args.json:
        doc = {
            "settings": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "value": os.environ.get(s.name),
                    "experimental": s.experimental,
                    "summary": s.summary,
                }
                for s in rows
            ],
            "unknown": unknown,
        }
        print(json.dumps(doc, indent=2))
    else:
        width = max(len(s.name) for s in settings.SETTINGS)
        for s in rows:
            value = os.environ.get(s.name)
            shown = "(unset)" if value is None else f"={value}"
            flag = " [experimental]" if s.experimental else ""
            print(f"{s.name:<{width}}  {s.kind:<8}  {shown:<12}  {s.summary}{flag}")
        if unknown:
            print(f"{PROG}: {settings.unknown_message(unknown)}", file=sys.stderr)
    return 1 if unknown else 0


def served_programs(dtype: str = "bf16", weights_order: str = "chunks") -> list[str]:
    """The kernel programs vLLM serving runs: ``nf4`` (q/k/v/o, quantize at load), ``attention``
    (our backend on sm_80-sm_89), the MoE family of ``weights_order`` and the router's
    ``moe_chunks``, as the fp16 programs for an fp16 model. Without a model to inspect; in
    vLLM the plugin asks the built model (``gptoss_3090.vllm.model.served_kernel_families``)."""
    if dtype not in ("bf16", "fp16"):
        raise ValueError(f"dtype {dtype!r}: expected 'bf16' or 'fp16'")
    if weights_order not in ("chunks", "rows"):
        raise ValueError(f"weights order {weights_order!r}: expected 'chunks' or 'rows'")
    suffix = "_f16" if dtype == "fp16" else ""
    moe = ["moe_chunks"] if weights_order == "chunks" else ["moe", "moe_chunks"]
    return ["nf4", "attention", *(f + suffix for f in moe)]


def _add_compile(sub: Any) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the kernels into the kernel cache now (before the first vllm serve)",
        description="NVRTC-compiles the kernel programs vllm serve runs (or --all) for one GPU "
        "architecture into the kernel cache ($GPTOSS_3090_CACHE or "
        "~/.cache/gptoss_3090/kernels), side by side. With --arch no GPU is needed (a "
        "container image build, say); without it the current GPU's architecture is used. "
        "The first vllm serve then loads them instead of compiling.",
    )
    p.add_argument("--arch", help="e.g. sm_86 (RTX 3090); default: the current GPU's")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="model dtype")
    p.add_argument(
        "--weights-order",
        choices=("chunks", "rows"),
        default="chunks",
        help="expert byte order served (GPTOSS_3090_MOE_WEIGHTS_ORDER; default chunks)",
    )
    p.add_argument("--all", action="store_true", help="every kernel program, not only the served")
    p.set_defaults(func=_cmd_compile)


def _cmd_compile(args: argparse.Namespace) -> int:
    from gptoss_3090 import _native, runtime

    runtime.ensure_cuda_libs()
    if _native.kernel_cache_dir() is None:
        raise ValueError("the kernel cache is off (GPTOSS_3090_CACHE=off): nothing would be kept")
    families = list(_native.kernel_sources()) if args.all else served_programs(
        args.dtype, args.weights_order
    )
    try:
        thread = runtime.compile_in_background(families, arch=args.arch)
    except _native.CudaError as e:
        if args.arch is None:  # no GPU to take the architecture from
            hint = "pass --arch (e.g. --arch sm_86) to compile without a GPU"
            raise ValueError(f"{e}; {hint}") from e
        raise
    assert thread is not None  # the cache is on
    thread.join()
    if thread.error is not None:
        raise thread.error
    for family in families:
        state = "cached already" if family in thread.cached else "compiled"
        print(f"{family:<16} {_size(thread.sizes[family]):>10}  {state}")
    print(f"{len(families)} programs for {thread.arch} in {thread.seconds:.1f} s, in "
          f"{_native.kernel_cache_dir()}")
    return 0


def _add_bench(sub: Any) -> None:
    from gptoss_3090 import bench_cli

    bench_cli.add_parser(sub)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

#: Functions that add one subcommand each to the subparsers object.
SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_inspect,
    _add_synth,
    _add_doctor,
    _add_demo,
    _add_settings,
    _add_compile,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve Unsloth GPT-OSS bitsandbytes NF4 checkpoints with vLLM on sm_80+ GPUs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, OSError]
    try:
        from gptoss_3090._native import CheckpointError, CudaError

        errors += [CheckpointError, CudaError]
    except ImportError:  # pragma: no cover - extension not built
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 2 usage or input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
