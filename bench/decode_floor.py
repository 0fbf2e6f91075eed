"""The memory-bandwidth floor of one GPT-OSS decode step, ours (NF4) vs stock vLLM (MXFP4).

Issue 6's targets include "close to the memory-bandwidth floor when decoding". A decode step
at batch B must read, at least once, every weight byte it uses plus the KV cache its attention
looks at; at small B nothing else is large, so ``floor time = bytes / bandwidth`` bounds the
step from below and ``B / floor time`` bounds the decode throughput from above. This script
counts those bytes from the shapes of a Hugging Face GptOss ``config.json`` for two sides:

* ``ours``: experts and q/k/v/o in bitsandbytes NF4 with double quantization
  (:func:`nf4_tensor_bytes`: two 4-bit codes per byte, one uint8 absmax code per 64 weights,
  one float32 absmax per 256 blocks, the 256-entry float32 nested code table, the 16-entry
  float32 NF4 table and the float32 offset per tensor); everything else bf16;
* ``stock``: vLLM's MXFP4 path: experts in MXFP4 (4-bit values + one uint8 E8M0 scale per 32
  weights = 4.25 bits/weight, :func:`mxfp4_tensor_bytes`), q/k/v/o and everything else bf16.

Bytes of one step (:func:`step_bytes`), with H hidden, I expert intermediate, E experts, k
experts per token, L layers, V vocabulary, C the average context (tokens already cached):

* per layer: 2 RMSNorm weights (2 H bf16), q/k/v/o weights + biases, the router (bf16 [E, H]
  + bias [E]), the attention sinks;
* experts, per layer: ``n(B) = E * (1 - (1 - k/E)**B)`` distinct experts (the expected count
  when each of B tokens picks k of E without replacement, uniformly; a measured count may be
  given instead), each reading gate_up [2I, H] + down [H, I] weights, statistics and biases;
* KV cache, per layer and sequence: ``min(C, sliding_window)`` tokens on a
  ``sliding_attention`` layer, C on a ``full_attention`` one, each token
  ``kv_heads * head_dim * 2 (K and V) * 2 bytes``;
* once per step: the final norm and lm_head [V, H] bf16; the embedding's B rows.

Left out: activations, the new token's K/V write (B * 2 KiB per layer for 20b) and
the logits, all small next to the weights. The weights are counted at their logical shapes;
an implementation that pads them (vLLM's Marlin MXFP4 MoE pads I to a multiple of 128 and H to
a multiple of 256) reads more than this floor.

The bandwidth is ``--bandwidth-gbs`` or the ``copy_gbps`` of a ``read_floor.json`` written by
``bench/read_floor.py``: a 1 GiB device-to-device ``copy_`` timed as bytes read + written per
second, i.e. the DRAM traffic per second the card sustains. It is used as is (not halved) as
the rate at which a step can read: read_floor.py's own read-only kernel reaches 89% of it on a
33.6 MB buffer (H200, session 20), so a real step can approach this floor but hardly beat it.

Insight (from this script, 20b, B = 1, C = 256): a step reads 2.736 GB ours vs 3.718 GB
stock, a floor ratio stock/ours of 1.359x (about 1.36x). The experts cost about the same on
both sides (12.86 MB vs 13.24 MB per expert: NF4 with double quantization is 4.13 bits/weight
plus small per-tensor tables, MXFP4 4.25); the difference is the attention projections, 4-bit
for us and bf16 in stock (24 x 13.7 MB vs 24 x 53.1 MB), while lm_head (1.16 GB bf16) is the
same on both sides. As B grows, n(B) approaches E and the experts, then the KV cache, dominate:
the floor ratio falls to 1.12x at B = 16 and 1.10x at B = 64 (formula routing).

With ``--result`` (the ``result.json`` of ``bench/bench_vllm_e2e.py``) each workload
``decode_bN`` (N prompts of 128 tokens, 256 output tokens each, so C = 128 + 256 / 2 = 256 by
default) is set against its measured tok/s: ``decode_tok_s``, the decode steps alone, where
the run recorded it (``bench_vllm_e2e.py`` since session 29), else ``tok_s``, which times the
whole ``generate`` call, prefill of the 128 prompt tokens included, so that measured / floor
is a lower bound of the decode steps' own efficiency. Ours's measured routing
(``runs[...]["routing"]["experts_per_layer_t<B>"]``) replaces n(B) when recorded; stock uses
the formula unless ``--measured-routing both``.

Usage::

    python3 bench/decode_floor.py --result res/e2e_decode/result.json --bandwidth-gbs 4103
    python3 bench/decode_floor.py --read-floor read_floor.json --batches 1,16,64 --out floor.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

SIDES = ("ours", "stock")
BF16 = 2  # bytes per bf16 value
F32 = 4  # bytes per float32 value
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_CODE_TABLE = 16  # float32 entries of the NF4 code table (quant_map)
NESTED_CODE_TABLE = 256  # float32 entries of the nested (dynamic) code table
MXFP4_GROUP = 32  # weights per uint8 E8M0 scale
COMPONENTS = ("experts", "attention_proj", "lm_head", "kv", "other", "embedding")
E2E_PROMPT, E2E_OUTPUT = 128, 256  # tokens per request of bench_vllm_e2e's decode_bN
DEFAULT_CONTEXT = E2E_PROMPT + E2E_OUTPUT // 2


def nf4_tensor_bytes(
    numel: int, blocksize: int = NF4_BLOCKSIZE, nested_blocksize: int = NF4_NESTED_BLOCKSIZE
) -> int:
    """Bytes of one bitsandbytes NF4 tensor with double quantization.

    Packed codes (two per byte), one uint8 absmax code per ``blocksize`` weights, one float32
    nested absmax per ``nested_blocksize`` blocks, the 256-entry float32 nested code table, the
    16-entry float32 NF4 code table and one float32 nested offset. (The checkpoint stores the
    offset as text in its ``quant_state`` JSON blob; on the device it is one float32.)
    """
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    blocks = -(-numel // blocksize)
    nested = -(-blocks // nested_blocksize)
    packed = -(-numel // 2)
    return packed + blocks + nested * F32 + (NESTED_CODE_TABLE + NF4_CODE_TABLE + 1) * F32


def mxfp4_tensor_bytes(numel: int, group: int = MXFP4_GROUP) -> int:
    """Bytes of one MXFP4 tensor: 4-bit values and one uint8 E8M0 scale per ``group`` weights."""
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    return -(-numel // 2) + -(-numel // group)


def expected_distinct_experts(experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts touched when ``batch`` tokens each pick ``top_k`` of ``experts``.

    Uniform routing without replacement: a given expert is missed by one token with probability
    ``1 - k/E``, by all B tokens with ``(1 - k/E)**B``.
    """
    if not 0 < top_k <= experts or batch < 0:
        raise ValueError(f"need 0 < k <= E and B >= 0, got E={experts} k={top_k} B={batch}")
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)


def _weight_bytes(numel: int, fmt: str) -> int:
    if fmt == "nf4":
        return nf4_tensor_bytes(numel)
    if fmt == "mxfp4":
        return mxfp4_tensor_bytes(numel)
    if fmt == "bf16":
        return numel * BF16
    raise ValueError(f"unknown weight format {fmt!r}")


def _formats(side: str) -> tuple[str, str]:
    """(expert weight format, attention projection weight format) of a side."""
    if side == "ours":
        return "nf4", "nf4"
    if side == "stock":
        return "mxfp4", "bf16"
    raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")


def expert_bytes(config: dict[str, Any], side: str) -> int:
    """Bytes of one expert: gate_up [2I, H] + down [H, I] weights (+ statistics) + bf16 biases."""
    h, i = config["hidden_size"], config["intermediate_size"]
    fmt, _ = _formats(side)
    return _weight_bytes(2 * i * h, fmt) + _weight_bytes(h * i, fmt) + (2 * i + h) * BF16


def attention_proj_bytes(config: dict[str, Any], side: str) -> int:
    """Bytes of one layer's q/k/v/o weights (+ statistics) and bf16 biases."""
    h = config["hidden_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    _, fmt = _formats(side)
    shapes = ((q, h), (kv, h), (kv, h), (h, q))  # [out, in]
    return sum(_weight_bytes(o * n, fmt) + o * BF16 for o, n in shapes)


def kv_bytes_per_sequence(config: dict[str, Any], context: float) -> float:
    """KV-cache bytes one sequence's attention reads over all layers at ``context`` tokens."""
    per_token = config["num_key_value_heads"] * config["head_dim"] * 2 * BF16  # K and V
    window = config.get("sliding_window")
    layers = config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    if len(layers) != config["num_hidden_layers"]:
        raise ValueError(f"{len(layers)} layer_types for {config['num_hidden_layers']} layers")
    total = 0.0
    for kind in layers:
        if kind == "sliding_attention" and window:
            total += min(context, window) * per_token
        elif kind in ("sliding_attention", "full_attention"):
            total += context * per_token
        else:
            raise ValueError(f"unknown layer type {kind!r}")
    return total


def step_bytes(
    config: dict[str, Any],
    side: str,
    batch: int,
    context: float = DEFAULT_CONTEXT,
    experts_touched: float | None = None,
) -> dict[str, float]:
    """Bytes one decode step of ``batch`` sequences reads, by component.

    Args:
        config: a Hugging Face GptOss config dict.
        side: ``"ours"`` (NF4 experts and q/k/v/o) or ``"stock"`` (MXFP4 experts, bf16 q/k/v/o).
        batch: sequences decoded in the step (one new token each).
        context: average tokens already in each sequence's KV cache.
        experts_touched: distinct experts per layer; default :func:`expected_distinct_experts`.

    Returns:
        ``experts``, ``attention_proj`` (q/k/v/o weights + biases), ``lm_head`` (+ final norm),
        ``kv``, ``other`` (per-layer norms, router, sinks), ``embedding`` (B rows) and
        ``total``, in bytes, plus ``experts_touched`` (per layer, not bytes).
    """
    if batch < 1 or context < 0:
        raise ValueError(f"need batch >= 1 and context >= 0, got {batch}, {context}")
    h, n_layers = config["hidden_size"], config["num_hidden_layers"]
    n_exp = config["num_local_experts"]
    if experts_touched is None:
        experts_touched = expected_distinct_experts(n_exp, config["num_experts_per_tok"], batch)
    if not 0 < experts_touched <= n_exp:
        raise ValueError(f"experts_touched {experts_touched} outside (0, {n_exp}]")
    per_layer_other = (
        2 * h * BF16  # input_layernorm, post_attention_layernorm
        + (n_exp * h + n_exp) * BF16  # router weight + bias
        + config["num_attention_heads"] * BF16  # sinks
    )
    out = {
        "experts": n_layers * experts_touched * expert_bytes(config, side),
        "attention_proj": float(n_layers * attention_proj_bytes(config, side)),
        "lm_head": float((config["vocab_size"] * h + h) * BF16),  # lm_head + final norm
        "kv": batch * kv_bytes_per_sequence(config, context),
        "other": float(n_layers * per_layer_other),
        "embedding": float(batch * h * BF16),
    }
    out["total"] = sum(out[c] for c in COMPONENTS)
    out["experts_touched"] = float(experts_touched)
    return out


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def load_bandwidth(read_floor: str | None, bandwidth_gbs: float | None) -> tuple[float, str]:
    """(bytes per second, where it came from) from ``--bandwidth-gbs`` or a read_floor.json."""
    if bandwidth_gbs is not None:
        if not bandwidth_gbs > 0:
            raise ValueError(f"--bandwidth-gbs must be positive, got {bandwidth_gbs}")
        return bandwidth_gbs * 1e9, f"{bandwidth_gbs:,.0f} GB/s (given)"
    if read_floor is None:
        raise ValueError("give --bandwidth-gbs or --read-floor")
    data = read_json(read_floor, "--read-floor")
    if not isinstance(data, dict) or not isinstance(data.get("copy_gbps"), (int, float)):
        raise ValueError(
            f"--read-floor {read_floor}: no numeric copy_gbps (not a read_floor.json?)"
        )
    gbs = float(data["copy_gbps"])
    device = data.get("device", "?")
    return gbs * 1e9, f"{gbs:,.0f} GB/s (device-to-device copy on {device}, {read_floor})"


def read_json(path: str, option: str) -> Any:
    """The JSON document at ``path``; ValueError naming the option and the file if it is not."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} {path}: not JSON ({e})") from e


def workload_batch(name: str) -> int | None:
    """The batch of a ``decode_bN`` workload name, else None."""
    m = re.fullmatch(r"decode_b(\d+)", name)
    return int(m.group(1)) if m else None


def measured_experts(run: dict[str, Any], batch: int) -> float | None:
    """The run's measured distinct experts per layer at ``batch`` tokens, if recorded."""
    v = run.get("routing", {}).get(f"experts_per_layer_t{batch}")
    return float(v) if isinstance(v, (int, float)) else None


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _gb(b: float) -> str:
    return f"{b / 1e9:.3f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def breakdown_table(config: dict[str, Any], batches: list[int], context: float) -> list[str]:
    """Per-component GB per step for both sides (formula routing)."""
    lines = [
        _row(
            [
                "side",
                "B",
                "experts/layer",
                "experts",
                "q/k/v/o",
                "lm_head",
                "KV",
                "other",
                "GB/step",
            ]
        ),
        _row(["---"] * 2 + ["---:"] * 7),
    ]
    for side in SIDES:
        for b in batches:
            s = step_bytes(config, side, b, context)
            lines.append(
                _row(
                    [
                        side,
                        str(b),
                        f"{s['experts_touched']:.2f}",
                        _gb(s["experts"]),
                        _gb(s["attention_proj"]),
                        _gb(s["lm_head"]),
                        _gb(s["kv"]),
                        _gb(s["other"] + s["embedding"]),
                        _gb(s["total"]),
                    ]
                )
            )
    return lines


def floor_rows(
    config: dict[str, Any],
    bandwidth: float,
    context: float,
    cases: list[tuple[str, int, dict[str, float | None], dict[str, float | None]]],
) -> tuple[list[str], list[str]]:
    """The floor table and the ours/stock ratio table.

    ``cases``: (workload label, batch, {side: measured experts per layer or None},
    {side: measured tok/s or None}).
    """
    floor = [
        _row(
            [
                "workload",
                "side",
                "B",
                "experts/layer",
                "GB/step",
                "floor us/step",
                "floor tok/s",
                "measured tok/s",
                "measured/floor",
            ]
        ),
        _row(["---"] * 2 + ["---:"] * 7),
    ]
    ratio = [
        _row(
            [
                "workload",
                "B",
                "GB/step stock/ours",
                "floor tok/s ours/stock",
                "measured tok/s ours/stock",
            ]
        ),
        _row(["---"] + ["---:"] * 4),
    ]
    for label, batch, touched, measured in cases:
        tok = {}
        by_side = {}
        for side in SIDES:
            s = step_bytes(config, side, batch, context, touched.get(side))
            by_side[side] = s["total"]
            t = s["total"] / bandwidth
            tok[side] = batch / t
            m = measured.get(side)
            src = "" if touched.get(side) is None else " (measured)"
            floor.append(
                _row(
                    [
                        label,
                        side,
                        str(batch),
                        f"{s['experts_touched']:.2f}{src}",
                        _gb(s["total"]),
                        f"{t * 1e6:,.1f}",
                        f"{tok[side]:,.0f}",
                        "-" if m is None else f"{m:,.0f}",
                        "-" if m is None else f"{100 * m / tok[side]:.1f}%",
                    ]
                )
            )
        mo, ms = measured.get("ours"), measured.get("stock")
        ratio.append(
            _row(
                [
                    label,
                    str(batch),
                    f"{by_side['stock'] / by_side['ours']:.3f}",
                    f"{tok['ours'] / tok['stock']:.3f}",
                    "-" if mo is None or ms is None else f"{mo / ms:.3f}",
                ]
            )
        )
    return floor, ratio


def result_cases(
    result: dict[str, Any], budget: str, measured_routing: str
) -> list[tuple[str, int, dict[str, float | None], dict[str, float | None]]]:
    """The decode_bN workloads of a bench_vllm_e2e result.json, with tok/s and routing."""
    runs = result.get("runs", {})
    names: list[str] = []
    for side in SIDES:
        run = runs.get(f"{side}_{budget}")
        if run is None:
            continue
        for name in run.get("workloads", {}):
            if workload_batch(name) is not None and name not in names:
                names.append(name)
    if not names:
        known = ", ".join(sorted(runs)) or "none"
        raise ValueError(f"no decode_bN workload for budget {budget!r} (runs: {known})")
    names.sort(key=lambda n: workload_batch(n) or 0)
    use_measured = {"ours": measured_routing in ("ours", "both")}
    use_measured["stock"] = measured_routing == "both"
    cases = []
    for name in names:
        batch = workload_batch(name)
        assert batch is not None
        touched: dict[str, float | None] = {}
        measured: dict[str, float | None] = {}
        for side in SIDES:
            run = runs.get(f"{side}_{budget}") or {}
            w = run.get("workloads", {}).get(name) or {}
            # The decode steps alone where the run recorded them (bench_vllm_e2e.py since
            # session 29), else the whole generate call.
            tok_s = w.get("decode_tok_s", w.get("tok_s"))
            measured[side] = float(tok_s) if isinstance(tok_s, (int, float)) else None
            touched[side] = measured_experts(run, batch) if use_measured[side] else None
        cases.append((name, batch, touched, measured))
    return cases


def report(
    config: dict[str, Any],
    config_name: str,
    bandwidth: float,
    bandwidth_src: str,
    context: float,
    batches: list[int],
    result: dict[str, Any] | None = None,
    result_name: str = "",
    budget: str = "full",
    measured_routing: str = "ours",
) -> str:
    """The Markdown report: floors (and measured throughput when ``result`` is given)."""
    lines = [
        f"# Decode-step memory-bandwidth floor ({config_name})",
        "",
        f"Bandwidth {bandwidth_src}; average context C = {context:g} tokens; GB = 1e9 bytes.",
        "Floor = bytes read per step / bandwidth; floor tok/s = B / floor time. "
        "experts/layer: distinct experts per layer, E (1 - (1 - k/E)^B) unless measured.",
        "",
    ]
    if result is not None:
        cases = result_cases(result, budget, measured_routing)
        lines[0] += f" vs measured ({result_name}, budget {budget})"
        steps_only = all(
            "decode_tok_s" in (run.get("workloads", {}).get(c[0]) or {})
            for c in cases
            for side, run in result.get("runs", {}).items()
            if side.endswith(f"_{budget}")
        )
        lines += [
            "Measured tok/s: the decode steps alone (each run less a run of its first token)."
            if steps_only
            else "Measured tok/s times the whole generate call, including the prefill of the "
            f"{E2E_PROMPT}-token prompts, so measured/floor is a lower bound of the decode "
            "steps' efficiency.",
            "",
        ]
    else:
        cases = [(f"B={b}", b, {}, {}) for b in batches]
    floor, ratio = floor_rows(config, bandwidth, context, cases)
    lines += floor + ["", "Ours vs stock:", ""] + ratio
    lines += ["", "Bytes per step by component (GB, formula routing):", ""]
    lines += breakdown_table(config, sorted({c[1] for c in cases}), context)
    return "\n".join(lines) + "\n"


def load_config(preset: str, config_path: str | None) -> tuple[dict[str, Any], str]:
    """(config dict, name) from a config.json path or a gptoss_3090 preset."""
    if config_path:
        return read_json(config_path, "--config"), config_path
    from gptoss_3090.presets import get_preset  # CPU-only, imports no torch

    return get_preset(preset), f"preset {preset}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--result", help="result.json of bench/bench_vllm_e2e.py")
    bw = ap.add_mutually_exclusive_group(required=True)
    bw.add_argument("--bandwidth-gbs", type=float, help="bandwidth in GB/s (1e9 bytes/s)")
    bw.add_argument("--read-floor", help="read_floor.json of bench/read_floor.py (copy_gbps)")
    ap.add_argument("--budget", default="full", help="run key suffix: runs[<side>_<budget>]")
    ap.add_argument(
        "--context",
        type=float,
        default=DEFAULT_CONTEXT,
        help=f"average tokens in the KV cache (default {DEFAULT_CONTEXT})",
    )
    ap.add_argument("--batches", default="1,16,64", help="batches when no --result is given")
    ap.add_argument("--preset", default="20b", help="gptoss_3090 preset (default 20b)")
    ap.add_argument("--config", help="a GptOss config.json instead of --preset")
    ap.add_argument(
        "--measured-routing",
        choices=("ours", "both", "none"),
        default="ours",
        help="sides whose measured experts_per_layer_t<B> replace the formula",
    )
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args(argv)
    try:
        batches = [int(v) for v in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        ap.error(f"--batches {args.batches!r}: expected positive integers, comma-separated")
    if args.context < 0:
        ap.error(f"--context {args.context}: expected >= 0")
    try:
        bandwidth, src = load_bandwidth(args.read_floor, args.bandwidth_gbs)
        config, name = load_config(args.preset, args.config)
        result = read_json(args.result, "--result") if args.result else None
        text = report(
            config,
            name,
            bandwidth,
            src,
            args.context,
            batches,
            result,
            args.result or "",
            args.budget,
            args.measured_routing,
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"decode_floor: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
