"""Runs our ops many times on fixed inputs and checks that every output is bit-identical to the
first: a race (a launch reading before its producer finished, a counter reset too early) shows
as a run that differs.

Why: in session 30's sitting (H200) one vLLM engine of eight gave other greedy tokens than an
engine with the same setting, from a prefill on. A random-weight model turns the smallest
numeric difference into other tokens, so a rare race is the likely cause; this looks for it op
by op, at the shapes vLLM runs (20b MoE layers chunk-major, the q/k/v and o projections, the
paged attention's decode and prefill), eagerly and in CUDA-graph replays, with a small torch
kernel between the calls so that the launches do not always line up the same way.

    PYTHONPATH=python python3 bench/determinism_stress.py --runs 200 --out res/determinism.json

Prints one row per case: runs, runs that differ from the first, and the largest difference.
Exit status 1 if any case differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gptoss_3090.moe import MoeLayerWeights
    from gptoss_3090.ops import Nf4Weight

sys.path.insert(0, str(Path(__file__).resolve().parent))

H, INTER, E, TOPK = 2880, 2880, 32, 4
HQ, HKV, D = 64, 8, 64


@dataclass
class CaseResult:
    """One case: how many of ``runs`` outputs differ from the first, and by how much at most."""

    op: str
    case: str
    mode: str
    runs: int
    differing_runs: int
    max_abs_diff: float
    seconds: float


def parse_ints(text: str, name: str) -> list[int]:
    """A comma-separated list of positive integers (``--tokens 1,16,64``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{name}: expected integers like 1,16,64, found {text!r}"
        ) from e
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{name}: expected positive integers, found {text!r}")
    return values


def stress(
    op: str, case: str, fn: Callable[[], torch.Tensor], runs: int, graph: bool
) -> CaseResult:
    """Calls ``fn`` (eagerly, or captured once and replayed) ``runs`` times with a foreign
    kernel before each call; compares each output with the first, bit for bit."""
    dev = torch.device("cuda")
    jitter = torch.zeros(1 << 16, device=dev)
    out = fn()  # compile and load before any capture
    torch.cuda.synchronize()
    replay: Callable[[], torch.Tensor] = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = fn()

        def replay() -> torch.Tensor:
            g.replay()
            return captured

    first: torch.Tensor | None = None
    differing, worst = 0, 0.0
    t0 = time.perf_counter()
    for r in range(runs):
        # A varying amount of foreign work before the call, so its launches meet the previous
        # call's tail at different points.
        for _ in range(r % 3):
            jitter.add_(1.0)
        out = replay().clone()  # contiguous: its bytes compare below
        if r % 16 == 15:
            torch.cuda.synchronize()
        if first is None:
            first = out
            continue
        # Bit patterns, so that a NaN repeated in place counts as the same output.
        if not torch.equal(out.view(torch.uint8), first.view(torch.uint8)):
            differing += 1
            diff = (out.float() - first.float()).abs().nan_to_num(float("inf")).max()
            worst = max(worst, float(diff))
    torch.cuda.synchronize()
    res = CaseResult(
        op, case, "graph" if graph else "eager", runs, differing, worst, time.perf_counter() - t0
    )
    print(row(res), flush=True)  # as each case ends: a run cut short still reports the rest
    return res


HEADER = f"{'op':<12}{'case':<40}{'mode':<7}{'differing':>10}{'max |diff|':>12}{'s':>7}"


def row(r: CaseResult) -> str:
    """One printed result row (see HEADER)."""
    return (
        f"{r.op:<12}{r.case:<40}{r.mode:<7}{r.differing_runs:>6}/{r.runs:<4}"
        f"{r.max_abs_diff:>11.3g}{r.seconds:>7.1f}"
    )


def projection_weights(g: torch.Generator) -> tuple[list[Nf4Weight], Nf4Weight]:
    """vLLM's q/k/v (three separately quantized parts) and o projections, random, nested NF4
    quantized on the GPU: ``([q, k, v], o)``."""
    from gptoss_3090 import ops

    def weight(n: int, k: int) -> ops.Nf4Weight:
        return ops.nf4_quantize(
            (torch.randn(n, k, device=g.device, generator=g) * 0.02).to(torch.bfloat16)
        )

    return [weight(HQ * D, H), weight(HKV * D, H), weight(HKV * D, H)], weight(H, HQ * D)


def moe_layer(seed: int, dev: torch.device) -> MoeLayerWeights:
    """One 20b MoE layer of random NF4 experts, chunk-major as the plugin serves them."""
    from bench_moe import random_nf4
    from gptoss_3090 import moe as M

    w = M.MoeLayerWeights(
        random_nf4(E, 2 * INTER, H, seed=seed, dev=dev),
        random_nf4(E, H, INTER, seed=seed + 10, dev=dev),
        M._dynamic_map_signed().to(dev),
        top_k=TOPK,
    )
    w.chunk_major(in_place=True)
    return w


def moe_cases(tokens: list[int], runs: int, graph_max: int) -> list[CaseResult]:
    """Two 20b MoE layers (random NF4, chunk-major as served), routing given as vLLM gives it."""
    from bench_moe import given_routes, router_logits
    from gptoss_3090 import moe as M

    dev = torch.device("cuda")
    layers = [moe_layer(10 + i, dev) for i in range(2)]
    results = []
    for t in tokens:
        g = torch.Generator(device=dev).manual_seed(t)
        x = torch.randn(t, H, device=dev, generator=g).to(torch.bfloat16)
        routes = given_routes(router_logits(t, len(layers), dev, g, 0.35))
        ws = layers[0].workspace(t)

        def run(x: torch.Tensor = x, routes=routes, ws: torch.Tensor = ws) -> torch.Tensor:
            y = x
            for w, (tw, ti) in zip(layers, routes, strict=True):
                y = M.moe(y, w, topk_ids=ti, topk_weights=tw, workspace=ws)
            return y

        for graph in (False, True) if t <= graph_max else (False,):
            results.append(stress("moe", f"T={t}, 2 layers", run, runs, graph))
    return results


def linear_cases(ms: list[int], runs: int, graph_max: int) -> list[CaseResult]:
    """vLLM's fused q/k/v (three parts) and o projections, nested NF4."""
    from gptoss_3090 import ops

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    qkv, o = projection_weights(g)
    results = []
    for m in ms:
        for name, w, k in (("qkv 5120x2880", qkv, H), ("o 2880x4096", o, HQ * D)):
            x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)

            def run(x: torch.Tensor = x, w=w) -> torch.Tensor:
                return ops.nf4_linear(x, w)

            for graph in (False, True) if m <= graph_max else (False,):
                results.append(stress("nf4_linear", f"M={m}, {name}", run, runs, graph))
    return results


def attention_cases(runs: int) -> list[CaseResult]:
    """The paged attention as vLLM's captured decode runs it (a 131072-token bound), full and
    sliding layers, at the default and a 512-key run-time split; and a 16 x 128 prefill."""
    from gptoss_3090 import _native
    from gptoss_3090 import attention as A
    from gptoss_3090.attention_reference import random_paged_batch

    dev = torch.device("cuda")
    ws = A.make_workspace(dev, HKV)
    results = []
    cases = [("decode", 1, 300), ("decode", 16, 300), ("decode", 64, 300), ("prefill", 16, 128)]
    for kind, batch, ctx in cases:
        g = torch.Generator().manual_seed(batch * 1000 + ctx)
        q_lens = [1] * batch if kind == "decode" else [ctx] * batch
        b = random_paged_batch(q_lens, [ctx] * batch, HQ, HKV, 16, torch.bfloat16, dev,
                               generator=g)  # fmt: skip
        sinks = torch.randn(HQ, generator=g).to(dev, torch.bfloat16)
        out = torch.empty_like(b["query"])
        bound = 131072 if kind == "decode" else b["max_seq_len"]
        for window in (128, None):
            for min_keys in (None, 512) if kind == "decode" else (None,):

                def run(b=b, out=out, window=window, bound=bound, sinks=sinks) -> torch.Tensor:
                    torch.ops.gptoss_3090.paged_attention(
                        b["query"], b["kv_cache"], out, b["query_start_loc"], b["seq_lens"],
                        b["block_table"], sinks, ws, b["max_query_len"], bound, window, 0.125,
                    )  # fmt: skip
                    return out

                _native.attention_set_run_min_keys(min_keys)
                try:
                    label = (
                        f"{kind} {batch}x{ctx}, {'sliding' if window else 'full'}"
                        + (f", min keys {min_keys}" if min_keys else "")
                    )
                    results.append(stress("attention", label, run, runs, kind == "decode"))
                finally:
                    _native.attention_set_run_min_keys(None)
    return results


def chain_cases(tokens: list[int], runs: int) -> list[CaseResult]:
    """Two decode layers' worth of our ops back to back in one CUDA graph, as a vLLM step chains
    them (so programmatic dependent launches overlap one op's tail with the next one's start):
    q/k/v projection, paged attention on the step's queries, o projection, residual, router,
    vLLM-style top-k in torch, MoE, residual."""
    from gptoss_3090 import attention as A
    from gptoss_3090 import moe as M
    from gptoss_3090 import ops
    from gptoss_3090.attention_reference import random_paged_batch

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    layers = []
    for i in range(2):
        qkv, o = projection_weights(g)
        layers.append({
            "qkv": qkv,
            "o": o,
            "router_w": (torch.randn(E, H, device=dev, generator=g) / H**0.5).to(torch.bfloat16),
            "router_b": (torch.randn(E, device=dev, generator=g) * 0.1).to(torch.bfloat16),
            "moe": moe_layer(30 + i, dev),
            "window": 128 if i % 2 == 0 else None,
        })  # fmt: skip
    results = []
    for t in tokens:
        cg = torch.Generator().manual_seed(100 + t)
        b = random_paged_batch([1] * t, [300] * t, HQ, HKV, 16, torch.bfloat16, dev, generator=cg)
        sinks = torch.randn(HQ, generator=cg).to(dev, torch.bfloat16)
        ws = A.make_workspace(dev, HKV)
        moe_ws = layers[0]["moe"].workspace(t)
        attn_out = torch.empty(t, HQ, D, device=dev, dtype=torch.bfloat16)
        x = (torch.randn(t, H, generator=cg) * 0.5).to(dev, torch.bfloat16)

        def run(b=b, sinks=sinks, ws=ws, moe_ws=moe_ws, attn_out=attn_out, x=x) -> torch.Tensor:
            h = x
            for lw in layers:
                qkv = ops.nf4_linear(h, lw["qkv"])
                q = qkv[:, : HQ * D].view(-1, HQ, D)
                torch.ops.gptoss_3090.paged_attention(
                    q, b["kv_cache"], attn_out, b["query_start_loc"], b["seq_lens"],
                    b["block_table"], sinks, ws, 1, 131072, lw["window"], 0.125,
                )  # fmt: skip
                h = h + ops.nf4_linear(attn_out.view(-1, HQ * D), lw["o"])
                logits = torch.ops.gptoss_3090.moe_router(h, lw["router_w"], lw["router_b"])
                vals, ids = torch.topk(logits.float(), TOPK, dim=-1)
                y = M.moe(h, lw["moe"], topk_ids=ids.to(torch.int32),
                          topk_weights=torch.softmax(vals, dim=-1), workspace=moe_ws)  # fmt: skip
                h = h + y
            return h

        results.append(stress("chain", f"T={t}, 2 decode layers", run, runs, True))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="calls per case (at least 2)")
    p.add_argument("--tokens", type=lambda s: parse_ints(s, "--tokens"), default=[1, 16, 64, 2048])
    p.add_argument("--ms", type=lambda s: parse_ints(s, "--ms"), default=[1, 16, 64, 2048])
    p.add_argument("--graph-max", type=int, default=512, help="largest size also run as a graph")
    p.add_argument(
        "--parts", default="moe,linear,attention,chain", help="which ops to stress (comma list)"
    )
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    if a.runs < 2:
        p.error(f"--runs {a.runs}: at least 2 calls to compare")
    parts = {s.strip() for s in a.parts.split(",") if s.strip()}
    unknown = parts - {"moe", "linear", "attention", "chain"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; expected moe, linear, attention, chain")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, {a.runs} calls per case")
    print(HEADER, flush=True)
    rows: list[CaseResult] = []
    if "attention" in parts:
        rows += attention_cases(a.runs)
    if "linear" in parts:
        rows += linear_cases(a.ms, a.runs, a.graph_max)
    if "moe" in parts:
        rows += moe_cases(a.tokens, a.runs, a.graph_max)
    if "chain" in parts:
        rows += chain_cases([t for t in a.tokens if t <= a.graph_max], a.runs)
    bad = sum(r.differing_runs > 0 for r in rows)
    print(f"{bad} of {len(rows)} cases gave an output that differs from their first")
    if a.out:
        a.out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 1 if any(r.differing_runs for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
