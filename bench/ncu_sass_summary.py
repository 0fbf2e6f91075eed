"""Summarise Nsight Compute source counters per SASS instruction.

Input: the CSV of ``ncu --import REPORT --page source --csv --print-source sass`` (a profile taken
with ``--section SourceCounters``). It has one row per SASS instruction with its execution count,
its warp-stall samples and the samples per stall reason.

Output (text):
- totals: warp-level instructions executed and stall samples;
- regions: instructions grouped by how often they ran. In a kernel, a straight-line stretch runs
  as often as its enclosing loop, so the groups separate the prologue (once per warp), the
  unrolled loop bodies and the epilogue, and show each one's share of the instructions issued
  and of the stall samples;
- the instructions with the most stall samples and their main stall reasons;
- the stall reasons over the whole kernel.

    python bench/ncu_sass_summary.py sass_moe_str_up_t16.csv [--top 30]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

EXECUTED = "Instructions Executed"
SAMPLES = "Warp Stall Sampling (All Samples)"
SOURCE = "Source"


@dataclass
class Instruction:
    index: int
    source: str
    executed: int
    samples: int
    stalls: dict[str, int] = field(default_factory=dict)


@dataclass
class SourceCounters:
    kernel: str
    instructions: list[Instruction]

    @property
    def executed(self) -> int:
        return sum(i.executed for i in self.instructions)

    @property
    def samples(self) -> int:
        return sum(i.samples for i in self.instructions)


def _int(text: str) -> int:
    text = text.strip().replace(",", "")
    return int(float(text)) if text not in ("", "-") else 0


def parse(path: Path) -> SourceCounters:
    """Reads one kernel's source-counter CSV (the first kernel if the file holds several)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(
            f"{path}: expected a 'Kernel Name' row and a header, found {len(rows)} rows"
        )
    kernel = rows[0][1] if rows[0] and rows[0][0] == "Kernel Name" and len(rows[0]) > 1 else "?"
    start = 1 if kernel != "?" else 0
    header = rows[start]
    col = {name: i for i, name in enumerate(header)}
    for needed in (SOURCE, EXECUTED, SAMPLES):
        if needed not in col:
            raise ValueError(f"{path}: column {needed!r} missing; was the profile taken with "
                             "--section SourceCounters and exported with --print-source sass?")
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out = []
    for row in rows[start + 1:]:
        if not row or row[0] == "Kernel Name":
            break  # the next kernel of a multi-kernel export
        if len(row) < len(header):
            continue
        out.append(Instruction(
            index=len(out),
            source=row[col[SOURCE]].strip(),
            executed=_int(row[col[EXECUTED]]),
            samples=_int(row[col[SAMPLES]]),
            stalls={r[len("stall_"):]: _int(row[col[r]]) for r in reasons},
        ))
    return SourceCounters(kernel, out)


@dataclass
class Region:
    count: int          # executions of each of its instructions
    instructions: int   # how many instructions ran that often
    executed: int       # their warp-level executions
    samples: int        # their stall samples
    first: Instruction  # the first of them, to find it in the SASS


def regions(sc: SourceCounters) -> list[Region]:
    """Groups the executed instructions by execution count, most stall samples first."""
    groups: dict[int, Region] = {}
    for ins in sc.instructions:
        if ins.executed == 0:
            continue
        r = groups.get(ins.executed)
        if r is None:
            groups[ins.executed] = Region(ins.executed, 1, ins.executed, ins.samples, ins)
        else:
            r.instructions += 1
            r.executed += ins.executed
            r.samples += ins.samples
    return sorted(groups.values(), key=lambda r: (-r.samples, -r.executed))


def stall_totals(sc: SourceCounters) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for ins in sc.instructions:
        for reason, n in ins.stalls.items():
            totals[reason] += n
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def report(sc: SourceCounters, top: int = 30, max_regions: int = 12) -> str:
    lines = [f"kernel {sc.kernel}: {sc.executed:,} warp instructions, {sc.samples:,} stall samples"]
    lines.append("")
    lines.append("regions (instructions grouped by execution count):")
    for r in regions(sc)[:max_regions]:
        issued, stalls = _pct(r.executed, sc.executed), _pct(r.samples, sc.samples)
        lines.append(
            f"  x{r.count:<9d} {r.instructions:5d} instr  {issued} of issued  {stalls} of stalls"
            f"  first #{r.first.index}: {r.first.source[:48]}"
        )
    lines.append("")
    lines.append(f"top {top} instructions by stall samples:")
    hot = sorted(sc.instructions, key=lambda i: -i.samples)[:top]
    for ins in sorted(hot, key=lambda i: i.index):
        main = sorted(ins.stalls.items(), key=lambda kv: -kv[1])[:2]
        why = ", ".join(f"{k} {v}" for k, v in main if v)
        lines.append(f"  #{ins.index:<5d} {_pct(ins.samples, sc.samples)} x{ins.executed:<8d} "
                     f"{ins.source[:56]:56s} {why}")
    lines.append("")
    totals = stall_totals(sc)
    lines.append("stall reasons: " + ", ".join(
        f"{k} {_pct(v, sc.samples).strip()}" for k, v in list(totals.items())[:10] if v))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path, nargs="+", help="ncu --page source --csv exports")
    ap.add_argument("--top", type=int, default=30, help="hottest instructions to list")
    args = ap.parse_args(argv)
    for i, path in enumerate(args.csv):
        if i:
            print()
        try:
            print(f"== {path.name}")
            print(report(parse(path), top=args.top))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
