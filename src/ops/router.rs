//! The GPT-OSS router's logits at small token counts (`moe_router_*` in kernels/moe.cu):
//! `logits [T, E] = x W_rᵀ + b_r` with fp32 sums, one launch, no workspace.
//!
//! vLLM runs the router as a bf16 `ReplicatedLinear` (cuBLAS): at one decode token that is a
//! 184 KB weight read behind a GEMM launch sized for much more work. The kernel reads each
//! expert's router row once per 4 tokens with every load in flight at once. Its parameters are
//! the MoE block's (`MoeParams`: x, router weight and bias, logits), so it lives in the MoE
//! kernel family.
use crate::cuda::GpuDevice;
use crate::error::{Error, Result};
use crate::ops::moe::MoeParams;
use crate::ops::{check_opt_ptr, check_ptr, check_row_stride, to_i32, Dtype};

/// Tokens one block multiplies (kernels/moe.cu `ROUTER_TOKENS`).
pub const ROUTER_TOKENS: usize = 4;
/// Largest hidden size: a block's 128 threads hold a row in 4 16-byte pieces each
/// (kernels/moe.cu `ROUTER_PIECES`).
pub const MAX_HIDDEN: usize = 4096;
/// Threads per block (kernels/moe.cu `ROUTER_WARPS` x 32).
const ROUTER_THREADS: u32 = 128;
/// Most experts (the grid's x dimension is one block per expert; the MoE's own bound).
pub const MAX_EXPERTS: usize = 256;

/// Arguments of [`router_logits`]: device pointers as integers (0 = absent), sizes in elements.
#[derive(Debug, Clone, Copy)]
pub struct RouterArgs {
    /// CUDA device ordinal.
    pub device: i32,
    /// Raw `CUstream` (PyTorch's current stream).
    pub stream: u64,
    /// Dtype of x, the weight, the bias (when `bias_act`) and the logits (unless `logits_f32`).
    pub dtype: Dtype,
    /// Tokens T (rows of x and of the logits); 0 launches nothing.
    pub tokens: usize,
    /// Hidden size H (a multiple of 8).
    pub hidden: usize,
    /// Experts E (rows of the weight, columns of the logits).
    pub experts: usize,
    /// x `[T, H]`, row stride `x_stride` elements (a multiple of 8, at least H), 16-byte aligned.
    pub x: u64,
    /// Row stride of x in elements.
    pub x_stride: usize,
    /// Router weight `[E, H]`, contiguous, 16-byte aligned.
    pub weight: u64,
    /// Router bias `[E]` (0 = none): act dtype when `bias_act`, else f32.
    pub bias: u64,
    /// The bias holds act dtype values.
    pub bias_act: bool,
    /// Logits `[T, E]`, contiguous: f32 when `logits_f32`, else act dtype.
    pub logits: u64,
    /// Write f32 logits.
    pub logits_f32: bool,
}

impl RouterArgs {
    /// Checks every size and pointer (no GPU needed) and builds the kernel's params.
    pub fn params(&self) -> Result<MoeParams> {
        if self.hidden == 0 || self.hidden % 8 != 0 || self.hidden > MAX_HIDDEN {
            return Err(Error::arg(format!(
                "router: hidden size must be a multiple of 8 in 8..={MAX_HIDDEN}, found {}",
                self.hidden
            )));
        }
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            return Err(Error::arg(format!(
                "router: experts must be in 1..={MAX_EXPERTS}, found {}",
                self.experts
            )));
        }
        check_row_stride("router x", self.x_stride as i64, self.hidden as i64)?;
        check_ptr("router x", self.x, 16)?;
        check_ptr("router weight", self.weight, 16)?;
        check_opt_ptr("router bias", self.bias, if self.bias_act { 2 } else { 4 })?;
        check_ptr(
            "router logits",
            self.logits,
            if self.logits_f32 { 4 } else { 2 },
        )?;
        Ok(MoeParams {
            x: self.x,
            router_w: self.weight,
            router_b: self.bias,
            logits: self.logits,
            logits_f32: i32::from(self.logits_f32),
            router_b_act: i32::from(self.bias_act),
            t: to_i32("router tokens", self.tokens as i64)?,
            h: to_i32("router hidden size", self.hidden as i64)?,
            e: to_i32("router experts", self.experts as i64)?,
            x_stride: to_i32("router x stride", self.x_stride as i64)?,
            ..Default::default()
        })
    }

    /// The launch grid: one block per (expert, [`ROUTER_TOKENS`] tokens).
    pub fn grid(&self) -> Result<(u32, u32, u32)> {
        let ty = self.tokens.div_ceil(ROUTER_TOKENS);
        let ty = u32::try_from(ty)
            .ok()
            .filter(|&v| v <= 65_535)
            .ok_or_else(|| Error::arg(format!("router: {} tokens is too many", self.tokens)))?;
        Ok((self.experts as u32, ty, 1))
    }
}

/// Launches the router on `args.stream`.
///
/// # Safety
/// Every pointer in `args` must be a live device allocation of the documented size on
/// `args.device`, and `stream` a stream of that device's primary context.
pub unsafe fn router_logits(dev: &GpuDevice, args: &RouterArgs) -> Result<()> {
    let params = args.params()?;
    if args.tokens == 0 {
        return Ok(());
    }
    let grid = args.grid()?;
    let f = dev.function_for_stream("moe", &args.dtype.entry("moe_router"), args.stream)?;
    // SAFETY: forwarded contract; params mirrors MoeParams and the grid covers what
    // moe_router indexes (blockIdx.x < E, blockIdx.y * 16 < T).
    unsafe { dev.launch(&f, grid, (ROUTER_THREADS, 1, 1), 0, args.stream, &params) }
}

/// Python bindings (`gptoss_3090._native.moe_router_logits`), registered by `ops::py`.
pub mod py {
    use pyo3::prelude::*;

    use super::{router_logits, RouterArgs};
    use crate::cuda;
    use crate::ops::Dtype;

    /// Launches the router logits kernel on `stream` (pointers as ints, 0 = no bias).
    #[pyfunction]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (device, stream, dtype, tokens, hidden, experts, x, x_stride, weight,
                        bias, bias_act, logits, logits_f32))]
    fn moe_router_logits(
        py: Python<'_>,
        device: i32,
        stream: u64,
        dtype: &str,
        tokens: usize,
        hidden: usize,
        experts: usize,
        x: u64,
        x_stride: usize,
        weight: u64,
        bias: u64,
        bias_act: bool,
        logits: u64,
        logits_f32: bool,
    ) -> PyResult<()> {
        let args = RouterArgs {
            device,
            stream,
            dtype: Dtype::parse(dtype)?,
            tokens,
            hidden,
            experts,
            x,
            x_stride,
            weight,
            bias,
            bias_act,
            logits,
            logits_f32,
        };
        args.params()?;
        let dev = cuda::device(device)?;
        py.detach(|| {
            cuda::guard("moe router", || {
                // SAFETY: the Python op passes live tensors it checked (dtype, device, shape,
                // contiguity) against these sizes; `params` re-checked the pointers.
                unsafe { router_logits(&dev, &args) }
            })
        })?;
        Ok(())
    }

    /// Adds the router launcher to the extension module.
    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(moe_router_logits, m)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RouterArgs {
        RouterArgs {
            device: 0,
            stream: 0,
            dtype: Dtype::Bf16,
            tokens: 33,
            hidden: 2880,
            experts: 32,
            x: 0x1000,
            x_stride: 2880,
            weight: 0x2000,
            bias: 0x3000,
            bias_act: true,
            logits: 0x4000,
            logits_f32: false,
        }
    }

    #[test]
    fn params_and_grid() {
        let a = args();
        let p = a.params().unwrap();
        assert_eq!((p.t, p.h, p.e, p.x_stride), (33, 2880, 32, 2880));
        assert_eq!((p.router_b_act, p.logits_f32), (1, 0));
        assert_eq!(a.grid().unwrap(), (32, 9, 1));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let bad = |f: &dyn Fn(&mut RouterArgs)| {
            let mut a = args();
            f(&mut a);
            a.params().unwrap_err().to_string()
        };
        assert!(bad(&|a| a.hidden = 2884).contains("multiple of 8"));
        assert!(bad(&|a| a.hidden = 4104).contains("multiple of 8"));
        assert!(bad(&|a| a.experts = 0).contains("experts"));
        assert!(bad(&|a| a.experts = 300).contains("experts"));
        assert!(bad(&|a| a.x_stride = 2872).contains("stride"));
        assert!(bad(&|a| a.x = 0x1008).contains("aligned"));
        assert!(bad(&|a| a.weight = 0).contains("null"));
        assert!(bad(&|a| a.logits = 0x4001).contains("aligned"));
        let mut a = args();
        a.bias = 0;
        assert!(a.params().is_ok());
        a.tokens = 65_536 * ROUTER_TOKENS;
        assert!(a.grid().is_err());
    }
}
