"""bench/ncu_sass_summary.py on a synthetic source-counter export (CPU, no ncu needed).

The export's layout (a 'Kernel Name' row, then a header with per-reason stall columns, then one
row per SASS instruction) is what ``ncu --page source --csv --print-source sass`` writes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from bench_modules import load_bench

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)",
          "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed",
          "stall_long_sb", "stall_wait", "stall_barrier", "stall_long_sb (Not Issued)"]


@pytest.fixture(scope="module")
def tool():
    return load_bench("ncu_sass_summary")


def _write(path: Path, rows: list[tuple[str, int, int, int, int, int]]) -> Path:
    """rows: (sass, executed, long_sb, wait, barrier); samples = their sum."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["Kernel Name", "moe_str_up_n1_bf16", ""])
        w.writerow(HEADER)
        for i, (src, ex, lsb, wt, bar) in enumerate(rows):
            w.writerow([hex(0x1000 + 16 * i), f"  {src}", lsb + wt + bar, lsb + wt, f"{ex:,}",
                        lsb, wt, bar, lsb])
    return path


def test_regions_split_prologue_loop_and_epilogue(tool, tmp_path):
    rows = [("LDC R1, c[0x0][0x28]", 100, 0, 2, 0),   # prologue: once per warp
            ("BAR.SYNC 0x0", 100, 0, 0, 30),
            ("LDS R4, [R2]", 2300, 5, 10, 0),          # loop body: 23 times per warp
            ("HMMA.16816.F32.BF16 R8, R4, R6, R8", 2300, 0, 40, 0),
            ("LDG.E R9, [R10.64]", 100, 13, 0, 0),     # epilogue
            ("EXIT", 0, 0, 0, 0)]                      # never ran
    sc = tool.parse(_write(tmp_path / "k.csv", rows))
    assert sc.kernel == "moe_str_up_n1_bf16"
    assert sc.executed == 100 + 100 + 2300 + 2300 + 100
    assert sc.samples == 2 + 30 + 15 + 40 + 13
    regs = tool.regions(sc)
    assert [(r.count, r.instructions, r.samples) for r in regs] == [(2300, 2, 55), (100, 3, 45)]
    assert regs[1].first.source.startswith("LDC")
    assert tool.stall_totals(sc) == {"wait": 52, "barrier": 30, "long_sb": 18}
    text = tool.report(sc, top=2)
    assert "moe_str_up_n1_bf16" in text and "HMMA" in text and "BAR.SYNC" in text
    assert "LDS R4" not in text.split("top 2")[1]  # only the two hottest are listed


def test_a_profile_without_source_counters_is_a_clear_error(tool, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('"Kernel Name","k"\n"Address","Source"\n"0x0","NOP"\n')
    with pytest.raises(ValueError, match="Instructions Executed"):
        tool.parse(path)
    assert tool.main([str(path)]) == 1
