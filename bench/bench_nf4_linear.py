"""Benchmark: NF4 linear (y = x W^T + b) against the bandwidth ceiling and cuBLAS bf16.

For each weight shape N x K and each M it reports, on one card in one sitting:

* ``ours``: ``gptoss_3090.ops.nf4_linear`` with the runtime's choice (``auto``: the streaming
  kernel for M <= 32), and separately the first fused kernels (``fused``: the first decode
  kernel for M <= 16, the tensor-core kernel above) and
  ``dequant_matmul`` (dequantize into a scratch tensor + cuBLAS) for M > 16;
* ``cublas``: ``torch.nn.functional.linear`` on the dequantized bf16 weight;
* ``bnb``: bitsandbytes ``matmul_4bit`` when it imports with CUDA;
* ``copy``: a large device-to-device copy (bytes read + written per second), the ceiling.

Timing: every measured call runs inside a CUDA graph of ``--calls`` back-to-back calls that
rotate over enough weight copies to exceed 4x the L2 cache (so weights come from DRAM); the
graph is replayed ``--reps`` times and the median per-call time is reported (CUDA events).
GB/s counts the weight bytes a call must read (NF4: packed + absmax + nested statistics;
cuBLAS: the bf16 weight), TFLOP/s counts 2*M*N*K.

Usage: ``PYTHONPATH=python python3 bench/bench_nf4_linear.py --out bench/results/nf4_linear.json``
(``--quick`` for a short run; ``--tunings auto,sm86`` runs the RTX 3090 configuration too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

SHAPES = [(5760, 2880), (2880, 2880), (4096, 2880), (2880, 4096), (512, 2880)]
MS = [1, 4, 16, 64, 256, 2048]


def git_commit() -> str:
    if os.environ.get("GPTOSS_3090_GIT_COMMIT"):
        return os.environ["GPTOSS_3090_GIT_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(__file__),
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except Exception:
        return "unknown"


def time_graph(fn: Callable[[int], object], calls: int, reps: int) -> float:
    """Median seconds per call of fn(i), i = 0..calls-1, captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    del g
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    n = 1 << 30  # 1 GiB
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(max(reps, 5)):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2 * n / statistics.median(times)


def bnb_available() -> bool:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        x = torch.randn(64, 64, dtype=torch.bfloat16, device="cuda")
        q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
        bnb.matmul_4bit(torch.randn(1, 64, dtype=torch.bfloat16, device="cuda"), q.t(), st)
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


HEADER = (
    f"{'tuning':6} {'shape':>10} {'M':>5} | {'ours us':>8} {'GB/s':>6} {'%copy':>6} "
    f"{'TFLOP/s':>7} {'kernel':>24} | {'fused us':>8} {'dq+mm us':>8} | "
    f"{'cuBLAS us':>9} {'x cuBLAS':>8} | {'bnb us':>7}"
)


def bench_point(m: int, n: int, k: int, w: dict, ctx: dict) -> dict:
    """Times one (shape, M) under the current tuning; ``w`` holds the weight copies."""
    from gptoss_3090 import _native, ops

    args = ctx["args"]
    dtype = torch.bfloat16
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    ws, wds, bnb_ws, bias = w["nf4"], w["bf16"], w["bnb"], w["bias"]
    flops = 2.0 * m * n * k

    def ours(i: int, path: str = "auto") -> torch.Tensor:
        return ops.nf4_linear(x, ws[i % len(ws)], bias, path=path)

    def fused(i: int) -> torch.Tensor:
        return ours(i, "decode" if m <= 16 else "mma")

    def dequant_mm(i: int) -> torch.Tensor:
        return ours(i, "dequant_matmul")

    def cublas(i: int) -> torch.Tensor:
        return torch.nn.functional.linear(x, wds[i % len(wds)], bias)

    t_auto = time_graph(ours, args.calls, args.reps)
    # What `auto` ran (the op's own choice; every shape here is of 16-row parts). `fused` times
    # the first decode kernel or the tensor-core kernel.
    ordinal = torch.cuda.current_device()
    plan = ops.auto_linear_path(m, True, ordinal)
    if plan in ("wide", "mma"):
        pl = _native.cuda_nf4_linear_plan(ordinal, m, n, k, plan)
        plan = pl["entry"] + (f" z{pl['splits']}" if pl["splits"] > 1 else "")
    t_fused = t_dq = float("nan")
    if not args.no_other_paths:
        t_fused = time_graph(fused, args.calls, args.reps)
        t_dq = time_graph(dequant_mm, args.calls, args.reps) if m > 16 else float("nan")
    t_cublas = time_graph(cublas, args.calls, args.reps)
    t_bnb = float("nan")
    if bnb_ws:
        import bitsandbytes as bnb

        def bnb_call(i: int) -> torch.Tensor:
            q, st = bnb_ws[i % len(bnb_ws)]
            return bnb.matmul_4bit(x, q.t(), st, bias=bias)

        try:
            t_bnb = time_graph(bnb_call, args.calls, args.reps)
        except Exception as e:  # not capturable: report and go on
            print(f"# bitsandbytes timing failed: {e}", file=sys.stderr)
            bnb_ws.clear()
    nf4_bytes, bf16_bytes, copy_bps = w["nf4_bytes"], w["bf16_bytes"], ctx["copy_bps"]
    return {
        "N": n,
        "K": k,
        "M": m,
        "kernel": plan,
        "ours_us": t_auto * 1e6,
        "ours_gbps": nf4_bytes / t_auto / 1e9,
        "ours_frac_copy": nf4_bytes / t_auto / copy_bps,
        "ours_tflops": flops / t_auto / 1e12,
        "fused_us": t_fused * 1e6,
        "dequant_matmul_us": t_dq * 1e6,
        "cublas_us": t_cublas * 1e6,
        "cublas_gbps": bf16_bytes / t_cublas / 1e9,
        "cublas_tflops": flops / t_cublas / 1e12,
        "speed_vs_cublas": t_cublas / t_auto,
        "bnb_us": t_bnb * 1e6,
        "nf4_bytes": nf4_bytes,
        "weight_copies": len(ws),
    }


def check_chunk_major(base, n: int, k: int) -> None:
    """Reorders ``base``'s packed bytes chunk-major in place (gptoss_3090.moe.chunk_major_)
    and checks the streaming path (M = 4) against the dequantized row-order weight: only kernels
    built with STR_CHUNK_MAJOR read that order."""
    from gptoss_3090 import ops
    from gptoss_3090.moe import chunk_major_

    want_w = base.dequantize().float()
    x = torch.randn(4, k, dtype=torch.bfloat16, device="cuda")
    chunk_major_(base.packed.view(1, -1), n, k, gate_up_pairs=False)
    got = ops.nf4_linear(x, base, None, path="auto").float()
    want = x.float() @ want_w.T
    err = float((got - want).norm() / want.norm())
    print(f"# chunk-major weights {n}x{k}: rel err {err:.2e} at M = 4")
    if not err <= 1e-2:
        raise SystemExit("chunk-major check failed: are the kernels built with STR_CHUNK_MAJOR?")


def nf4_copies(base, l2: int) -> list:
    """``base`` (a nested :class:`Nf4Weight`) plus clones, together more than 4x L2, so that
    rotating through them times DRAM, not L2."""
    from gptoss_3090 import ops

    copies = max(2, math.ceil(4 * l2 / base.nbytes) + 1)
    return [base] + [
        ops.Nf4Weight(
            packed=base.packed.clone(),
            absmax=base.absmax.clone(),
            shape=base.shape,
            dtype=base.dtype,
            nested_absmax=base.nested_absmax.clone(),
            nested_quant_map=base.nested_quant_map,
            nested_offset=base.nested_offset,
        )
        for _ in range(copies - 1)
    ]


def bench_shape(
    n: int,
    k: int,
    ms: list[int],
    tunings: list[str],
    ctx: dict,
    first: bool,
    parts: list[int] | None = None,
):
    """All M and tunings for one weight shape; weight copies rotate to exceed 4x L2. With
    ``parts`` (row counts summing to ``n``) the weight is that many separately quantized
    segments, as vLLM's fused q/k/v (``4096+512+512x2880``)."""
    from gptoss_3090 import ops, runtime

    dtype = torch.bfloat16
    l2 = ctx["l2"]
    if parts:
        segs = [
            ops.nf4_quantize(torch.randn(r, k, dtype=dtype, device="cuda") * 0.02, nested=True)
            for r in parts
        ]
        per_seg = [nf4_copies(sg, l2) for sg in segs]
        nf4 = [list(c) for c in zip(*per_seg, strict=False)]
        wd = torch.cat([sg.dequantize() for sg in segs])
        base_bytes = sum(sg.nbytes for sg in segs)
    else:
        base = ops.nf4_quantize(torch.randn(n, k, dtype=dtype, device="cuda") * 0.02, nested=True)
        if ctx["args"].weights_order == "chunks":
            check_chunk_major(base, n, k)
        nf4 = nf4_copies(base, l2)
        base_bytes = base.nbytes
        wd = base.dequantize()
    copies = len(nf4)
    dcopies = max(2, math.ceil(4 * l2 / (wd.numel() * 2)) + 1)
    w = {
        "nf4": nf4,
        "bf16": [wd] + [wd.clone() for _ in range(dcopies - 1)],
        "bnb": [],
        "bias": torch.randn(n, dtype=dtype, device="cuda") * 0.1,
        "nf4_bytes": base_bytes,
        "bf16_bytes": wd.numel() * 2,
    }
    if ctx["have_bnb"] and not parts:
        import bitsandbytes.functional as F

        q, st = F.quantize_4bit(wd, blocksize=64, quant_type="nf4", compress_statistics=True)
        w["bnb"] = [(q.clone(), st) for _ in range(copies)]
    rows = []
    for tuning in tunings:
        with runtime.forced_tuning(None if tuning == "auto" else tuning):
            for m in ms:
                row = {"tuning": tuning, **bench_point(m, n, k, w, ctx)}
                rows.append(row)
                if first and len(rows) == 1:
                    print(HEADER)
                if parts:
                    row["segments"] = parts
                name = "+".join(map(str, parts)) if parts else str(n)
                print(
                    f"{tuning:6} {f'{name}x{k}':>10} {m:5d} | {row['ours_us']:8.1f} "
                    f"{row['ours_gbps']:6.0f} {100 * row['ours_frac_copy']:5.0f}% "
                    f"{row['ours_tflops']:7.1f} {row['kernel']:>24} | {row['fused_us']:8.1f} "
                    f"{row['dequant_matmul_us']:8.1f} | {row['cublas_us']:9.1f} "
                    f"{row['speed_vs_cublas']:7.2f}x | {row['bnb_us']:7.1f}",
                    flush=True,
                )
    return rows


def write_json(path: str, obj: object) -> None:
    """Writes ``obj`` as indented JSON to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def parse_counts(text: str, what: str) -> list[int]:
    """``1,16,64`` -> ``[1, 16, 64]``; anything but positive integers exits naming ``what``."""
    try:
        counts = [int(v) for v in text.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"{what}: expected positive integers such as 1,16,64, found {text!r}"
        ) from None
    return counts


def parse_shape(text: str) -> tuple[int, int, list[int] | None]:
    """``NxK``, or ``A+B+CxK`` for a weight of separately quantized row segments (vLLM's fused
    q/k/v: ``4096+512+512x2880``): ``(N, K, segment rows or None)``."""
    try:
        rows, k = text.strip().split("x")
        parts = [int(r) for r in rows.split("+")]
        if len(parts) > 3 or min(parts) <= 0 or int(k) <= 0:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--shapes: expected NxK or A+B+CxK items, found {text!r}") from None
    return sum(parts), int(k), parts if len(parts) > 1 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write JSON results here")
    ap.add_argument(
        "--shapes",
        default=None,
        help="e.g. 5760x2880,512x2880; 4096+512+512x2880: three separately quantized segments",
    )
    ap.add_argument("--ms", default=None, help="e.g. 1,16,2048")
    ap.add_argument("--tunings", default="auto,sm86", help="comma list of auto/sm80/sm86/sm90")
    ap.add_argument("--calls", type=int, default=40, help="calls per CUDA graph")
    ap.add_argument("--reps", type=int, default=7, help="graph replays (median)")
    ap.add_argument("--quick", action="store_true", help="fewer calls and replays")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    ap.add_argument(
        "--no-other-paths",
        action="store_true",
        help="skip the fused and dq+mm timings (our other paths): for kernel-variant sweeps",
    )
    ap.add_argument(
        "--weights-order",
        choices=("rows", "chunks"),
        default="rows",
        help="rows: bitsandbytes' order (the default kernels); chunks: chunk-major, for the "
        "streaming kernels (M <= 16) built with STR_CHUNK_MAJOR (GPTOSS_3090_KERNEL_DIR); the "
        "other paths then read garbage",
    )
    args = ap.parse_args()
    # arguments first: a typo is reported on any machine, before the GPU is looked for
    shapes = [(n, k, None) for n, k in SHAPES]
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
    ms = MS if not args.ms else parse_counts(args.ms, "--ms")
    tunings = [t.strip() for t in args.tunings.split(",") if t.strip()]
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    from gptoss_3090 import runtime

    if args.quick:
        args.calls, args.reps = 12, 3

    torch.manual_seed(0)
    runtime.warmup()
    info = runtime.device_info()
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", info["l2_bytes"]))
    copy_bps = copy_bandwidth(args.reps)
    have_bnb = (not args.no_bnb) and bnb_available()
    print(
        f"# {info['name']} ({info['arch']}, {info['sm_count']} SMs, L2 {l2 / 2**20:.0f} MiB); "
        f"device-to-device copy {copy_bps / 1e9:.0f} GB/s; bitsandbytes CUDA: {have_bnb}"
    )
    rows: list[dict] = []
    ctx = {"copy_bps": copy_bps, "l2": l2, "have_bnb": have_bnb, "args": args}
    for n, k, parts in shapes:
        rows += bench_shape(n, k, ms, tunings, ctx, first=not rows, parts=parts)
        torch.cuda.empty_cache()

    result = {
        "card": info["name"],
        "arch": info["arch"],
        "sm_count": info["sm_count"],
        "l2_bytes": l2,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_commit": git_commit(),
        "command": " ".join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "copy_gbps": copy_bps / 1e9,
        "bitsandbytes_cuda": have_bnb,
        "method": "CUDA-graph replay of back-to-back calls rotating over >4x L2 of weight "
        "copies; median of replays; GB/s = weight bytes / time",
        "rows": rows,
    }
    if args.out:
        write_json(args.out, result)
        print(f"# wrote {args.out}")
    targets = [r for r in rows if r["M"] == 1 and (r["N"], r["K"]) in ((5760, 2880), (4096, 2880))]
    for r in targets:
        print(
            f"# target M=1 {r['N']}x{r['K']} [{r['tuning']}]: {100 * r['ours_frac_copy']:.0f}% "
            "of copy bandwidth (goal >= 80%)"
        )
    for r in rows:
        if r["M"] == 2048:
            print(
                f"# target M=2048 {r['N']}x{r['K']} [{r['tuning']}]: {r['speed_vs_cublas']:.2f}x "
                "cuBLAS (goal >= 0.9x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
