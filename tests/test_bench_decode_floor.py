"""bench/decode_floor.py: its byte counts against a real checkpoint, its routing formula against
a simulation, and its CLI on a real bench_vllm_e2e result (CPU only).

References are independent of the script: the tensors the synthetic checkpoint writer stores
(read back through the safetensors package's headers), a Monte-Carlo count of distinct experts
with numpy, and hand counts from the config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_modules import BENCH, load_bench
from gptoss_3090 import presets
from gptoss_3090.synth import write_synthetic_checkpoint
from safetensors import safe_open

REPO = BENCH.parent
E2E_RESULT = (
    REPO / "bench/results/h200_2026-11-29_session28/call2_rope_sitting/res/e2e_decode/result.json"
)
READ_FLOOR = REPO / "bench/results/h200_2026-11-28_session20/call1_variantcheck/read_floor.json"
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I64": 8, "I32": 4}
NF4_SUFFIXES = {
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
}
BLOB = ".quant_state.bitsandbytes__nf4"

TINY = presets.get_preset("tiny")
H, INTER = TINY["hidden_size"], TINY["intermediate_size"]
Q = TINY["num_attention_heads"] * TINY["head_dim"]
KV = TINY["num_key_value_heads"] * TINY["head_dim"]


@pytest.fixture(scope="module")
def floor():
    return load_bench("decode_floor")


@pytest.fixture(scope="module")
def tiny_sizes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Bytes of every tensor of a tiny synthetic checkpoint (NF4 q/k/v/o and experts, nested),
    from the safetensors headers of the shards its index lists."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_synthetic_checkpoint(out, "tiny", seed=1, progress=False, reference=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes: dict[str, int] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                sizes[key] = int(np.prod(s.get_shape(), dtype=np.int64)) * ITEMSIZE[s.get_dtype()]
    assert set(sizes) == set(index["weight_map"])
    assert sum(sizes.values()) == index["metadata"]["total_size"]
    return sizes


def _nf4_parts(sizes: dict[str, int], prefix: str) -> dict[str, int]:
    stem = prefix + ".weight"
    return {k[len(stem) :]: v for k, v in sizes.items() if k.startswith(stem)}


@pytest.mark.parametrize(
    ("prefix", "numel"),
    [
        ("model.layers.0.mlp.experts.gate_up_projs.0", 2 * INTER * H),
        ("model.layers.3.mlp.experts.down_projs.7", H * INTER),
        ("model.layers.1.self_attn.q_proj", Q * H),
        ("model.layers.2.self_attn.k_proj", KV * H),
    ],
)
def test_nf4_tensor_bytes_matches_checkpoint(
    floor, tiny_sizes: dict[str, int], prefix: str, numel: int
) -> None:
    parts = _nf4_parts(tiny_sizes, prefix)
    # The double-quantized bitsandbytes layout, key for key (a layout change must be looked at).
    assert set(parts) == NF4_SUFFIXES, sorted(parts)
    # The quant_state blob is host-side JSON (shape, dtype, blocksizes, nested_offset); of it
    # the device reads only the float32 offset, which nf4_tensor_bytes counts as 4 bytes.
    device_bytes = sum(v for k, v in parts.items() if k != BLOB) + 4
    assert floor.nf4_tensor_bytes(numel) == device_bytes
    # And with the blob as stored, off by no more than the blob itself.
    assert abs(floor.nf4_tensor_bytes(numel) - sum(parts.values())) <= parts[BLOB]


def test_all_experts_read_the_whole_checkpoint_once(floor, tiny_sizes: dict[str, int]) -> None:
    """At a huge batch every expert is touched: the weights read are the whole model except the
    embedding (read B rows per step, not whole), counted exactly."""
    step = floor.step_bytes(TINY, "ours", batch=10**6, context=0)
    assert step["experts_touched"] == TINY["num_local_experts"]
    assert step["kv"] == 0
    weights = step["experts"] + step["attention_proj"] + step["lm_head"] + step["other"]

    embedding = tiny_sizes["model.embed_tokens.weight"]
    blobs = [k for k in tiny_sizes if k.endswith(BLOB)]
    # NF4 tensors: 4 q/k/v/o per layer + 2 per expert per layer.
    n_layers, n_exp = TINY["num_hidden_layers"], TINY["num_local_experts"]
    assert len(blobs) == n_layers * (4 + 2 * n_exp)
    stored = sum(tiny_sizes.values()) - embedding
    # Exactly: without the host-side JSON blobs, plus one float32 offset per NF4 tensor.
    device = stored - sum(tiny_sizes[k] for k in blobs) + 4 * len(blobs)
    assert weights == device
    # Against the stored bytes as they are (blobs included), within 1%.
    assert weights == pytest.approx(stored, rel=0.01)


def test_kv_bytes_hand_count(floor) -> None:
    # Tiny: 4 layers alternating sliding (window 128) / full, 2 KV heads x 64, K and V, bf16.
    per_token = 2 * 64 * 2 * 2
    assert floor.kv_bytes_per_sequence(TINY, 300) == per_token * (2 * 128 + 2 * 300)
    assert floor.kv_bytes_per_sequence(TINY, 100) == per_token * 4 * 100
    step = floor.step_bytes(TINY, "stock", batch=3, context=300)
    assert step["kv"] == 3 * per_token * (2 * 128 + 2 * 300)


def test_distinct_experts_formula_matches_simulation(floor) -> None:
    n_exp, k, batch, trials = 32, 4, 16, 20000
    rng = np.random.default_rng(0)
    # Top-k without replacement: the k smallest of E iid uniforms are a uniform k-subset.
    picks = np.argpartition(rng.random((trials, batch, n_exp)), k, axis=-1)[..., :k]
    touched = np.zeros((trials, n_exp), dtype=bool)
    np.put_along_axis(touched, picks.reshape(trials, batch * k), True, axis=-1)
    simulated = touched.sum(axis=-1).mean()
    assert floor.expected_distinct_experts(n_exp, k, batch) == pytest.approx(simulated, rel=0.02)
    assert floor.expected_distinct_experts(n_exp, k, 1) == pytest.approx(k)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "decode_floor.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _rows(text: str, workload: str) -> dict[str, list[str]]:
    """The floor table's rows of one workload, by side."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] == workload:
            out[cells[1]] = cells
    return out


def test_cli_on_session28_result(floor, tmp_path: Path) -> None:
    out = tmp_path / "floor.md"
    proc = _run_cli("--result", str(E2E_RESULT), "--bandwidth-gbs", "4103", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == proc.stdout
    assert "lower bound" in proc.stdout
    result = json.loads(E2E_RESULT.read_text())
    for workload in ("decode_b1", "decode_b16", "decode_b64"):
        rows = _rows(proc.stdout, workload)
        assert set(rows) == {"ours", "stock"}, proc.stdout
        for side, cells in rows.items():
            tok_s = result["runs"][f"{side}_full"]["workloads"][workload]["tok_s"]
            assert cells[7] == f"{tok_s:,.0f}"
    # Ours's measured routing replaces the formula; stock keeps the formula.
    b16 = _rows(proc.stdout, "decode_b16")
    assert b16["ours"][3] == "26.46 (measured)"
    assert b16["stock"][3] == f"{floor.expected_distinct_experts(32, 4, 16):.2f}"


def test_cli_prefers_the_decode_steps_alone(floor, tmp_path: Path) -> None:
    """A result whose runs recorded decode_tok_s (the decode steps without the prefill) is
    measured by it, and the report says so instead of calling the ratio a lower bound."""
    result = json.loads(E2E_RESULT.read_text())
    for run in result["runs"].values():
        for w in run["workloads"].values():
            w["decode_tok_s"] = 1.25 * w["tok_s"]
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    proc = _run_cli("--result", str(path), "--bandwidth-gbs", "4103")
    assert proc.returncode == 0, proc.stderr
    assert "lower bound" not in proc.stdout and "decode steps alone" in proc.stdout
    for side, cells in _rows(proc.stdout, "decode_b64").items():
        w = result["runs"][f"{side}_full"]["workloads"]["decode_b64"]
        assert cells[7] == f"{w['decode_tok_s']:,.0f}"


def test_cli_read_floor_bandwidth_and_floor_only(floor) -> None:
    proc = _run_cli("--read-floor", str(READ_FLOOR), "--batches", "1,64")
    assert proc.returncode == 0, proc.stderr
    copy_gbps = json.loads(READ_FLOOR.read_text())["copy_gbps"]
    assert f"{copy_gbps:,.0f} GB/s" in proc.stdout
    ours = _rows(proc.stdout, "B=1")["ours"]
    step = floor.step_bytes(presets.get_preset("20b"), "ours", 1)
    assert ours[5] == f"{step['total'] / (copy_gbps * 1e9) * 1e6:,.1f}"
    assert set(_rows(proc.stdout, "B=64")) == {"ours", "stock"}
    assert _run_cli("--batches", "1").returncode != 0  # no bandwidth given


def test_cli_names_the_bad_file(tmp_path: Path) -> None:
    """A file that is not JSON, or a read_floor.json without copy_gbps, is a usage error that
    names the option and the file, not a traceback."""
    text = tmp_path / "notes.txt"
    text.write_text("not json")
    for args, expect in (
        (("--read-floor", str(text)), f"--read-floor {text}: not JSON"),
        (("--read-floor", str(E2E_RESULT)), "no numeric copy_gbps"),
        (("--bandwidth-gbs", "1", "--result", str(text)), f"--result {text}: not JSON"),
        (("--bandwidth-gbs", "1", "--config", str(text)), f"--config {text}: not JSON"),
    ):
        proc = _run_cli(*args)
        assert proc.returncode == 2, proc.stdout
        assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
