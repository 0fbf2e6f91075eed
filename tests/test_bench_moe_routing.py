"""bench/bench_moe.py's router logits (CPU, no GPU needed): the uniform default reproduces the
earlier draws, and ``--routing-skew`` piles pairs onto the same experts for every side."""

from __future__ import annotations

import pytest
import torch
from bench_modules import load_bench

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_moe")


def test_uniform_logits_are_the_plain_draws(bench) -> None:
    got = bench.router_logits(64, 3, CPU, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    want = [torch.randn(64, bench.E, generator=g) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_skew_loads_the_same_experts_whatever_the_noise(bench) -> None:
    def busiest(seed: int, skew: float) -> tuple[float, list[int]]:
        lg = bench.router_logits(64, 24, CPU, torch.Generator().manual_seed(seed), skew)
        tops = [
            int(torch.bincount(torch.topk(x, bench.TOPK, -1).indices.flatten()).argmax())
            for x in lg
        ]
        return bench.max_pairs(lg), tops

    uniform, _ = busiest(1, 0.0)
    skewed_a, tops_a = busiest(1, 0.7)
    skewed_b, tops_b = busiest(2, 0.7)
    # 256 pairs over 32 experts: about 14 on the busiest when uniform, far more when skewed.
    assert 10 <= uniform <= 18
    assert skewed_a > uniform + 8 and skewed_b > uniform + 8
    # The popularity belongs to the layer, not to the noise: the sides' routings (ours and
    # Marlin draw different noise) mostly favour the same expert.
    assert sum(a == b for a, b in zip(tops_a, tops_b, strict=True)) >= 16
