"""bench/variant_check.py's comparison of two saved runs (CPU, no GPU needed): equal outputs are
reported bit-identical, a differing or missing case fails the comparison."""

from __future__ import annotations

import pytest
import torch
from bench_modules import load_bench


@pytest.fixture(scope="module")
def tool():
    return load_bench("variant_check")


def test_compare_reports_equal_differing_and_missing_cases(tool, tmp_path, capsys):
    base = {"linear_qkv_m1": torch.arange(6, dtype=torch.bfloat16), "moe_t1": torch.ones(4)}
    torch.save(base, tmp_path / "base.pt")
    torch.save({k: v.clone() for k, v in base.items()}, tmp_path / "same.pt")
    assert tool.compare(str(tmp_path / "base.pt"), str(tmp_path / "same.pt")) == 0
    assert capsys.readouterr().out.count("bit-identical") == 2

    off = {"linear_qkv_m1": base["linear_qkv_m1"].clone(), "moe_t1": torch.ones(4)}
    off["moe_t1"][2] = 1.5
    torch.save(off, tmp_path / "off.pt")
    assert tool.compare(str(tmp_path / "base.pt"), str(tmp_path / "off.pt")) == 1
    out = capsys.readouterr().out
    assert "moe_t1: DIFFERS (max |diff| 5.000e-01)" in out

    torch.save({"moe_t1": torch.ones(4)}, tmp_path / "short.pt")
    assert tool.compare(str(tmp_path / "base.pt"), str(tmp_path / "short.pt")) == 1
    assert "linear_qkv_m1: missing" in capsys.readouterr().out
