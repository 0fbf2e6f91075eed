"""bench/gpu_e2e.sh's guards, with fake python3 / nvidia-smi on the PATH and its folders moved
under tmp_path (GPU_E2E_DIR, GPU_E2E_CK, GPU_E2E_STAGE). Each guard comes from a sitting that
lost device time without it (session 33): a MoE test file that could not be collected switched
every later job to the fallback kernels; stale bundle parts of an earlier cut broke the vLLM
install, after which the start call waited out its limit with nothing able to run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_e2e.sh"

FAKE_PYTHON = """#!/bin/bash
# Fake python3: `-m pytest` exits $FAKE_PYTEST_RC; `-c 'import vllm ...'` fails like a missing
# vLLM unless FAKE_VLLM=1; anything else succeeds.
if [ "$1" = -m ] && [ "$2" = pytest ]; then echo "fake pytest"; exit "${FAKE_PYTEST_RC:-0}"; fi
if [ "$1" = -c ] && [[ $2 == *"import vllm"* ]]; then
  if [ "${FAKE_VLLM:-0}" = 1 ]; then echo "vllm 0.26.0"; exit 0; fi
  echo "ModuleNotFoundError: No module named 'vllm'"; exit 1
fi
exit 0
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    if not Path("/bin/bash").exists():
        pytest.skip("needs bash")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", "#!/bin/bash\nexit 0\n")):
        p = fake / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    work = tmp_path / "cwd"
    work.mkdir()
    env = dict(
        os.environ,
        PATH=f"{fake}:{os.environ['PATH']}",
        GPU_E2E_DIR=str(tmp_path / "e2e"),
        GPU_E2E_CK=str(tmp_path / "ck"),
        GPU_E2E_STAGE=str(tmp_path / "stage"),
        OUT=str(tmp_path / "out"),
        SKIP_SYNTH="1",
    )
    (tmp_path / "out").mkdir()
    return work, env


def _run(work: Path, env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=work,
        env=dict(env, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("pytest_rc", "fallback"), [(0, False), (1, True), (2, False), (5, False)])
def test_moetest_falls_back_only_on_failed_tests(sandbox, pytest_rc: int, fallback: bool) -> None:
    work, env = sandbox
    r = _run(work, env, "run", "moetest", FAKE_PYTEST_RC=str(pytest_rc))
    assert r.returncode == pytest_rc, r.stderr
    env_file = Path(env["GPU_E2E_DIR"]) / "env"
    got = env_file.exists() and "GPTOSS_3090_MOE_WEIGHTS_ORDER=rows" in env_file.read_text()
    assert got == fallback


def test_start_without_vllm_queues_nothing_and_packs(sandbox) -> None:
    work, env = sandbox
    r = _run(work, env, "start", "moetest", "--", "30")
    assert r.returncode == 1
    assert "nothing queued" in r.stdout
    e2e = Path(env["GPU_E2E_DIR"])
    assert not (e2e / "queue.pid").exists()
    assert "nothing queued" in (e2e / "status").read_text()
    assert (Path(env["OUT"]) / "e2e.tgz").is_file()


def test_start_refuses_a_second_queue(sandbox) -> None:
    work, env = sandbox
    e2e = Path(env["GPU_E2E_DIR"])
    e2e.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (e2e / "queue.pid").write_text(f"{sleeper.pid}\n")
        (e2e / "queue.done").touch()  # an earlier queue's end
        r = _run(work, env, "start", "moetest", "--", "1", FAKE_VLLM="1")
    finally:
        sleeper.kill()
    assert "a queue is still running" in r.stdout
    assert "start moetest" not in (e2e / "status").read_text()


def test_stage_one_drops_the_parts_of_an_earlier_cut(sandbox) -> None:
    work, env = sandbox
    stage = Path(env["GPU_E2E_STAGE"])
    stage.mkdir()
    (stage / "bundle.tgz.part2").write_text("an earlier cut")
    part1 = work / ".gpu-bundle" / "part-1"
    part1.mkdir(parents=True)
    (part1 / "bundle.tgz.part00").write_text("this cut")
    (part1 / "install-bundle.sh").write_text("true\n")
    r = _run(work, env, "stage", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in stage.iterdir()) == ["bundle.tgz.part00", "install-bundle.sh"]
    # Later parts add to the stage without dropping anything.
    part2 = work / ".gpu-bundle" / "part-2"
    part2.mkdir()
    (part2 / "bundle.tgz.part01").write_text("this cut, part 2")
    assert _run(work, env, "stage", "2").returncode == 0
    assert (stage / "bundle.tgz.part00").exists() and (stage / "bundle.tgz.part01").exists()


def test_coldstart_summary_reads_each_engines_start(tmp_path: Path) -> None:
    """bench/coldstart_summary.py: the engine start from result.json, vLLM's init time and
    its compile share, and our thread's line (both wheels' formats) from the engine log."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "coldstart_summary", SCRIPT.parent / "coldstart_summary.py"
    )
    assert spec is not None and spec.loader is not None
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)

    def engine(name: str, start: float | None, log: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        if start is not None:
            runs = {"ours_full": {"startup_s": start, "workloads": {}}}
            (d / "result.json").write_text(json.dumps({"runs": runs}))
        (d / "ours_full.log").write_text(log)
        return d

    init = (
        "INFO [core.py:340] init engine (profile, create kv cache, warmup model) took 18.60 s "
        "(compilation: 2.30 s)\n"
    )
    on = engine(
        "coldstart_1_on",
        27.94,
        "INFO [model.py:440] gptoss-3090: compiling kernels nf4 for sm_86 while the weights load\r"
        "progress\rINFO [runtime.py:167] gptoss-3090: kernels for sm_86 ready in 41.3 s "
        "(compiled: nf4, moe_chunks; already cached: attention)\n" + init,
    )
    old = engine(
        "old_wheel", 30.0, "gptoss-3090: kernels nf4, attention for sm_90 ready in 1.2 s\n"
    )
    started = engine("started", None, "compiling kernels nf4 for sm_86 while the weights load\n")
    off = engine("coldstart_2_off", 37.4, init)
    md = summary.table([on, old, started, off])
    rows = [ln.strip("|").split("|") for ln in md.splitlines()[2:]]
    cells = [[c.strip() for c in r] for r in rows]
    assert cells[0] == [
        "coldstart_1_on", "27.9", "18.60", "2.30",
        "41.3 s for sm_86; compiled: nf4, moe_chunks; cached: attention",
    ]
    assert cells[1][1] == "30.0"
    assert cells[1][4] == "1.2 s for sm_90 (nf4, attention; cached not logged)"
    assert cells[2][1:] == ["", "", "", "started; no end logged"]
    assert cells[3] == ["coldstart_2_off", "37.4", "18.60", "2.30", "not started"]
