"""runtime.compile_in_background: the kernel compile the vLLM plugin starts before the weights
load. CPU only (NVRTC, no GPU): the families land in the disk cache, bad arguments fail at once,
and a compile already running is waited for rather than repeated (the Rust test
`concurrent_compiles_of_a_family_run_nvrtc_once` counts the NVRTC runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gptoss_3090 import _native, runtime


def _nvrtc_or_skip() -> None:
    runtime.ensure_cuda_libs()
    try:
        _native.nvrtc_version()
    except Exception as e:  # noqa: BLE001 - any failure means no NVRTC here
        pytest.skip(f"NVRTC not available: {e}")


def test_background_compile_fills_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nvrtc_or_skip()
    monkeypatch.setenv("GPTOSS_3090_CACHE", str(tmp_path))
    thread = runtime.compile_in_background(["attention"], arch="8.6")
    assert thread is not None and thread.daemon and thread.arch == "sm_86"
    # A caller that needs the family meanwhile gets the same cubin, and one cache entry results.
    again = _native.compile_kernels("sm_86", ["attention"])
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert thread.error is None, thread.error
    assert thread.sizes == again and again["attention"] > 0
    assert thread.seconds is not None and thread.seconds > 0
    assert thread.cached == []  # a fresh cache: the thread compiled it
    assert _native.kernel_cache_path("attention", "sm_86") == str(
        tmp_path / next(tmp_path.iterdir()).name
    )
    warm = runtime.compile_in_background(["attention"], arch="sm_86")
    assert warm is not None
    warm.join(timeout=600)
    assert warm.error is None and warm.cached == ["attention"]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].startswith("attention-sm86-"), entries
    assert (tmp_path / entries[0]).stat().st_size > again["attention"]  # header + cubin


def test_background_compile_rejects_bad_arguments_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _nvrtc_or_skip()
    with pytest.raises(ValueError, match="no_such_family"):
        runtime.compile_in_background(["attention", "no_such_family"], arch="sm_86")
    for bad in ("sm_75", "sm_x6", "", "7.5", "sm_860"):
        with pytest.raises(ValueError, match="arch"):
            runtime.compile_in_background(["attention"], arch=bad)
    with pytest.raises(TypeError, match="list of family names"):
        runtime.compile_in_background("attention", arch="sm_86")
    with pytest.raises(TypeError):
        runtime.compile_in_background(["attention"], arch=86)  # type: ignore[arg-type]
    assert _native.arch_name("8.6") == _native.arch_name("86") == "sm_86"
    monkeypatch.setenv("GPTOSS_3090_CACHE", "off")
    assert runtime.compile_in_background(["attention"], arch="sm_86") is None


def test_compile_kernels_takes_a_family_list() -> None:
    _nvrtc_or_skip()
    with pytest.raises(ValueError, match="no_such_family"):
        _native.compile_kernels("sm_86", ["no_such_family"])
    assert _native.compile_kernels("sm_86", []) == {}
    with pytest.raises(ValueError, match="no_such_family"):
        _native.kernel_cache_path("no_such_family", "sm_86")
