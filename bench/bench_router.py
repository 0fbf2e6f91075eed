"""Benchmark: GPT-OSS-20B's router logits, our kernel against vLLM's own path (F.linear, cuBLAS).

vLLM runs the router (``MLPBlock.router``, a bf16 ``ReplicatedLinear`` [32, 2880] with bias) as
``F.linear``; the bnb_moe plugin runs ``torch.ops.gptoss_3090.moe_router``. Both are timed here
on the same card in the same run, as a decode step runs them: CUDA-graph replay of back-to-back
calls, each on the next of enough distinct weight copies to exceed 4x the L2 (24 layers' routers
would stay in L2 between steps, but a real step streams ~12 GB of other weights through it).

Usage: ``python3 bench/bench_router.py [--tokens 1,2,4,8,16,32,64] [--out router.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_nf4_linear import git_commit, time_graph  # noqa: E402

EXPERTS, HIDDEN = 32, 2880


def tokens_list(text: str) -> list[int]:
    """``--tokens``: comma-separated positive token counts."""
    out = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) <= 0:
            raise SystemExit(f"--tokens: expected positive integers, found {item!r}")
        out.append(int(item))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64", help="token counts")
    ap.add_argument("--calls", type=int, default=200, help="calls per CUDA graph")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays (median)")
    ap.add_argument("--out", help="write results as JSON here")
    args = ap.parse_args()
    tokens = tokens_list(args.tokens)
    if not torch.cuda.is_available():
        print("bench_router: needs a CUDA GPU", file=sys.stderr)
        return 2
    from gptoss_3090 import moe as M

    props = torch.cuda.get_device_properties(0)
    row_bytes = EXPERTS * HIDDEN * 2
    copies = max(2, math.ceil(4 * props.L2_cache_size / row_bytes) + 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(copies, EXPERTS, HIDDEN, device="cuda", generator=g) / HIDDEN**0.5).to(
        torch.bfloat16
    )
    b = torch.randn(copies, EXPERTS, device="cuda", generator=g).to(torch.bfloat16)
    print(
        f"# {props.name}: router [{EXPERTS}, {HIDDEN}] bf16 + bias, {copies} weight copies "
        f"({copies * row_bytes / 1e6:.0f} MB), commit {git_commit()}"
    )
    print(f"{'T':>5} {'ours us':>9} {'F.linear us':>12} {'speedup':>8} {'rel err':>9}")
    rows = []
    for t in tokens:
        x = torch.randn(t, HIDDEN, device="cuda", generator=g).to(torch.bfloat16)
        out = M.router_logits(x, w[0], b[0])
        ref = x.float() @ w[0].float().t() + b[0].float()
        err = float((out.float() - ref).norm() / ref.norm())
        ours = time_graph(
            lambda i, x=x: M.router_logits(x, w[i % copies], b[i % copies]), args.calls, args.reps
        )
        base = time_graph(
            lambda i, x=x: torch.nn.functional.linear(x, w[i % copies], b[i % copies]),
            args.calls,
            args.reps,
        )
        rows.append({"tokens": t, "ours_us": ours * 1e6, "f_linear_us": base * 1e6, "rel_err": err})
        print(f"{t:>5} {ours * 1e6:>9.2f} {base * 1e6:>12.2f} {base / ours:>7.2f}x {err:>9.1e}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "benchmark": "router",
                    "card": props.name,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"
                    ),
                    "commit": git_commit(),
                    "command": " ".join([sys.executable, *sys.argv]),
                    "torch": torch.__version__,
                    "kernel_max_tokens": M.ROUTER_KERNEL_MAX_TOKENS,
                    "results": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
