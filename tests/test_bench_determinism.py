"""bench/determinism_stress.py's argument handling (CPU; the stress itself needs a GPU)."""

from __future__ import annotations

import argparse

import pytest
from bench_modules import load_bench


@pytest.fixture(scope="module")
def stress():
    return load_bench("determinism_stress")


def test_size_lists_parse_and_reject(stress) -> None:
    assert stress.parse_ints("1,16, 64", "--tokens") == [1, 16, 64]
    for bad in ("", "0,4", "-1", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="--tokens"):
            stress.parse_ints(bad, "--tokens")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "1"], "at least 2 calls"),
        (["--parts", "moe,nonsense"], "unknown ['nonsense']"),
        (["--tokens", "0"], "positive integers"),
    ],
)
def test_bad_arguments_name_the_option(stress, capsys, args, message) -> None:
    with pytest.raises(SystemExit):
        stress.main(args)
    assert message in capsys.readouterr().err


def test_result_row_reports_differing_runs(stress) -> None:
    r = stress.CaseResult("moe", "T=16, 2 layers", "graph", 200, 3, 0.5, 1.25)
    line = stress.row(r)
    assert "moe" in line and "T=16, 2 layers" in line and "3/200" in line
    assert len(stress.HEADER.split()) >= 5
