"""Benchmark of the fused NF4 MoE op at GPT-OSS-20B shapes (H = I = 2880, E = 32, top-4).

Cycles through ``--layers`` layers of distinct random NF4 weights (random packed codes with
plausible nested absmax: same bytes and FLOPs as the real checkpoint), as a forward pass does, so
L2 cannot hold them. For each token count it reports the time per layer (CUDA events, median;
small token counts replay a CUDA graph of all layers), for decode the bytes of distinct expert
weights touched per second against the device-to-device copy bandwidth measured in the same run,
and TFLOP/s. Baselines in the same run: vLLM 0.26's Marlin MXFP4 MoE (if vllm imports) and a
bf16 PyTorch reference (per-expert matmuls on dequantized weights). Both the device's own tuning
and forced sm_86 tuning are measured.

Routing (``--routing``): ``given`` (default) passes each layer's precomputed top-k ids and weights,
as vLLM serves the model (its ``fused_topk`` routes, then our ``apply``) and as the Marlin baseline
gets them; ``logits`` passes the router logits, so our kernels route themselves (what
``GPTOSS_3090_MOE_ROUTING=internal`` does in vLLM). Results before session 5's commits used
``logits``.

Router logits are standard normal per token and expert, so every expert is equally popular.
``--routing-skew S`` adds ``S`` times a fixed per-layer popularity (standard normal per expert,
the same for our op, Marlin and the bf16 reference), so a batch's pairs pile up on some experts
as a real model's do: in vLLM, our 20b synthetic checkpoint touched 31.5 of 32 experts per layer
at 64 tokens (session 20), which S = 0.35 reproduces; S = 0 is the uniform default. The
table's ``max pairs`` column is the mean over layers of the busiest expert's routed pairs.

Usage::

    PYTHONPATH=python python3 bench/bench_moe.py --out bench/results/moe_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from gptoss_3090 import moe as M

H = I = 2880  # noqa: E741 - the paper's names
E = 32
TOPK = 4
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]


def random_nf4(e: int, n: int, k: int, seed: int, dev: torch.device) -> M.Nf4Experts:
    """Random NF4 experts: uniform codes, nested absmax codes around a plausible 0.05 scale."""
    g = torch.Generator(device=dev).manual_seed(seed)
    packed = torch.randint(0, 256, (e, n * k // 2), dtype=torch.uint8, device=dev, generator=g)
    nb = n * k // 64
    nnb = (nb + 255) // 256
    # codes 128..255 of the signed dynamic map are >= 0; nested scale 0.03 + offset 0.05 keeps
    # absmax in [0.05, 0.08], about what GPT-OSS expert weights have.
    absmax = torch.randint(128, 256, (e, nb), dtype=torch.uint8, device=dev, generator=g)
    nabs = torch.full((e, nnb), 0.03, device=dev)
    noff = torch.full((e,), 0.05, device=dev)
    bias = torch.randn(e, n, device=dev, generator=g) * 0.05
    return M.Nf4Experts(packed, absmax, nabs, noff, bias, (e, n, k), True)


def expert_bytes(w: M.MoeLayerWeights) -> int:
    """Bytes of one expert's gate_up + down (packed + statistics)."""
    return w.layer_bytes() // w.experts


def time_fn(fn: Callable[[], Any], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_fn_clocked(fn: Callable[[], Any], iters: int) -> tuple[float, dict[str, Any]]:
    """:func:`time_fn` with the GPU's SM clock and power sampled meanwhile (gpu_clocks), so
    that a kernel's time can be set against the clock it ran at (an issue-bound kernel slows
    with it; vLLM's whole-model load may run the GPU at other clocks than this benchmark)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_clocks import ClockSampler

    with ClockSampler(period_s=0.01) as clocks:
        ms = time_fn(fn, iters)
    return ms, clocks.summary()


def copy_bandwidth(dev: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffers."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / ms / 1e6


def router_logits(
    tokens: int, n_layers: int, dev: torch.device, g: torch.Generator, skew: float = 0.0
) -> list[torch.Tensor]:
    """Each layer's router logits: standard normal noise from ``g`` (drawn as before the skew
    option existed, so ``skew = 0`` reproduces earlier runs' routing) plus ``skew`` times layer
    ``li``'s expert popularity (standard normal per expert, seeded by the layer only)."""
    out = []
    for li in range(n_layers):
        lg = torch.randn(tokens, E, device=dev, generator=g)
        if skew:
            pop = torch.randn(E, generator=torch.Generator().manual_seed(5000 + li))
            lg = lg + skew * pop.to(dev)
        out.append(lg)
    return out


def max_pairs(logits: list[torch.Tensor]) -> float:
    """Mean over layers of the busiest expert's routed (token, k) pairs."""
    most = [
        int(torch.bincount(torch.topk(lg, TOPK, dim=-1).indices.flatten(), minlength=E).max())
        for lg in logits
    ]
    return sum(most) / len(most)


def given_routes(logits: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's routing as vLLM hands it to a MoE method: top-k ids (int32) and the softmax
    over the k selected logits."""
    routes = []
    for lg in logits:
        vals, ids = torch.topk(lg, TOPK, dim=-1)
        routes.append((torch.softmax(vals, dim=-1), ids.to(torch.int32)))
    return routes


def foreign_kernel_us(dev: torch.device, calls: int, iters: int) -> float:
    """Microseconds per call of ``--foreign-kernel``'s torch kernel alone, ``calls`` of them
    replayed in one CUDA graph (bench_nf4_linear.time_graph)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_nf4_linear import time_graph

    pad = torch.zeros(1024, device=dev)
    return time_graph(lambda _i: pad.add_(1.0), calls, iters) * 1e6


class Ours:
    """Our op over ``layers`` layers; graph replay for small token counts."""

    def __init__(
        self,
        layers: list[M.MoeLayerWeights],
        tokens: int,
        tuning: str,
        graph: bool,
        routing: str = "given",
        skew: float = 0.0,
        foreign: bool = False,
    ):
        dev = layers[0].gate_up.packed.device
        self.layers = layers
        # --foreign-kernel: a torch kernel before each layer, as vLLM's top-k runs before our
        # op, so our first kernel cannot start early behind our previous layer's last one
        # (programmatic dependent launch) as it does back to back.
        self.foreign = torch.zeros(1024, device=dev) if foreign else None
        g = torch.Generator(device=dev).manual_seed(1000 + tokens)
        self.x = torch.randn(tokens, H, device=dev, generator=g).to(torch.bfloat16)
        self.logits = router_logits(tokens, len(layers), dev, g, skew)
        # given: the top-k vLLM's router would hand to apply() (softmax over the k selected).
        self.routes: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if routing == "given":
            self.routes = given_routes(self.logits)
        elif routing != "logits":
            raise ValueError(f"routing: expected 'given' or 'logits', found {routing!r}")
        self.ws = layers[0].workspace(tokens)
        self.tuning = tuning
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self.run()  # compile/load before capture
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.run()

    def run(self) -> None:
        if self.routes is not None:
            for w, (tw, ti) in zip(self.layers, self.routes, strict=True):
                if self.foreign is not None:
                    self.foreign.add_(1.0)
                M.moe(self.x, w, topk_ids=ti, topk_weights=tw, workspace=self.ws,
                      tuning=self.tuning)  # fmt: skip
            return
        for w, lg in zip(self.layers, self.logits, strict=True):
            if self.foreign is not None:
                self.foreign.add_(1.0)
            M.moe(self.x, w, router_logits=lg, workspace=self.ws, tuning=self.tuning)

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()

    def distinct_experts(self) -> int:
        """Sum over layers of the distinct experts the routing touches."""
        return sum(
            int(torch.unique(torch.topk(lg, TOPK, dim=-1).indices).numel()) for lg in self.logits
        )


def bf16_weights(layers: list[M.MoeLayerWeights]) -> list[tuple[torch.Tensor, ...]]:
    """Dequantized bf16 weights of a few layers for the bf16 baseline."""
    ws = []
    for w in layers:
        gu = torch.stack([w.gate_up.dequantize(e, torch.bfloat16) for e in range(E)])
        dn = torch.stack([w.down.dequantize(e, torch.bfloat16) for e in range(E)])
        ws.append((gu, w.gate_up.bias.bfloat16(), dn, w.down.bias.bfloat16()))
    return ws


def bf16_reference(
    ws: list[tuple[torch.Tensor, ...]], tokens: int, skew: float = 0.0
) -> Callable[[], None]:
    """bf16 PyTorch MoE (per-expert matmuls on dequantized weights) over a few layers."""
    dev = ws[0][0].device
    g = torch.Generator(device=dev).manual_seed(2000 + tokens)
    x = torch.randn(tokens, H, device=dev, generator=g).to(torch.bfloat16)
    logits = router_logits(tokens, len(ws), dev, g, skew)

    def run() -> None:
        for (gu, bgu, dn, bdn), lg in zip(ws, logits, strict=True):
            vals, ids = torch.topk(lg, TOPK, dim=-1)
            wts = torch.softmax(vals, dim=-1)
            y = torch.zeros_like(x)
            flat = ids.flatten()
            order = torch.argsort(flat)
            counts = torch.bincount(flat, minlength=E).tolist()
            start = 0
            for e, c in enumerate(counts):
                if c == 0:
                    continue
                sel = order[start : start + c]
                start += c
                tok = sel // TOPK
                a = x[tok] @ gu[e].T + bgu[e]
                gate = a[:, 0::2].clamp(max=7.0)
                up = a[:, 1::2].clamp(-7.0, 7.0)
                hh = (up + 1) * gate * torch.sigmoid(1.702 * gate)
                out = hh @ dn[e].T + bdn[e]
                y.index_add_(0, tok, out * wts.flatten()[sel, None].to(out.dtype))

    return run


def check_chunk_major(layers: list[M.MoeLayerWeights], dev: torch.device) -> None:
    """Reorders every layer's experts chunk-major in place (``MoeLayerWeights.chunk_major``, as
    the vLLM plugin does at load), then checks the first layer at 64 tokens (streaming
    kernels) and 2048 (tiled GEMMs) against the fp32 reference of the row-order weights
    (computed before the reorder)."""
    g = torch.Generator(device=dev).manual_seed(7)
    cases = []
    for t in (64, 2048):
        x = torch.randn(t, H, device=dev, generator=g).to(torch.bfloat16)
        (tw, ti), = given_routes([torch.randn(t, E, device=dev, generator=g)])
        want, _, _ = M.reference_forward(x, layers[0], topk_ids=ti, topk_weights=tw)
        cases.append((t, x, tw, ti, want))
    for w in layers:
        w.chunk_major(in_place=True)
    for t, x, tw, ti, want in cases:
        got = M.moe(x, layers[0], topk_ids=ti, topk_weights=tw).float()
        err = float((got - want).norm() / want.norm())
        print(f"chunk-major weights: rel err {err:.2e} vs the fp32 reference at {t} tokens")
        if not err <= 1e-2:
            raise SystemExit("chunk-major check failed")


def marlin_mxfp4(
    tokens: int,
    n_layers: int,
    dev: torch.device,
    graph_max_tokens: int = 128,
    skew: float = 0.0,
) -> Callable[[], None] | str:
    """vLLM 0.26 Marlin MXFP4 MoE on random MXFP4 weights, or the reason it cannot run."""
    try:
        # vLLM 0.26: experts/marlin_moe.py and the pure-function MXFP4 repack.
        from vllm.model_executor.layers.fused_moe.activation import (  # type: ignore
            MoEActivation,
        )
        from vllm.model_executor.layers.fused_moe.experts.marlin_moe import (  # type: ignore
            fused_marlin_moe,
        )
        from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import (  # type: ignore
            prepare_moe_mxfp4_layer_for_marlin,
        )
        from vllm.scalar_type import scalar_types  # type: ignore
    except Exception as exc:  # noqa: BLE001 - any import problem means "not available"
        return f"vllm not available ({type(exc).__name__}: {exc})"
    try:
        # Stock vLLM's Marlin MXFP4 backend pads GPT-OSS shapes (oracle/mxfp4.py,
        # mxfp4_round_up_hidden_size_and_intermediate_size): hidden to a multiple of 256 and
        # intermediate to a multiple of 128 on CUDA (2880 -> 3072 and 2944). Marlin rejects the
        # unpadded shapes, so the baseline runs exactly what stock serving runs.
        hp, ip = -(-H // 256) * 256, -(-I // 128) * 128
        layers = []
        for li in range(n_layers):
            g = torch.Generator(device=dev).manual_seed(3000 + li)
            lay = types.SimpleNamespace()
            # MXFP4: 2 values per byte, one e8m0 scale per 32 values (gpt_oss_mxfp4 layout).
            u8 = {"dtype": torch.uint8, "device": dev, "generator": g}
            lay.w13_weight = torch.randint(0, 256, (E, 2 * ip, hp // 2), **u8)
            lay.w2_weight = torch.randint(0, 256, (E, hp, ip // 2), **u8)
            lay.w13_weight_scale = torch.randint(118, 124, (E, 2 * ip, hp // 32), **u8)
            lay.w2_weight_scale = torch.randint(118, 124, (E, hp, ip // 32), **u8)
            lay.w13_bias = torch.zeros(E, 2 * ip, dtype=torch.bfloat16, device=dev)
            lay.w2_bias = torch.zeros(E, hp, dtype=torch.bfloat16, device=dev)
            lay.num_experts = E
            lay.params_dtype = torch.bfloat16
            names = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale",
                     "w13_bias", "w2_bias")  # fmt: skip
            packed = prepare_moe_mxfp4_layer_for_marlin(lay, *(getattr(lay, n) for n in names))
            for n, v in zip(names, packed, strict=True):
                setattr(lay, n, v)
            layers.append(lay)
        gg = torch.Generator(device=dev).manual_seed(4000 + tokens)
        x = torch.randn(tokens, hp, device=dev, generator=gg).to(torch.bfloat16)
        routes = given_routes(router_logits(tokens, len(layers), dev, gg, skew))

        def run() -> None:
            for lay, (tw, ti) in zip(layers, routes, strict=True):
                fused_marlin_moe(
                    x,
                    lay.w13_weight,
                    lay.w2_weight,
                    lay.w13_bias,
                    lay.w2_bias,
                    lay.w13_weight_scale,
                    lay.w2_weight_scale,
                    tw,
                    ti,
                    global_num_experts=E,
                    quant_type_id=scalar_types.float4_e2m1f.id,
                    activation=MoEActivation.SWIGLUOAI,
                )

        run()
        torch.cuda.synchronize()
        if tokens > graph_max_tokens:
            return run
        # Small token counts replay a CUDA graph, as ours does and as vLLM serves decode, so
        # neither side pays Python launch overhead.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph.replay
    except Exception as exc:  # noqa: BLE001 - report why the baseline could not run
        return f"vllm Marlin MXFP4 failed ({type(exc).__name__}: {exc})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--bf16-layers", type=int, default=4, help="layers for the bf16 baseline")
    ap.add_argument("--tunings", default="auto,sm86")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--graph-max-tokens", type=int, default=128)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse)")
    ap.add_argument(
        "--routing",
        choices=("given", "logits"),
        default="given",
        help="given: precomputed top-k, as vLLM serves and as Marlin gets it (default); "
        "logits: our kernels route from the router logits",
    )
    ap.add_argument(
        "--routing-skew",
        type=float,
        default=0.0,
        help="expert popularity added to the router logits (0: uniform; 0.35: as our 20b "
        "synthetic checkpoint routed in vLLM)",
    )
    ap.add_argument(
        "--foreign-kernel",
        action="store_true",
        help="run a small torch kernel before each layer (as vLLM's top-k precedes our op), so "
        "that our kernels cannot overlap the previous layer's through PDL; us/layer then "
        "includes it (its own time per call is printed)",
    )
    ap.add_argument(
        "--weights-order",
        choices=("rows", "chunks"),
        default="chunks",
        help="chunks: chunk-major experts, as the vLLM plugin serves them (default); rows: "
        "bitsandbytes' order as stored (needed by the older decode variants, "
        "GPTOSS_3090_MOE_DECODE=1/2)",
    )
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    tokens = [int(t) for t in args.tokens.split(",") if t]
    tunings = [t for t in args.tunings.split(",") if t]

    layers = []
    for li in range(args.layers):
        gu = random_nf4(E, 2 * I, H, 10 * li + 1, dev)
        dn = random_nf4(E, H, I, 10 * li + 2, dev)
        layers.append(M.MoeLayerWeights(gu, dn, M._dynamic_map_signed().to(dev), top_k=TOPK))
    if args.weights_order == "chunks":
        check_chunk_major(layers, dev)
    per_expert = expert_bytes(layers[0])
    copy_gbs = copy_bandwidth(dev)
    card = torch.cuda.get_device_name(dev)
    print(
        f"{card}: copy bandwidth {copy_gbs:.0f} GB/s (read+write); {args.layers} layers of "
        f"{layers[0].layer_bytes() / 1e6:.0f} MB NF4; {per_expert / 1e6:.2f} MB per expert; "
        f"routing {args.routing}, skew {args.routing_skew:g}"
    )
    foreign_us = None
    if args.foreign_kernel:
        foreign_us = foreign_kernel_us(dev, args.layers, args.iters)
        print(f"foreign kernel before each layer: {foreign_us:.2f} us per call alone (in us/layer)")

    bf16_ws = [] if args.no_baselines else bf16_weights(layers[: args.bf16_layers])
    rows: list[dict[str, Any]] = []
    hdr = (
        f"{'T':>5} {'tuning':>6} {'regime':>15} {'us/layer':>9} {'GB/s':>7} {'%copy':>6} "
        f"{'TFLOP/s':>8} {'bf16 us':>8} {'marlin us':>9} {'x bf16':>7} {'x marlin':>8} "
        f"{'max pairs':>9} {'SM MHz':>6}"
    )
    print(hdr)
    for t in tokens:
        flops = 2.0 * t * TOPK * (2 * I * H + H * I)
        base: dict[str, float | str | None] = {"bf16_us": None, "marlin_us": None}
        if not args.no_baselines:
            ref = bf16_reference(bf16_ws, t, args.routing_skew)
            base["bf16_us"] = time_fn(ref, max(3, args.iters // 4)) / len(bf16_ws) * 1e3
            mar = marlin_mxfp4(
                t, min(args.layers, 8), dev, args.graph_max_tokens, args.routing_skew
            )
            if isinstance(mar, str):
                base["marlin_us"] = None
                base["marlin_note"] = mar
            else:
                ms, base["marlin_clocks"] = time_fn_clocked(mar, args.iters)
                base["marlin_us"] = ms / min(args.layers, 8) * 1e3
        for tuning in tunings:
            ours = Ours(
                layers,
                t,
                tuning,
                graph=t <= args.graph_max_tokens,
                routing=args.routing,
                skew=args.routing_skew,
                foreign=args.foreign_kernel,
            )
            ms, clocks = time_fn_clocked(ours, args.iters)
            us = ms / len(layers) * 1e3
            touched = ours.distinct_experts() * per_expert
            gbs = touched / (ms * 1e-3) / 1e9
            regime = M.moe_regime(t, TOPK, E, tuning if tuning != "auto" else _auto_tuning(dev))
            row = {
                "tokens": t,
                "tuning": tuning,
                "routing": args.routing,
                "routing_skew": args.routing_skew,
                "max_pairs": max_pairs(ours.logits),
                "regime": regime,
                "us_per_layer": us,
                "touched_GBps": gbs,
                "pct_copy": 100 * gbs / copy_gbs,
                "tflops": flops / (us * 1e-6) / 1e12,
                "clocks": clocks,
                **base,
            }
            rows.append(row)
            bf = base.get("bf16_us")
            mr = base.get("marlin_us")
            print(
                f"{t:>5} {tuning:>6} {regime:>15} {us:>9.1f} {gbs:>7.0f} {row['pct_copy']:>6.1f} "
                f"{row['tflops']:>8.1f} {_f(bf):>8} {_f(mr):>9} "
                f"{_x(bf, us):>7} {_x(mr, us):>8} {row['max_pairs']:>9.1f} "
                f"{clocks.get('sm_mhz_median', '-'):>6}"
            )
            del ours
            torch.cuda.empty_cache()
        if base.get("marlin_note") and t == tokens[0]:
            print(f"  marlin: {base['marlin_note']}")
    result = {
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "commit": args.commit or _commit(),
        "command": " ".join([sys.executable, *sys.argv]),
        "copy_GBps": copy_gbs,
        "layers": args.layers,
        "routing": args.routing,
        "routing_skew": args.routing_skew,
        "foreign_kernel_us": foreign_us,
        "expert_bytes": per_expert,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


def _auto_tuning(dev: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(dev)
    forced = M._native().forced_tuning()
    if forced:
        return str(forced)
    if (major, minor) in ((8, 6), (8, 9)) or major >= 10:
        return "sm86"
    return "sm90" if major == 9 else "sm80"


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def _x(base: Any, ours: float) -> str:
    return "-" if base is None else f"{base / ours:.2f}x"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - no git in the benchmark environment
        return "unknown"


if __name__ == "__main__":
    main()
