"""CPU tests of ``gptoss-3090 doctor``, ``demo``, ``bench --plot`` and the ``_native`` stubs."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from gptoss_3090 import _native
from gptoss_3090.cli import main as cli_main

PKG = Path(__file__).resolve().parents[1] / "python" / "gptoss_3090"
GPU = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# _native.pyi
# ---------------------------------------------------------------------------------------------


def _stub_names() -> set[str]:
    tree = ast.parse((PKG / "_native.pyi").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_every_native_name_is_in_the_stub() -> None:
    public = {n for n in dir(_native) if not n.startswith("_")} | {"__version__"}
    missing = public - _stub_names()
    assert not missing, f"_native.pyi lacks {sorted(missing)}"


def test_stub_exception_hierarchy_matches_native() -> None:
    tree = ast.parse((PKG / "_native.pyi").read_text())
    bases = {
        n.name: [b.id for b in n.bases if isinstance(b, ast.Name)]
        for n in tree.body
        if isinstance(n, ast.ClassDef)
    }
    for name in ("CheckpointError", "CudaError", "KernelCompileError"):
        native = getattr(_native, name)
        assert [b.__name__ for b in native.__bases__] == bases[name], name


def test_stub_functions_have_docstrings() -> None:
    tree = ast.parse((PKG / "_native.pyi").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            assert ast.get_docstring(node), f"{node.name} has no docstring in _native.pyi"


def _stub_functions() -> list[tuple[ast.FunctionDef, object]]:
    """(stub def, native object) for module functions and NativeCheckpoint methods."""
    tree = ast.parse((PKG / "_native.pyi").read_text())
    out: list[tuple[ast.FunctionDef, object]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and hasattr(_native, node.name):
            out.append((node, getattr(_native, node.name)))
        if isinstance(node, ast.ClassDef) and node.name == "NativeCheckpoint":
            for m in node.body:
                if isinstance(m, ast.FunctionDef) and m.name != "__new__":
                    obj = getattr(_native.NativeCheckpoint, m.name)
                    if isinstance(obj, property):
                        continue
                    out.append((m, obj))
    return out


def test_stub_signatures_match_native_parameters() -> None:
    """Parameter names of the stub equal those PyO3 reports (text_signature)."""
    checked = 0
    for node, obj in _stub_functions():
        sig = getattr(obj, "__text_signature__", None)
        if not sig:
            continue
        native = [
            p.strip().split("=")[0].lstrip("*").strip()
            for p in sig.strip("()").split(",")
            if p.strip() and p.strip() not in ("/", "*", "$module")
        ]
        native = [p for p in native if p and p not in ("$module", "$self")]
        a = node.args
        ours = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"]
        assert ours == native, f"{node.name}: stub {ours} != native {native}"
        checked += 1
    assert checked >= 28


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------

LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\w+)\s+\S")


@pytest.fixture(scope="module")
def doctor_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict]:
    """One doctor run (importing vLLM in its plugin probe is the slow part), text and JSON."""
    from gptoss_3090 import doctor

    tiny = tmp_path_factory.mktemp("doctor") / "tiny"
    from gptoss_3090.synth import write_synthetic_checkpoint

    write_synthetic_checkpoint(tiny, preset="tiny", reference=False, progress=False)
    checks = doctor.run_checks(str(tiny), max_model_len=4096)
    text = doctor.format_text(checks)
    rc = 1 if any(c.status == doctor.FAIL for c in checks) else 0
    return rc, text, json.loads(doctor.to_json(checks))


def test_doctor_prints_one_line_per_check(doctor_run) -> None:
    _, text, _ = doctor_run
    lines = text.splitlines()
    names = [LINE.match(ln).group(2) for ln in lines[:-1] if LINE.match(ln)]
    assert names == [
        "gpu", "driver", "nvrtc", "torch", "vllm", "plugin", "kernels", "memory", "settings"
    ]
    assert lines[-1].startswith("doctor: ")


@pytest.mark.skipif(GPU, reason="CPU-machine expectations")
def test_doctor_on_cpu_machine(doctor_run) -> None:
    rc, text, doc = doctor_run
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert status["gpu"] == "SKIP"
    assert status["nvrtc"] == "PASS"
    # NVRTC compiles every family for sm_86 without a GPU
    assert status["kernels"] == "PASS", text
    kern = next(c for c in doc["checks"] if c["name"] == "kernels")
    assert kern["data"]["arch"] == "sm_86"
    assert set(kern["data"]["cubin_bytes"]) == set(_native.kernel_sources())
    assert all(v > 0 for v in kern["data"]["cubin_bytes"].values())
    # the memory plan used a 24 GiB card
    mem = next(c for c in doc["checks"] if c["name"] == "memory")
    assert mem["status"] == "PASS", text
    assert mem["data"]["budget_gib"] == 24.0
    assert (rc == 0) == doc["ok"] == all(c["status"] != "FAIL" for c in doc["checks"])
    assert rc == 0, text


def test_doctor_cli_exit_status_and_json(monkeypatch, capsys) -> None:
    """The CLI prints JSON and exits 0 iff no check failed (plugin probe stubbed for speed)."""
    from gptoss_3090 import doctor

    monkeypatch.setattr(doctor, "_check_plugin", lambda v: doctor.Check("plugin", "SKIP", "x"))
    assert cli_main(["doctor", "--json"]) == 0 or GPU
    doc = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in doc["checks"]][-1] == "settings"
    monkeypatch.setattr(doctor, "_check_torch", lambda: doctor.Check("torch", "FAIL", "broken"))
    assert cli_main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  torch" in out and "FAILED: torch" in out


def test_doctor_settings_lists_what_is_set_and_fails_on_unknown_names() -> None:
    """The settings check: defaults when nothing is set; each known variable with its kind (and
    a note on experimental ones); a GPTOSS_3090_* name the package does not read fails."""
    from gptoss_3090 import doctor

    c = doctor._check_settings({"PATH": "/bin"})
    assert c.status == "PASS" and "defaults" in c.detail
    c = doctor._check_settings(
        {"GPTOSS_3090_ATTN_ROPE": "vllm", "GPTOSS_3090_MOE_ROUTING": "router"}
    )
    assert c.status == "PASS"
    assert "GPTOSS_3090_ATTN_ROPE=vllm [serving]" in c.detail
    assert "GPTOSS_3090_MOE_ROUTING=router [serving] (experimental" in c.detail
    assert c.data["experimental"] == ["GPTOSS_3090_MOE_ROUTING"]
    c = doctor._check_settings({"GPTOSS_3090_ATTN_ROPES": "vllm", "GPTOSS_3090_PDL": "off"})
    assert c.status == "FAIL" and "GPTOSS_3090_ATTN_ROPES" in c.detail
    assert c.data["unknown"] == ["GPTOSS_3090_ATTN_ROPES"]
    assert "GPTOSS_3090_ATTN_ROPE" in c.data["known"]


def test_settings_table_matches_the_sources_and_the_docs() -> None:
    """Every GPTOSS_3090_* name the Rust, CUDA and Python sources and the benchmarks mention is
    in the settings table, every table entry is read somewhere, and each is documented (docs/
    or README)."""
    from gptoss_3090 import settings

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"GPTOSS_3090_[A-Z0-9_]+")
    used: set[str] = set()
    for folder in ("src", "python", "kernels", "bench"):
        for path in (root / folder).rglob("*"):
            if "results" in path.parts:
                continue
            if path.suffix in (".rs", ".py", ".cu", ".cuh", ".sh") and path.name != "settings.py":
                used |= set(pattern.findall(path.read_text()))
    table = settings.by_name()
    assert len(table) == len(settings.SETTINGS)
    assert sorted(used - set(table)) == [], "read by the sources but missing from the table"
    assert sorted(set(table) - used) == [], "in the table but read nowhere"
    docs = "".join(
        (root / p).read_text() for p in ("README.md", "docs/RUNTIME.md", "docs/ARCHITECTURE.md")
    )
    assert sorted(n for n in table if n not in docs) == [], "undocumented settings"
    assert all(s.kind in settings.KINDS and s.summary for s in settings.SETTINGS)


def test_doctor_memory_fail_for_missing_checkpoint(tmp_path: Path) -> None:
    from gptoss_3090 import doctor

    c = doctor._check_memory(str(tmp_path / "nope"), doctor._Gpu(), 4096)
    assert c.status == "FAIL" and "nope" in c.detail


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(GPU, reason="the demo serves through vLLM on a GPU (tests/gpu)")
def test_demo_cpu_path_generates_text(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    cache = tmp_path / "demo-cache"
    rc = cli_main(["demo", "--cache-dir", str(cache), "--max-tokens", "4", "--prompt", "the cold"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "bit-identical" in out
    gen = [ln for ln in out.splitlines() if ln.startswith("generated: ")]
    assert gen and gen[0][len("generated: ") :].strip()
    assert "what a GPU" in out or "with an sm_80+ GPU" in out
    assert (cache / "config.json").is_file()
    # second run reuses the checkpoint
    mtime = (cache / "config.json").stat().st_mtime_ns
    assert cli_main(["demo", "--cache-dir", str(cache), "--max-tokens", "1", "--cpu"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert (cache / "config.json").stat().st_mtime_ns == mtime


def test_demo_bad_model_path(tmp_path: Path, capsys) -> None:
    assert cli_main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def test_bench_plots_a_result_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gptoss_3090.bench_cli import plot_result

    rows = [
        {"tokens": t, "tuning": "auto", "us_per_layer": 10.0 + t, "bf16_us": 50.0 + t}
        for t in (1, 4, 16)
    ]
    src = tmp_path / "moe_fake.json"
    src.write_text(json.dumps({"card": "test card", "rows": rows}))
    png = plot_result(src, tmp_path / "plots")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(GPU, reason="CPU-machine expectations")
def test_bench_without_gpu_says_what_it_skipped(tmp_path: Path, capsys) -> None:
    rc = cli_main(["bench", "--out", str(tmp_path), "--only", "attention,nf4_linear,fused_read"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SKIP  attention" in out and "GPU" in out
    assert "SKIP  fused_read" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["benchmarks"]["attention"]["status"] == "skipped"


@pytest.mark.skipif(GPU, reason="the demo serves through vLLM on a GPU (tests/gpu)")
def test_demo_model_without_reference_explains(tmp_path: Path, capsys) -> None:
    from gptoss_3090.synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(tmp_path / "m", "tiny", reference=False, progress=False)
    assert cli_main(["demo", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "24 GiB card" in out and "no reference/" in out
