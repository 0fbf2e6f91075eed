"""GPU time per kernel from torch-profiler traces (Chrome trace JSON, optionally gzipped).

``bench_vllm_e2e.py --profile-workload decode_b64`` writes one trace folder per engine
(``traces/<side>_<budget>/``) covering a fixed number of decode steps. This script sums the
duration of every GPU kernel event by name, groups names into families (our kernels, Marlin,
attention, GEMMs, ...) and prints microseconds per decode step, so the two sides' steps can be
compared op by op.

Usage::

    python3 bench/trace_kernels.py OUT/traces/stock_full OUT/traces/ours_full --steps 32 \\
        --out OUT/kernels.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Family of a kernel name: the first pattern that matches (case-insensitive) names it.
FAMILIES: list[tuple[str, str]] = [
    ("moe (ours)", r"^moe_"),
    ("nf4 linear (ours)", r"^nf4_"),
    ("attention (ours)", r"^attn_|^attention_|kv_cache_write|^paged_"),
    ("moe (marlin)", r"marlin"),
    # vLLM's own routing kernels: fused_topk runs for our side too (unless
    # GPTOSS_3090_MOE_ROUTING=internal), moe_align and moe_sum for stock's Marlin path only.
    ("moe routing / align (vLLM)", r"moe_align|topk|count_and_sort|moe_sum"),
    # reduce_segments: the Triton unified attention's split-KV merge (decode at small batches).
    ("attention (triton)", r"unified_attention|kernel_unified|reshape_and_cache|^reduce_segments"),
    ("gemm (cublas / cutlass)", r"gemm|sm90_xmma|cutlass|cublas|ampere_.*_s16816|nvjet"),
    ("norm / elementwise (inductor, triton)", r"^triton_|rms_norm|fused_add"),
    ("sampling / logits", r"argmax|sampl|softmax|logit"),
]


def family(name: str) -> str:
    """The family a kernel name belongs to, or "other"."""
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return fam
    return "other"


def load_events(path: Path) -> list[dict[str, Any]]:
    """The ``traceEvents`` of one trace file (``.json`` or ``.json.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data.get("traceEvents", []) if isinstance(data, dict) else data


def trace_files(folder: Path) -> list[Path]:
    """Worker trace files under ``folder`` (any depth)."""
    return sorted(p for p in folder.rglob("*") if p.name.endswith((".json", ".json.gz")))


def kernel_times(events: Iterable[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Total duration (us) and launch count per GPU kernel name."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") != "kernel":
            continue
        acc = out[str(ev.get("name", "?"))]
        acc[0] += float(ev.get("dur", 0.0))
        acc[1] += 1
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def busy_and_span(events: Iterable[dict[str, Any]]) -> tuple[float, float]:
    """GPU busy time (union of kernel intervals, us) and the span from the first kernel's start
    to the last one's end. A span well above the busy time means the GPU waited: on the host's
    launches or graph replays, or on something other than kernels (copies, synchronisation)."""
    spans = sorted(
        (float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0)))
        for ev in events
        if ev.get("ph") == "X" and ev.get("cat") == "kernel" and "ts" in ev
    )
    if not spans:
        return 0.0, 0.0
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, max(e for _, e in spans) - spans[0][0]


def early_starts(events: Iterable[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per kernel name: how many launches started before the kernel before them (in start order)
    had ended, and for how long they ran alongside it (us). In one stream, kernels only overlap
    through programmatic dependent launch (GPTOSS_3090_PDL), so this shows whether PDL took
    effect, inside CUDA graphs too."""
    spans = sorted(
        (float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0)), str(ev.get("name", "?")))
        for ev in events
        if ev.get("ph") == "X" and ev.get("cat") == "kernel" and "ts" in ev
    )
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for (_, prev_end, _), (start, end, name) in zip(spans, spans[1:], strict=False):
        if start < prev_end:
            acc = out[name]
            acc[0] += min(prev_end, end) - start
            acc[1] += 1
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def timeline(folder: Path) -> tuple[float, float]:
    """busy_and_span summed over the trace files of ``folder`` (one per worker)."""
    busy = span = 0.0
    for f in trace_files(folder):
        b, s = busy_and_span(load_events(f))
        busy, span = busy + b, span + s
    return busy, span


PerKernel = dict[str, tuple[float, int]]


def summed_over_files(
    folder: Path, per_file: Callable[[list[dict[str, Any]]], PerKernel]
) -> PerKernel:
    """``per_file`` (us and a count per kernel name) of every trace file in ``folder``, added."""
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for f in trace_files(folder):
        for name, (us, n) in per_file(load_events(f)).items():
            total[name][0] += us
            total[name][1] += n
    return {k: (v[0], int(v[1])) for k, v in total.items()}


def early_starts_in(folder: Path) -> PerKernel:
    """early_starts summed over the trace files of ``folder``."""
    return summed_over_files(folder, early_starts)


def summarize(folder: Path) -> PerKernel:
    """kernel_times over every trace file in ``folder``."""
    return summed_over_files(folder, kernel_times)


def table(
    runs: dict[str, dict[str, tuple[float, int]]],
    steps: int,
    top: int = 12,
    timelines: dict[str, tuple[float, float]] | None = None,
    early: dict[str, dict[str, tuple[float, int]]] | None = None,
) -> str:
    """Markdown: us per step by family for each run (with each run's GPU busy time and span,
    from ``timelines``, where given), then each run's top kernels, then (from ``early``, where
    given) the kernels that started before the previous kernel ended."""
    fams = sorted({family(k) for r in runs.values() for k in r})
    per_fam = {
        name: {f: sum(us for k, (us, _) in r.items() if family(k) == f) / steps for f in fams}
        for name, r in runs.items()
    }
    order = sorted(fams, key=lambda f: -max(per_fam[n][f] for n in runs))
    lines = ["| family | " + " | ".join(f"{n} us/step" for n in runs) + " |"]
    lines.append("|---|" + "---|" * len(runs))
    for f in order:
        lines.append(f"| {f} | " + " | ".join(f"{per_fam[n][f]:.1f}" for n in runs) + " |")
    totals = " | ".join(f"**{sum(per_fam[n].values()):.1f}**" for n in runs)
    lines.append(f"| **all kernels** | {totals} |")
    if timelines:
        busy = " | ".join(f"{timelines[n][0] / steps:.1f}" for n in runs)
        span = " | ".join(f"{timelines[n][1] / steps:.1f}" for n in runs)
        frac = " | ".join(
            f"{100 * timelines[n][0] / timelines[n][1]:.0f}%" if timelines[n][1] else "-"
            for n in runs
        )
        lines.append(f"| GPU busy (kernel union) | {busy} |")
        lines.append(f"| GPU span (first to last kernel) | {span} |")
        lines.append(f"| busy / span | {frac} |")
    for name, r in runs.items():
        lines += ["", f"Top kernels, {name} (us per step, launches per step):", ""]
        lines += ["| kernel | family | us/step | launches/step |", "|---|---|---|---|"]
        for k, (us, n) in sorted(r.items(), key=lambda kv: -kv[1][0])[:top]:
            short = k if len(k) <= 90 else k[:87] + "..."
            lines.append(f"| `{short}` | {family(k)} | {us / steps:.1f} | {n / steps:.1f} |")
    for name, starts in (early or {}).items():
        lines += ["", f"Early starts, {name} (before the previous kernel ended: PDL):", ""]
        if not starts:
            lines.append("none")
            continue
        lines += ["| kernel | launches/step | overlap us/step |", "|---|---|---|"]
        for k, (us, n) in sorted(starts.items(), key=lambda kv: -kv[1][0])[:top]:
            short = k if len(k) <= 90 else k[:87] + "..."
            lines.append(f"| `{short}` | {n / steps:.1f} | {us / steps:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="trace folders, one per engine")
    p.add_argument("--steps", type=int, required=True, help="decode steps the traces cover")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    a = p.parse_args(argv)
    if a.steps <= 0:
        p.error("--steps must be positive")
    runs, timelines, early = {}, {}, {}
    for folder in a.folders:
        if not trace_files(folder):
            p.error(f"{folder}: no trace files (*.json, *.json.gz)")
        runs[folder.name] = summarize(folder)
        timelines[folder.name] = timeline(folder)
        early[folder.name] = early_starts_in(folder)
    md = table(runs, a.steps, timelines=timelines, early=early)
    print(md)
    if a.out:
        a.out.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
