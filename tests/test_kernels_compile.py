"""Every kernel family compiles through NVRTC for every supported architecture (no GPU needed),
compile errors carry the NVRTC log, and the runtime fails cleanly without a GPU."""

from __future__ import annotations

import re

import gptoss_3090
import pytest
import torch
from gptoss_3090 import _native
from gptoss_3090._cuda_libs import find_nvrtc, preload_nvrtc

ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90"]


def _nvrtc_or_skip() -> None:
    preload_nvrtc()
    try:
        _native.nvrtc_version()
    except gptoss_3090.CudaError as e:
        info = find_nvrtc()
        pytest.skip(f"NVRTC is not installed here ({e}); searched {info.searched}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private, empty kernel cache so that the test really compiles."""
    import os

    d = tmp_path_factory.mktemp("kcache")
    old = os.environ.get("GPTOSS_3090_CACHE")
    os.environ["GPTOSS_3090_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("GPTOSS_3090_CACHE", None)
    else:
        os.environ["GPTOSS_3090_CACHE"] = old


@pytest.mark.parametrize("arch", ARCHS)
def test_every_source_compiles(arch, cache_dir):
    _nvrtc_or_skip()
    sizes = _native.compile_kernels(arch)
    families = {"nf4", "moe", "moe_chunks", "attention", "moe_f16", "moe_chunks_f16"}
    assert set(sizes) == set(_native.kernel_sources()) == families
    for name, size in sizes.items():
        assert size > 0, f"{name} for {arch}: empty cubin"
    # the cache now holds one entry per family, and a second call is served from it
    files = sorted(p.name for p in cache_dir.iterdir() if p.suffix == ".cubin")
    tag = arch.replace("_", "")
    assert sum(1 for f in files if f"-{tag}-" in f) == len(families), files
    assert _native.compile_kernels(arch) == sizes


@pytest.mark.parametrize("family", ["attention", "nf4"])
def test_families_compiled_side_by_side_equal_a_lone_compile(family, cache_dir):
    """compile_kernels runs NVRTC on several families at once (no global lock); each cubin must
    be byte for byte what a compile of that family alone gives. The two smallest families keep
    this cheap; the sm_86 cache entries come from test_every_source_compiles (same module
    cache), else from this call."""
    _nvrtc_or_skip()
    _native.compile_kernels("sm_86")
    (entry,) = [p for p in cache_dir.iterdir() if p.name.startswith(f"{family}-sm86-")]
    cached = entry.read_bytes()
    assert cached[:8] == b"GPTOSSK1"
    alone = _native.compile_source(_native.kernel_source(family), "sm_86", family)
    assert cached[40:] == alone


def test_nf4_entries_exist_in_cubin():
    _nvrtc_or_skip()
    cubin = _native.compile_source(_native.kernel_source("nf4"), "sm_86", "nf4")
    assert cubin[:4] == b"\x7fELF"
    for entry in (
        b"nf4_dequant_bf16",
        b"nf4_dequant_f16",
        b"nf4_linear_decode_m8_bf16",
        b"nf4_linear_decode_m16_f16",
        b"nf4_linear_mma_l3_bf16",
        b"nf4_linear_mma_l4_f16",
        b"nf4_linear_mma_m3_bf16",
        b"nf4_linear_mma_s4_bf16",
        b"nf4_linear_splitk_reduce_bf16",
        b"nf4_linear_splitk_reduce_v4_f16",
        b"nf4_quantize_blocks_f32",
        b"nf4_quantize_mean",
        b"nf4_quantize_nested",
    ):
        assert entry in cubin, entry


def test_router_entries_exist_in_the_served_moe_family(cache_dir):
    """The router op takes its kernels from ``moe_chunks`` (src/ops/router.rs, ROUTER_FAMILY),
    the family vLLM serves the experts from, so a fresh ``vllm serve`` compiles one MoE family,
    not two. Its cubins (the bf16 program and the fp16 one, where fp16 entries go) must hold
    every router entry. (The sm_86 cache entries come from test_every_source_compiles, else
    from this call.)"""
    _nvrtc_or_skip()
    _native.compile_kernels("sm_86")
    for dtype, program in (("bf16", "moe_chunks"), ("f16", "moe_chunks_f16")):
        (entry,) = [p for p in cache_dir.iterdir() if p.name.startswith(f"{program}-sm86-")]
        cubin = entry.read_bytes()[40:]
        assert cubin[:4] == b"\x7fELF"
        for name in ("moe_router", "moe_router_topk", "moe_route"):
            assert f"{name}_{dtype}\x00".encode() in cubin, (name, dtype)


def _ptxas_per_entry(log: str, pattern: str) -> dict[str, int]:
    """The integer in group 1 of ``pattern`` for each entry of a ``ptxas -v`` log."""
    out: dict[str, int] = {}
    entry = "?"
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(
            r"Function properties for (\w+)", line
        )
        if m:
            entry = m.group(1)
        m = re.search(pattern, line)
        if m:
            out[entry] = int(m.group(1))
    return out


def _spills(log: str) -> dict[str, int]:
    """Spill-store bytes per entry (entries without spills omitted)."""
    return {e: n for e, n in _ptxas_per_entry(log, r"(\d+) bytes spill stores").items() if n > 0}


def test_nf4_kernels_do_not_spill():
    """Register spills would silently cost bandwidth: ptxas must report none. (Until session 10
    the two-tile streaming linear was allowed 16 bytes on sm_90, measured faster than one block
    per SM without spills; the streaming core's running cursors removed them.)"""
    _nvrtc_or_skip()
    for arch in ("sm_86", "sm_90"):
        _, log = _native.compile_source_log(
            _native.kernel_source("nf4"), arch, ["--ptxas-options=-v"], "nf4"
        )
        spills = _spills(log)
        assert "bytes spill stores" in log, "ptxas -v printed no register report"
        assert not spills, f"{arch}: {spills}"


def _static_smem(log: str) -> dict[str, int]:
    """Static shared-memory bytes per entry."""
    return _ptxas_per_entry(log, r"Used \d+ registers.*?(\d+) bytes smem")


def test_two_tile_moe_kernels_stage_eight_columns_at_two_blocks_per_sm():
    """The two-tile streaming MoE kernels stage a whole 8-column tile of activations at two
    blocks per H100 SM (session 18: 1.04-1.05x at 64 tokens against 7 columns). A few hundred
    bytes more of static shared memory would silently fall back to 7: the budget is the SM's
    228 KB over two blocks, less the runtime's 1 KB per block, the 64 KB code-pair table and 8
    columns of K = 2880 (`stream_x_column_bytes`)."""
    _nvrtc_or_skip()
    _, log = _native.compile_source_log(
        _native.kernel_source("moe_chunks"), "sm_90", ["--ptxas-options=-v"], "moe_chunks"
    )
    smem = _static_smem(log)
    per_block = 228 * 1024 // 2 - 1024
    columns = 8 * 2 * (2880 + 8)
    for entry in ("moe_str_up_n2_bf16", "moe_str_down_n2_bf16"):
        assert entry in smem, f"no ptxas report for {entry}"
        assert smem[entry] + 256 * 256 + columns <= per_block, (entry, smem[entry])


def test_broken_source_raises_compile_error_with_log():
    _nvrtc_or_skip()
    src = '#include "common.cuh"\nextern "C" __global__ void k(int* p) { p[0] = no_such_symbol; }\n'
    with pytest.raises(gptoss_3090.KernelCompileError) as ei:
        _native.compile_source(src, "sm_86")
    msg = str(ei.value)
    assert "no_such_symbol" in msg and "sm_86" in msg
    assert isinstance(ei.value, gptoss_3090.CudaError)


def test_side_by_side_compile_reports_the_first_failing_family(tmp_path, monkeypatch):
    """Every family broken (GPTOSS_3090_KERNEL_DIR): whichever thread fails first, the error
    is the first family's in family order (nf4), with its NVRTC log."""
    _nvrtc_or_skip()
    for name in ("nf4", "moe", "attention"):
        (tmp_path / f"{name}.cu").write_text(f'#error "{name} is broken here"\n')
    monkeypatch.setenv("GPTOSS_3090_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("GPTOSS_3090_CACHE", "off")
    with pytest.raises(gptoss_3090.KernelCompileError) as ei:
        _native.compile_kernels("sm_86")
    msg = str(ei.value)
    assert "nf4.cu" in msg and "nf4 is broken here" in msg, msg


def test_bad_arch_is_a_value_error():
    with pytest.raises(ValueError):
        _native.compile_kernels("sm_7x")
    with pytest.raises(ValueError):
        _native.compile_source("", "sm_75")  # older than sm_80


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_no_gpu_raises_cuda_error():
    from gptoss_3090 import runtime

    with pytest.raises(gptoss_3090.CudaError):
        runtime.device_info(0)
    with pytest.raises(gptoss_3090.CudaError):
        runtime.warmup(0)
    assert _native.cuda_driver_available() in (True, False)


def test_misspelt_forced_tuning_stops_the_device_open(monkeypatch):
    """A GPTOSS_3090_FORCE_TUNING the runtime cannot parse used to be ignored, silently running
    the GPU's own configuration; the first open of a device now names the variable. (Ordinal 63
    is never opened, so the check runs with or without a GPU.)"""
    from gptoss_3090 import runtime

    monkeypatch.setenv("GPTOSS_3090_FORCE_TUNING", "sm68")
    with pytest.raises(ValueError, match='GPTOSS_3090_FORCE_TUNING="sm68": expected sm80, sm86'):
        runtime.device_info(63)


def test_nvrtc_discovery_reports_what_it_found():
    info = preload_nvrtc()
    assert isinstance(info.searched, list) and info.searched
    if info.path is not None:
        assert "libnvrtc.so.1" in info.path
        assert info.major in (12, 13)


def test_tuning_override_round_trip():
    from gptoss_3090 import runtime

    with runtime.forced_tuning("sm86"):
        assert _native.forced_tuning() == "sm86"
        with runtime.forced_tuning("sm90"):
            assert _native.forced_tuning() == "sm90"
        assert _native.forced_tuning() == "sm86"
    with pytest.raises(ValueError):
        runtime.set_tuning("sm75")
    with pytest.raises(ValueError):
        runtime.set_linear_strategy("fastest")


def test_chunk_major_moe_family_is_the_moe_source_with_its_define():
    moe, chunks = _native.kernel_source("moe"), _native.kernel_source("moe_chunks")
    assert chunks == "#define STR_CHUNK_MAJOR 1\n" + moe
    moe16, chunks16 = _native.kernel_source("moe_f16"), _native.kernel_source("moe_chunks_f16")
    assert chunks16 == "#define STR_CHUNK_MAJOR 1\n" + moe16


@pytest.mark.parametrize("family", ["moe", "moe_chunks"])
def test_moe_entries_split_by_dtype_between_two_programs(family, cache_dir):
    """moe.cu compiles as two programs per weight order: the bf16 entries in `family`, the fp16
    ones in `family`_f16, where GpuDevice::function sends every entry ending in _f16. Together
    they hold every entry of the file, each exactly once, so no launch can miss its kernel. (The
    sm_86 cache entries come from test_every_source_compiles, same module cache.)"""
    _nvrtc_or_skip()
    text = _native.kernel_source(family)
    entries = set(re.findall(r'extern "C" __global__[^\n]*? void (\w+)\(const MoeParams', text))
    assert len(entries) == 62 and all(e.endswith(("_bf16", "_f16")) for e in entries)
    _native.compile_kernels("sm_86", [family, f"{family}_f16"])
    cubins = {}
    for program in (family, f"{family}_f16"):
        path = _native.kernel_cache_path(program, "sm_86")
        assert path is not None
        with open(path, "rb") as f:
            cubins[program] = f.read()[40:]
    for entry in entries:
        section = b".text." + entry.encode() + b"\x00"
        want_f16 = entry.endswith("_f16")
        assert (section in cubins[f"{family}_f16"]) == want_f16, entry
        assert (section in cubins[family]) == (not want_f16), entry


def test_chunk_major_linear_streaming_variant_compiles():
    # The benchmark-only STR_CHUNK_MAJOR build of the linear's streaming kernels
    # (bench_nf4_linear.py --weights-order chunks, gpu_kernels.sh nf4chunks) must keep compiling.
    _nvrtc_or_skip()
    src = "#define STR_CHUNK_MAJOR 1\n" + _native.kernel_source("nf4")
    cubin = _native.compile_source(src, "sm_90", "nf4")
    assert cubin[:4] == b"\x7fELF"
    assert b"nf4_linear_str_n1_bf16" in cubin
