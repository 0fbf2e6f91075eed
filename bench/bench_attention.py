"""Benchmark: gptoss-3090 attention (sinks + sliding window, paged KV cache) vs vLLM TRITON_ATTN.

Both kernels run on the same card, in the same process, on the same paged inputs (GPT-OSS-20B
shapes: 64 query heads, 8 KV heads, head_dim 64, bf16, block size 16, sinks on). Each
measurement captures ``--reps`` back-to-back calls in a CUDA graph (as vLLM runs decode) and
reports the median GPU time per call over ``--iters`` replays, so Python launch overhead is
excluded for both sides. Without vLLM the baseline is an eager PyTorch SDPA implementation of
the same math (marked ``sdpa`` in the table), which is not what vLLM would run.

Cases: decode (batch, context) in {(1,1K), (1,32K), (1,128K), (16,8K), (16,32K), (64,2K),
(64,8K)} and prefill {2K, 8K, 32K} tokens (one sequence), each on a sliding (W=128) and a full
layer. Targets (issue 5): >= 1.2x Triton for decode at batch >= 16 and context >= 8K, >= 1.0x
elsewhere.

Usage::

    PYTHONPATH=python python3 bench/bench_attention.py --out bench/results/attention_h100.json
    # batch-1 decode at short contexts as vLLM's captured graphs run it (planned for 131072):
    PYTHONPATH=python python3 bench/bench_attention.py --only decode \
        --decode-cases 1x128,1x256,1x384,1x1024 --seq-bound 131072
    PYTHONPATH=python python3 bench/bench_attention.py --tuning sm86 --out ...   # forced sm86
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gptoss_3090 import attention as A
from gptoss_3090 import runtime
from gptoss_3090.attention_reference import (
    VllmTritonAttention,
    random_paged_batch,
    rope_cos_sin_table,
    vllm_triton_available,
)

HQ, HKV, D = 64, 8, 64
SCALE = 0.125
WINDOW = 128
DECODE = [(1, 1024), (1, 32768), (1, 131072), (16, 8192), (16, 32768), (64, 2048), (64, 8192)]
PREFILL = [2048, 8192, 32768]


def git_commit() -> str:
    """``$GPTOSS_3090_GIT_COMMIT`` if set (runs from a copied tree), else ``git rev-parse HEAD``."""
    if os.environ.get("GPTOSS_3090_GIT_COMMIT"):
        return os.environ["GPTOSS_3090_GIT_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=root, stderr=subprocess.DEVNULL, text=True
        ).strip()
    except Exception:
        return "unknown"


def time_graph(fn, reps: int, iters: int) -> float:
    """Median microseconds per call of ``fn`` (captured ``reps`` times in one CUDA graph)."""
    fn()  # eager warm-up (compiles / autotunes outside the capture)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(reps):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    times.sort()
    return times[len(times) // 2]


class SdpaBaseline:
    """Eager PyTorch baseline (used only when vLLM is missing): gathers each request's pages
    and runs ``scaled_dot_product_attention`` with the sink as an extra zero key whose additive
    bias is the sink logit (same math, no value)."""

    def __call__(
        self,
        query,
        kv_cache,
        output,
        qsl,
        seq_lens,
        block_table,
        sinks,
        max_q,
        max_s,
        window,
        scale,
    ):
        qsl_l = qsl.tolist()
        sl_l = seq_lens.tolist()
        bs = kv_cache.shape[2]
        for r in range(len(sl_l)):
            s, e = qsl_l[r], qsl_l[r + 1]
            q_len, n = e - s, sl_l[r]
            if q_len == 0:
                continue
            lo = 0 if window is None else max(0, n - q_len - window + 1)
            blocks = block_table[r, lo // bs : (n + bs - 1) // bs].long()
            kv = kv_cache[blocks].permute(1, 0, 2, 3).reshape(HKV, -1, 2 * D)
            kv = kv[:, lo % bs : lo % bs + (n - lo)]
            k = kv[..., :D].repeat_interleave(HQ // HKV, 0)
            v = kv[..., D:].repeat_interleave(HQ // HKV, 0)
            zero = torch.zeros(HQ, 1, D, dtype=k.dtype, device=k.device)
            k = torch.cat([k, zero], 1)
            v = torch.cat([v, zero], 1)
            for c0 in range(0, q_len, 256):
                c1 = min(q_len, c0 + 256)
                pos = torch.arange(n - q_len + c0, n - q_len + c1, device=k.device).view(-1, 1)
                key_pos = torch.arange(lo, n, device=k.device).view(1, -1)
                vis = key_pos <= pos
                if window is not None:
                    vis &= key_pos > pos - window
                bias = torch.zeros(HQ, c1 - c0, n - lo + 1, dtype=k.dtype, device=k.device)
                bias[:, :, :-1].masked_fill_(~vis, float("-inf"))
                bias[:, :, -1] = sinks.view(HQ, 1).to(k.dtype)
                q = query[s + c0 : s + c1].transpose(0, 1)
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias, scale=scale
                )
                output[s + c0 : s + c1] = o.transpose(0, 1)
        return output


def rope_like_vllm(positions, q, k, table):
    """vLLM's neox RoPE in torch ops (``RotaryEmbedding.forward_static``); compiled, it becomes
    the model's per-layer RoPE kernels."""
    cos, sin = table.index_select(0, positions).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rot(x, heads):
        x = x.reshape(x.shape[0], heads, D)
        lo, hi = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1).to(x.dtype)

    return rot(q, HQ), rot(k, HKV)


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``batch`` decode requests of one new token after ``ctx`` keys each, or
    (``kind == "prefill"``) one request of ``ctx`` tokens; ``window`` None is a full layer."""

    kind: str
    batch: int
    ctx: int
    window: int | None


@dataclass(frozen=True)
class Setup:
    """What every case shares. ``seq_bound`` (decode) is the ``max_seq_len`` both sides are
    given when it exceeds the context, as in vLLM's captured decode graphs (planned for
    max_model_len). ``kv_write`` (decode) also times the step's cache write: ``kv_cache_write``
    then the attention (vLLM's separate update) against the write folded into the decode
    launch. ``rope`` (with ``kv_write``) also times the step's RoPE: vLLM's, compiled by
    torch.compile, before the folded launch, against RoPE folded into it (``rope_cos_sin``)."""

    base: Callable[..., None]
    base_name: str
    ws: torch.Tensor
    seq_bound: int = 0
    kv_write: bool = False
    rope: bool = False


def bench_case(case: Case, setup: Setup, reps: int, iters: int, seed: int) -> dict:
    """Times ``case`` (ours, then the baseline) and returns its result row."""
    kind, batch, ctx, window = case.kind, case.batch, case.ctx, case.window
    base, base_name, ws = setup.base, setup.base_name, setup.ws
    seq_bound, kv_write, rope = setup.seq_bound, setup.kv_write, setup.rope
    gen = torch.Generator().manual_seed(seed)
    if kind == "decode":
        q_lens, seq_lens = [1] * batch, [ctx] * batch
    else:
        q_lens, seq_lens = [ctx], [ctx]
    b = random_paged_batch(q_lens, seq_lens, HQ, HKV, 16, torch.bfloat16, "cuda", generator=gen)
    sinks = torch.randn(HQ, generator=gen).to("cuda", torch.bfloat16)
    out = torch.empty_like(b["query"])
    out_b = torch.empty_like(b["query"])
    args = (b["query_start_loc"], b["seq_lens"], b["block_table"])
    max_seq_len = max(b["max_seq_len"], seq_bound) if kind == "decode" else b["max_seq_len"]

    def ours(*new_rows):
        # new_rows: (key, value, slot_mapping) to write the new tokens in the same call.
        torch.ops.gptoss_3090.paged_attention(
            b["query"],
            b["kv_cache"],
            out,
            *args,
            sinks,
            ws,
            b["max_query_len"],
            max_seq_len,
            window,
            SCALE,
            *new_rows,
        )

    def baseline():
        base(
            b["query"],
            b["kv_cache"],
            out_b,
            *args,
            sinks,
            b["max_query_len"],
            max_seq_len,
            window,
            SCALE,
        )

    t_ours = time_graph(ours, reps, iters)
    t_write_then, t_folded = None, None
    t_vllm_rope, t_rope_folded = None, None
    if kv_write and kind == "decode":
        # The new token's K/V rows as vLLM passes them (slices of the fused q/k/v output) and
        # their slots (each request's last position).
        bs = b["kv_cache"].shape[2]
        fused = torch.randn(batch, (HQ + 2 * HKV) * D, generator=gen).to("cuda", torch.bfloat16)
        key = fused[:, HQ * D : (HQ + HKV) * D].view(batch, HKV, D)
        value = fused[:, (HQ + HKV) * D :].view(batch, HKV, D)
        slots = torch.tensor(
            [int(b["block_table"][r, (ctx - 1) // bs]) * bs + (ctx - 1) % bs for r in range(batch)],
            dtype=torch.int64,
            device="cuda",
        )

        def write_then_attention():
            torch.ops.gptoss_3090.kv_cache_write(key, value, b["kv_cache"], slots)
            ours()

        t_write_then = time_graph(write_then_attention, reps, iters)
        t_folded = time_graph(lambda: ours(key, value, slots), reps, iters)
        if rope:
            table = rope_cos_sin_table(max(max_seq_len, ctx), device="cuda")
            q_view = fused[:, : HQ * D].view(batch, HQ, D)
            positions = torch.full((batch,), ctx - 1, dtype=torch.int64, device="cuda")
            compiled = torch.compile(rope_like_vllm, dynamic=False)

            def attend(q, k, *rope_arg):
                torch.ops.gptoss_3090.paged_attention(
                    q, b["kv_cache"], out, *args, sinks, ws, b["max_query_len"], max_seq_len,
                    window, SCALE, k, value, slots, *rope_arg,
                )

            def vllm_rope_then_folded():
                q, k = compiled(positions, q_view, key, table)
                attend(q, k)

            vllm_rope_then_folded()  # compile outside the capture
            t_vllm_rope = time_graph(vllm_rope_then_folded, reps, iters)
            t_rope_folded = time_graph(lambda: attend(q_view, key, table), reps, iters)
            ours()  # `out` again from the unrotated queries, for the baseline comparison below
    if base_name == "sdpa":
        # The SDPA baseline synchronises (tolist); time it eagerly.
        baseline()
        torch.cuda.synchronize()
        ts = []
        for _ in range(max(3, iters // 4)):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            baseline()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1000.0)
        ts.sort()
        t_base = ts[len(ts) // 2]
    else:
        t_base = time_graph(baseline, reps, iters)
    err = float((out.float() - out_b.float()).norm() / out_b.float().norm().clamp_min(1e-30))
    splits = A.decode_splits(
        torch.cuda.current_device(),
        batch if kind == "decode" else 1,
        HKV,
        max_seq_len,
        window,
        1 if kind == "decode" else ctx,
        ws,
    )
    # Work: keys visited per query (decode: bytes of K+V read; prefill: causal FLOPs).
    if kind == "decode":
        keys = min(ctx, window) if window else ctx
        work = batch * keys * HKV * 2 * D * 2 / 1e9  # GB
        rate = work / (t_ours * 1e-6)
        unit = "GB/s"
    else:
        pairs = sum(min(i + 1, window) if window else i + 1 for i in range(ctx))
        work = 4.0 * HQ * D * pairs / 1e12  # TFLOP
        rate = work / (t_ours * 1e-6)
        unit = "TFLOP/s"
    return {
        "kind": kind,
        "batch": batch,
        "context": ctx,
        "max_seq_len": max_seq_len,
        "layer": "sliding" if window else "full",
        "ours_us": t_ours,
        "baseline_us": t_base,
        "baseline": base_name,
        "speedup": t_base / t_ours,
        "rate": rate,
        "rate_unit": unit,
        "decode_splits": splits if kind == "decode" else None,
        "rel_err_vs_baseline": err,
        "write_then_attention_us": t_write_then,
        "folded_write_us": t_folded,
        "vllm_rope_then_folded_us": t_vllm_rope,
        "rope_folded_us": t_rope_folded,
    }


def decode_cases(text: str) -> list[tuple[int, int]]:
    """``--decode-cases``: ``BATCHxCONTEXT`` pairs, comma-separated, both positive."""
    cases = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--decode-cases: expected BATCHxCONTEXT items, found {item!r}")
        cases.append((int(parts[0]), int(parts[1])))
    return cases


def target(row) -> float:
    if row["kind"] == "decode" and row["batch"] >= 16 and row["context"] >= 8192:
        return 1.2
    return 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--tuning", choices=["sm80", "sm86", "sm90"], help="force a tuning family")
    ap.add_argument("--reps", type=int, default=10, help="calls per CUDA graph")
    ap.add_argument("--iters", type=int, default=20, help="timed graph replays (median)")
    ap.add_argument("--only", choices=["decode", "prefill"], help="run one half only")
    ap.add_argument(
        "--decode-cases",
        default=",".join(f"{b}x{c}" for b, c in DECODE),
        help="decode (batch)x(context) list, e.g. 1x256,1x384",
    )
    ap.add_argument(
        "--seq-bound",
        type=int,
        default=0,
        help="decode max_seq_len given to both sides when larger than the context (131072: "
        "what vLLM's captured graphs plan for at max_model_len 131072)",
    )
    ap.add_argument(
        "--min-keys",
        type=int,
        help="fewest keys a decode split takes at run time (a multiple of 16)",
    )
    ap.add_argument(
        "--kv-write",
        action="store_true",
        help="decode: also time kv_cache_write + attention against the write folded into the "
        "decode launch (what the vLLM backend runs)",
    )
    ap.add_argument(
        "--rope",
        action="store_true",
        help="decode, with --kv-write: also time vLLM's RoPE (torch.compile) before the folded "
        "launch against RoPE folded into it (what the vLLM backend runs)",
    )
    ap.add_argument("--baseline", choices=["auto", "triton", "sdpa"], default="auto")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.tuning:
        runtime.set_tuning(args.tuning)
    if args.min_keys is not None:
        from gptoss_3090 import _native

        _native.attention_set_overrides(min_keys=args.min_keys)
    info = runtime.device_info()  # kernels load on the eager call before each capture
    use_triton = args.baseline == "triton" or (args.baseline == "auto" and vllm_triton_available())
    base = VllmTritonAttention(HQ, HKV, "cuda") if use_triton else SdpaBaseline()
    base_name = "triton" if use_triton else "sdpa"
    ws = A.make_workspace("cuda", HKV)
    print(
        f"# {info['name']} ({info['arch']}, {info['sm_count']} SMs), tuning {info['tuning']}"
        f" (natural {info['natural_tuning']}), baseline: "
        f"{'vLLM TRITON_ATTN unified_attention' if use_triton else 'eager torch SDPA (no vLLM)'}"
        f", min keys per split: {args.min_keys or 'default'}"
    )
    cases = []
    if args.only != "prefill":
        decode = decode_cases(args.decode_cases)
        cases += [("decode", b, c, w) for b, c in decode for w in (WINDOW, None)]
    if args.only != "decode":
        cases += [("prefill", 1, n, w) for n in PREFILL for w in (WINDOW, None)]
    setup = Setup(base, base_name, ws, args.seq_bound, args.kv_write, args.rope)
    rows = []
    hdr = (
        f"{'case':<22}{'layer':<9}{'ours us':>10}{f'{base_name} us':>12}{'speedup':>9}"
        f"{'target':>8}{'rate':>16}{'splits':>7}{'rel err':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for i, (kind, batch, ctx, window) in enumerate(cases):
        iters = args.iters if not (kind == "prefill" and ctx >= 32768) else max(5, args.iters // 4)
        reps = args.reps if not (kind == "prefill" and ctx >= 8192) else 2
        row = bench_case(Case(kind, batch, ctx, window), setup, reps, iters, seed=i)
        rows.append(row)
        torch.cuda.empty_cache()
        if kind == "decode":
            name = f"decode B={batch} ctx={f'{ctx // 1024}K' if ctx >= 1024 else ctx}"
        else:
            name = f"prefill {ctx // 1024}K"
        ok = "" if row["speedup"] >= target(row) else "  <-- below target"
        print(
            f"{name:<22}{row['layer']:<9}{row['ours_us']:>10.1f}{row['baseline_us']:>12.1f}"
            f"{row['speedup']:>8.2f}x{target(row):>7.1f}x{row['rate']:>9.1f} {row['rate_unit']:<7}"
            f"{row['decode_splits'] or '-':>6}{row['rel_err_vs_baseline']:>10.1e}"
            f"{ok}",
            flush=True,
        )
        if row["folded_write_us"] is not None:
            print(
                f"{'':<22}{'':<9}KV write then attention {row['write_then_attention_us']:.1f} us,"
                f" folded {row['folded_write_us']:.1f} us"
                f" ({row['write_then_attention_us'] / row['folded_write_us']:.2f}x)",
                flush=True,
            )
        if row["rope_folded_us"] is not None:
            print(
                f"{'':<22}{'':<9}vLLM RoPE then folded {row['vllm_rope_then_folded_us']:.1f} us,"
                f" RoPE folded {row['rope_folded_us']:.1f} us"
                f" ({row['vllm_rope_then_folded_us'] / row['rope_folded_us']:.2f}x)",
                flush=True,
            )
    geo = math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows))
    print(f"geometric-mean speedup vs {base_name}: {geo:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        doc = {
            "benchmark": "attention",
            "card": info["name"],
            "device": info,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "command": " ".join([sys.executable, *sys.argv]),
            "torch": torch.__version__,
            "baseline": base_name,
            "shapes": {
                "num_q_heads": HQ,
                "num_kv_heads": HKV,
                "head_dim": D,
                "block_size": 16,
                "dtype": "bfloat16",
                "sliding_window": WINDOW,
            },
            "geomean_speedup": geo,
            "results": rows,
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
