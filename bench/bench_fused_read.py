#!/usr/bin/env python3
"""Issue 2 benchmark: building fused expert buffers vs a plain sequential read.

Usage::

    gptoss-3090 synth /tmp/gptoss-20b --preset 20b          # ~12.5 GB, once
    python bench/bench_fused_read.py /tmp/gptoss-20b [--threads N] [--repeats 2]

What it measures, in one process and one run (page cache warm for both):

1. **plain read**: every ``*.safetensors`` file of the checkpoint read sequentially with
   ``readinto`` into one reused 16 MiB buffer. The first pass warms the page cache and is
   not timed; the best of ``--repeats`` timed passes gives GB/s.
2. **fused build**: ``Checkpoint.fused_experts(layer, proj)`` for every layer and both
   projections, one after another, each released before the next (the allocation is part of
   the cost, as in a loader that allocates per layer). GB/s = bytes of the fused buffers
   (packed + absmax + nested statistics + biases) / wall time; best of ``--repeats``.
   A third variant fills one set of preallocated buffers per projection (``out=``), as a
   loader reusing pinned staging buffers would.
3. **peak RSS beyond the page cache**: ``RssAnon`` from /proc/self/status (anonymous memory
   only; the mapped checkpoint pages count in ``RssFile``), sampled every 2 ms by a thread
   and after every build, minus the value before the builds.
4. **inspect**: wall time of ``python -m gptoss_3090.cli inspect PATH --json`` in a fresh
   process (Python start-up and imports included), of ``import gptoss_3090`` alone in a fresh
   process, and of ``open_checkpoint(path).summary()`` in this process.

Targets (issue 2): fused >= 0.8x plain read, peak RssAnon beyond baseline < 1 GB, inspect < 2 s.
Results are printed as a table and written to ``bench/results/fused_read-<host>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHUNK = 16 << 20


def rss_anon() -> int:
    """Anonymous resident memory of this process, in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/self/status")


class PeakSampler:
    """Samples RssAnon every ``period`` seconds in a thread; ``peak`` is the maximum seen."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.period)

    def note(self) -> None:
        self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.note()


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors files in {path}")
    return files


def plain_read(files: list[Path]) -> tuple[int, float]:
    """Reads every file sequentially; returns (bytes, seconds)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - start


def fused_pass(
    ck: Any, layers: int, threads: int | None, sampler: PeakSampler
) -> tuple[int, float]:
    """fused_experts for every (layer, proj), each released before the next."""
    total = 0
    start = time.perf_counter()
    for layer in range(layers):
        for proj in ("gate_up", "down"):
            fe = ck.fused_experts(layer, proj, threads=threads)
            total += fe.nbytes
            sampler.note()
            del fe
    return total, time.perf_counter() - start


def fused_pass_reuse(
    ck: Any, layers: int, threads: int | None, sampler: PeakSampler
) -> tuple[int, float]:
    """Same, filling one preallocated set of buffers per projection (out=)."""
    bufs = {proj: ck.empty_fused_buffers(0, proj) for proj in ("gate_up", "down")}
    total = 0
    start = time.perf_counter()
    for layer in range(layers):
        for proj in ("gate_up", "down"):
            fe = ck.fused_experts(layer, proj, out=bufs[proj], threads=threads)
            total += fe.nbytes
            sampler.note()
            del fe
    elapsed = time.perf_counter() - start
    del bufs
    return total, elapsed


def time_inspect(path: Path) -> float:
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1] / "python"
    env["PYTHONPATH"] = (
        f"{root}{os.pathsep}{env['PYTHONPATH']}" if "PYTHONPATH" in env else str(root)
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_3090.cli", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"inspect failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


def time_import() -> float:
    """Seconds to ``import gptoss_3090`` in a fresh interpreter (measured inside it)."""
    code = (
        "import time; t = time.perf_counter(); import gptoss_3090; print(time.perf_counter() - t)"
    )
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1] / "python"
    env["PYTHONPATH"] = (
        f"{root}{os.pathsep}{env['PYTHONPATH']}" if "PYTHONPATH" in env else str(root)
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "path", type=Path, help="synthetic 20b checkpoint (gptoss-3090 synth --preset 20b)"
    )
    ap.add_argument("--threads", type=int, default=None, help="copy threads (default: library's)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per method (best kept)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)

    from gptoss_3090 import open_checkpoint

    files = shard_files(args.path)
    t0 = time.perf_counter()
    ck = open_checkpoint(args.path)
    summary = ck.summary()
    open_s = time.perf_counter() - t0
    layers = int(summary["layers"])

    plain_read(files)  # warm the page cache
    plain = [plain_read(files) for _ in range(args.repeats)]
    plain_bytes, plain_s = min(plain, key=lambda r: r[1])

    base = rss_anon()
    with PeakSampler() as sampler:
        fused = [fused_pass(ck, layers, args.threads, sampler) for _ in range(args.repeats)]
    fused_bytes, fused_s = min(fused, key=lambda r: r[1])
    peak_alloc = sampler.peak - base

    base_reuse = rss_anon()
    with PeakSampler() as sampler2:
        reuse = [fused_pass_reuse(ck, layers, args.threads, sampler2) for _ in range(args.repeats)]
    reuse_bytes, reuse_s = min(reuse, key=lambda r: r[1])
    peak_reuse = sampler2.peak - base_reuse

    inspect_s = min(time_inspect(args.path) for _ in range(2))
    import_s = min(time_import() for _ in range(2))

    plain_gbs = plain_bytes / plain_s / 1e9
    fused_gbs = fused_bytes / fused_s / 1e9
    reuse_gbs = reuse_bytes / reuse_s / 1e9
    result = {
        "benchmark": "fused_read",
        "checkpoint": str(args.path),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "repeats": args.repeats,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "layers": layers,
        "files": len(files),
        "plain_read": {"bytes": plain_bytes, "seconds": plain_s, "gb_per_s": plain_gbs},
        "fused_alloc": {
            "bytes": fused_bytes,
            "seconds": fused_s,
            "gb_per_s": fused_gbs,
            "ratio_vs_plain": fused_gbs / plain_gbs,
            "peak_rss_anon_beyond_baseline_bytes": peak_alloc,
        },
        "fused_reuse": {
            "bytes": reuse_bytes,
            "seconds": reuse_s,
            "gb_per_s": reuse_gbs,
            "ratio_vs_plain": reuse_gbs / plain_gbs,
            "peak_rss_anon_beyond_baseline_bytes": peak_reuse,
        },
        "inspect_subprocess_seconds": inspect_s,
        "open_and_summary_seconds": open_s,
        "import_gptoss_3090_seconds": import_s,
        "targets": {"ratio_vs_plain": 0.8, "peak_rss_beyond_cache_bytes": 1e9, "inspect_s": 2.0},
    }

    rows = [
        ("plain sequential read", plain_bytes, plain_s, plain_gbs, None, None),
        (
            "fused, allocate per layer",
            fused_bytes,
            fused_s,
            fused_gbs,
            fused_gbs / plain_gbs,
            peak_alloc,
        ),
        (
            "fused, reused buffers",
            reuse_bytes,
            reuse_s,
            reuse_gbs,
            reuse_gbs / plain_gbs,
            peak_reuse,
        ),
    ]
    print(f"checkpoint {args.path}: {len(files)} files, {layers} layers, {os.cpu_count()} CPUs")
    print(f"{'method':<28}{'GB':>8}{'s':>8}{'GB/s':>8}{'x plain':>9}{'peak anon MB':>14}")
    for name, nbytes, secs, gbs, ratio, peak in rows:
        r = f"{ratio:.2f}" if ratio is not None else "-"
        pk = f"{peak / 1e6:.0f}" if peak is not None else "-"
        print(f"{name:<28}{nbytes / 1e9:>8.2f}{secs:>8.2f}{gbs:>8.2f}{r:>9}{pk:>14}")
    print(
        f"inspect (fresh process, --json): {inspect_s:.2f} s; "
        f"of which `import gptoss_3090` {import_s:.2f} s; "
        f"open+summary in-process: {open_s:.3f} s"
    )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"fused_read-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
