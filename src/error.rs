//! The crate's one error type, and its mapping to Python exceptions at the boundary.
//!
//! Every fallible function in the crate returns [`Result<T>`]. Nothing panics on user data:
//! a bad file, tensor, shape or argument becomes one of these variants, and
//! `From<Error> for PyErr` turns it into the documented Python exception:
//!
//! | variant group | Python exception |
//! |---|---|
//! | checkpoint (`Io`, `Json`, `Safetensors`, `Config`, `Tensor`, `MissingTensor`, `UnexpectedTensor`) | `gptoss_3090.CheckpointError` (subclass of `ValueError`) |
//! | `InvalidArgument` | `ValueError` |
//! | `NoDriver`, `NoNvrtc`, `UnsupportedGpu`, `Driver` | `gptoss_3090.CudaError` (subclass of `RuntimeError`) |
//! | `Compile` | `gptoss_3090.KernelCompileError` (subclass of `CudaError`) |

use std::path::PathBuf;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::{create_exception, PyErr};

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, named by where and what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS-level failure reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON document (config.json, the index, a quant-state blob) did not parse.
    #[error("{what}: invalid JSON: {message}")]
    Json { what: String, message: String },
    /// The safetensors container itself is damaged (truncated header, bad offsets, ...).
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// config.json does not describe a model we support, or is inconsistent.
    #[error("config.json: {0}")]
    Config(String),
    /// A tensor exists but is wrong: names the key, what was expected and what was found.
    #[error("tensor '{key}': expected {expected}, found {found}")]
    Tensor {
        key: String,
        expected: String,
        found: String,
    },
    /// A tensor the model needs is absent from every shard.
    #[error("tensor '{key}' is missing ({context})")]
    MissingTensor { key: String, context: String },
    /// A tensor name we do not understand for this model.
    #[error("tensor '{key}' is unexpected ({context})")]
    UnexpectedTensor { key: String, context: String },
    /// A caller passed a bad argument (shape, dtype, size, alignment, name).
    #[error("{0}")]
    InvalidArgument(String),
    /// libcuda.so could not be loaded: no NVIDIA driver on this machine.
    #[error("no NVIDIA driver found (libcuda.so.1 could not be loaded): {0}")]
    NoDriver(String),
    /// libnvrtc could not be found.
    #[error("NVRTC not found: {0}")]
    NoNvrtc(String),
    /// The GPU is older than sm_80.
    #[error("GPU {ordinal} is sm_{major}{minor}; gptoss-3090 kernels need sm_80 or newer (Ampere, Ada, Hopper)")]
    UnsupportedGpu {
        ordinal: i32,
        major: i32,
        minor: i32,
    },
    /// NVRTC rejected a kernel source; carries the compiler log.
    #[error("NVRTC failed to compile kernels/{source_name} for {arch}:\n{log}")]
    Compile {
        source_name: String,
        arch: String,
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {context}: {message}")]
    Driver { context: String, message: String },
}

impl Error {
    /// Shorthand for a [`Error::Tensor`] mismatch.
    pub fn tensor(
        key: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            key: key.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// Shorthand for an [`Error::InvalidArgument`].
    pub fn arg(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    fn is_checkpoint(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::Json { .. }
                | Error::Safetensors { .. }
                | Error::Config(_)
                | Error::Tensor { .. }
                | Error::MissingTensor { .. }
                | Error::UnexpectedTensor { .. }
        )
    }
}

create_exception!(
    gptoss_3090,
    CheckpointError,
    PyValueError,
    "A checkpoint file, its config or one of its tensors is missing, damaged or not what GPT-OSS needs. The message names the file or tensor key."
);
create_exception!(
    gptoss_3090,
    CudaError,
    PyRuntimeError,
    "The CUDA driver, NVRTC or the GPU cannot run gptoss-3090 kernels (no driver, no NVRTC, GPU older than sm_80, or a failed driver call)."
);
create_exception!(
    gptoss_3090,
    KernelCompileError,
    CudaError,
    "NVRTC failed to compile one of the package's kernels; the message carries the compiler log."
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let message = err.to_string();
        if err.is_checkpoint() {
            return CheckpointError::new_err(message);
        }
        match err {
            Error::InvalidArgument(_) => PyValueError::new_err(message),
            Error::Compile { .. } => KernelCompileError::new_err(message),
            _ => CudaError::new_err(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_error_names_key_expected_and_found() {
        let e = Error::tensor(
            "model.layers.0.mlp.router.linear.weight",
            "[32, 2880]",
            "[32, 2881]",
        );
        let s = e.to_string();
        assert!(s.contains("model.layers.0.mlp.router.linear.weight"));
        assert!(s.contains("[32, 2880]") && s.contains("[32, 2881]"));
        assert!(e.is_checkpoint());
        assert!(!Error::arg("x").is_checkpoint());
    }
}
