//! Python bindings of the CUDA runtime (`gptoss_3090._native`).
//!
//! | function | purpose |
//! |---|---|
//! | `compile_kernels(arch: str, families=None) -> dict[str, int]` | NVRTC-compile families (default all; cubin bytes each); no GPU |
//! | `compile_source(src: str, arch: str) -> bytes` | test hook: compile one source text to a cubin |
//! | `cuda_driver_available() -> bool` | libcuda loads and `cuInit` succeeds |
//! | `nvrtc_version() -> tuple[int, int]` | NVRTC version (raises CudaError without NVRTC) |
//! | `kernel_cache_dir() -> str \| None` | where cubins are cached |
//! | `kernel_cache_path(family: str, arch: str) -> str \| None` | a family's cache file for `arch` |
//! | `arch_name(arch: str) -> str` | "sm_XY" from any accepted spelling; sm_80+ only |
//! | `device_info(ordinal: int) -> dict` | name, arch, SMs, shared memory, L2, tuning, ... |
//! | `warmup(ordinal: int) -> None` | compile + load every kernel (before CUDA-graph capture) |
//! | `max_active_clusters(ordinal, family, entry, cluster_y, threads, dyn_smem) -> int` | clusters a GPU runs at once (sm_90+) |
//! | `set_tuning(name: str \| None) -> None` | force `sm80`/`sm86`/`sm90` launch configs, or clear |
//! | `forced_tuning() -> str \| None` | the current override |
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::{Arch, Tuning, SOURCES};
use crate::error::{Error, Result};

/// Compiles the kernel families `families` (default: every one) for `arch` (e.g. "sm_86")
/// through the disk cache, several at once (`compile_families`).
/// Returns `{family: cubin_bytes}`. Needs NVRTC, not a GPU.
#[pyfunction]
#[pyo3(signature = (arch, families = None))]
fn compile_kernels<'py>(
    py: Python<'py>,
    arch: &str,
    families: Option<Vec<String>>,
) -> PyResult<Bound<'py, PyDict>> {
    let arch = Arch::parse(arch)?;
    let names: Vec<&str> = match &families {
        Some(f) => f.iter().map(String::as_str).collect(),
        None => SOURCES.iter().map(|s| s.name).collect(),
    };
    let cubins: Result<Vec<Vec<u8>>> = py.detach(|| super::compile_families(&names, arch));
    let d = PyDict::new(py);
    for (name, cubin) in names.iter().zip(cubins?) {
        d.set_item(name, cubin.len())?;
    }
    Ok(d)
}

/// Compiles one source text (it may `#include "common.cuh"`) for `arch`, without the cache.
/// Raises KernelCompileError with the NVRTC log on failure. Test hook.
#[pyfunction]
#[pyo3(signature = (src, arch, name = "test_source"))]
fn compile_source<'py>(
    py: Python<'py>,
    src: &str,
    arch: &str,
    name: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let arch = Arch::parse(arch)?;
    let cubin = py.detach(|| super::compile_source(name, src, arch))?;
    Ok(PyBytes::new(py, &cubin))
}

/// Compiles one source text with extra NVRTC options; returns (cubin_bytes, nvrtc_log).
/// Diagnostics hook, e.g. `compile_source_log(src, "sm_86", ["--ptxas-options=-v"])`.
#[pyfunction]
#[pyo3(signature = (src, arch, extra_options = Vec::new(), name = "test_source"))]
fn compile_source_log(
    py: Python<'_>,
    src: &str,
    arch: &str,
    extra_options: Vec<String>,
    name: &str,
) -> PyResult<(usize, String)> {
    let arch = Arch::parse(arch)?;
    let (cubin, log) = py.detach(|| super::compile_source_with(name, src, arch, &extra_options))?;
    Ok((cubin.len(), log))
}

/// The embedded text of kernel family `name` ("nf4", "moe", "moe_chunks", "attention",
/// "moe_f16", "moe_chunks_f16").
#[pyfunction]
fn kernel_source(name: &str) -> PyResult<&'static str> {
    Ok(super::source(name)?.source)
}

/// Names of the kernel families.
#[pyfunction]
fn kernel_sources() -> Vec<&'static str> {
    SOURCES.iter().map(|s| s.name).collect()
}

/// Whether the NVIDIA driver library loads and `cuInit` succeeds.
#[pyfunction]
fn cuda_driver_available() -> bool {
    super::driver_available()
}

/// The NVRTC version as (major, minor).
#[pyfunction]
fn nvrtc_version() -> PyResult<(i32, i32)> {
    Ok(super::nvrtc_version()?)
}

/// The folder where compiled cubins are cached, or None when caching is off.
#[pyfunction]
fn kernel_cache_dir() -> Option<String> {
    super::cache_dir().map(|p| p.to_string_lossy().into_owned())
}

/// `arch` (any spelling `Arch::parse` takes: "sm_86", "86", "8.6") as "sm_XY"; ValueError
/// when it is malformed or older than sm_80.
#[pyfunction]
fn arch_name(arch: &str) -> PyResult<String> {
    let parsed = Arch::parse(arch)?;
    if !parsed.is_supported() {
        return Err(Error::arg(format!(
            "arch '{arch}': gptoss-3090 kernels need sm_80 or newer"
        ))
        .into());
    }
    Ok(parsed.to_string())
}

/// The cache file kernel family `family` compiled for `arch` has (whether or not it exists
/// yet), or None when caching is off. Needs NVRTC (its version is part of the key).
#[pyfunction]
fn kernel_cache_path(family: &str, arch: &str) -> PyResult<Option<String>> {
    let arch = Arch::parse(arch)?;
    let path = super::compile::cache_path(super::source(family)?, arch)?;
    Ok(path.map(|p| p.to_string_lossy().into_owned()))
}

/// Facts about GPU `ordinal`: name, arch, SM count, shared memory, L2, memory, tuning.
#[pyfunction]
fn device_info<'py>(py: Python<'py>, ordinal: i32) -> PyResult<Bound<'py, PyDict>> {
    let dev = super::device(ordinal)?;
    let d = PyDict::new(py);
    d.set_item("ordinal", dev.ordinal())?;
    d.set_item("name", dev.name())?;
    d.set_item("arch", dev.arch().to_string())?;
    d.set_item("major", dev.arch().major)?;
    d.set_item("minor", dev.arch().minor)?;
    d.set_item("sm_count", dev.sm_count())?;
    d.set_item(
        "max_shared_per_block_optin",
        dev.max_shared_per_block_optin(),
    )?;
    d.set_item("shared_per_sm", dev.shared_per_sm())?;
    d.set_item("l2_bytes", dev.l2_bytes())?;
    d.set_item("total_mem", dev.total_mem())?;
    d.set_item("tuning", dev.tuning().name())?;
    d.set_item("natural_tuning", dev.natural_tuning().name())?;
    d.set_item("driver_version", super::driver_version().ok())?;
    d.set_item("nvrtc_version", super::nvrtc_version().ok())?;
    d.set_item(
        "kernel_cache_dir",
        super::cache_dir().map(|p| p.to_string_lossy().into_owned()),
    )?;
    Ok(d)
}

/// How many clusters of (1, `cluster_y`, 1) blocks of kernel `family/entry` (`threads` threads,
/// `dyn_smem` bytes of dynamic shared memory) GPU `ordinal` runs at once (sm_90+).
#[pyfunction]
fn max_active_clusters(
    ordinal: i32,
    family: &str,
    entry: &str,
    cluster_y: u32,
    threads: u32,
    dyn_smem: u32,
) -> PyResult<u32> {
    if !(1..=8).contains(&cluster_y) || !(1..=1024).contains(&threads) {
        return Err(Error::arg(format!(
            "cluster_y must be 1..=8 and threads 1..=1024, found {cluster_y} and {threads}"
        ))
        .into());
    }
    let dev = super::device(ordinal)?;
    let f = dev.function(family, entry)?;
    Ok(dev.max_active_clusters(&f, cluster_y, threads, dyn_smem)?)
}

/// Compiles (disk cache) and loads every kernel on GPU `ordinal`. Call before CUDA-graph capture.
#[pyfunction]
fn warmup(py: Python<'_>, ordinal: i32) -> PyResult<()> {
    py.detach(|| super::device(ordinal).and_then(|d| d.warmup()))?;
    Ok(())
}

/// Forces a launch-configuration family ("sm80", "sm86", "sm90") on every GPU, or clears the
/// override with None (then GPTOSS_3090_FORCE_TUNING is not consulted again).
#[pyfunction]
#[pyo3(signature = (name = None))]
fn set_tuning(name: Option<&str>) -> PyResult<()> {
    let t = match name {
        Some(n) => Some(Tuning::parse(n)?),
        None => None,
    };
    super::set_tuning(t);
    Ok(())
}

/// The current tuning override ("sm80"/"sm86"/"sm90") or None.
#[pyfunction]
fn forced_tuning() -> Option<&'static str> {
    super::forced_tuning().map(Tuning::name)
}

/// Adds the runtime functions to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(compile_source, m)?)?;
    m.add_function(wrap_pyfunction!(compile_source_log, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_source, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_sources, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_driver_available, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_cache_path, m)?)?;
    m.add_function(wrap_pyfunction!(arch_name, m)?)?;
    m.add_function(wrap_pyfunction!(device_info, m)?)?;
    m.add_function(wrap_pyfunction!(warmup, m)?)?;
    m.add_function(wrap_pyfunction!(max_active_clusters, m)?)?;
    m.add_function(wrap_pyfunction!(set_tuning, m)?)?;
    m.add_function(wrap_pyfunction!(forced_tuning, m)?)?;
    Ok(())
}
