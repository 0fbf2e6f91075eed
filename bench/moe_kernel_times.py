"""Where a MoE layer's time goes, kernel by kernel (torch.profiler / CUPTI, no ncu needed).

Replays the same CUDA graph as ``bench_moe.py`` (24 layers of distinct random NF4 weights,
routing given, chunk-major experts unless ``--weights-order rows``) under the profiler and prints,
per token count, each kernel's mean duration per layer, the weight bytes it reads per second
(the distinct experts the routing touches: gate_up bytes for ``*_up*`` kernels, down bytes for
``*_down*``), and the layer's wall time from CUDA events, so that the gap between kernels
(launch latency inside the graph, tails) shows too.

Usage::

    PYTHONPATH=python python3 bench/moe_kernel_times.py --tokens 1,4,16,64 --out times.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe as B  # noqa: E402
from gptoss_3090 import moe as M  # noqa: E402


def kernel_times(ours: B.Ours, replays: int) -> dict[str, tuple[int, float]]:
    """``{kernel: (launches per replay, total us per replay)}`` over ``replays`` graph replays."""
    from torch.profiler import ProfilerActivity, profile

    ours()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            ours()
        torch.cuda.synchronize()
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count[ev.name] += 1
        total[ev.name] += ev.time_range.elapsed_us()
    return {k: (count[k] // replays, total[k] / replays) for k in count}


def touched_bytes(ours: B.Ours, proj: str) -> int:
    """Bytes of ``proj`` ("gate_up" or "down") of the distinct experts the layers touch (every
    layer has the same shapes)."""
    t: M.Nf4Experts = getattr(ours.layers[0], proj)
    per_expert = sum(
        a[0].numel() * a.element_size()
        for a in (t.packed, t.absmax, t.nested_absmax, t.nested_offset)
    )
    return per_expert * ours.distinct_experts()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--tuning", default="auto")
    ap.add_argument("--weights-order", choices=("rows", "chunks"), default="chunks")
    ap.add_argument("--out", help="JSON file for the table")
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    layers = []
    for li in range(args.layers):
        gu = B.random_nf4(B.E, 2 * B.I, B.H, 10 * li + 1, dev)
        dn = B.random_nf4(B.E, B.H, B.I, 10 * li + 2, dev)
        w = M.MoeLayerWeights(gu, dn, M._dynamic_map_signed().to(dev), top_k=B.TOPK)
        layers.append(w.chunk_major(in_place=True) if args.weights_order == "chunks" else w)
    copy_gbs = B.copy_bandwidth(dev)
    print(
        f"# {torch.cuda.get_device_name(dev)}; copy {copy_gbs:.0f} GB/s; {args.layers} layers; "
        f"weights {args.weights_order}; tuning {args.tuning}"
    )
    rows = []
    for t in (int(v) for v in args.tokens.split(",") if v):
        ours = B.Ours(layers, t, args.tuning, graph=True)
        wall_us = B.time_fn(ours, 20) * 1e3 / args.layers
        per_proj = {"up": touched_bytes(ours, "gate_up"), "down": touched_bytes(ours, "down")}
        times = kernel_times(ours, args.replays)
        busy = sum(us for _, us in times.values()) / args.layers
        print(
            f"T={t}: {wall_us:.1f} us per layer, kernels busy {busy:.1f} us "
            f"({wall_us - busy:.1f} us between kernels)"
        )
        for name, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
            per_layer = us / args.layers
            proj = "up" if "_up" in name else "down" if "_down" in name else None
            gbs = per_proj[proj] / args.layers / (per_layer * 1e3) if proj else None
            share = f"{gbs:7.0f} GB/s {gbs / copy_gbs * 100:5.1f}% copy" if gbs else ""
            print(f"    {name[:60]:60s} x{n // args.layers:<2d} {per_layer:8.2f} us  {share}")
            rows.append(
                {
                    "tokens": t,
                    "kernel": name,
                    "launches_per_layer": n / args.layers,
                    "us_per_layer": per_layer,
                    "gbs": gbs,
                    "wall_us_per_layer": wall_us,
                }
            )
    if args.out:
        meta = {
            "card": torch.cuda.get_device_name(dev),
            "copy_gbs": copy_gbs,
            "weights_order": args.weights_order,
            "tuning": args.tuning,
            "commit": os.environ.get("GPTOSS_3090_GIT_COMMIT") or B._commit(),
            "command": " ".join(sys.argv),
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
