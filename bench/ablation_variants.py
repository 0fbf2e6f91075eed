"""Timing-only kernel folders that each remove one part of the streaming kernels' work, so that
a GPU call can time where the MoE's and the linear's decode time goes (outputs are garbage).

Each ablation edits the tree's ``kernels/`` text in one place and is written to
``.gpu-variants/<name>/`` next to an unedited ``a_head/`` copy; ``bash bench/gpu_kernels.sh
ablation`` then times every folder (``GPTOSS_3090_KERNEL_DIR``) with ``moe_kernel_times.py``
and ``linear_kernel_times.py``. An edit that no longer matches the kernels exactly once is an
error naming it, so the ablations stay honest when the kernels change.

    python3 bench/ablation_variants.py            # all ablations
    python3 bench/ablation_variants.py nocomp     # a_head and nocomp only

Session 31 (H200, one decode token, 20b shapes): gate_up 20.1 us per layer; without the table
lookups 17.8, without the mma 18.9, without both 14.2 (the read of the same bytes alone: 9.9).
Every folder compiles its kernel families once on the GPU host (about 1.5 minutes), so a call
with five folders needs about 8 minutes before any timing: budget for it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` (which must occur exactly once) by ``new`` in kernels/``file``."""

    file: str
    old: str
    new: str


# The code-pair lookup without its shared-memory load: the PRMT address becomes the "pair".
NO_LOOKUP = Edit(
    "common.cuh",
    "    return *(const u32*)(table + __byte_perm(w, lane4, 0x5504 | (SEL << 4)));",
    "    (void)table; return __byte_perm(w, lane4, 0x5504 | (SEL << 4));",
)

# The mma replaced by one XOR chain of its inputs (keeps the lookups and the activations live).
NO_MMA = Edit(
    "common.cuh",
    "            if (st == 0) mma_zero<DTYPE>(d[nt], a, bb); else mma_acc<DTYPE>(d[nt], a, bb);",
    "            { const u32 xx = a[0] ^ a[1] ^ a[2] ^ a[3] ^ bb[0] ^ bb[1];\n"
    "              if (st == 0) {\n"
    "                  d[nt][0] = __uint_as_float(xx); d[nt][1] = d[nt][2] = d[nt][3] = 0.f;\n"
    "              } else {\n"
    "                  d[nt][0] = __uint_as_float(__float_as_uint(d[nt][0]) ^ xx);\n"
    "              } }",
)

# Neither lookups nor mma: each 64-k block folds its weight words and one activation word.
NO_COMPUTE = Edit(
    "common.cuh",
    """    float d[NT][4];
#pragma unroll
    for (int st = 0; st < 4; ++st) {
        u32 a[4];
        str_decode_step(table, wa, wb, st, lane4, a);""",
    """    float d[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        d[nt][0] = __uint_as_float(wa.x ^ wa.y ^ wb.x ^ wb.y ^ xw[nt][0] ^ lane4);
        d[nt][1] = d[nt][2] = d[nt][3] = 0.f;
    }
#pragma unroll
    for (int st = 0; st < 0; ++st) {
        u32 a[4];
        str_decode_step(table, wa, wb, st, lane4, a);""",
)

# The same two edits in str_chunk, the interleaved form of a whole chunk that the MoE's streams
# run (common.cuh, STR_INTERLEAVE_MAX_NT).
NO_MMA_CHUNK = Edit(
    "common.cuh",
    """            if (st == 0) {
                mma_zero<DTYPE>(d0[nt], a0, b0);
                mma_zero<DTYPE>(d1[nt], a1, b1);
            } else {
                mma_acc<DTYPE>(d0[nt], a0, b0);
                mma_acc<DTYPE>(d1[nt], a1, b1);
            }""",
    """            { const u32 x0x = a0[0] ^ a0[1] ^ a0[2] ^ a0[3] ^ b0[0] ^ b0[1];
              const u32 x1x = a1[0] ^ a1[1] ^ a1[2] ^ a1[3] ^ b1[0] ^ b1[1];
              if (st == 0) {
                  d0[nt][0] = __uint_as_float(x0x); d0[nt][1] = d0[nt][2] = d0[nt][3] = 0.f;
                  d1[nt][0] = __uint_as_float(x1x); d1[nt][1] = d1[nt][2] = d1[nt][3] = 0.f;
              } else {
                  d0[nt][0] = __uint_as_float(__float_as_uint(d0[nt][0]) ^ x0x);
                  d1[nt][0] = __uint_as_float(__float_as_uint(d1[nt][0]) ^ x1x);
              } }""",
)

NO_COMPUTE_CHUNK = Edit(
    "common.cuh",
    """    float d0[NT][4], d1[NT][4];
#pragma unroll
    for (int st = 0; st < 4; ++st) {""",
    """    float d0[NT][4], d1[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        d0[nt][0] = __uint_as_float(wa0.x ^ wa0.y ^ wb0.x ^ wb0.y ^ x0[nt][0] ^ lane4);
        d1[nt][0] = __uint_as_float(wa1.x ^ wa1.y ^ wb1.x ^ wb1.y ^ x1[nt][0] ^ lane4);
        d0[nt][1] = d0[nt][2] = d0[nt][3] = d1[nt][1] = d1[nt][2] = d1[nt][3] = 0.f;
    }
#pragma unroll
    for (int st = 0; st < 0; ++st) {""",
)

# The 64 KB code-pair table left unwritten (the nested map still loads).
NO_TABLE = Edit(
    "common.cuh",
    "    for (int j = 0; j < 8; ++j) row[(j + b) & 7] = u32x4{pair, pair, pair, pair};",
    "    for (int j = 0; j < 0; ++j) row[(j + b) & 7] = u32x4{pair, pair, pair, pair};",
)

ABLATIONS: dict[str, tuple[Edit, ...]] = {
    "nolut": (NO_LOOKUP,),
    "nomma": (NO_MMA, NO_MMA_CHUNK),
    "nocomp": (NO_COMPUTE, NO_COMPUTE_CHUNK),
    "notable": (NO_TABLE,),
}


def kernel_texts(kernels: Path = KERNELS) -> dict[str, str]:
    """The kernel sources a folder needs, by file name."""
    return {p.name: p.read_text() for p in sorted(kernels.iterdir()) if p.suffix in (".cu", ".cuh")}


def apply(texts: dict[str, str], edits: tuple[Edit, ...], name: str) -> dict[str, str]:
    """``texts`` with ``edits`` applied; ValueError naming the ablation if one does not match
    exactly once."""
    out = dict(texts)
    for e in edits:
        n = out.get(e.file, "").count(e.old)
        if n != 1:
            raise ValueError(
                f"ablation {name}: its edit of kernels/{e.file} matches {n} times (expected 1); "
                "update bench/ablation_variants.py to the current kernels"
            )
        out[e.file] = out[e.file].replace(e.old, e.new)
    return out


def write(names: list[str], out: Path) -> list[Path]:
    """Writes ``out``/a_head and one folder per ablation in ``names``; returns the folders."""
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; known: {sorted(ABLATIONS)}")
    texts = kernel_texts()
    folders = {"a_head": texts} | {n: apply(texts, ABLATIONS[n], n) for n in names}
    shutil.rmtree(out, ignore_errors=True)
    written = []
    for name, files in folders.items():
        d = out / name
        d.mkdir(parents=True)
        for fname, text in files.items():
            (d / fname).write_text(text)
        written.append(d)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"ablations (default all: {', '.join(ABLATIONS)})")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu-variants")
    args = ap.parse_args()
    try:
        folders = write(args.names or list(ABLATIONS), args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in folders:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
