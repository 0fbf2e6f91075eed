"""End-to-end throughput: our bnb_moe stack vs stock vLLM 0.26 MXFP4 on Marlin (issue 6, item 5).

Stock: OpenAI's MXFP4 layout at full GPT-OSS-20B size with random weights (on a config.json
carrying the MXFP4 quantization_config), ``moe_backend="marlin"`` and TRITON_ATTN: exactly what
vLLM runs on Ampere. Its weights come from ``load_format=
"gptoss_random"`` (register_random_loader), drawn like our synthetic checkpoint's, because
vLLM's dummy weights route every token to the same 4 experts (``--stock-weights dummy`` keeps
them, for comparison). Ours: the 20b synthetic NF4 checkpoint
(``gptoss-3090 synth OUT --preset 20b``) with ``--quantization bnb_moe`` and our attention
backend (CUSTOM; ``--ours-attention TRITON_ATTN`` to compare like for like). Both with the same
compilation settings (vLLM defaults: torch.compile + FULL_AND_PIECEWISE CUDA graphs, the same
explicit ``max_cudagraph_capture_size``), prefix caching off, on the same card in one sitting.

Workloads (token-id prompts, greedy, ``ignore_eos``, a warm-up run of each shape first, then
``--repeats`` timed runs, default 3, of which the median is reported):
decode at batch 1, 16 and 64 with 128 tokens in and 256 out (output tok/s), and prefill 16 x 2048
tokens with 1 token out (input tok/s); each at 0.85 of the card and on the 24 GiB budget
(vLLM's total 23.0 GiB, ``max_model_len`` 131072). KV capacity comes from vLLM's log.

Usage (GPU host)::

    python bench/bench_vllm_e2e.py --ours /data/synth-20b --out bench/results/vllm_e2e_bench

Writes ``result.json``, ``summary.md``, ``throughput.png`` and one log per engine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def _source_dir() -> str:
    """ROOT/python when it holds a built ``_native`` (a dev build), else "" (use the installed
    package: a source tree without the extension would shadow it)."""
    src = ROOT / "python"
    return str(src) if any((src / "gptoss_3090").glob("_native*.so")) else ""


WORKLOADS = {
    "decode_b1": (1, 128, 256),
    "decode_b16": (16, 128, 256),
    "decode_b64": (64, 128, 256),
    "prefill_16x2048": (16, 2048, 1),
}
TARGETS = {"decode_b1": 1.5, "decode_b64": 1.0, "prefill_16x2048": 1.0}


def decode_steps(batch: int, n_out: int, seconds: float, first_token_s: float) -> dict[str, float]:
    """The decode steps of a timed run: the whole run (prefill, then n_out - 1 decode steps of
    `batch` tokens) less a run of the same shape that stops after the first token. A decode
    workload's tok/s counts its prefill too (128 prompt tokens per request: about 1% of a
    batch-1 run, 9% of a batch-64 one, where prefill runs at a different ratio to stock);
    decode_tok_s is what bench/decode_floor.py sets against the bandwidth floor."""
    decode_s = seconds - first_token_s
    if decode_s <= 0:
        raise ValueError(
            f"a {n_out}-token run took {seconds:.4f} s, not more than its first token alone "
            f"({first_token_s:.4f} s)"
        )
    return {
        "first_token_s": first_token_s,
        "decode_s": decode_s,
        "decode_step_ms": 1e3 * decode_s / (n_out - 1),
        "decode_tok_s": batch * (n_out - 1) / decode_s,
    }


def mxfp4_config_dir(out: Path) -> Path:
    """config.json of GPT-OSS-20B in OpenAI's MXFP4 form (weights come from load_format=dummy)."""
    from gptoss_3090.presets import get_preset

    d = out / "mxfp4_20b_config"
    d.mkdir(parents=True, exist_ok=True)
    cfg = get_preset("20b")
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------


def route_probe(worker: Any) -> dict[str, Any]:
    """Routing of each layer for random tokens, on the worker (``LLM.collective_rpc``).

    The hidden state is approximated by the token embedding through the layer's
    post-attention RMSNorm. Returns the mean number of distinct experts a batch of 1, 16 and 64
    tokens routes to per layer: a batch's weight bytes depend on it.
    """
    import torch

    model = worker.get_model()
    inner = getattr(model, "model", model)
    try:
        emb = inner.embedding
        routers = [(lay.post_attention_layernorm, lay.mlp.router) for lay in inner.layers]
    except AttributeError as e:
        return {"error": f"model layout not understood: {e}"}
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1000, 190000, (64,), generator=g).to(emb.weight.device)
    counts: dict[int, list[int]] = {1: [], 16: [], 64: []}
    with torch.no_grad():
        h = emb.weight[ids].float()
        for norm, router in routers:
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()
            logits = x @ router.weight.float().t() + router.bias.float()
            top = torch.topk(logits, 4, dim=-1).indices
            for n in counts:
                counts[n].append(int(torch.unique(top[:n]).numel()))
    return {f"experts_per_layer_t{n}": sum(c) / len(c) for n, c in counts.items()}


def register_random_loader() -> str:
    """Registers the ``gptoss_random`` load format for stock: random weights drawn like our
    synthetic checkpoint's, so that both sides route alike.

    vLLM's ``load_format="dummy"`` fills every float tensor with U(-1e-3, 1e-3) from a seed
    that depends only on the tensor's size: all 24 layers get the same biases, which then
    dominate the residual stream, every token's hidden state converges to one vector, and every
    token of a batch is routed to the same 4 experts (a 64-token decode step then reads 4
    experts' weights instead of about 32; measured: stock's whole decode step at batch 64 took
    less time than 24 Marlin MoE layers over 32 experts, bench/results sitting 4). This loader
    runs the dummy initialisation, then redraws each tensor before the quantization method
    repacks it: norms 1 + 0.1 N, biases 0.02 N (router 0.1 N), matrices N(0, 1/fan_in), the
    embedding 0.5 N, sinks N(1, 0.75); MXFP4 expert codes uniform random bytes and their e8m0
    scales 2^-7 (weights of RMS about 0.023, close to 1/sqrt(2880)). Values never change a
    kernel's work; only the routing they produce does.
    """
    import torch
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    name = "gptoss_random"

    @register_model_loader(name)
    class _RandomLoader(DummyModelLoader):
        def load_weights(self, model: Any, model_config: Any) -> None:
            super().load_weights(model, model_config)
            with torch.no_grad():
                for i, (pname, t) in enumerate(model.named_parameters()):
                    _redraw(pname, t, torch.Generator(device=t.device).manual_seed(1000 + i))

    return name


def _redraw(name: str, t: Any, g: Any) -> None:
    """One tensor of ``gptoss_random`` (see register_random_loader)."""
    import torch

    if t.dtype == torch.uint8:
        if "scale" in name:
            t.fill_(127 - 7)
        else:
            t.copy_(torch.randint(0, 256, t.shape, generator=g, device=t.device, dtype=torch.uint8))
        return
    if not torch.is_floating_point(t):
        return

    def normal(mean: float, std: float) -> Any:
        return torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32) * std + mean

    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name:
        v = normal(1.0, 0.1)
    elif leaf == "sinks":
        v = normal(1.0, 0.75)
    elif "bias" in leaf:
        v = normal(0.0, 0.1 if "router" in name else 0.02)
    elif "embedding" in name or "embed_tokens" in name:
        v = normal(0.0, 0.5)
    elif t.dim() >= 2:
        v = normal(0.0, t.shape[-1] ** -0.5)
    else:
        v = normal(0.0, 0.02)
    t.copy_(v.to(t.dtype))


def worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec["side"] == "ours":
        import gptoss_3090.vllm as gv

        gv.register()
    import torch
    from gpu_clocks import ClockSampler  # bench/, this script's folder
    from vllm import LLM, SamplingParams, TokensPrompt

    kwargs = dict(spec["llm"])
    if kwargs.get("load_format") == "gptoss_random":
        register_random_loader()
    if spec.get("budget_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        kwargs["gpu_memory_utilization"] = round(spec["budget_gib"] * GIB / total, 4)
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **kwargs)
    result: dict[str, Any] = {
        "startup_s": time.perf_counter() - t0,
        "gpu_memory_utilization": kwargs.get("gpu_memory_utilization"),
        "device": torch.cuda.get_device_name(0),
        "workloads": {},
    }
    # How many experts a batch touches decides how many weight bytes a decode step reads, so
    # both sides must route like a real model (see register_random_loader).
    result["routing"] = llm.collective_rpc(route_probe)[0]
    g = torch.Generator().manual_seed(0)

    def prompts(batch: int, length: int) -> list[TokensPrompt]:
        ids = torch.randint(1000, 190000, (batch, length), generator=g).tolist()
        return [TokensPrompt(prompt_token_ids=p) for p in ids]

    for name in spec["workloads"]:
        batch, n_in, n_out = WORKLOADS[name]
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        # Warm-up, other prompts. Its first request's greedy tokens are kept: the prompts are the
        # same in every engine of the same workload list, so `agree` can set engines' outputs
        # side by side (a setting that silently changed the math diverges at once).
        warm = llm.generate(prompts(batch, n_in), params, use_tqdm=False)
        first_tokens = [int(t) for t in warm[0].outputs[0].token_ids]
        # Several timed runs, each on fresh prompts: a batch-1 run lasts under a second, so a
        # single one is at the mercy of the host (sitting 13: 1.07x and 1.32x stock on the two
        # budgets from one run each). The median run is the result; all are kept.
        first_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

        def timed(
            p: Any, batch: int = batch, n_in: int = n_in
        ) -> tuple[float, list[Any], dict[str, Any]]:
            torch.cuda.synchronize()
            # The SM clock and power while the run lasts (gpu_clocks: an issue-bound kernel
            # slows with the clock, a memory-bound one less). Every 50 ms: the sampler thread
            # takes the GIL from vLLM's host loop, which a batch-1 step waits on.
            with ClockSampler(period_s=0.05) as clocks:
                t1 = time.perf_counter()
                outs = llm.generate(prompts(batch, n_in), p, use_tqdm=False)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t1
            return dt, outs, clocks.summary()

        runs = []
        for _ in range(spec.get("repeats", 1)):
            dt, outs, clocks = timed(params)
            produced = sum(len(o.outputs[0].token_ids) for o in outs)
            run = {
                "seconds": dt,
                "output_tok_s": produced / dt,
                "input_tok_s": batch * n_in / dt,
                "tok_s": (batch * n_in if n_out == 1 else produced) / dt,
                "clocks": clocks,
            }
            if n_out > 1:
                # The same prompts' prefill and first token alone, on fresh prompts: what is
                # left of the run is its n_out - 1 decode steps (decode_steps).
                run.update(decode_steps(batch, n_out, dt, timed(first_only)[0]))
            runs.append(run)
        median = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
        result["workloads"][name] = {
            **median,
            "runs_tok_s": [r["tok_s"] for r in runs],
            "first_tokens": first_tokens,
        }
        if n_out > 1:
            result["workloads"][name]["runs_decode_tok_s"] = [r["decode_tok_s"] for r in runs]
    det = spec.get("determinism", 0)
    if det:
        # The same prompts again and again in this engine: greedy tokens of every request must
        # repeat exactly (a race shows as a run that diverges; a random-weight model turns the
        # smallest difference into other tokens within a few steps).
        for name in spec["workloads"]:
            batch, n_in, n_out = WORKLOADS[name]
            fixed = prompts(batch, n_in)
            params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
            runs_tokens = [
                [[int(t) for t in o.outputs[0].token_ids] for o in llm.generate(fixed, params,
                                                                                use_tqdm=False)]
                for _ in range(det)
            ]
            result["workloads"][name]["determinism"] = determinism_report(runs_tokens)
    prof = spec.get("profile")
    if prof:
        # After the timed runs: a traced decode (the profiler skips PROFILE_DELAY engine
        # iterations, the prefill among them, then records PROFILE_STEPS decode steps).
        batch, n_in, _ = WORKLOADS[prof["workload"]]
        params = SamplingParams(
            temperature=0.0, max_tokens=PROFILE_DELAY + PROFILE_STEPS + 8, ignore_eos=True
        )
        llm.start_profile()
        llm.generate(prompts(batch, n_in), params, use_tqdm=False)
        try:
            llm.stop_profile()
        except Exception as e:  # already stopped after max_iterations
            result["profile_stop"] = repr(e)
        result["profile"] = {"dir": prof["dir"], "steps": PROFILE_STEPS, "batch": batch}
    Path(out_path).write_text(json.dumps(result))


#: Engine iterations the profiler skips (prefill and the first decode steps) and records.
PROFILE_DELAY = 8
PROFILE_STEPS = 32


def profiler_config(trace_dir: str) -> dict[str, Any]:
    """vLLM 0.26 ``profiler_config`` for a short decode trace into ``trace_dir``."""
    return {
        "profiler": "torch",
        "torch_profiler_dir": trace_dir,
        "torch_profiler_with_stack": False,
        "torch_profiler_record_shapes": False,
        "ignore_frontend": True,
        "delay_iterations": PROFILE_DELAY,
        "max_iterations": PROFILE_STEPS,
    }


def _parse_log(text: str) -> dict[str, Any]:
    info: dict[str, Any] = {}
    m = re.search(r"GPU KV cache size: ([\d,]+) tokens", text)
    if m:
        info["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    m = re.search(r"Model loading took ([\d.]+) GiB", text)
    if m:
        info["weights_gib"] = float(m.group(1))
    m = re.search(r"Available KV cache memory: ([\d.]+) GiB", text)
    if m:
        info["kv_cache_gib"] = float(m.group(1))
    return info


def run(name: str, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    spec_p, res_p, log_p = out / f"{name}.spec.json", out / f"{name}.json", out / f"{name}.log"
    spec_p.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_source_dir(), os.environ.get("PYTHONPATH", "")) if p
    )
    if spec["side"] == "stock":
        env["VLLM_PLUGINS"] = ""  # stock vLLM: our plugin not even loaded
    with open(log_p, "w") as log:
        rc = subprocess.run(
            [sys.executable, __file__, "worker", str(spec_p), str(res_p)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=spec.get("timeout", 5400),
        ).returncode
    text = log_p.read_text(errors="replace")
    if rc != 0 or not res_p.exists():
        return {"error": f"rc={rc}; see {log_p}", "tail": text.splitlines()[-30:]}
    res = json.loads(res_p.read_text())
    res.update(_parse_log(text))
    return res


def determinism_report(runs: list[list[list[int]]]) -> dict[str, Any]:
    """Runs of the same prompts (``runs[r][request]`` = greedy tokens) against the first run:
    how many runs repeat it exactly, and for each run the shortest prefix any of its requests
    shares with the first run's (the earliest divergence)."""
    if not runs:
        raise ValueError("determinism: no runs")
    first = runs[0]
    shortest = [
        min((common_prefix(mine, ref) for mine, ref in zip(run, first, strict=True)), default=0)
        for run in runs
    ]
    return {
        "runs": len(runs),
        "identical_runs": sum(run == first for run in runs),
        "earliest_divergence_per_run": shortest,
        "tokens_per_request": max((len(t) for t in first), default=0),
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: for each engine's result (name -> worker result JSON) and workload, how
    many of its first request's greedy tokens match the first engine's (``tokens / total``).
    Two settings that compute the same model agree until a near-tie flips a token; one that
    changes the math (no RoPE, say) diverges within a few tokens."""
    names = list(results)
    if not names:
        raise ValueError("agree: no results to compare")
    ref = results[names[0]]
    workloads = [w for w in ref.get("workloads", {}) if "first_tokens" in ref["workloads"][w]]
    if not workloads:
        raise ValueError(f"agree: {names[0]} has no first_tokens (a result from before them?)")
    lines = [
        "| engine | " + " | ".join(workloads) + " |",
        "|---|" + "---|" * len(workloads),
    ]
    for name in names:
        cells = []
        for w in workloads:
            mine = results[name].get("workloads", {}).get(w, {}).get("first_tokens")
            theirs = ref["workloads"][w]["first_tokens"]
            cells.append("-" if mine is None else f"{common_prefix(mine, theirs)} / {len(theirs)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("spec")
    w.add_argument("result")
    ag = sub.add_parser(
        "agree",
        help="compare the greedy tokens of engines' result JSONs (ours_full.json) with the first's",
    )
    ag.add_argument("results", nargs="+", type=Path)
    ag.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--ours", help="the 20b synthetic NF4 checkpoint")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/vllm_e2e_bench")
    p.add_argument("--budget-gib", type=float, default=23.0)
    p.add_argument("--full-util", type=float, default=0.85)
    p.add_argument("--max-capture", type=int, default=512, help="same for both sides")
    p.add_argument("--ours-attention", default="CUSTOM")
    p.add_argument("--budgets", nargs="+", default=["full", "24gib"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per workload (the median is reported)"
    )
    p.add_argument("--sides", nargs="+", default=["stock", "ours"], choices=["stock", "ours"])
    p.add_argument(
        "--determinism",
        type=int,
        default=0,
        metavar="N",
        help="after the timed runs, generate each workload's same prompts N times and compare "
        "every request's greedy tokens with the first run's (result: workloads.<w>.determinism)",
    )
    p.add_argument(
        "--profile-workload",
        choices=list(WORKLOADS),
        help="after the timed runs, trace PROFILE_STEPS decode steps of this workload with the "
        "torch profiler (traces/<side>_<budget>/; summarise with bench/trace_kernels.py)",
    )
    p.add_argument(
        "--stock-weights",
        choices=["random", "dummy"],
        default="random",
        help="stock's random weights: drawn like our synthetic checkpoint's (gptoss_random, "
        "default), or vLLM's dummy values, which route every token to the same 4 experts",
    )
    a = p.parse_args(argv)
    if a.cmd == "worker":
        worker(a.spec, a.result)
        return 0
    if a.cmd == "agree":
        loaded = {}
        for path in a.results:
            try:
                loaded[path.parent.name or str(path)] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                p.error(f"agree: cannot read {path}: {e}")
        try:
            table = agreement_table(loaded)
        except ValueError as e:
            p.error(str(e))
        print(table, end="")
        if a.out:
            a.out.write_text(table)
        return 0
    if a.repeats < 1:
        p.error(f"--repeats {a.repeats}: at least one timed run per workload")
    if a.determinism < 0 or a.determinism == 1:
        p.error(f"--determinism {a.determinism}: 0 (off) or at least 2 runs to compare")
    if not a.ours:
        p.error("--ours PATH (gptoss-3090 synth PATH --preset 20b) is required")
    a.out.mkdir(parents=True, exist_ok=True)
    stock_model = str(mxfp4_config_dir(a.out))
    common = {
        "max_model_len": 131072,
        "enable_prefix_caching": False,
        "seed": 0,
        "compilation_config": {"max_cudagraph_capture_size": a.max_capture},
    }
    sides = {
        "stock": {
            "model": stock_model,
            "llm": {
                **common,
                "load_format": "gptoss_random" if a.stock_weights == "random" else "dummy",
                "skip_tokenizer_init": True,
                "moe_backend": "marlin",
                "attention_backend": "TRITON_ATTN",
            },
        },
        "ours": {
            "model": a.ours,
            "llm": {
                **common,
                "quantization": "bnb_moe",
                "skip_tokenizer_init": True,
                "attention_backend": a.ours_attention,
            },
        },
    }
    report: dict[str, Any] = {"settings": vars(a) | {"out": str(a.out)}, "runs": {}}
    for budget in a.budgets:
        for side, base in sides.items():
            if side not in a.sides:
                continue
            spec = {**base, "side": side, "workloads": a.workloads, "repeats": a.repeats}
            spec["determinism"] = a.determinism
            spec["llm"] = dict(base["llm"])
            if a.profile_workload:
                trace_dir = str((a.out / "traces" / f"{side}_{budget}").resolve())
                spec["llm"]["profiler_config"] = profiler_config(trace_dir)
                spec["profile"] = {"workload": a.profile_workload, "dir": trace_dir}
            if budget == "24gib":
                spec["budget_gib"] = a.budget_gib
            else:
                spec["llm"]["gpu_memory_utilization"] = a.full_util
            name = f"{side}_{budget}"
            print(f"== {name}", flush=True)
            report["runs"][name] = run(name, spec, a.out)
    report["ratios"] = ratios(report["runs"], a.budgets, a.workloads)
    (a.out / "result.json").write_text(json.dumps(report, indent=2))
    md = summary_md(report, a.budgets, a.workloads)
    (a.out / "summary.md").write_text(md)
    print(md)
    plot(report, a.budgets, a.workloads, a.out / "throughput.png")
    return 0


def ratios(runs: dict[str, Any], budgets: list[str], workloads: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in budgets:
        s, o = runs.get(f"stock_{b}", {}), runs.get(f"ours_{b}", {})
        if "workloads" not in s or "workloads" not in o:
            continue
        r = {w: o["workloads"][w]["tok_s"] / s["workloads"][w]["tok_s"] for w in workloads}
        r["targets_met"] = {w: r[w] >= t for w, t in TARGETS.items() if w in r}
        if "kv_cache_tokens" in s and "kv_cache_tokens" in o:
            r["kv_tokens_ratio"] = o["kv_cache_tokens"] / s["kv_cache_tokens"]
        out[b] = r
    return out


def summary_md(report: dict[str, Any], budgets: list[str], workloads: list[str]) -> str:
    lines = [
        "| budget | workload | stock tok/s | ours tok/s | ours/stock | target |",
        "|---|---|---|---|---|---|",
    ]
    for b in budgets:
        s, o = report["runs"].get(f"stock_{b}", {}), report["runs"].get(f"ours_{b}", {})
        if "workloads" not in s or "workloads" not in o:
            for side, r in (("stock", s), ("ours", o)):
                for w, v in r.get("workloads", {}).items():
                    lines.append(_one_side_row(b, side, f"{w} ({side} only)", _tok_s(v)))
                    if "decode_tok_s" in v:
                        label = f"{w}, decode steps only ({side} only)"
                        lines.append(_one_side_row(b, side, label, _tok_s(v, "decode_tok_s")))
                    if "determinism" in v:
                        label = f"{w}, runs repeating the first exactly ({side} only)"
                        lines.append(_one_side_row(b, side, label, _determinism(v)))
                    if "clocks" in v:
                        label = f"{w}, SM clock and power ({side} only)"
                        lines.append(_one_side_row(b, side, label, _clocks(v)))
                if r:
                    label = f"{side}: experts per layer, 64 tokens"
                    lines.append(_one_side_row(b, side, label, _routed(r)))
                if "startup_s" in r:
                    label = f"{side}: engine start s"
                    lines.append(_one_side_row(b, side, label, _seconds(r)))
                if "error" in r:
                    lines.append(_one_side_row(b, side, f"{side} error", str(r["error"])))
            continue
        for w in workloads:
            sw, ow = s["workloads"][w], o["workloads"][w]
            st, ot = sw["tok_s"], ow["tok_s"]
            tgt = TARGETS.get(w)
            target = f">= {tgt:.1f}x" if tgt else ""
            lines.append(f"| {b} | {w} | {_tok_s(sw)} | {_tok_s(ow)} | {ot / st:.2f}x | {target} |")
            if "decode_tok_s" in sw and "decode_tok_s" in ow:
                sd, od = sw["decode_tok_s"], ow["decode_tok_s"]
                lines.append(
                    f"| {b} | {w}, decode steps only | {_tok_s(sw, 'decode_tok_s')} | "
                    f"{_tok_s(ow, 'decode_tok_s')} | {od / sd:.2f}x | |"
                )
            if "determinism" in sw or "determinism" in ow:
                lines.append(
                    f"| {b} | {w}, runs repeating the first exactly | {_determinism(sw)} | "
                    f"{_determinism(ow)} | | |"
                )
            if "clocks" in sw or "clocks" in ow:
                lines.append(
                    f"| {b} | {w}, SM clock and power | {_clocks(sw)} | {_clocks(ow)} | | |"
                )
        sk, ok = s.get("kv_cache_tokens"), o.get("kv_cache_tokens")
        kv_ratio = f"{ok / sk:.2f}x" if isinstance(sk, int) and isinstance(ok, int) else ""
        lines.append(f"| {b} | KV cache tokens | {sk} | {ok} | {kv_ratio} | >= 1.0x at 24 GiB |")
        lines.append(f"| {b} | weights GiB | {s.get('weights_gib')} | {o.get('weights_gib')} | | |")
        lines.append(f"| {b} | experts per layer, 64 tokens | {_routed(s)} | {_routed(o)} | | |")
        lines.append(f"| {b} | engine start s | {_seconds(s)} | {_seconds(o)} | | |")
    dev = next((r.get("device") for r in report["runs"].values() if "device" in r), "?")
    return f"Device: {dev}\n\n" + "\n".join(lines) + "\n"


def _seconds(run: dict[str, Any]) -> str:
    """A run's engine start (``LLM(...)`` until it returned: weight load, kernel compile and
    load, torch.compile, memory profile, graph capture) as a table cell."""
    t = run.get("startup_s")
    return f"{t:.1f}" if isinstance(t, (int, float)) else ""


def _determinism(workload: dict[str, Any]) -> str:
    """A workload's ``--determinism`` result as a table cell: identical runs of all, and the
    earliest divergence of any run (empty without one)."""
    d = workload.get("determinism")
    if not d:
        return ""
    return (
        f"{d['identical_runs']} / {d['runs']} (earliest divergence "
        f"{min(d['earliest_divergence_per_run'])} / {d['tokens_per_request']})"
    )


def _clocks(workload: dict[str, Any]) -> str:
    """The median run's SM clock and power (gpu_clocks.summarize) as a table cell: median and
    lowest MHz, median watts, and the share of samples held down for power; why not, when
    NVML gave nothing."""
    c = workload.get("clocks")
    if not c:
        return ""
    if not c.get("samples"):
        return f"n/a ({c.get('error', 'no samples')})"
    return (
        f"{c['sm_mhz_median']:,.0f} MHz (min {c['sm_mhz_min']:,}), {c['power_w_median']:.0f} W, "
        f"power-capped {c['power_capped_share']:.0%}"
    )


def _one_side_row(budget: str, side: str, label: str, value: str) -> str:
    """A summary row of a run with one side only: the value in that side's column."""
    cells = [budget, label, "", "", "", ""]
    cells[2 if side == "stock" else 3] = value
    return "| " + " | ".join(cells) + " |"


def _tok_s(workload: dict[str, Any], key: str = "tok_s") -> str:
    """The median run's tok/s (or decode_tok_s), with the range of the timed runs when there
    were several."""
    runs = workload.get(f"runs_{key}", [])
    spread = f" ({min(runs):,.0f}-{max(runs):,.0f})" if len(runs) > 1 else ""
    return f"{workload[key]:,.0f}{spread}"


def _routed(run: dict[str, Any]) -> str:
    """Distinct experts a 64-token batch routes to per layer (route_probe)."""
    v = run.get("routing", {}).get("experts_per_layer_t64")
    return "?" if v is None else f"{v:.1f}"


def plot(report: dict[str, Any], budgets: list[str], workloads: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=True):
        s, o = report["runs"].get(f"stock_{b}", {}), report["runs"].get(f"ours_{b}", {})
        if "error" in s or "error" in o or not s or not o:
            ax.set_title(f"{b}: failed")
            continue
        xs = range(len(workloads))
        st = [s["workloads"][w]["tok_s"] for w in workloads]
        ot = [o["workloads"][w]["tok_s"] for w in workloads]
        ax.bar([x - 0.2 for x in xs], st, 0.4, label="stock vLLM MXFP4 (Marlin, TRITON_ATTN)")
        ax.bar([x + 0.2 for x in xs], ot, 0.4, label="gptoss-3090 bnb_moe (NF4)")
        for x, a, c in zip(xs, st, ot, strict=True):
            ax.text(x + 0.2, c, f"{c / a:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), workloads, rotation=15)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s (decode: output, prefill: input)")
        ax.set_title(f"budget: {b}")
        ax.legend(fontsize=7)
    dev = next((r.get("device") for r in report["runs"].values() if "device" in r), "")
    fig.suptitle(f"GPT-OSS-20B end to end, vLLM 0.26, {dev}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
