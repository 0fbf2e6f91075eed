"""Accuracy of the NF4 linear's paths against dequantize-then-matmul in fp32.

For each shape, M, activation dtype and input kind (gaussian, or all positive as after SwiGLU,
where a biased rounding of the weights grows with K), prints the relative error
||y - ref|| / ||ref|| of each path, where ref = x @ dequantize(W)^T computed in fp32 and
dequantize(W) is the bf16/fp16 weight bitsandbytes would give. The bf16-rounded reference
itself (ref rounded to the dtype) is the floor any kernel can reach.

    python bench/linear_accuracy.py --shapes 5120x2880,2880x4096 --ms 1,16,64 --paths auto,wide
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_nf4_linear as B  # noqa: E402


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="5120x2880,2880x4096", help="NxK list (one tensor each)")
    ap.add_argument("--ms", default="1,16,33,64", help="token counts")
    ap.add_argument("--paths", default="auto,wide,stream,mma,dequant_matmul", help="linear paths")
    ap.add_argument("--dtypes", default="bf16,f16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write JSON rows here")
    args = ap.parse_args()
    from gptoss_3090 import ops

    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16}
    shapes = [B.parse_shape(t) for t in args.shapes.split(",")]
    if any(parts for _, _, parts in shapes):
        raise SystemExit("--shapes: one NxK tensor per shape here (no A+B+C segments)")
    ms = B.parse_counts(args.ms, "--ms")
    paths, dtypes_asked = args.paths.split(","), args.dtypes.split(",")
    for name, allowed in ((paths, ops.LINEAR_PATHS), (dtypes_asked, tuple(dtypes))):
        bad = [v for v in name if v not in allowed]
        if bad:
            raise SystemExit(f"unknown value(s) {bad}; expected some of {', '.join(allowed)}")
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    print(
        f"{'shape':>10} {'dtype':>5} {'input':>8} {'M':>3} | floor    | "
        + " | ".join(f"{p:>14}" for p in paths)
    )
    for n, k, _ in shapes:
        shape = f"{n}x{k}"
        for dname in dtypes_asked:
            dtype = dtypes[dname]
            g = torch.Generator().manual_seed(args.seed)
            w = ops.nf4_quantize((torch.randn(n, k, generator=g) * 0.02).to(dtype).cuda())
            w_deq = w.dequantize().float()
            for kind in ("gaussian", "positive"):
                for m in ms:
                    x = torch.randn(m, k, generator=g)
                    if kind == "positive":
                        x = x.abs()
                    x = x.to(dtype).cuda()
                    ref = x.float() @ w_deq.t()
                    row = {
                        "N": n,
                        "K": k,
                        "M": m,
                        "dtype": dname,
                        "input": kind,
                        "floor": rel_err(ref.to(dtype), ref),
                    }
                    for path in paths:
                        try:
                            row[path] = rel_err(ops.nf4_linear(x, w, path=path), ref)
                        except ValueError as e:  # the path does not serve this M
                            if "path serves" not in str(e):
                                raise
                            row[path] = float("nan")
                    rows.append(row)
                    print(
                        f"{shape:>10} {dname:>5} {kind:>8} {m:>3} | {row['floor']:.2e} | "
                        + " | ".join(f"{row[p]:14.2e}" for p in paths)
                    )
    if args.out:
        B.write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
