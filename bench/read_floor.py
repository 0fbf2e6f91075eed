"""Benchmark: what a kernel that only reads N bytes achieves, timed like bench_nf4_linear.py.

The issues' decode targets are fractions of a large device-to-device copy's bandwidth, reached
by kernels that read a few MB each (an attention projection's NF4 weight is 0.7-8.3 MB, one
token's four experts 33 + 17 MB). At those sizes a kernel's launch and its first DRAM round trip
are a large part of its time. This script measures the floor on the same card with the same
timing (CUDA-graph replay of back-to-back calls rotating over copies that exceed 4x the L2):

* ``empty``: a kernel that reads nothing (one program per SM), the per-call floor of a graph;
* ``read``: a Triton kernel that reads every byte once with 16-byte loads and writes one sum per
  program (the best of a few program sizes), the floor of any kernel that must read the bytes;
* ``streams``: the MoE streaming kernels' read pattern without compute: one warp per 16-row
  group of 1440-byte rows, each streaming its group's chunk-major bytes 1 KB per step with 4
  steps in flight (one token's gate_up at 33.6 MB is 1458 such groups at once);
* ``copy``: ``Tensor.copy_`` of the same bytes (reads and writes them).

Each reports us per call and the read bytes per second as a fraction of the large copy's
bandwidth (bytes read + written per second, as bench_nf4_linear.py).

Usage: ``python3 bench/read_floor.py [--sizes-mb 0.74,4.1,8.3,33] [--out floor.json]``
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_nf4_linear import copy_bandwidth, time_graph  # noqa: E402

# NF4 bytes (packed + statistics) of the weights the issues time: 512x2880, 2880x2880,
# 5120x2880 (vLLM's q/k/v), 5760x2880, and one token's four experts (gate_up, then down).
SIZES_MB = [0.75, 4.2, 7.5, 8.4, 16.8, 33.6]
GROUP_BYTES = 16 * 1440  # one 16-row group of a GPT-OSS-20B expert (K = 2880), chunk-major


@functools.lru_cache(maxsize=1)
def read_kernels():
    """The Triton kernels (imported lazily: Triton is a GPU-host dependency only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def empty_kernel(out_ptr):
        tl.store(out_ptr + tl.program_id(0), 0)

    @triton.jit
    def read_kernel(x_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n_words, other=0)
        tl.store(out_ptr + tl.program_id(0), tl.sum(v, axis=0))

    @triton.jit
    def stream_kernel(
        x_ptr, out_ptr, group_words: tl.constexpr, steps: tl.constexpr, STAGES: tl.constexpr
    ):
        # One warp streams one 16-row group's chunk-major bytes, 1 KB per step (the MoE
        # streaming kernels' order and granularity), STAGES steps in flight.
        offs = tl.arange(0, 256)
        base = tl.program_id(0) * group_words
        acc = tl.zeros([256], dtype=tl.int32)
        for j in tl.range(0, steps, num_stages=STAGES):
            acc ^= tl.load(x_ptr + base + j * 256 + offs)
        tl.store(out_ptr + tl.program_id(0) * 256 + offs, acc)

    return triton, empty_kernel, read_kernel, stream_kernel


def measure_size(
    nbytes: int, l2: int, copy_bps: float, t_empty: float, args: argparse.Namespace
) -> dict:
    """The read and copy floors of one size, over copies that exceed 4x the L2."""
    triton, _, read_kernel, stream_kernel = read_kernels()
    copies = max(2, math.ceil(4 * l2 / nbytes) + 1)
    bufs = [
        torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device="cuda")
        for _ in range(copies)
    ]
    dsts = [torch.empty_like(bufs[0]) for _ in range(copies)]
    sink = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    best = (math.inf, 0)
    for block in (1024, 2048, 4096, 8192):
        grid = (triton.cdiv(nbytes // 4, block),)
        if grid[0] > sink.numel():
            continue

        def read(i: int, block: int = block, grid: tuple = grid) -> None:
            read_kernel[grid](bufs[i % copies], sink, nbytes // 4, BLOCK=block, num_warps=8)

        best = min(best, (time_graph(read, args.calls, args.reps), block))
    # The streaming kernels' pattern: one warp per 16-row group of 1440-byte rows (K = 2880),
    # all groups at once, 22 chunks of 1 KB each (the half chunk left out).
    groups = nbytes // GROUP_BYTES
    streams_out = torch.empty(max(groups, 1) * 256, dtype=torch.int32, device="cuda")

    def streams(i: int) -> None:
        stream_kernel[(groups,)](
            bufs[i % copies], streams_out, GROUP_BYTES // 4, 22, STAGES=4, num_warps=1
        )

    t_streams = time_graph(streams, args.calls, args.reps) if groups else math.nan
    streams_bytes = groups * 22 * 1024
    t_copy = time_graph(lambda i: dsts[i % copies].copy_(bufs[i % copies]), args.calls, args.reps)
    return {
        "mb": nbytes / 1e6,
        "empty_us": t_empty * 1e6,
        "read_us": best[0] * 1e6,
        "read_block_words": best[1],
        "read_frac_copy": nbytes / best[0] / copy_bps,
        "streams_us": t_streams * 1e6,
        "streams_bytes": streams_bytes,
        "streams_frac_copy": streams_bytes / t_streams / copy_bps,
        "copy_us": t_copy * 1e6,
        "copy_frac_copy": 2 * nbytes / t_copy / copy_bps,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", default=",".join(str(s) for s in SIZES_MB))
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args()
    try:
        sizes_mb = [float(v) for v in args.sizes_mb.split(",")]
    except ValueError:
        sizes_mb = []
    if not sizes_mb or not all(0.016 <= mb <= 4096 for mb in sizes_mb):
        ap.error(f"--sizes-mb {args.sizes_mb!r}: expected MB values from 0.016 to 4096")
    if args.calls < 1 or args.reps < 1:
        ap.error(f"--calls {args.calls}, --reps {args.reps}: expected at least 1 each")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure", file=sys.stderr)
        return 2
    _, empty_kernel, _, _ = read_kernels()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2, sms = int(props.L2_cache_size), int(props.multi_processor_count)
    copy_bps = copy_bandwidth(args.reps)
    print(
        f"# {props.name}: {sms} SMs, L2 {l2 >> 20} MiB, device-to-device copy "
        f"{copy_bps / 1e9:.0f} GB/s; us per call, read bytes / s as % of copy"
    )
    sink = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")

    def empty(i: int) -> None:
        empty_kernel[(sms,)](sink)

    t_empty = time_graph(empty, args.calls, args.reps)
    print(f"empty kernel ({sms} programs): {t_empty * 1e6:.2f} us")
    rows = []
    for mb in sizes_mb:
        row = measure_size(int(mb * 1e6) // 16 * 16, l2, copy_bps, t_empty, args)
        rows.append(row)
        print(
            f"{row['mb']:6.2f} MB: read {row['read_us']:6.2f} us "
            f"({100 * row['read_frac_copy']:3.0f}% of copy, "
            f"{row['read_block_words']} words per program)  "
            f"streams {row['streams_us']:6.2f} us ({100 * row['streams_frac_copy']:3.0f}%)  "
            f"copy_ {row['copy_us']:6.2f} us ({100 * row['copy_frac_copy']:3.0f}%)",
            flush=True,
        )
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": props.name,
                    "copy_gbps": copy_bps / 1e9,
                    "sms": sms,
                    "l2_bytes": l2,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
