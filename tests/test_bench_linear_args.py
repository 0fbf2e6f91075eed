"""The NF4 linear benchmarks reject bad --shapes and --ms with a message naming the argument,
before they look for a GPU (CPU, no GPU needed: the same message on any machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "tool", ["bench_nf4_linear.py", "linear_kernel_times.py", "linear_accuracy.py"]
)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--ms", "1,zero"], "--ms: expected positive integers"),
        (["--ms", "0"], "--ms: expected positive integers"),
        (["--shapes", "5760by2880"], "--shapes: expected NxK"),
        (["--shapes", "1+2+3+4x64"], "--shapes: expected NxK"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(tool, args, needle):
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / tool), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert needle in run.stderr, run.stderr[-2000:]
