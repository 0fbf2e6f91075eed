"""Diagnostic: the DRAM bandwidth of the streaming MoE's weight access order, without compute.

The streaming kernels (``kernels/moe.cu``, ``moe_str_*``) read an expert's packed NF4 rows (K / 2
bytes each) as 16-row groups, one 128-k chunk at a time: per warp and chunk, 16 pieces of 64
bytes at a stride of one row. From 2 to 64 tokens they reach about 1.5 TB/s, half of copy
bandwidth, and neither instruction count, L1 misses of the statistics nor the mma chain explains
it (``docs/RUNTIME.md``). This script reads the same number of bytes with Triton in two orders:

* ``rows``: the kernels' order (16 rows x ``--piece`` bytes per step, rows ``K / 2`` bytes apart);
* ``chunk_major``: each group's step as one contiguous block (what a load-time repack would give);
* ``step_major``: inside each expert (``--groups-per-expert`` groups), step j of every group
  side by side, so the groups streaming together read one contiguous sweep;

one warp per 16-row group, ``--stages`` steps in flight (Triton pipelines the loop with cp.async
on sm_80+), and prints GB/s next to a device-to-device copy of the same buffer. If ``rows`` stays
near the kernels' speed while ``chunk_major`` approaches the copy, the weight order is what
holds them.

    python3 bench/dram_pattern.py [--mb 265] [--row-bytes 1440] [--pieces 64,128,256]
        [--stages 4] [--programs-per-sm 16]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moe import time_fn  # noqa: E402

ROWS = 16
ORDERS = ("rows", "chunk_major", "step_major")


@triton.jit
def _read_groups(
    w_ptr,
    out_ptr,
    groups,
    row_words: tl.constexpr,
    steps: tl.constexpr,
    piece_words: tl.constexpr,
    order: tl.constexpr,
    stages: tl.constexpr,
    gpe: tl.constexpr,
):
    # Program p reads 16-row groups p, p + grid, ... (one each without --programs-per-sm);
    # XOR of everything read keeps the loads alive.
    r = tl.arange(0, 16)[:, None]
    c = tl.arange(0, piece_words)[None, :]
    for g in range(tl.program_id(0), groups, tl.num_programs(0)):
        acc = tl.zeros([16, piece_words], dtype=tl.int32)
        group = g * (16 * row_words)  # int32: --mb is capped below 8 GiB
        for j in tl.range(0, steps, num_stages=stages):
            if order == 1:
                offs = group + j * (16 * piece_words) + r * piece_words + c
            elif order == 2:
                # expert base + step j of the expert's gpe groups + this group's piece
                e0 = (g // gpe) * (gpe * 16 * row_words)
                offs = e0 + (j * gpe + g % gpe) * (16 * piece_words) + r * piece_words + c
            else:
                offs = group + r * row_words + j * piece_words + c
            acc ^= tl.load(w_ptr + offs)
        tl.store(out_ptr + g * (16 * piece_words) + r * piece_words + c, acc)


def read_order(
    words: torch.Tensor,
    row_words: int,
    piece_words: int,
    order: int,
    stages: int,
    programs: int = 0,
    gpe: int = 360,
) -> tuple[torch.Tensor, int]:
    """Runs one read pass with `programs` programs (0: one per group); returns the per-group
    XOR tiles and the bytes read."""
    groups = words.numel() // (ROWS * row_words)
    steps = row_words // piece_words
    out = torch.empty(groups * ROWS * piece_words, dtype=torch.int32, device=words.device)
    grid = (min(programs, groups) if programs > 0 else groups,)
    _read_groups[grid](
        words, out, groups, row_words, steps, piece_words, order, stages, gpe, num_warps=1
    )
    return out, groups * ROWS * steps * piece_words * 4


def expected_xor(
    words: torch.Tensor, row_words: int, piece_words: int, order: int, gpe: int = 360
) -> int:
    """XOR of exactly the words one pass reads (the check that each is read once)."""
    groups = words.numel() // (ROWS * row_words)
    steps = row_words // piece_words
    g = words[: groups * ROWS * row_words].view(groups, ROWS * row_words)
    if order == 2:
        e = g.view(groups // gpe, gpe * ROWS * row_words)
        region = e[:, : steps * gpe * ROWS * piece_words]
    elif order == 1:
        region = g[:, : steps * ROWS * piece_words]
    else:
        region = g.view(groups, ROWS, row_words)[:, :, : steps * piece_words]
    return _xor_all(region.reshape(-1))


def _xor_all(t: torch.Tensor) -> int:
    t = t.clone()
    while t.numel() > 1:
        if t.numel() % 2:
            t = torch.cat([t, torch.zeros(1, dtype=t.dtype, device=t.device)])
        t = t[0::2] ^ t[1::2]
    return int(t.item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=265, help="buffer size (265: one layer's gate_up)")
    ap.add_argument("--row-bytes", type=int, default=1440, help="bytes per packed row (K / 2)")
    ap.add_argument("--pieces", default="64,128,256", help="bytes per row per step")
    ap.add_argument("--stages", type=int, default=4, help="steps in flight + 1")
    ap.add_argument(
        "--programs-per-sm",
        type=int,
        default=0,
        help="persistent one-warp programs per SM (16: the streaming kernels' 2 blocks x 8 "
        "warps, so the same bytes in flight); 0 = one program per group",
    )
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument(
        "--groups-per-expert", type=int, default=360, help="step_major: groups per expert"
    )
    ap.add_argument("--orders", default="rows,chunk_major,step_major")
    args = ap.parse_args()
    if args.stages < 1 or args.reps < 1 or args.programs_per_sm < 0:
        raise SystemExit(
            f"--stages {args.stages}, --reps {args.reps}, --programs-per-sm "
            f"{args.programs_per_sm}: expected >= 1, >= 1 and >= 0"
        )
    if not 0 < args.mb < 8192:
        raise SystemExit(f"--mb {args.mb}: expected 1 to 8191 (word offsets are 32-bit)")
    if args.row_bytes % 4:
        raise SystemExit(f"--row-bytes {args.row_bytes}: expected a multiple of 4")
    if not torch.cuda.is_available():
        raise SystemExit("dram_pattern.py needs a CUDA GPU")
    row_words = args.row_bytes // 4
    gpe = args.groups_per_expert
    rows = (args.mb << 20) // args.row_bytes // (ROWS * gpe) * (ROWS * gpe)
    words = torch.randint(
        -(2**31), 2**31 - 1, (rows * row_words,), dtype=torch.int32, device="cuda"
    )
    dst = torch.empty_like(words)
    copy_us = time_fn(lambda: dst.copy_(words), args.reps) * 1e3
    copy_gbs = 2 * words.numel() * 4 / copy_us / 1e3
    programs = args.programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    name = torch.cuda.get_device_name()
    print(
        f"# {name}: {words.numel() * 4 / 2**20:.0f} MiB, rows of {args.row_bytes} B, "
        f"{args.stages} stages, "
        + (f"{args.programs_per_sm} programs per SM" if programs else "one program per group")
    )
    print(f"copy (read + write): {copy_us:9.1f} us  {copy_gbs:7.0f} GB/s")
    for piece in (int(p) for p in args.pieces.split(",")):
        if piece % 4 or piece > args.row_bytes or (piece // 4) & (piece // 4 - 1):
            raise SystemExit(f"--pieces {piece}: expected a power-of-two multiple of 4 bytes")
        for order in args.orders.split(","):
            code = ORDERS.index(order)
            out, nbytes = read_order(words, row_words, piece // 4, code, args.stages, programs, gpe)
            got = _xor_all(out)
            want = expected_xor(words, row_words, piece // 4, code, gpe)
            us = 1e3 * time_fn(
                lambda pw=piece // 4, cm=code: read_order(
                    words, row_words, pw, cm, args.stages, programs, gpe
                ),
                args.reps,
            )
            gbs = nbytes / us / 1e3
            check = "ok" if got == want else "XOR MISMATCH"
            print(
                f"{order:>11} piece {piece:4d} B: {us:9.1f} us  {gbs:7.0f} GB/s  "
                f"{gbs / copy_gbs:5.2f}x copy  ({check})"
            )


if __name__ == "__main__":
    main()
