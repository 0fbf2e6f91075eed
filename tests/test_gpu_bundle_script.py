"""scripts/gpu-bundle.sh must re-cut the offline vLLM bundle without changing a byte, into parts
that each fit the device tool's 64 MiB carry limit together with the repository and the wheel
(CPU only; a fake bundle of random bytes stands in for vLLM's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-bundle.sh"
MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or shutil.which("split") is None or not (ROOT / ".git").exists(),
    reason="needs git, coreutils' split and a git checkout",
)


def _stream(out: Path) -> bytes:
    """The bundle's bytes as install-bundle.sh reads them: bundle.tgz.part* in name order."""
    files = sorted(out.glob("part-*/bundle.tgz.part*"), key=lambda f: f.name)
    return b"".join(f.read_bytes() for f in files)


def test_recut_keeps_bytes_and_every_part_fits(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    # The layout of session 18's bundle: heads in part-1/part-2, tails moved into part-3.
    layout = {
        "part-1/bundle.tgz.part0a": 40,
        "part-3/bundle.tgz.part0b": 3,
        "part-2/bundle.tgz.part1a": 50,
        "part-3/bundle.tgz.part1b": 2,
        "part-3/bundle.tgz.part2": 25,
    }
    for rel, mib in layout.items():
        f = out / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(os.urandom(mib * MIB))
        (f.parent / "install-bundle.sh").write_text("#!/bin/bash\n")
    before = _stream(out)

    run = subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr

    assert _stream(out) == before
    parts = sorted(out.glob("part-*"))
    assert len(parts) >= 3
    # What a call carries besides its part: the repository (in 4 KiB blocks, as the script
    # counts it) and the wheel; the script keeps 3 MiB of margin on top.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum(
        -(-(ROOT / name.decode()).stat().st_size // 4096) * 4096
        for name in listed
        if name and (ROOT / name.decode()).is_file()
    )
    wheel = (
        sum(f.stat().st_size for f in (ROOT / ".gpu-wheel").glob("*"))
        if (ROOT / ".gpu-wheel").is_dir()
        else 0
    )
    for part in parts:
        assert (part / "install-bundle.sh").is_file()
        size = sum(f.stat().st_size for f in part.iterdir())
        assert size + tree + wheel <= 64 * MIB, f"{part.name}: {size / MIB:.1f} MiB does not fit"
    assert f"{len(parts)} parts" in run.stdout
