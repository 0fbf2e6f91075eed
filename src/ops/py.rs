//! Python bindings of the launchers (`gptoss_3090._native.*`).
//!
//! Every launcher takes plain integers: device pointers (`tensor.data_ptr()`), sizes, strides,
//! the device ordinal and the raw stream handle (`torch.cuda.current_stream().cuda_stream`).
//! Python (`gptoss_3090.ops`) validates tensors before calling; the launchers re-check sizes,
//! alignment and null pointers and raise ValueError / CudaError, never panic.
//!
//! To add a family: write `fn register_<family>(m)` below and call it from [`register`].
use pyo3::prelude::*;

fn register_nf4(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

/// Adds every launcher to the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    register_nf4(m)?;
    super::moe::register(m)?;
    Ok(())
}
