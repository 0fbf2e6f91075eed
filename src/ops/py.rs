//! Python bindings.
use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    super::moe::register(m)?;
    Ok(())
}
