"""The gptoss-3090 CLI: inspect (text / JSON), synth, argument and input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gptoss_3090 import presets
from gptoss_3090.cli import main
from gptoss_3090.memory import memory_plan

TINY = presets.TINY
GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["synth", str(out), "--preset", "tiny", "--no-reference", "--quiet"]) == 0
    return out


def test_synth_writes_checkpoint(tiny: Path) -> None:
    assert (tiny / "config.json").is_file()
    assert (tiny / "model.safetensors.index.json").is_file()
    assert (tiny / "tokenizer.json").is_file()
    assert not (tiny / "reference").exists()


def test_inspect_json(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny), "--json", "--budget-gib", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    s, plan = data["summary"], data["memory_plan"]
    assert s["layers"] == TINY["num_hidden_layers"]
    assert s["experts"] == TINY["num_local_experts"]
    assert s["hidden_size"] == TINY["hidden_size"]
    # Independent arithmetic for the tiny model: 2 full layers x 2 KV heads x 64 x (K,V) x 2 B.
    n_full = TINY["layer_types"].count("full_attention")
    per_token = n_full * TINY["num_key_value_heads"] * TINY["head_dim"] * 2 * 2
    assert plan["kv_bytes_per_token"] == per_token == 1024
    free = 4 * GIB - s["gpu_weight_bytes"] - plan["overhead_bytes"]
    assert plan["kv_budget_bytes"] == free
    assert abs(plan["kv_cache_tokens"] - free // per_token) <= 4096  # minus sliding windows
    assert plan["fits_max_model_len"] == (plan["kv_cache_tokens"] >= 131072)


def test_inspect_text(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out
    assert "KV tokens" in out
    assert "131,072-token context fits" in out  # tiny weights leave ~20 GiB of 24
    assert f"{TINY['num_hidden_layers']} layers" in out


def test_inspect_tight_budget_does_not_fit(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny), "--budget-gib", "3.1"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_inspect_bad_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "error" in err
    assert "Traceback" not in err


def test_inspect_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "OUT"],  # --preset is required
        ["synth", "OUT", "--preset", "huge"],
        ["synth", "OUT", "--preset", "tiny", "--attention", "fp8"],
        ["synth", "OUT", "--preset", "tiny", "--dtype", "fp32"],
        ["synth", "OUT", "--preset", "tiny", "--seed", "x"],
        ["inspect"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_synth_negative_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "o"), "--preset", "tiny", "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err


def test_synth_refuses_non_empty_dir(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tiny), "--preset", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "synth" in out


@pytest.mark.parametrize("module", ["gptoss_3090.cli", "gptoss_3090"])
def test_console_entry_point_runs(tiny: Path, module: str) -> None:
    """``python -m gptoss_3090`` (and ``.cli``) exits 2 with a one-line message on a bad path."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "inspect", str(tiny / "missing")],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_memory_plan_20b_fits_on_24_gib() -> None:
    """GPT-OSS-20B shapes with ~12.6 GB of NF4 weights: 131,072 tokens fit in 24 GiB."""
    cfg = presets.GPTOSS_20B
    summary = {
        "gpu_weight_bytes": 12_600_000_000,
        "layers": cfg["num_hidden_layers"],
        "kv_heads": cfg["num_key_value_heads"],
        "head_dim": cfg["head_dim"],
        "layer_types": cfg["layer_types"],
        "sliding_window": cfg["sliding_window"],
    }
    plan = memory_plan(summary, budget_gib=24.0)
    assert plan["kv_bytes_per_token"] == 24_576  # gpt-oss-math.md: 12 x 8 x 64 x 2 x 2
    assert plan["fits_max_model_len"]
    assert plan["kv_cache_tokens"] > 131072
    tight = memory_plan(summary, budget_gib=14.0)
    assert not tight["fits_max_model_len"]
    with pytest.raises(ValueError, match="gpu_weight_bytes"):
        memory_plan({"layers": 2})


def test_settings_lists_the_variables_and_their_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``settings``: one row per variable with its kind and value here; ``--kind`` filters;
    ``--json`` gives the same; an unknown GPTOSS_3090_* name is reported and exits 1."""
    from gptoss_3090 import settings

    for name in [n for n in os.environ if n.startswith("GPTOSS_3090_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GPTOSS_3090_ATTN_ROPE", "vllm")
    assert main(["settings"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(settings.SETTINGS)
    rope = next(ln for ln in lines if ln.startswith("GPTOSS_3090_ATTN_ROPE "))
    assert "serving" in rope and "=vllm" in rope
    assert any("(unset)" in ln and ln.startswith("GPTOSS_3090_PDL ") for ln in lines)
    assert "[experimental]" in next(ln for ln in lines if "MOE_ROUTING" in ln)

    assert main(["settings", "--kind", "path", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {s["kind"] for s in doc["settings"]} == {"path"}
    assert doc["unknown"] == []

    monkeypatch.setenv("GPTOSS_3090_ATTN_ROPES", "vllm")
    assert main(["settings"]) == 1
    err = capsys.readouterr().err
    assert "GPTOSS_3090_ATTN_ROPES is not a setting" in err
    assert main(["settings", "--kind", "nonsense"]) == 2


def test_served_programs_follow_dtype_and_weights_order() -> None:
    from gptoss_3090 import _native
    from gptoss_3090.cli import served_programs

    assert served_programs() == ["nf4", "attention", "moe_chunks"]
    assert served_programs("fp16") == ["nf4", "attention", "moe_chunks_f16"]
    assert served_programs("bf16", "rows") == ["nf4", "attention", "moe", "moe_chunks"]
    known = set(_native.kernel_sources())
    for dtype in ("bf16", "fp16"):
        for order in ("chunks", "rows"):
            assert set(served_programs(dtype, order)) <= known
    with pytest.raises(ValueError, match="dtype"):
        served_programs("fp32")


def test_compile_fills_the_kernel_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gptoss-3090 compile --arch` fills the cache without a GPU; a second run finds it there.
    (The served programs are cut to the small attention one to keep this fast.)"""
    from gptoss_3090 import _native, cli, runtime

    runtime.ensure_cuda_libs()
    try:
        _native.nvrtc_version()
    except Exception as e:  # noqa: BLE001 - any failure means no NVRTC here
        pytest.skip(f"NVRTC not available: {e}")
    monkeypatch.setenv("GPTOSS_3090_CACHE", str(tmp_path))
    monkeypatch.setattr(cli, "served_programs", lambda dtype, order: ["attention"])
    assert main(["compile", "--arch", "sm_86"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "compiled" in out and "sm_86" in out and str(tmp_path) in out
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["attention"]
    assert main(["compile", "--arch", "sm_86"]) == 0
    assert "cached already" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["compile", "--arch", "sm_75"], {}, "arch"),
        (["compile", "--arch", "sm_86"], {"GPTOSS_3090_CACHE": "off"}, "cache is off"),
    ],
)
def test_compile_input_errors(
    argv: list[str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compile_without_a_gpu_asks_for_an_arch(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: compile would use its architecture")
    assert main(["compile"]) == 2
    assert "--arch" in capsys.readouterr().err
