//! The GPT-OSS router's logits at small token counts (`moe_router_*` in kernels/moe.cu):
//! `logits [T, E] = x W_rᵀ + b_r` with fp32 sums, one launch, no workspace.
//!
//! Given a top-k ([`RouterTopk`]), it also routes: the MoE op's own selection and softmax
//! (`warp_topk_softmax`: ties to the lower expert, NaN as -inf, softmax over the k selected
//! logits as stored). On sm_90 under its own tuning, with at most [`TOPK_CLUSTER_EXPERTS`]
//! experts, one launch of thread-block clusters does both (`moe_router_topk`: each cluster's
//! blocks gather their logits in block 0's shared memory, which routes); elsewhere the logits
//! launch is followed by `moe_route` over the stored logits. Both give the same bits.
//!
//! vLLM runs the router as a bf16 `ReplicatedLinear` (cuBLAS): at one decode token that is a
//! 184 KB weight read behind a GEMM launch sized for much more work. The kernel reads each
//! expert's router row once per 4 tokens with every load in flight at once. Its parameters are
//! the MoE block's (`MoeParams`: x, router weight and bias, logits), so it lives in the MoE
//! kernel family.
use crate::cuda::GpuDevice;
use crate::error::{Error, Result};
use crate::ops::moe::{u32_of, MoeParams, MAX_TOPK};
use crate::ops::{check_opt_ptr, check_ptr, check_row_stride, to_i32, Dtype};

/// Tokens one block multiplies (kernels/moe.cu `ROUTER_TOKENS`).
pub const ROUTER_TOKENS: usize = 4;
/// Largest hidden size: a block's 128 threads hold a row in 4 16-byte pieces each
/// (kernels/moe.cu `ROUTER_PIECES`).
pub const MAX_HIDDEN: usize = 4096;
/// Threads per block (kernels/moe.cu `ROUTER_WARPS` x 32).
const ROUTER_THREADS: u32 = 128;
/// Kernel family the router's entries are taken from. Both MoE families compile the same
/// kernels/moe.cu (`moe_chunks` adds `STR_CHUNK_MAJOR`, which only the experts' streaming
/// kernels read), so the router's kernels are the same source in either. vLLM serves
/// chunk-major experts (`moe_chunks`), so taking the router from there spares a fresh
/// `vllm serve` the row-order family's compile: 71 s of one core for sm_86 on a 2-core VM,
/// nearly half of the kernels' first-start compile (session 32).
const ROUTER_FAMILY: &str = "moe_chunks";
/// Most experts (the grid's x dimension is one block per expert; the MoE's own bound).
pub const MAX_EXPERTS: usize = 256;
/// Blocks per cluster of `moe_router_topk` (kernels/moe.cu `ROUTER_TOPK_BLOCKS`, the portable
/// cluster size) and experts per block (`ROUTER_TOPK_GROUPS`, 128 threads each).
const TOPK_CLUSTER_BLOCKS: u32 = 8;
const TOPK_CLUSTER_GROUPS: u32 = 4;
/// Most experts `moe_router_topk` serves (one cluster holds every expert's logits).
pub const TOPK_CLUSTER_EXPERTS: usize = (TOPK_CLUSTER_BLOCKS * TOPK_CLUSTER_GROUPS) as usize;

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
    /// Also route, or `None`: logits only.
    pub topk: Option<RouterTopk>,
}

/// Where the router writes its routing ([`RouterArgs::topk`]).
#[derive(Debug, Clone, Copy)]
pub struct RouterTopk {
    /// Experts per token (1..=[`MAX_TOPK`], at most E).
    pub k: usize,
    /// Top-k ids i32 `[T, k]`, contiguous.
    pub ids: u64,
    /// Top-k weights f32 `[T, k]`, contiguous: the softmax over the k selected logits.
    pub weights: u64,
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
        let (mut topk, mut ids, mut wts) = (0, 0, 0);
        if let Some(r) = self.topk {
            let most = MAX_TOPK.min(self.experts);
            if r.k == 0 || r.k > most {
                return Err(Error::arg(format!(
                    "router: top_k must be in 1..={most} (at most {MAX_TOPK} and the {} \
                     experts), found {}",
                    self.experts, r.k
                )));
            }
            check_ptr("router top-k ids", r.ids, 4)?;
            check_ptr("router top-k weights", r.weights, 4)?;
            (topk, ids, wts) = (r.k, r.ids, r.weights);
        }
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
            topk: to_i32("router top_k", topk as i64)?,
            ws_ids: ids,
            ws_wts: wts,
            // moe_route (the routing launch off the cluster path) reads the stored logits.
            route_mode: crate::ops::moe::ROUTE_LOGITS,
            ..Default::default()
        })
    }

    /// Whether `moe_router_topk` (one launch of clusters) routes on `dev` under `tuning`:
    /// a top-k is asked for, the GPU runs its own sm_90 launches, the experts fit one
    /// cluster, and [`TOPK_CLUSTER_ENV`] allows it.
    pub fn cluster_topk(&self, sm90_launch_ok: bool) -> Result<bool> {
        let allowed = cluster_topk_allowed(std::env::var(TOPK_CLUSTER_ENV).ok().as_deref())?;
        Ok(
            self.topk.is_some()
                && sm90_launch_ok
                && self.experts <= TOPK_CLUSTER_EXPERTS
                && allowed,
        )
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

/// Knob (read on every call): `on` (default) lets [`RouterArgs::cluster_topk`] pick the
/// one-launch router top-k where it can run; `off` always runs the logits launch and then
/// `moe_route` (for comparisons; the same bits).
pub const TOPK_CLUSTER_ENV: &str = "GPTOSS_3090_ROUTER_TOPK_CLUSTER";

/// [`TOPK_CLUSTER_ENV`] for an explicit setting (`None` = unset).
fn cluster_topk_allowed(setting: Option<&str>) -> Result<bool> {
    crate::ops::env_switch(setting, TOPK_CLUSTER_ENV, ("off", "on"), true)
}

/// Launches the router (and its top-k, where asked) on `args.stream`; returns whether the
/// top-k ran in the router's own launch (`moe_router_topk`).
///
/// # Safety
/// Every pointer in `args` must be a live device allocation of the documented size on
/// `args.device`, and `stream` a stream of that device's primary context.
pub unsafe fn router_logits(dev: &GpuDevice, args: &RouterArgs) -> Result<bool> {
    let params = args.params()?;
    if args.tokens == 0 {
        return Ok(false);
    }
    let grid = args.grid()?;
    if args.cluster_topk(crate::ops::sm90_launch_ok(dev, dev.tuning()))? {
        let f = dev.function_for_stream(
            ROUTER_FAMILY,
            &args.dtype.entry("moe_router_topk"),
            args.stream,
        )?;
        let threads = TOPK_CLUSTER_GROUPS * ROUTER_THREADS;
        let opts = crate::cuda::LaunchOptions {
            cluster_y: TOPK_CLUSTER_BLOCKS,
            pdl: false,
        };
        // SAFETY: forwarded contract; the grid's x covers the token groups (x * 4 < T), its y
        // the cluster's blocks (4 y + group < E checked in the kernel), and ids/weights hold
        // [T, k].
        unsafe {
            dev.launch_ex(
                &f,
                (grid.1, TOPK_CLUSTER_BLOCKS, 1),
                (threads, 1, 1),
                0,
                args.stream,
                &params,
                opts,
            )?
        };
        return Ok(true);
    }
    let f = dev.function_for_stream(ROUTER_FAMILY, &args.dtype.entry("moe_router"), args.stream)?;
    // SAFETY: forwarded contract; params mirrors MoeParams and the grid covers what
    // moe_router indexes (blockIdx.x < E, blockIdx.y * 4 < T).
    unsafe { dev.launch(&f, grid, (ROUTER_THREADS, 1, 1), 0, args.stream, &params)? };
    if args.topk.is_some() {
        let f =
            dev.function_for_stream(ROUTER_FAMILY, &args.dtype.entry("moe_route"), args.stream)?;
        let blocks = u32_of("router top-k", args.tokens.div_ceil(8))?;
        // SAFETY: forwarded contract; one warp per token (t = 8 x + warp < T) reads the logits
        // just written and writes its ids/weights row.
        unsafe { dev.launch(&f, (blocks, 1, 1), (256, 1, 1), 0, args.stream, &params)? };
    }
    Ok(false)
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
                        bias, bias_act, logits, logits_f32, top_k=0, topk_ids=0,
                        topk_weights=0))]
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
        top_k: usize,
        topk_ids: u64,
        topk_weights: u64,
    ) -> PyResult<bool> {
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
            // top_k 0 with no pointers: logits only; anything else asks for routing (and
            // `params` names what is wrong with it).
            topk: (top_k > 0 || topk_ids != 0 || topk_weights != 0).then_some(super::RouterTopk {
                k: top_k,
                ids: topk_ids,
                weights: topk_weights,
            }),
        };
        args.params()?;
        let dev = cuda::device(device)?;
        let fused = py.detach(|| {
            cuda::guard("moe router", || {
                // SAFETY: the Python op passes live tensors it checked (dtype, device, shape,
                // contiguity) against these sizes; `params` re-checked the pointers.
                unsafe { router_logits(&dev, &args) }
            })
        })?;
        Ok(fused)
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
            topk: None,
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
    fn cluster_topk_needs_sm90_a_topk_and_at_most_32_experts() -> Result<()> {
        let mut a = args();
        assert!(!a.cluster_topk(true)?, "no top-k asked for");
        a.topk = Some(RouterTopk {
            k: 4,
            ids: 0x5000,
            weights: 0x6000,
        });
        if std::env::var(TOPK_CLUSTER_ENV).is_err() {
            assert!(a.cluster_topk(true)?);
        }
        assert!(
            !a.cluster_topk(false)?,
            "no sm_90 launches (or a forced sm86 tuning)"
        );
        a.experts = 128; // gpt-oss-120b: more than one cluster holds
        assert!(!a.cluster_topk(true)?);
        Ok(())
    }

    #[test]
    fn cluster_topk_knob_parses() -> Result<()> {
        assert!(cluster_topk_allowed(None)?);
        assert!(cluster_topk_allowed(Some("on"))?);
        assert!(!cluster_topk_allowed(Some(" off "))?);
        let err = cluster_topk_allowed(Some("maybe")).unwrap_err().to_string();
        assert!(
            err.contains(TOPK_CLUSTER_ENV) && err.contains("off"),
            "{err}"
        );
        Ok(())
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
        let topk = |k, ids| {
            let mut a = args();
            a.topk = Some(RouterTopk {
                k,
                ids,
                weights: 0x6000,
            });
            a.params()
        };
        let p = topk(4, 0x5000).unwrap();
        assert_eq!((p.topk, p.ws_ids, p.ws_wts), (4, 0x5000, 0x6000));
        assert_eq!(p.route_mode, crate::ops::moe::ROUTE_LOGITS);
        assert!(topk(0, 0x5000).unwrap_err().to_string().contains("top_k"));
        assert!(topk(9, 0x5000).unwrap_err().to_string().contains("top_k"));
        assert!(topk(4, 0).unwrap_err().to_string().contains("ids"));
        assert!(topk(4, 0x5002).unwrap_err().to_string().contains("aligned"));
        assert_eq!(args().params().unwrap().topk, 0);
        let mut a = args();
        a.bias = 0;
        assert!(a.params().is_ok());
        a.tokens = 65_536 * ROUTER_TOKENS;
        assert!(a.grid().is_err());
    }
}
