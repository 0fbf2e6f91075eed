"""Sweep: the NF4 linear's tensor-core tiles at medium M, against cuBLAS bf16 in the same process.

For each shape and M, times every forced tile path (``mma_s``, ``mma_m``, ``mma_l``) and
cuBLAS on the dequantized weight (CUDA-graph replay over >4x L2 of weight copies, as
bench_nf4_linear.py). The K split comes from the runtime, or from ``GPTOSS_3090_NF4_SPLITS``
(read once per process), so a split sweep runs this script once per value:

    for s in "" 1 2 4 8; do GPTOSS_3090_NF4_SPLITS=$s python bench/sweep_nf4_mma.py; done

``--paths`` also takes ``stream`` (the streaming kernel, M <= 32; its K split from the
runtime or ``GPTOSS_3090_MOE_STREAM_KS``, reported in the ``splits`` column) and
``dequant_matmul``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_nf4_linear import nf4_copies, time_graph  # noqa: E402


def sweep_shape(n: int, k: int, l2: int, splits: str, args: argparse.Namespace) -> None:
    """Every M and forced path of one [N, K] weight; one line each."""
    from gptoss_3090 import _native, ops, runtime

    dev = torch.cuda.current_device()

    def auto_wide(m: int) -> bool:
        wide_max = getattr(ops, "WIDE_MAX_M", 0)  # older wheels (baselines) have no wide path
        return ops.STREAM_MAX_M < m <= wide_max and runtime.use_wide_linear(dev)

    base = ops.nf4_quantize(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02)
    ws = nf4_copies(base, l2)
    wd = base.dequantize()
    wds = [wd] + [wd.clone() for _ in range(max(2, math.ceil(4 * l2 / wd.nbytes) + 1) - 1)]
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda") * 0.1
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")

        def cublas(i: int, x: torch.Tensor = x) -> torch.Tensor:
            return torch.nn.functional.linear(x, wds[i % len(wds)], bias)

        t_cublas = time_graph(cublas, args.calls, args.reps)
        ref = torch.nn.functional.linear(x.float(), wd.float(), bias.float())
        for path in args.paths.split(","):
            if path in ("stream", "dequant_matmul"):  # no tensor-core plan to report
                plan = {"entry": path, "splits": 1}
            elif path == "auto" and auto_wide(m):  # what ops' auto runs (the runtime's plans
                plan = _native.cuda_nf4_linear_plan(dev, m, n, k, "wide")  # do not know it)
            elif path == "auto" and runtime.use_dequant_matmul(m, dev):
                plan = {"entry": "dequant_matmul", "splits": 1}
            else:
                plan = _native.cuda_nf4_linear_plan(dev, m, n, k, path)
            y = ops.nf4_linear(x, base, bias, path=path).float()
            err = ((y - ref).norm() / ref.norm()).item()

            def ours(i: int, x: torch.Tensor = x, path: str = path) -> torch.Tensor:
                return ops.nf4_linear(x, ws[i % len(ws)], bias, path=path)

            t = time_graph(ours, args.calls, args.reps)
            print(
                f"{n}x{k} M={m:4d} splits={splits:>4} {path:6} {plan['entry']:>20} "
                f"z{plan['splits']}: {t * 1e6:7.1f} us  cuBLAS {t_cublas * 1e6:6.1f} us  "
                f"{t_cublas / t:5.2f}x  rel err {err:.1e}",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="5120x2880,2880x4096", help="NxK list")
    ap.add_argument("--ms", default="32,64,128", help="M list")
    ap.add_argument("--paths", default="auto,mma_s,mma_m,mma_l", help="forced paths")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    from gptoss_3090 import runtime

    torch.manual_seed(0)
    runtime.warmup()
    l2 = int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
    splits = os.environ.get("GPTOSS_3090_NF4_SPLITS", "") or "auto"
    if os.environ.get("GPTOSS_3090_MOE_STREAM_KS"):
        splits += "/ks" + os.environ["GPTOSS_3090_MOE_STREAM_KS"]
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        sweep_shape(n, k, l2, splits, args)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
