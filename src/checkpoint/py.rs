//! Python bindings of the checkpoint reader (`gptoss_3090._native`).
//!
//! - `NativeCheckpoint(path)`: opens and validates a checkpoint directory.
//! - `fused_dequantize(...)`: dequantizes one expert from fused buffers.
//!
//! Buffers travel as 1-D contiguous numpy `uint8` arrays of raw bytes (the Python layer views
//! torch tensors of any dtype as bytes); bf16/f16 results come back as `uint16` bit patterns.
//! Heavy work (dequantization, filling fused buffers) runs with the GIL released.

use std::path::PathBuf;

use numpy::{PyArray1, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::fused::{self, FusedOut, FusedView, Proj};
use super::model::Weight;
use super::shards::dtype_name;
use super::Checkpoint;
use crate::error::Error;
use crate::nf4::FloatDtype;

fn index_arg(name: &str, v: i64, len: usize) -> Result<usize, Error> {
    usize::try_from(v)
        .ok()
        .filter(|&i| i < len)
        .ok_or_else(|| Error::arg(format!("{name}: expected an index in 0..{len}, found {v}")))
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

fn float_dtype(s: &str) -> Result<FloatDtype, Error> {
    match s {
        "bfloat16" => Ok(FloatDtype::BF16),
        "float16" => Ok(FloatDtype::F16),
        other => Err(Error::arg(format!(
            "dtype: expected 'bfloat16' or 'float16', found '{other}'"
        ))),
    }
}

fn slice_ro<'a>(name: &str, a: &'a PyReadonlyArray1<'_, u8>) -> Result<&'a [u8], Error> {
    a.as_slice().map_err(|_| {
        Error::arg(format!(
            "buffer '{name}': expected a contiguous uint8 array"
        ))
    })
}

fn slice_rw<'a>(name: &str, a: &'a mut PyReadwriteArray1<'_, u8>) -> Result<&'a mut [u8], Error> {
    a.as_slice_mut().map_err(|_| {
        Error::arg(format!(
            "buffer '{name}': expected a contiguous uint8 array"
        ))
    })
}

/// An opened, validated GPT-OSS checkpoint (the native half of `gptoss_3090.Checkpoint`).
#[pyclass(frozen, module = "gptoss_3090._native")]
pub struct NativeCheckpoint {
    inner: Checkpoint,
}

#[pymethods]
impl NativeCheckpoint {
    /// Opens and validates the checkpoint directory `path`; raises CheckpointError.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| Checkpoint::open(&path))?;
        Ok(NativeCheckpoint { inner })
    }

    /// The checkpoint directory.
    #[getter]
    fn path(&self) -> String {
        self.inner.dir.display().to_string()
    }

    /// The text of config.json.
    fn config_json(&self) -> String {
        self.inner.config_text.clone()
    }

    /// The summary as a JSON string.
    fn summary_json(&self) -> String {
        super::summary::summary(&self.inner).to_string()
    }

    /// All tensor keys, sorted.
    fn keys(&self) -> Vec<String> {
        self.inner.keys().map(str::to_string).collect()
    }

    /// `(dtype_name, shape)` of a stored tensor.
    fn tensor_info(&self, key: &str) -> PyResult<(String, Vec<usize>)> {
        let e = self.inner.entry(key)?;
        Ok((dtype_name(e.dtype).to_string(), e.shape.clone()))
    }

    /// A copy of the stored bytes of `key` as a 1-D uint8 array.
    fn read_tensor<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let bytes = self.inner.tensor_bytes(key)?;
        let v = py.detach(|| bytes.to_vec());
        Ok(PyArray1::from_vec(py, v))
    }

    /// `"nf4"`, `"plain"` (a Linear weight stored unquantized) or None (not a Linear weight).
    fn weight_format(&self, name: &str) -> Option<&'static str> {
        match self.inner.weight(name) {
            Some(Weight::Nf4(_)) => Some("nf4"),
            Some(Weight::Plain(_)) => Some("plain"),
            None => None,
        }
    }

    /// Dequantizes NF4 weight `name`: `(uint16 bit patterns, dtype_name, shape)`.
    fn dequantize<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<(Bound<'py, PyArray1<u16>>, String, Vec<usize>)> {
        let d = py.detach(|| self.inner.dequantize(name))?;
        let dtype = d.dtype_name().to_string();
        Ok((PyArray1::from_vec(py, d.bits), dtype, d.shape))
    }

    /// Sizes of the fused (layer, proj) buffers: a dict with `layer`, `proj`, `shape` (E, N, K),
    /// `nested`, `dtype`, `bias_dtype`, `total_bytes` and `buffers` {name: {shape, dtype, nbytes}}.
    fn fused_layout<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        proj: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let l = index_arg("layer", layer, self.inner.model.layers.len())?;
        let p = Proj::parse(proj)?;
        let lay = fused::layout(&self.inner, l, p)?;
        let d = PyDict::new(py);
        d.set_item("layer", lay.layer)?;
        d.set_item("proj", lay.proj.as_str())?;
        d.set_item("shape", (lay.experts, lay.n, lay.k))?;
        d.set_item("nested", lay.nested)?;
        d.set_item("dtype", lay.dtype_name())?;
        d.set_item("bias_dtype", dtype_name(lay.bias_dtype))?;
        d.set_item("total_bytes", lay.total_bytes())?;
        let bufs = PyDict::new(py);
        for b in lay.buffers() {
            let e = PyDict::new(py);
            e.set_item("shape", b.shape.clone())?;
            e.set_item("dtype", b.dtype)?;
            e.set_item("nbytes", b.nbytes)?;
            bufs.set_item(b.name, e)?;
        }
        d.set_item("buffers", bufs)?;
        Ok(d)
    }

    /// Fills caller buffers (1-D contiguous uint8 arrays of exactly the layout's byte sizes) with
    /// the fused (layer, proj) experts, in one pass, without the GIL. `nested_*` must be given
    /// iff the experts are nested. `threads` defaults to min(cores, 8).
    #[pyo3(signature = (layer, proj, packed, absmax, bias, quant_map, nested_absmax=None,
                        nested_offset=None, nested_quant_map=None, threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn fill_fused(
        &self,
        py: Python<'_>,
        layer: i64,
        proj: &str,
        mut packed: PyReadwriteArray1<'_, u8>,
        mut absmax: PyReadwriteArray1<'_, u8>,
        mut bias: PyReadwriteArray1<'_, u8>,
        mut quant_map: PyReadwriteArray1<'_, u8>,
        nested_absmax: Option<PyReadwriteArray1<'_, u8>>,
        nested_offset: Option<PyReadwriteArray1<'_, u8>>,
        nested_quant_map: Option<PyReadwriteArray1<'_, u8>>,
        threads: Option<usize>,
    ) -> PyResult<()> {
        let l = index_arg("layer", layer, self.inner.model.layers.len())?;
        let p = Proj::parse(proj)?;
        let lay = fused::layout(&self.inner, l, p)?;
        let mut nab = nested_absmax;
        let mut noff = nested_offset;
        let mut nqm = nested_quant_map;
        let out = FusedOut {
            packed: slice_rw("packed", &mut packed)?,
            absmax: slice_rw("absmax", &mut absmax)?,
            bias: slice_rw("bias", &mut bias)?,
            quant_map: slice_rw("quant_map", &mut quant_map)?,
            nested_absmax: nab
                .as_mut()
                .map(|a| slice_rw("nested_absmax", a))
                .transpose()?,
            nested_offset: noff
                .as_mut()
                .map(|a| slice_rw("nested_offset", a))
                .transpose()?,
            nested_quant_map: nqm
                .as_mut()
                .map(|a| slice_rw("nested_quant_map", a))
                .transpose()?,
        };
        let threads = threads.unwrap_or_else(default_threads);
        let inner = &self.inner;
        py.detach(|| fused::fill(inner, &lay, out, threads))?;
        Ok(())
    }
}

/// Dequantizes expert `expert` from fused buffers (raw-byte uint8 arrays as laid out by
/// `fused_layout`) of shape [experts, n, k]; returns `n*k` uint16 bit patterns of `dtype`.
#[pyfunction]
#[pyo3(signature = (packed, absmax, quant_map, experts, n, k, dtype, expert,
                    nested_absmax=None, nested_offset=None, nested_quant_map=None))]
#[allow(clippy::too_many_arguments)]
fn fused_dequantize<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    absmax: PyReadonlyArray1<'py, u8>,
    quant_map: PyReadonlyArray1<'py, u8>,
    experts: usize,
    n: usize,
    k: usize,
    dtype: &str,
    expert: i64,
    nested_absmax: Option<PyReadonlyArray1<'py, u8>>,
    nested_offset: Option<PyReadonlyArray1<'py, u8>>,
    nested_quant_map: Option<PyReadonlyArray1<'py, u8>>,
) -> PyResult<Bound<'py, PyArray1<u16>>> {
    let e = index_arg("expert", expert, experts)?;
    let view = FusedView {
        experts,
        n,
        k,
        dtype: float_dtype(dtype)?,
        packed: slice_ro("packed", &packed)?,
        absmax: slice_ro("absmax", &absmax)?,
        quant_map: slice_ro("quant_map", &quant_map)?,
        nested_absmax: nested_absmax
            .as_ref()
            .map(|a| slice_ro("nested_absmax", a))
            .transpose()?,
        nested_offset: nested_offset
            .as_ref()
            .map(|a| slice_ro("nested_offset", a))
            .transpose()?,
        nested_quant_map: nested_quant_map
            .as_ref()
            .map(|a| slice_ro("nested_quant_map", a))
            .transpose()?,
    };
    let bits = py.detach(|| fused::dequantize_expert(&view, e))?;
    Ok(PyArray1::from_vec(py, bits))
}

/// Adds the checkpoint classes and functions to `_native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeCheckpoint>()?;
    m.add_function(wrap_pyfunction!(fused_dequantize, m)?)?;
    Ok(())
}
