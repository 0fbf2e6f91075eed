"""``gptoss-3090 bench``: run the benchmarks that fit this machine, write JSON + PNG plots.

Benchmarks (scripts in the repository's ``bench/`` folder; each prints its own table):

========== ========================= ====================================================
name       script                    needs
========== ========================= ====================================================
attention  bench_attention.py        a CUDA GPU (baseline: vLLM's Triton attention, or SDPA)
nf4_linear bench_nf4_linear.py       a CUDA GPU (baselines: cuBLAS bf16, bitsandbytes)
moe        bench_moe.py              a CUDA GPU + the fused MoE op (baseline: bf16 torch, Marlin)
e2e        bench_vllm_e2e.py         a GPU with >= 22 GiB, vLLM 0.26, ``--e2e-checkpoint`` (a 20b
                                     synthetic checkpoint); baseline: stock vLLM MXFP4 on Marlin
fused_read bench_fused_read.py       CPU only, ``--fused-read-checkpoint`` (a 20b checkpoint)
========== ========================= ====================================================

Every benchmark that runs writes ``OUT/<name>.json`` (e2e: ``OUT/e2e/``), and each JSON is
plotted to ``OUT/<name>.png``: throughput against batch / token count, ours against the
baseline, with the card in the title. What cannot run here is listed with the reason, so a run
on a CPU machine says exactly what it skipped. ``--plot FILE...`` only plots existing results
(e.g. ``bench/results/*.json`` from a GPU host).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BENCHES", "add_parser", "plot_result", "main"]

#: name -> script file in bench/.
BENCHES: dict[str, str] = {
    "attention": "bench_attention.py",
    "nf4_linear": "bench_nf4_linear.py",
    "moe": "bench_moe.py",
    "e2e": "bench_vllm_e2e.py",
    "fused_read": "bench_fused_read.py",
}
E2E_MIN_GIB = 22.0


def add_parser(sub: Any) -> None:
    """Adds the ``bench`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "bench",
        help="run the benchmarks that fit this machine; JSON + PNG plots into a folder",
        description="Runs the kernel and end-to-end benchmarks that fit this machine and writes "
        "JSON results plus PNG plots (throughput vs batch/token count, ours vs baseline).",
    )
    p.add_argument(
        "--out", default="bench-results", help="results folder (default ./bench-results)"
    )
    p.add_argument(
        "--only",
        default=None,
        help=f"comma list of benchmarks (default: all that fit): {', '.join(BENCHES)}",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions (rough numbers)")
    p.add_argument("--bench-dir", default=None, help="folder of the bench/*.py scripts")
    p.add_argument("--e2e-checkpoint", metavar="PATH", help="20b synthetic checkpoint for e2e")
    p.add_argument(
        "--fused-read-checkpoint", metavar="PATH", help="20b checkpoint for fused_read (CPU)"
    )
    p.add_argument(
        "--plot",
        nargs="+",
        metavar="JSON",
        help="only plot these existing result files into --out (no benchmark runs)",
    )
    p.set_defaults(func=main)


def _bench_dir(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "bench", Path.cwd() / "bench"):
        if (cand / "bench_attention.py").is_file():
            return cand
    return None


def _gpu() -> tuple[bool, str, float]:
    """(usable sm_80+ GPU, its name or why not, memory GiB)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed", 0.0
    if not torch.cuda.is_available():
        return False, "no CUDA GPU", 0.0
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) < (8, 0):
        return False, f"{props.name} is sm_{props.major}{props.minor} (< sm_80)", 0.0
    return True, str(props.name), props.total_memory / (1 << 30)


def _plan(args: argparse.Namespace, bench_dir: Path) -> list[tuple[str, list[str] | None, str]]:
    """(name, argv or None when skipped, note) for every selected benchmark."""
    gpu_ok, gpu_what, gpu_gib = _gpu()
    only = set(args.only.split(",")) if args.only else set(BENCHES)
    unknown = only - set(BENCHES)
    if unknown:
        raise ValueError(f"--only: unknown benchmark(s) {sorted(unknown)}; known: {list(BENCHES)}")
    out = Path(args.out)
    plan: list[tuple[str, list[str] | None, str]] = []
    for name, script in BENCHES.items():
        if name not in only:
            continue
        path = bench_dir / script
        if not path.is_file():
            plan.append((name, None, f"{path} not found (this branch lacks it)"))
            continue
        cmd = [sys.executable, str(path)]
        if name == "fused_read":
            if not args.fused_read_checkpoint:
                plan.append((name, None, "needs --fused-read-checkpoint PATH (a 20b synth)"))
                continue
            plan.append((name, cmd + [args.fused_read_checkpoint, "--out-dir", str(out)], "CPU"))
            continue
        if not gpu_ok:
            plan.append((name, None, f"needs a CUDA sm_80+ GPU ({gpu_what})"))
            continue
        if name == "e2e":
            if importlib.util.find_spec("vllm") is None:
                plan.append((name, None, "needs vLLM 0.26 (pip install 'gptoss-3090[vllm]')"))
            elif not args.e2e_checkpoint:
                plan.append(
                    (
                        name,
                        None,
                        "needs --e2e-checkpoint PATH (gptoss-3090 synth PATH --preset 20b)",
                    )
                )
            elif gpu_gib < E2E_MIN_GIB:
                plan.append((name, None, f"needs >= {E2E_MIN_GIB:.0f} GiB ({gpu_gib:.1f} GiB)"))
            else:
                plan.append(
                    (
                        name,
                        cmd + ["--ours", args.e2e_checkpoint, "--out", str(out / "e2e")],
                        gpu_what,
                    )
                )
            continue
        if name == "moe" and importlib.util.find_spec("gptoss_3090.moe") is None:
            plan.append((name, None, "the fused MoE op (gptoss_3090.moe) is not in this build"))
            continue
        extra: list[str] = ["--out", str(out / f"{name}.json")]
        if args.quick:
            extra += {
                "attention": ["--reps", "3", "--iters", "5"],
                "nf4_linear": ["--quick"],
                "moe": ["--iters", "5", "--layers", "8"],
            }.get(name, [])
        plan.append((name, cmd + extra, gpu_what))
    return plan


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_attention(doc: dict[str, Any], png: Path) -> None:
    plt = _plt()
    rows = doc["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, kind in zip(axes, ("decode", "prefill"), strict=True):
        rs = [r for r in rows if r["kind"] == kind]
        if kind == "decode":
            labels = [f"B={r['batch']}\nctx={r['context'] // 1024}K\n{r['layer']}" for r in rs]
            # throughput: tokens (sequences) decoded per second by one layer's attention
            ours = [r["batch"] / (r["ours_us"] * 1e-6) for r in rs]
            base = [r["batch"] / (r["baseline_us"] * 1e-6) for r in rs]
            ax.set_ylabel("decode tokens/s per layer")
        else:
            labels = [f"{r.get('tokens', r.get('context', 0)) // 1024}K\n{r['layer']}" for r in rs]
            ours = [r.get("tokens", r.get("context", 0)) / (r["ours_us"] * 1e-6) for r in rs]
            base = [r.get("tokens", r.get("context", 0)) / (r["baseline_us"] * 1e-6) for r in rs]
            ax.set_ylabel("prefill tokens/s per layer")
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="gptoss-3090")
        ax.bar([x + 0.2 for x in xs], base, width=0.4, label=f"baseline: {doc.get('baseline')}")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_yscale("log")
        ax.set_title(f"attention {kind}")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Attention with sinks, {doc.get('card')} - geomean {doc.get('geomean_speedup', 0):.2f}x "
        f"vs {doc.get('baseline')}"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_moe(doc: dict[str, Any], png: Path) -> None:
    plt = _plt()
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for tuning in sorted({r["tuning"] for r in rows}):
        rs = sorted((r for r in rows if r["tuning"] == tuning), key=lambda r: r["tokens"])
        ax.plot(
            [r["tokens"] for r in rs],
            [r["tokens"] / (r["us_per_layer"] * 1e-6) for r in rs],
            marker="o",
            label=f"gptoss-3090 fused NF4 MoE (tuning {tuning})",
        )
    for key, label in (("bf16_us", "bf16 PyTorch per-expert"), ("marlin_us", "vLLM Marlin MXFP4")):
        rs = sorted(
            {r["tokens"]: r for r in rows if r.get(key) and r[key] == r[key]}.values(),
            key=lambda r: r["tokens"],
        )
        if rs:
            ax.plot(
                [r["tokens"] for r in rs],
                [r["tokens"] / (r[key] * 1e-6) for r in rs],
                marker="s",
                linestyle="--",
                label=f"baseline: {label}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per forward (batch)")
    ax.set_ylabel("tokens/s per MoE layer")
    ax.set_title(f"GPT-OSS-20B MoE layer, {doc.get('card')}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_nf4_linear(doc: dict[str, Any], png: Path) -> None:
    plt = _plt()
    rows = doc["rows"]
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.5), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes, strict=True):
        rs = [r for r in rows if (r["N"], r["K"]) == (n, k)]
        for tuning in sorted({r["tuning"] for r in rs}):
            t = sorted((r for r in rs if r["tuning"] == tuning), key=lambda r: r["M"])
            ax.plot(
                [r["M"] for r in t],
                [r["M"] / (r["ours_us"] * 1e-6) for r in t],
                "o-",
                label=f"NF4 linear ({tuning})",
            )
        first = sorted({r["M"]: r for r in rs}.values(), key=lambda r: r["M"])
        for key, label in (("cublas_us", "cuBLAS bf16"), ("bnb_us", "bitsandbytes NF4")):
            t = [r for r in first if r.get(key) and r[key] == r[key]]  # NaN: not measured
            if t:
                ax.plot(
                    [r["M"] for r in t],
                    [r["M"] / (r[key] * 1e-6) for r in t],
                    "s--",
                    label=f"baseline: {label}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("tokens (rows of x) per second")
        ax.set_title(f"{n}x{k}")
        ax.legend(fontsize=7)
    fig.suptitle(f"NF4 linear, {doc.get('card')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _kind(doc: dict[str, Any]) -> str | None:
    if doc.get("benchmark") == "attention" or (
        isinstance(doc.get("results"), list) and doc["results"] and "kind" in doc["results"][0]
    ):
        return "attention"
    rows = doc.get("rows")
    if isinstance(rows, list) and rows:
        if "us_per_layer" in rows[0]:
            return "moe"
        if "M" in rows[0] and "ours_us" in rows[0]:
            return "nf4_linear"
    return None


_PLOTTERS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "attention": _plot_attention,
    "moe": _plot_moe,
    "nf4_linear": _plot_nf4_linear,
}


def plot_result(json_path: str | Path, out_dir: str | Path) -> Path | None:
    """Plots one result JSON into ``out_dir/<stem>.png``; None for a format without a plot."""
    path = Path(json_path)
    doc = json.loads(path.read_text())
    kind = _kind(doc) if isinstance(doc, dict) else None
    if kind is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{path.stem}.png"
    _PLOTTERS[kind](doc, png)
    return png


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Runs (or with ``--plot`` only plots) the benchmarks; returns 0, or 1 if one failed."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        for f in args.plot:
            png = plot_result(f, out)
            print(f"{f}: " + (f"plot {png}" if png else "no plot for this format"))
        return 0
    bench_dir = _bench_dir(args.bench_dir)
    if bench_dir is None:
        raise ValueError(
            "bench/ scripts not found: run from a source checkout or pass --bench-dir DIR"
        )
    plan = _plan(args, bench_dir)
    summary: dict[str, Any] = {"out": str(out), "benchmarks": {}}
    failed = False
    todo = [p for p in plan if p[1] is not None]
    for name, cmd, note in plan:
        if cmd is None:
            print(f"SKIP  {name:<10} {note}", flush=True)
            summary["benchmarks"][name] = {"status": "skipped", "reason": note}
    for i, (name, cmd, note) in enumerate(todo, 1):
        assert cmd is not None
        print(f"[{i}/{len(todo)}] {name} on {note}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd).returncode  # the script's table streams to the terminal
        secs = time.perf_counter() - start
        entry: dict[str, Any] = {"status": "ok" if rc == 0 else f"exit {rc}", "seconds": secs}
        if rc != 0:
            failed = True
        js = out / f"{name}.json"
        if js.is_file():
            entry["json"] = str(js)
            png = plot_result(js, out)
            if png:
                entry["plot"] = str(png)
                print(f"      plot {png}", flush=True)
        summary["benchmarks"][name] = entry
        print(f"{'DONE' if rc == 0 else 'FAIL'}  {name:<10} {secs:.0f} s", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"bench: results in {out} (summary.json)")
    return 1 if failed else 0
