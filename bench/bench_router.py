"""Benchmark: GPT-OSS-20B's router logits, our kernel against vLLM's own path (F.linear, cuBLAS).

vLLM runs the router (``MLPBlock.router``, a bf16 ``ReplicatedLinear`` [32, 2880] with bias) as
``F.linear``; the bnb_moe plugin runs ``torch.ops.gptoss_3090.moe_router``. Both are timed here
on the same card in the same run, as a decode step runs them: CUDA-graph replay of back-to-back
calls, each on the next of enough distinct weight copies to exceed 4x the L2 (24 layers' routers
would stay in L2 between steps, but a real step streams ~12 GB of other weights through it).

With routing (``--top-k 4``, the default) it also times the router that routes too
(``torch.ops.gptoss_3090.moe_router_topk``, the plugin's ``GPTOSS_3090_MOE_ROUTING=router``):
on sm_90 in one launch of thread-block clusters, and (``2 launches``) with
``GPTOSS_3090_ROUTER_TOPK_CLUSTER=off``, the logits launch and then a routing launch; and,
where vLLM imports, the two ways a step gets its routing without it: vLLM's top-k launch
(``fused_topk``, one kernel) after F.linear (stock) and after our logits kernel (the plugin's
default).

Usage: ``python3 bench/bench_router.py [--tokens 1,2,4,8,16,32,64] [--top-k 4] [--out r.json]``
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
    ap.add_argument("--top-k", type=int, default=4, help="experts per token (0: logits only)")
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
    vllm_topk = _vllm_fused_topk() if args.top_k else None
    k = args.top_k
    head = f"{'T':>5} {'ours us':>9} {'F.linear us':>12} {'speedup':>8} {'rel err':>9}"
    if k:
        head += f" {'ours+topk us':>13} {'2 launches':>11}"
    if vllm_topk is not None:
        head += f" {'ours,vllm topk':>15} {'stock us':>9} {'x stock':>8}"
    print(head if vllm_topk is not None or not k else head + "   (vLLM not importable)")
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
        row = {"tokens": t, "ours_us": ours * 1e6, "f_linear_us": base * 1e6, "rel_err": err}
        line = f"{t:>5} {ours * 1e6:>9.2f} {base * 1e6:>12.2f} {base / ours:>7.2f}x {err:>9.1e}"
        if k:
            routed = time_graph(
                lambda i, x=x: M.router_topk(x, w[i % copies], b[i % copies], k),
                args.calls,
                args.reps,
            )
            before = os.environ.get("GPTOSS_3090_ROUTER_TOPK_CLUSTER")
            os.environ["GPTOSS_3090_ROUTER_TOPK_CLUSTER"] = "off"  # read at capture
            try:
                split = time_graph(
                    lambda i, x=x: M.router_topk(x, w[i % copies], b[i % copies], k),
                    args.calls,
                    args.reps,
                )
            finally:
                if before is None:
                    os.environ.pop("GPTOSS_3090_ROUTER_TOPK_CLUSTER")
                else:
                    os.environ["GPTOSS_3090_ROUTER_TOPK_CLUSTER"] = before
            row["ours_topk_us"] = routed * 1e6
            row["ours_topk_two_launches_us"] = split * 1e6
            line += f" {routed * 1e6:>13.2f} {split * 1e6:>11.2f}"
        if vllm_topk is not None:

            def logits_then_topk(i: int, x: torch.Tensor = x, ours: bool = True) -> None:
                lin = M.router_logits if ours else torch.nn.functional.linear
                logits = lin(x, w[i % copies], b[i % copies])
                vllm_topk(x, logits, k, True)

            two = time_graph(logits_then_topk, args.calls, args.reps)
            stock = time_graph(
                lambda i: logits_then_topk(i, ours=False), args.calls, args.reps
            )
            row["ours_logits_vllm_topk_us"] = two * 1e6
            row["stock_us"] = stock * 1e6
            line += f" {two * 1e6:>15.2f} {stock * 1e6:>9.2f} {stock / routed:>7.2f}x"
        rows.append(row)
        print(line)
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
                    "top_k": k,
                    "vllm_topk": vllm_topk is not None,
                    "results": rows,
                },
                f,
                indent=2,
            )
    return 0


def _vllm_fused_topk():  # noqa: ANN202 - vLLM's function, or None
    """vLLM 0.26's ``fused_topk`` (softmax, top-k, renormalize: GPT-OSS's routing), or None
    where vLLM does not import (the kernel-only GPU host)."""
    try:
        from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk
    except Exception:  # noqa: BLE001 - any import failure means no baseline
        return None
    return fused_topk


if __name__ == "__main__":
    sys.exit(main())
