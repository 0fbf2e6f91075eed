"""bench/inductor_kernels.py finds an Inductor kernel's Triton source by name (CPU).

The wrapper text below has the shape torch 2.x Inductor writes for CUDA graphs: each kernel's
source inlined as ``NAME = async_compile.triton('NAME', '''...''', device_str='cuda')``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_modules import load_bench

WRAPPER = """
from torch._inductor.async_compile import AsyncCompile
async_compile = AsyncCompile()

triton_poi_fused_2 = async_compile.triton('triton_poi_fused_2', '''
import triton
@triton.jit
def triton_poi_fused_2(in_ptr0, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    tmp0 = tl.load(in_ptr0 + (x0), xmask)
    tmp1 = tl_math.cos(tmp0)
''', device_str='cuda')

triton_poi_fused_20 = async_compile.triton('triton_poi_fused_20', '''
def triton_poi_fused_20(in_ptr0):
    pass
''', device_str='cuda')

triton_poi_fused_3 = async_compile.triton('triton_poi_fused_3', '''
def triton_poi_fused_3(in_ptr0, in_ptr1):
    tmp2 = tmp0 + tmp1
''', device_str='cuda')
"""


@pytest.fixture(scope="module")
def tool():
    return load_bench("inductor_kernels")


def test_finds_each_named_kernel_once(tool, tmp_path: Path) -> None:
    graphs = tmp_path / "cache" / "ab"
    graphs.mkdir(parents=True)
    (graphs / "wrapper_a.py").write_text(WRAPPER)
    (graphs / "wrapper_b.py").write_text(WRAPPER)  # the same graph cached twice: one source
    (graphs / "unrelated.py").write_text("x = 1\n")
    found = tool.find_kernels(
        ["triton_poi_fused_2", "triton_poi_fused_3", "missing"], [tmp_path / "cache"]
    )
    ((_, src2),) = found["triton_poi_fused_2"]
    assert "tl_math.cos" in src2 and "triton_poi_fused_20" not in src2
    ((_, src3),) = found["triton_poi_fused_3"]
    assert src3.startswith("def triton_poi_fused_3(") and "tmp0 + tmp1" in src3
    assert found["missing"] == []


def test_cli_reports_and_fails_when_nothing_matches(tool, tmp_path: Path) -> None:
    (tmp_path / "w.py").write_text(WRAPPER)
    out = tmp_path / "report.txt"
    assert tool.main(["triton_poi_fused_3", "--root", str(tmp_path), "--out", str(out)]) == 0
    report = out.read_text()
    assert "## triton_poi_fused_3: 1 distinct source(s)" in report and "tmp0 + tmp1" in report
    assert tool.main(["nope", "--root", str(tmp_path), "--out", str(out)]) == 1
    assert "## nope: 0 distinct source(s)" in out.read_text()


def test_cli_rejects_a_missing_root(tool, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        tool.main(["triton_poi_fused_3", "--root", str(tmp_path / "absent")])
    assert err.value.code == 2
    assert "--root: not a directory" in capsys.readouterr().err
