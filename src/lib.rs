//! gptoss_3090 native core: checkpoint reading, exact NF4, the CUDA runtime and the ops.
//!
//! This file only wires the Python module `gptoss_3090._native`; each domain lives in its own
//! module and exposes a `py::register` function.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
pub mod cuda;
pub mod error;
pub mod nf4;
pub mod ops;

use pyo3::prelude::*;

/// The extension module imported as `gptoss_3090._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CheckpointError", py.get_type::<error::CheckpointError>())?;
    m.add("CudaError", py.get_type::<error::CudaError>())?;
    m.add(
        "KernelCompileError",
        py.get_type::<error::KernelCompileError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    nf4::py::register(m)?;
    checkpoint::py::register(m)?;
    cuda::py::register(m)?;
    ops::py::register(m)?;
    Ok(())
}
