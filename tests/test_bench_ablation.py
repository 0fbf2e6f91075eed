"""bench/ablation_variants.py (CPU): every ablation still edits the current kernels in exactly
one place, the folders differ from the tree's kernels only there, and a stale edit is an error
that names the ablation. (Compiling the folders takes minutes each; the GPU call does it.)"""

from __future__ import annotations

import pytest
from bench_modules import load_bench


@pytest.fixture(scope="module")
def abl():
    return load_bench("ablation_variants")


def test_every_ablation_matches_the_kernels_once(abl, tmp_path) -> None:
    folders = abl.write(list(abl.ABLATIONS), tmp_path)
    assert [d.name for d in folders] == ["a_head", *abl.ABLATIONS]
    tree = abl.kernel_texts()
    assert abl.kernel_texts(tmp_path / "a_head") == tree
    for name, edits in abl.ABLATIONS.items():
        got = abl.kernel_texts(tmp_path / name)
        changed = {f for f in tree if got[f] != tree[f]}
        assert changed == {e.file for e in edits}, name
        for e in edits:
            assert e.new in got[e.file] and e.old not in got[e.file], name


def test_a_stale_edit_names_its_ablation(abl) -> None:
    stale = abl.Edit("common.cuh", "no such kernel text", "x")
    with pytest.raises(ValueError, match="ablation gone: its edit of kernels/common.cuh matches 0"):
        abl.apply(abl.kernel_texts(), (stale,), "gone")
    with pytest.raises(ValueError, match="unknown ablation"):
        abl.write(["nolut", "typo"], abl.ROOT / ".gpu-variants-never-written")
