"""Where the NF4 linear's time goes, kernel by kernel (torch.profiler / CUPTI, no ncu needed).

For each shape and M, replays a CUDA graph of back-to-back ``ops.nf4_linear`` calls that rotate
over enough weight copies to exceed 4x the L2 cache (as ``bench_nf4_linear.py`` times them),
under the profiler, and prints each kernel's mean duration per call (the main kernel and, after
a K split, the split-K reduce), next to the wall time per call from CUDA events: the difference
is the gap between kernels inside the graph.

    python bench/linear_kernel_times.py --shapes 4096+512+512x2880,2880x4096 --ms 33,64
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_nf4_linear as B  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096+512+512x2880,2880x4096,5760x2880")
    ap.add_argument("--ms", default="33,64")
    ap.add_argument("--calls", type=int, default=40, help="calls per graph")
    ap.add_argument("--replays", type=int, default=10, help="profiled graph replays")
    ap.add_argument("--out", default=None, help="write JSON rows here")
    args = ap.parse_args()
    shapes = [B.parse_shape(t) for t in args.shapes.split(",")]
    ms = B.parse_counts(args.ms, "--ms")
    if args.calls < 1 or args.replays < 1:
        raise SystemExit("--calls and --replays: expected at least 1")
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    from gptoss_3090 import ops
    from torch.profiler import ProfilerActivity, profile

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for n, k, parts in shapes:
        text = "+".join(map(str, parts)) + f"x{k}" if parts else f"{n}x{k}"
        segs = [
            ops.nf4_quantize(torch.randn(r, k, dtype=torch.bfloat16, device="cuda") * 0.02)
            for r in (parts or [n])
        ]
        # one list of segments per copy (vLLM's q/k/v: three separately quantized tensors)
        copies = [list(c) for c in zip(*[B.nf4_copies(sg, l2) for sg in segs], strict=False)]
        if not parts:
            copies = [c[0] for c in copies]
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")

            def one(i: int, x: torch.Tensor = x, copies: list = copies) -> torch.Tensor:
                return ops.nf4_linear(x, copies[i % len(copies)])

            wall = B.time_graph(one, args.calls, 5)
            graph = torch.cuda.CUDAGraph()
            one(0)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                for i in range(args.calls):
                    one(i)
            graph.replay()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.replays):
                    graph.replay()
                torch.cuda.synchronize()
            per: dict[str, float] = defaultdict(float)
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    per[ev.name] += ev.device_time_total
            calls = args.calls * args.replays
            kernels = {name: us / calls for name, us in per.items()}
            row = {"shape": text, "M": m, "wall_us": wall * 1e6, "kernels_us": kernels}
            rows.append(row)
            busy = sum(kernels.values())
            print(
                f"{text:>18} M={m:<3} wall {wall * 1e6:6.1f} us | kernels {busy:6.1f} us | "
                + ", ".join(f"{name.split('(')[0]} {us:.1f}" for name, us in kernels.items())
            )
    if args.out:
        B.write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
