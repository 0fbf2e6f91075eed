"""Kernel variants, quickly: times the streaming NF4 linear and the MoE layer and saves their
outputs, so that two kernel folders (``GPTOSS_3090_KERNEL_DIR``) can be compared for speed and
bit for bit in one short GPU call.

Unlike ``bench_nf4_linear.py`` and ``bench_moe.py`` it does not call ``runtime.warmup()``: only
the kernel families it launches get compiled, which keeps a folder's first run to seconds
instead of minutes (session 17, calls 7 and 8). Run one process per folder and round:

    GPTOSS_3090_KERNEL_DIR=/tmp/kbase python3 bench/variant_check.py run base --out DIR
    GPTOSS_3090_KERNEL_DIR=/tmp/knew  python3 bench/variant_check.py run new --out DIR
    python3 bench/variant_check.py compare DIR/base.pt DIR/new.pt

``bash bench/gpu_kernels.sh variantcheck`` does that for every folder in ``.gpu-variants/``
against the tree's own kernels, in two alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_linear(tag: str, ms: list[int], path: str, out: dict[str, torch.Tensor]) -> None:
    """vLLM's fused q/k/v (three parts) and o projection, rotating weight copies past 4x L2."""
    from bench_nf4_linear import nf4_copies, time_graph
    from gptoss_3090 import ops

    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    for name, rows, k in (("qkv", [4096, 512, 512], 2880), ("o", [2880], 4096)):
        parts = [
            ops.nf4_quantize(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02)
            for n in rows
        ]
        copies = [nf4_copies(p, l2) for p in parts]
        ncop = min(len(c) for c in copies)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            out[f"linear_{name}_m{m}"] = ops.nf4_linear(x, parts, path=path).cpu()

            def call(i: int, x: torch.Tensor = x, copies: list = copies, ncop: int = ncop):
                return ops.nf4_linear(x, [c[i % ncop] for c in copies], path=path)

            t = time_graph(call, 40, 9)
            print(f"{tag:10} linear {name:4} M={m:3d}: {t * 1e6:8.2f} us", flush=True)


def run_moe(tag: str, tokens: list[int], layers_n: int, out: dict[str, torch.Tensor]) -> None:
    """MoE layers at GPT-OSS-20B shapes (random NF4 experts, chunk-major as served), routing
    given, captured in a CUDA graph over ``layers_n`` distinct layers."""
    import bench_moe as B
    from gptoss_3090 import moe as M

    dev = torch.device("cuda", torch.cuda.current_device())
    layers = []
    for li in range(layers_n):
        gu = B.random_nf4(B.E, 2 * B.I, B.H, 10 * li + 1, dev)
        dn = B.random_nf4(B.E, B.H, B.I, 10 * li + 2, dev)
        w = M.MoeLayerWeights(gu, dn, M._dynamic_map_signed().to(dev), top_k=B.TOPK)
        w.chunk_major(in_place=True)
        layers.append(w)
    for t in tokens:
        o = B.Ours(layers, t, "auto", graph=True)
        o()
        torch.cuda.synchronize()
        tw, ti = o.routes[0]
        out[f"moe_t{t}"] = M.moe(o.x, layers[0], topk_ids=ti, topk_weights=tw).cpu()
        ms = B.time_fn(o, 20)
        print(f"{tag:10} moe    T={t:4d}: {ms * 1e3 / layers_n:8.2f} us per layer", flush=True)
        del o


def compare(base: str, other: str) -> int:
    """Prints, per case, whether ``other``'s output equals ``base``'s bit for bit (else the
    largest difference); returns 1 if any differs."""
    a = torch.load(base)
    b = torch.load(other)
    bad = 0
    for key in sorted(a):
        if key not in b:
            print(f"{key}: missing in {other}")
            bad = 1
            continue
        same = torch.equal(a[key], b[key])
        diff = "" if same else f" (max |diff| {(a[key].float() - b[key].float()).abs().max():.3e})"
        print(f"{key}: {'bit-identical' if same else 'DIFFERS'}{diff}")
        bad |= 0 if same else 1
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="time and save the outputs of the current kernels")
    r.add_argument("tag", help="name of this run (the output file is OUT/TAG.pt)")
    r.add_argument("--out", required=True, help="folder for TAG.pt")
    r.add_argument("--parts", default="linear,moe", help="linear, moe or both")
    r.add_argument("--linear-ms", default="1,4,16", help="M list of the linear")
    r.add_argument("--linear-path", default="stream", help="nf4_linear path (stream, wide, ...)")
    r.add_argument("--moe-tokens", default="1,4,16,64", help="token counts of the MoE layer")
    r.add_argument("--moe-layers", type=int, default=12, help="distinct MoE layers cycled")
    c = sub.add_parser("compare", help="bit-for-bit comparison of two runs")
    c.add_argument("base")
    c.add_argument("other")
    args = ap.parse_args()
    if args.cmd == "compare":
        return compare(args.base, args.other)
    if not torch.cuda.is_available():
        print("variant_check.py needs a CUDA GPU", file=sys.stderr)
        return 2
    parts = {p for p in args.parts.split(",") if p}
    unknown = parts - {"linear", "moe"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; expected linear and/or moe")
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    if "linear" in parts:
        ms = [int(v) for v in args.linear_ms.split(",") if v]
        run_linear(args.tag, ms, args.linear_path, out)
    if "moe" in parts:
        tokens = [int(v) for v in args.moe_tokens.split(",") if v]
        run_moe(args.tag, tokens, args.moe_layers, out)
    os.makedirs(args.out, exist_ok=True)
    torch.save(out, os.path.join(args.out, f"{args.tag}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
