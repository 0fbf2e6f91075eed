//! Python bindings of the launchers (`gptoss_3090._native.*`).
//!
//! Every launcher takes plain integers: device pointers (`tensor.data_ptr()`), sizes, strides,
//! the device ordinal and the raw stream handle (`torch.cuda.current_stream().cuda_stream`).
//! Python (`gptoss_3090.ops`) validates tensors before calling; the launchers re-check sizes,
//! alignment and null pointers and raise ValueError / CudaError, never panic.
//!
//! To add a family: write `fn register_<family>(m)` below and call it from [`register`].
//!
//! NF4 (`cuda_nf4_*`; the CPU reference functions of `src/nf4` use the plain `nf4_*` names):
//! - `cuda_nf4_dequantize(ordinal, stream, dtype, stats, numel, n_experts, out)`
//! - `cuda_nf4_dequantize_segments(ordinal, stream, dtype, [(stats, numel, out), ...])` (1..=3
//!   single tensors, one launch)
//! - `cuda_nf4_linear(ordinal, stream, dtype, x, ldx, m, k, y, ldy, bias, segments, path="auto",
//!   ws=0, ws_floats=0) -> str` (ws: the split-K workspace the plan asks for)
//! - `cuda_nf4_linear_plan(ordinal, m, n, k, path="auto") -> dict`
//! - `cuda_nf4_quantize(ordinal, stream, in_dtype, weight, n, nested, packed, absmax, codes,
//!   nested_absmax, nested_map, offset)`
//!
//! where `stats` / each segment's statistics is the tuple
//! `(packed, absmax, nested_absmax, nested_map, nested_offset_ptr, nested_offset_value, nested)`
//! and a segment is `(stats..., rows)` (8 items).
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::cuda;
use crate::error::Error;
use crate::ops::nf4::{self, LinearArgs, LinearPath, Nf4Stats, QuantInput, QuantizeOut, Segment};
use crate::ops::Dtype;

type StatsTuple = (u64, u64, u64, u64, u64, f32, bool);
type SegmentTuple = (u64, u64, u64, u64, u64, f32, bool, i64);

fn stats_of(t: StatsTuple) -> Nf4Stats {
    Nf4Stats {
        packed: t.0,
        absmax: t.1,
        nested_absmax: t.2,
        nested_map: t.3,
        nested_offset_ptr: t.4,
        nested_offset_value: t.5,
        nested: t.6,
    }
}

/// Dequantizes NF4 (single tensor or `n_experts` fused experts) into `out` on the GPU.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_nf4_dequantize(
    ordinal: i32,
    stream: u64,
    dtype: &str,
    stats: StatsTuple,
    numel: i64,
    n_experts: i64,
    out: u64,
) -> PyResult<()> {
    let dtype = Dtype::parse(dtype)?;
    let stats = stats_of(stats);
    nf4::dequantize_params(&stats, numel, n_experts, out)?;
    let dev = cuda::device(ordinal)?;
    cuda::guard("nf4 dequantize", || {
        // SAFETY: Python validated the tensors (device, dtype, sizes, alignment) and passes
        // torch's current stream of this device.
        unsafe { nf4::dequantize(&dev, &stats, numel, n_experts, dtype, out, stream) }
    })?;
    Ok(())
}

/// Dequantizes 1..=3 single NF4 tensors, each `(stats, numel, out)`, in one launch.
#[pyfunction]
fn cuda_nf4_dequantize_segments(
    ordinal: i32,
    stream: u64,
    dtype: &str,
    segments: Vec<(StatsTuple, i64, u64)>,
) -> PyResult<()> {
    let dtype = Dtype::parse(dtype)?;
    let segments: Vec<nf4::DequantSegment> = segments
        .into_iter()
        .map(|(stats, numel, out)| nf4::DequantSegment {
            stats: stats_of(stats),
            numel,
            out,
        })
        .collect();
    nf4::dequantize_segments_params(&segments, 1)?;
    let dev = cuda::device(ordinal)?;
    cuda::guard("nf4 dequantize", || {
        // SAFETY: Python validated the tensors (device, dtype, sizes, alignment) and passes
        // torch's current stream of this device.
        unsafe { nf4::dequantize_segments(&dev, &segments, dtype, stream) }
    })?;
    Ok(())
}

/// y = x W^T + b on the GPU; W is 1..=3 NF4 segments. Returns the kernel entry used.
#[pyfunction]
#[pyo3(signature = (ordinal, stream, dtype, x, ldx, m, k, y, ldy, bias, segments, path = "auto", ws = 0, ws_floats = 0))]
#[allow(clippy::too_many_arguments)]
fn cuda_nf4_linear(
    ordinal: i32,
    stream: u64,
    dtype: &str,
    x: u64,
    ldx: i64,
    m: i64,
    k: i64,
    y: u64,
    ldy: i64,
    bias: u64,
    segments: Vec<SegmentTuple>,
    path: &str,
    ws: u64,
    ws_floats: u64,
) -> PyResult<String> {
    let dtype = Dtype::parse(dtype)?;
    let path = LinearPath::parse(path)?;
    let segs: Vec<Segment> = segments
        .into_iter()
        .map(|s| Segment {
            stats: stats_of((s.0, s.1, s.2, s.3, s.4, s.5, s.6)),
            rows: s.7,
        })
        .collect();
    let args = LinearArgs {
        x,
        ldx,
        m,
        k,
        y,
        ldy,
        bias,
        dtype,
    };
    nf4::linear_params(&segs, &args)?;
    let dev = cuda::device(ordinal)?;
    let plan = cuda::guard("nf4 linear", || {
        // SAFETY: as in cuda_nf4_dequantize.
        unsafe { nf4::linear(&dev, &segs, &args, path, (ws, ws_floats), stream) }
    })?;
    Ok(dtype.entry(plan.entry))
}

/// The launch plan the linear would use for (M, N, K) on GPU `ordinal` (no launch): entry,
/// grid, threads, smem, tuning, splits, workspace_floats (the split-K workspace to pass) and
/// cluster_reduce. `stream`: the stream the launch will use (0: none known; inside CUDA-graph
/// capture the kernels must then be loaded already).
#[pyfunction]
#[pyo3(signature = (ordinal, m, n, k, path = "auto", stream = 0))]
fn cuda_nf4_linear_plan<'py>(
    py: Python<'py>,
    ordinal: i32,
    m: i64,
    n: i64,
    k: i64,
    path: &str,
    stream: u64,
) -> PyResult<Bound<'py, PyDict>> {
    if m < 1 || n < 1 || k < 1 {
        return Err(Error::arg(format!(
            "M, N and K must be >= 1, found M={m}, N={n}, K={k}"
        ))
        .into());
    }
    let dev = cuda::device(ordinal)?;
    let path = LinearPath::parse(path)?;
    let plan = if path == Some(LinearPath::Wide) {
        nf4::plan_wide_on(&dev, m, n, k, stream)?
    } else {
        nf4::plan_linear(m, n, k, dev.sm_count(), dev.tuning(), path)?
    };
    let d = PyDict::new(py);
    d.set_item("entry", plan.entry)?;
    d.set_item("grid", (plan.grid.0, plan.grid.1, plan.grid.2))?;
    d.set_item("threads", plan.threads)?;
    d.set_item("smem", plan.smem)?;
    d.set_item("tuning", dev.tuning().name())?;
    d.set_item("splits", plan.splits)?;
    d.set_item("workspace_floats", plan.workspace_floats)?;
    let clustered = path == Some(LinearPath::Wide) && nf4::wide_plan_clustered(&plan);
    d.set_item("cluster_reduce", clustered)?;
    Ok(d)
}

/// Quantizes a weight to NF4 on the GPU (bitsandbytes CUDA semantics).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_nf4_quantize(
    ordinal: i32,
    stream: u64,
    in_dtype: &str,
    weight: u64,
    n: i64,
    nested: bool,
    packed: u64,
    absmax: u64,
    codes: u64,
    nested_absmax: u64,
    nested_map: u64,
    offset: u64,
) -> PyResult<()> {
    let kind = QuantInput::parse(in_dtype)?;
    let out = QuantizeOut {
        packed,
        absmax,
        codes,
        nested_absmax,
        nested_map,
        offset,
    };
    nf4::quantize_params(weight, kind, n, nested, &out)?;
    let dev = cuda::device(ordinal)?;
    cuda::guard("nf4 quantize", || {
        // SAFETY: as in cuda_nf4_dequantize.
        unsafe { nf4::quantize(&dev, weight, kind, n, nested, &out, stream) }
    })?;
    Ok(())
}

fn register_nf4(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_nf4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nf4_dequantize_segments, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nf4_linear, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nf4_linear_plan, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_nf4_quantize, m)?)?;
    m.add("NF4_STREAM_MAX_M", nf4::STREAM_MAX_M)?;
    m.add("NF4_WIDE_MAX_M", nf4::WIDE_MAX_M)?;
    Ok(())
}

/// Adds every launcher to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    register_nf4(m)?;
    super::moe::register(m)?;
    super::router::py::register(m)?;
    super::attention::py::register(m)?;
    Ok(())
}
