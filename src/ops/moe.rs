//! The GPT-OSS MoE block on the virtual fused NF4 experts (kernels/moe.cu).
//!
//! [`moe_forward`] validates a [`MoeArgs`] (raw device pointers and sizes handed over from the
//! Python custom op), picks the [`Regime`] for the token count and launches, on the caller's
//! stream:
//! - decode (T <= 16): (`moe_route` in router-weights mode) → `moe_str_up` (per-block routing
//!   and grouping, gate_up + bias + SwiGLU-OAI) → `moe_str_down` (down + bias, fp32) →
//!   `moe_combine` (or `moe_str_down` combines itself where [`fold_combine`] says so: one
//!   token); the older `moe_dec2_*` / `moe_dec_*` through [`DECODE_VARIANT_ENV`];
//! - stream (17..=[`STREAM_MAX_TOKENS`]): (`moe_route`) → `moe_group` → `moe_str_up` →
//!   `moe_str_down` → `moe_combine`;
//! - prefill: (`moe_route`) → `moe_group` → `moe_gemm_up` → `moe_gemm_down` → `moe_combine`.
//!
//! Every grid depends only on the token count, every buffer lives in the caller's workspace
//! ([`WorkspaceLayout`]), and nothing synchronizes, so the sequence is CUDA-graph capturable
//! for a fixed T.

use std::sync::Arc;

use crate::cuda::{GpuDevice, KernelFn, Tuning};
use crate::error::{Error, Result};
use crate::ops::{
    check_row_stride, env_count, residency, stream_chunks, stream_k_fits, stream_split,
    stream_x_column_bytes, stream_x_columns, Dtype, STREAM_MAX_K, STR_TABLE_BYTES, STR_WARPS,
};

/// Route from router weights (`logits = x W_rᵀ + b_r` in the kernel).
pub const ROUTE_WEIGHTS: i32 = 0;
/// Route from given logits `[T, E]`.
pub const ROUTE_LOGITS: i32 = 1;
/// Routing given as top-k ids (i32) and weights (f32), `[T, topk]` (vLLM's `apply`).
pub const ROUTE_GIVEN: i32 = 2;

/// Largest expert count the kernels support (one warp holds 8 logits per lane).
pub const MAX_EXPERTS: usize = 256;
/// Largest top-k the kernels support.
pub const MAX_TOPK: usize = 8;
/// Token counts up to this use the decode kernels (weights streamed once per touched expert).
pub const DECODE_MAX_TOKENS: usize = 16;
/// Token counts up to this take top-k of given logits inside `moe_group` (one block).
pub const FUSED_ROUTE_MAX_TOKENS: usize = 64;
/// Smallest prefill tile height.
const MIN_BM: usize = 64;
/// Smallest tile height `moe_group` may list: one streaming pass of one column tile (8 pairs),
/// with [`PASS_ITEMS_ENV`]. Sizes the tile list.
const MIN_TILE: usize = 8;
/// Largest prefill tile height (sizes the padded sorted list).
const MAX_BM: usize = 128;
/// Rows of decoded weights per prefill block (kernels/moe.cu `GEMM_BN`).
const GEMM_BN: usize = 128;
/// Warps per decode block (kernels/moe.cu `DEC_WARPS`).
const DEC_WARPS: usize = 8;

/// Kernel parameters, mirrored field by field from `struct MoeParams` in kernels/moe.cu.
/// Pointers are device addresses (0 = absent); strides are in elements.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoeParams {
    /// x `[T, H]` act dtype, row stride `x_stride`.
    pub x: u64,
    /// y `[T, H]` act dtype, contiguous.
    pub y: u64,
    /// Router weight `[E, H]` act dtype, contiguous.
    pub router_w: u64,
    /// Router bias `[E]` f32.
    pub router_b: u64,
    /// Router logits `[T, E]`, f32 or act dtype (`logits_f32`).
    pub logits: u64,
    /// gate_up packed codes u8 `[E, 2I*H/2]`.
    pub gu_packed: u64,
    /// gate_up absmax: u8 `[E, 2I*H/64]` (nested) or f32.
    pub gu_absmax: u64,
    /// gate_up nested absmax f32 `[E, gu_nnb]`.
    pub gu_nested: u64,
    /// gate_up nested offset f32 `[E]`.
    pub gu_offset: u64,
    /// gate_up bias f32 `[E, 2I]`.
    pub gu_bias: u64,
    /// down packed codes u8 `[E, H*I/2]`.
    pub dn_packed: u64,
    /// down absmax: u8 `[E, H*I/64]` (nested) or f32.
    pub dn_absmax: u64,
    /// down nested absmax f32 `[E, dn_nnb]`.
    pub dn_nested: u64,
    /// down nested offset f32 `[E]`.
    pub dn_offset: u64,
    /// down bias f32 `[E, H]`.
    pub dn_bias: u64,
    /// Double-quantization map f32 `[256]`.
    pub nested_map: u64,
    /// Top-k ids i32 `[T, topk]` (workspace, or the caller's when given).
    pub ws_ids: u64,
    /// Top-k weights f32 `[T, topk]` (workspace, or the caller's when given).
    pub ws_wts: u64,
    /// Pairs per expert i32 `[E]`.
    pub ws_counts: u64,
    /// Padded segment start per expert i32 `[E]`.
    pub ws_offsets: u64,
    /// `{num_active, num_tiles}` i32 `[2]`.
    pub ws_meta: u64,
    /// Touched experts i32 `[E]`.
    pub ws_active: u64,
    /// Prefill tiles i32 `[max_tiles, 2]` = (expert, first row).
    pub ws_tiles: u64,
    /// Pair ids in expert order i32 `[sorted_cap]` (-1 = padding).
    pub ws_sorted: u64,
    /// SwiGLU output act `[T*topk, I]`.
    pub ws_h: u64,
    /// Expert outputs act `[T*topk, H]`.
    pub ws_out: u64,
    /// Tokens.
    pub t: i32,
    /// Hidden size.
    pub h: i32,
    /// Expert intermediate size.
    pub i: i32,
    /// Experts.
    pub e: i32,
    /// Experts per token.
    pub topk: i32,
    /// Row stride of x (elements).
    pub x_stride: i32,
    /// `ROUTE_*`.
    pub route_mode: i32,
    /// Logits are f32 (else act dtype).
    pub logits_f32: i32,
    /// `moe_group` routes the tokens itself.
    pub fuse_route: i32,
    /// gate_up absmax is nested (u8 codes).
    pub gu_nested_flag: i32,
    /// down absmax is nested (u8 codes).
    pub dn_nested_flag: i32,
    /// Nested blocks per gate_up expert.
    pub gu_nnb: i32,
    /// Nested blocks per down expert.
    pub dn_nnb: i32,
    /// Prefill tile height / segment padding.
    pub bm: i32,
    /// Capacity of `ws_tiles`.
    pub max_tiles: i32,
    /// Capacity of `ws_sorted`.
    pub sorted_cap: i32,
    /// `moe_str_*`: warps splitting K per 16-row group (1, 2, 4 or 8).
    pub str_ks: i32,
    /// `moe_str_*`: 1 = experts and pairs from `moe_group`, 0 = routed per block.
    pub str_grouped: i32,
    /// `ws_out` holds f32 (`moe_str_down`) instead of the act dtype (`moe_gemm_down`).
    pub out_f32: i32,
    /// moe_str_*: activation columns a block stages in shared memory (0: none).
    pub str_xcols: i32,
    /// `moe_str_fused_*`: u32 `[1 + E]` zeroed before the launch (tickets, then gate_up items
    /// done per expert slot).
    pub ws_sync: u64,
    /// `moe_str_fused_*`: the down phase's K split.
    pub str_ks_dn: i32,
    /// `moe_str_fused_*`: the down phase's staged activation columns.
    pub str_xcols_dn: i32,
    /// `moe_str_fused_*`: gate_up items (blocks) per expert slot.
    pub str_gx_up: i32,
    /// `moe_str_fused_*`: down items per expert slot.
    pub str_gx_dn: i32,
    /// `moe_str_fused_*`: expert slots.
    pub str_slots: i32,
    /// `moe_router_*`: `router_b` holds act dtype values (1) or f32 (0).
    pub router_b_act: i32,
    /// `moe_str_*` grouped: 1 = block row y runs tile y of `ws_tiles` (one pass of `bm` pairs),
    /// 0 = block row y runs active expert y, all its passes in turn.
    pub str_pass_items: i32,
    /// `moe_str_*` split launches: 1 = the down launch combines ([`fold_combine`]) and no
    /// `moe_combine` follows.
    pub str_fold: i32,
    /// u32 `[str_gx_dn]`: the folded combine's arrival counters, one per down grid column
    /// (zeroed by the gate_up launch).
    pub fold_ctr: u64,
}

/// Byte offsets of the buffers inside the caller's workspace for one token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLayout {
    /// Top-k ids i32 `[T*topk]`.
    pub ids: usize,
    /// Top-k weights f32 `[T*topk]`.
    pub wts: usize,
    /// i32 `[E]`.
    pub counts: usize,
    /// i32 `[E]`.
    pub offsets: usize,
    /// i32 `[2]`.
    pub meta: usize,
    /// i32 `[E]`.
    pub active: usize,
    /// i32 `[max_tiles, 2]`.
    pub tiles: usize,
    /// i32 `[sorted_cap]`.
    pub sorted: usize,
    /// u32 `[1 + E]`: the fused streaming kernel's counters.
    pub sync: usize,
    /// u32 `[H / 16]`: the folded combine's counters (one per down grid column, at most one
    /// column per 16-row group).
    pub fold: usize,
    /// act `[T*topk, I]`.
    pub h: usize,
    /// act `[T*topk, H]`.
    pub out: usize,
    /// Total bytes.
    pub total: usize,
    /// Tile capacity (any tile height >= 8).
    pub max_tiles: usize,
    /// Sorted-list capacity (any tile height <= 128).
    pub sorted_cap: usize,
}

/// Bytes of the fused streaming kernel's counters: tickets, then one per expert slot.
fn sync_bytes(experts: usize) -> usize {
    4 * (1 + experts)
}

fn align256(v: usize) -> usize {
    v.div_ceil(256) * 256
}

fn checked(what: &str, v: Option<usize>) -> Result<usize> {
    v.ok_or_else(|| Error::arg(format!("{what}: size overflows")))
}

impl WorkspaceLayout {
    /// Layout for `tokens` tokens of a `[hidden] -> [experts x intermediate]` MoE with `topk`
    /// experts per token and `elem_size`-byte activations. Independent of the GPU and of the
    /// regime, so one workspace serves every tuning.
    pub fn new(
        tokens: usize,
        hidden: usize,
        intermediate: usize,
        experts: usize,
        topk: usize,
        elem_size: usize,
    ) -> Result<Self> {
        let tk = checked("tokens * top_k", tokens.checked_mul(topk))?;
        let max_tiles = tk.div_ceil(MIN_TILE) + experts;
        let sorted_cap = checked(
            "sorted capacity",
            experts
                .checked_mul(MAX_BM - 1)
                .and_then(|v| v.checked_add(tk)),
        )?;
        let mut off = 0usize;
        let mut take = |bytes: Option<usize>| -> Result<usize> {
            let b = checked("workspace", bytes)?;
            let at = off;
            off = checked("workspace", at.checked_add(align256(b)))?;
            Ok(at)
        };
        let ids = take(tk.checked_mul(4))?;
        let wts = take(tk.checked_mul(4))?;
        let counts = take(Some(experts * 4))?;
        let offsets = take(Some(experts * 4))?;
        let meta = take(Some(8))?;
        let active = take(Some(experts * 4))?;
        let tiles = take(max_tiles.checked_mul(8))?;
        let sorted = take(sorted_cap.checked_mul(4))?;
        let sync = take(Some(sync_bytes(experts)))?;
        let fold = take(Some(4 * hidden.div_ceil(16)))?;
        let h = take(
            tk.checked_mul(intermediate)
                .and_then(|v| v.checked_mul(elem_size)),
        )?;
        // The streaming kernels keep expert outputs in fp32 until the combine; the tiled GEMMs
        // (larger token counts, where the workspace is large) store the act dtype.
        let out_elem = if tokens <= DECODE_MAX_TOKENS.max(stream_max_tokens()?) {
            elem_size.max(4)
        } else {
            elem_size
        };
        let out = take(tk.checked_mul(hidden).and_then(|v| v.checked_mul(out_elem)))?;
        Ok(WorkspaceLayout {
            ids,
            wts,
            counts,
            offsets,
            meta,
            active,
            tiles,
            sorted,
            sync,
            fold,
            h,
            out,
            total: off,
            max_tiles,
            sorted_cap,
        })
    }
}

/// Which kernels run for a token count on a tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Weight streaming per touched expert with per-block routing (`moe_str_*`, or the older
    /// `moe_dec_*` / `moe_dec2_*` through [`DECODE_VARIANT_ENV`]).
    Decode,
    /// Weight streaming per touched expert after `moe_group` (`moe_str_*`): every expert's
    /// NF4 weights are read once per 16 of its tokens, so it beats the tiled GEMMs while the
    /// layer is bound by weight bytes.
    Stream,
    /// Tiled tensor-core GEMMs with tile height `bm` and `stages` cp.async stages.
    Prefill {
        /// Tile height (tokens).
        bm: usize,
        /// Pipeline depth.
        stages: usize,
    },
}

impl Regime {
    /// The regime for `tokens` tokens with `topk` experts each among `experts` on `tuning`.
    /// Only depends on static sizes, so a captured graph stays valid.
    /// Fails only when [`STREAM_MAX_ENV`] holds something else than a token count.
    pub fn choose(tokens: usize, topk: usize, experts: usize, tuning: Tuning) -> Result<Regime> {
        if tokens <= DECODE_MAX_TOKENS {
            return Ok(Regime::Decode);
        }
        if tokens <= stream_max_tokens()? {
            return Ok(Regime::Stream);
        }
        if let Some((bm, stages)) = gemm_override()? {
            return Ok(Regime::Prefill { bm, stages });
        }
        // BM 128, 2 stages (63 KB) once the experts average 64 or more rows: it decodes each
        // weight tile for twice the tokens, 1.18-1.25x m64s2 at 2048-8192 tokens on the H100 and
        // even at 512 (bench/results/h100_2026-11-27_session7/). Two of its blocks need more than
        // the 100 KB per SM of sm_86/89, so that tuning keeps BM 64, 2 stages, one decoded-B
        // buffer (44 KB, 2 blocks per SM), which also beat m64s3/m64s4/m128s4 on the H100
        // (bench/results/moe_h100_2026-11-26_variants.txt).
        if tuning != Tuning::Sm86 && tokens * topk >= 64 * experts.max(1) {
            return Ok(Regime::Prefill { bm: 128, stages: 2 });
        }
        Ok(Regime::Prefill { bm: 64, stages: 2 })
    }

    /// Dynamic shared memory of the prefill GEMM (kernels/moe.cu `GemmSmem::TOTAL`); the
    /// variants with 3 or more stages double-buffer the decoded weight tile.
    pub fn gemm_smem_bytes(bm: usize, stages: usize) -> usize {
        let ld = 64 + 8;
        let b_bufs = if stages >= 3 { 2 } else { 1 };
        stages * bm * ld * 2 + stages * GEMM_BN * 32 + b_bufs * GEMM_BN * ld * 2 + bm * 4
    }
}

/// Development override of the prefill GEMM variant (`GPTOSS_3090_MOE_GEMM`: `m64s2`,
/// `m128s2` or `m128s4`; read once per process), for benchmarks.
fn gemm_override() -> Result<Option<(usize, usize)>> {
    static GEMM: crate::ops::EnvCell<(usize, usize)> = std::sync::OnceLock::new();
    crate::ops::env_setting(
        &GEMM,
        "GPTOSS_3090_MOE_GEMM",
        "m64s2, m128s2 or m128s4",
        |v| match v {
            "m64s2" => Some((64, 2)),
            "m128s2" => Some((128, 2)),
            "m128s4" => Some((128, 4)),
            _ => None,
        },
    )
}

/// One fused NF4 expert tensor `[E, N, K]` on the device.
#[derive(Debug, Clone, Copy, Default)]
pub struct Nf4Experts {
    /// u8 `[E, N*K/2]`.
    pub packed: u64,
    /// u8 `[E, N*K/64]` (nested) or f32.
    pub absmax: u64,
    /// f32 `[E, nnb]` (nested only, else 0).
    pub nested_absmax: u64,
    /// f32 `[E]` (nested only, else 0).
    pub nested_offset: u64,
    /// f32 `[E, N]`.
    pub bias: u64,
    /// Double quantization in use.
    pub nested: bool,
    /// Nested blocks per expert (row stride of `nested_absmax`).
    pub nnb: usize,
}

/// Byte order of the packed expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsOrder {
    /// bitsandbytes' row-major order, as checkpoints store it (kernel family `moe`).
    Rows,
    /// Chunk-major, as `gptoss_3090.moe.chunk_major_packed` repacks it: each 16-row group's
    /// 128-k chunk is 1 KB contiguous (kernel family `moe_chunks`). The same arithmetic in the
    /// same order, so the output is bit-identical to the rows order; DRAM serves these reads
    /// faster (bench/dram_pattern.py: 0.80x of copy bandwidth against 0.57x).
    Chunks,
}

impl WeightsOrder {
    /// Parses `"rows"` or `"chunks"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim() {
            "rows" => Ok(Self::Rows),
            "chunks" => Ok(Self::Chunks),
            other => Err(Error::arg(format!(
                "weights_order: expected 'rows' or 'chunks', found {other:?}"
            ))),
        }
    }

    /// The kernel family that reads this order.
    pub fn family(self) -> &'static str {
        match self {
            Self::Rows => "moe",
            Self::Chunks => "moe_chunks",
        }
    }
}

/// Everything one MoE forward needs, as device addresses and sizes (checked by the Python op
/// for dtype, device, contiguity and shape; re-checked here for consistency and alignment).
#[derive(Debug, Clone, Copy)]
pub struct MoeArgs {
    /// CUDA device ordinal (the current torch device).
    pub device: i32,
    /// CUstream handle (torch's current stream).
    pub stream: u64,
    /// Activation dtype.
    pub dtype: Dtype,
    /// Tokens.
    pub tokens: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// Expert intermediate size I.
    pub intermediate: usize,
    /// Experts E.
    pub experts: usize,
    /// Experts per token.
    pub topk: usize,
    /// x `[T, H]`.
    pub x: u64,
    /// Row stride of x in elements.
    pub x_stride: usize,
    /// y `[T, H]` contiguous.
    pub y: u64,
    /// `ROUTE_*`.
    pub route_mode: i32,
    /// Router weight `[E, H]` (ROUTE_WEIGHTS).
    pub router_w: u64,
    /// Router bias `[E]` f32 (optional).
    pub router_b: u64,
    /// Logits `[T, E]` (ROUTE_LOGITS).
    pub logits: u64,
    /// Logits are f32.
    pub logits_f32: bool,
    /// Top-k ids i32 `[T, topk]` (ROUTE_GIVEN).
    pub topk_ids: u64,
    /// Top-k weights f32 `[T, topk]` (ROUTE_GIVEN).
    pub topk_weights: u64,
    /// gate_up experts `[E, 2I, H]`.
    pub gate_up: Nf4Experts,
    /// down experts `[E, H, I]`.
    pub down: Nf4Experts,
    /// Double-quantization map f32 `[256]` (needed when either tensor is nested).
    pub nested_map: u64,
    /// Workspace base.
    pub workspace: u64,
    /// Workspace size in bytes.
    pub workspace_bytes: usize,
    /// Byte order of both experts' packed weights.
    pub weights_order: WeightsOrder,
}

fn need_aligned(name: &str, ptr: u64, align: u64) -> Result<()> {
    if ptr == 0 {
        return Err(Error::arg(format!(
            "{name}: expected a device pointer, found null"
        )));
    }
    if ptr % align != 0 {
        return Err(Error::arg(format!(
            "{name}: expected a {align}-byte aligned device pointer, found 0x{ptr:x}"
        )));
    }
    Ok(())
}

fn to_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::arg(format!("{name}: {v} does not fit in 32 bits")))
}

impl MoeArgs {
    /// Checks sizes, modes and pointers; returns the workspace layout.
    pub fn validate(&self) -> Result<WorkspaceLayout> {
        let (h, i, e, k) = (self.hidden, self.intermediate, self.experts, self.topk);
        if h == 0 || h % 64 != 0 {
            return Err(Error::arg(format!(
                "hidden size: expected a positive multiple of 64, found {h}"
            )));
        }
        if i == 0 || i % 64 != 0 {
            return Err(Error::arg(format!(
                "intermediate size: expected a positive multiple of 64, found {i}"
            )));
        }
        // The streaming kernels (decode and streaming regimes) split K at most 8 ways.
        for (name, dim) in [("hidden size", h), ("intermediate size", i)] {
            if !stream_k_fits(stream_chunks(dim)) {
                return Err(Error::arg(format!(
                    "{name}: at most {STREAM_MAX_K} is supported (the streaming kernels' bound), \
                     found {dim}"
                )));
            }
        }
        if e == 0 || e > MAX_EXPERTS {
            return Err(Error::arg(format!(
                "experts: expected 1..={MAX_EXPERTS}, found {e}"
            )));
        }
        if k == 0 || k > MAX_TOPK || k > e {
            return Err(Error::arg(format!(
                "top_k: expected 1..={} (and at most the {e} experts), found {k}",
                MAX_TOPK
            )));
        }
        // Element counts (T*topk*H etc.) index with 64-bit math in the kernels, but T itself and
        // per-expert row counts travel as i32.
        to_i32("tokens * top_k", self.tokens.saturating_mul(k))?;
        check_row_stride("x", self.x_stride as i64, h as i64)?;
        let layout = WorkspaceLayout::new(self.tokens, h, i, e, k, 2)?;
        if self.workspace_bytes < layout.total {
            return Err(Error::arg(format!(
                "workspace: expected at least {} bytes for {} tokens, found {}",
                layout.total, self.tokens, self.workspace_bytes
            )));
        }
        if self.tokens == 0 {
            return Ok(layout);
        }
        need_aligned("x", self.x, 16)?;
        need_aligned("y", self.y, 16)?;
        need_aligned("workspace", self.workspace, 256)?;
        match self.route_mode {
            ROUTE_WEIGHTS => need_aligned("router_weight", self.router_w, 16)?,
            ROUTE_LOGITS => need_aligned("router_logits", self.logits, 4)?,
            ROUTE_GIVEN => {
                need_aligned("topk_ids", self.topk_ids, 4)?;
                need_aligned("topk_weights", self.topk_weights, 4)?;
            }
            other => {
                return Err(Error::arg(format!(
                    "route_mode: expected 0 (weights), 1 (logits) or 2 (given), found {other}"
                )))
            }
        }
        for (name, t) in [("gate_up", &self.gate_up), ("down", &self.down)] {
            need_aligned(&format!("{name}.packed"), t.packed, 16)?;
            need_aligned(&format!("{name}.absmax"), t.absmax, 4)?;
            need_aligned(&format!("{name}.bias"), t.bias, 4)?;
            if t.nested {
                need_aligned(&format!("{name}.nested_absmax"), t.nested_absmax, 4)?;
                need_aligned(&format!("{name}.nested_offset"), t.nested_offset, 4)?;
                need_aligned("nested_map", self.nested_map, 4)?;
            }
        }
        let check_nnb = |name: &str, t: &Nf4Experts, n: usize, kk: usize| -> Result<()> {
            let need = (n * kk / 64).div_ceil(256);
            if t.nested && t.nnb != need {
                return Err(Error::arg(format!(
                    "{name}.nested_absmax: expected {need} nested blocks per expert for [{n}, {kk}], found {}",
                    t.nnb
                )));
            }
            Ok(())
        };
        check_nnb("gate_up", &self.gate_up, 2 * i, h)?;
        check_nnb("down", &self.down, h, i)?;
        Ok(layout)
    }

    /// The kernel parameters for this call (after [`MoeArgs::validate`]).
    pub fn params(&self, layout: &WorkspaceLayout, regime: Regime) -> Result<MoeParams> {
        let ws = self.workspace;
        let at = |off: usize| ws + off as u64;
        let given = self.route_mode == ROUTE_GIVEN;
        Ok(MoeParams {
            x: self.x,
            y: self.y,
            router_w: self.router_w,
            router_b: self.router_b,
            logits: self.logits,
            gu_packed: self.gate_up.packed,
            gu_absmax: self.gate_up.absmax,
            gu_nested: self.gate_up.nested_absmax,
            gu_offset: self.gate_up.nested_offset,
            gu_bias: self.gate_up.bias,
            dn_packed: self.down.packed,
            dn_absmax: self.down.absmax,
            dn_nested: self.down.nested_absmax,
            dn_offset: self.down.nested_offset,
            dn_bias: self.down.bias,
            nested_map: self.nested_map,
            ws_ids: if given { self.topk_ids } else { at(layout.ids) },
            ws_wts: if given {
                self.topk_weights
            } else {
                at(layout.wts)
            },
            ws_counts: at(layout.counts),
            ws_offsets: at(layout.offsets),
            ws_meta: at(layout.meta),
            ws_active: at(layout.active),
            ws_tiles: at(layout.tiles),
            ws_sorted: at(layout.sorted),
            ws_h: at(layout.h),
            ws_out: at(layout.out),
            t: to_i32("tokens", self.tokens)?,
            h: to_i32("hidden", self.hidden)?,
            i: to_i32("intermediate", self.intermediate)?,
            e: to_i32("experts", self.experts)?,
            topk: to_i32("top_k", self.topk)?,
            x_stride: to_i32("x stride", self.x_stride)?,
            route_mode: self.route_mode,
            logits_f32: i32::from(self.logits_f32),
            // Only top-k from given logits is cheap enough for one block; router-weights
            // logits always get their own grid-wide launch.
            fuse_route: i32::from(
                self.route_mode == ROUTE_LOGITS && self.tokens <= FUSED_ROUTE_MAX_TOKENS,
            ),
            gu_nested_flag: i32::from(self.gate_up.nested),
            dn_nested_flag: i32::from(self.down.nested),
            gu_nnb: to_i32("gate_up nested blocks", self.gate_up.nnb)?,
            dn_nnb: to_i32("down nested blocks", self.down.nnb)?,
            bm: match regime {
                Regime::Decode => 1,
                // moe_group pads each expert's segment to bm; the streaming kernels ignore it.
                Regime::Stream => to_i32("bm", MIN_BM)?,
                Regime::Prefill { bm, .. } => to_i32("bm", bm)?,
            },
            max_tiles: to_i32("max tiles", layout.max_tiles)?,
            sorted_cap: to_i32("sorted capacity", layout.sorted_cap)?,
            str_ks: 1,
            str_grouped: i32::from(matches!(regime, Regime::Stream)),
            out_f32: 0,
            str_xcols: 0,
            ws_sync: at(layout.sync),
            str_ks_dn: 1,
            str_xcols_dn: 0,
            str_gx_up: 0,
            str_gx_dn: 0,
            str_slots: 0,
            router_b_act: 0,
            str_pass_items: 0,
            str_fold: 0,
            fold_ctr: at(layout.fold),
        })
    }
}

/// Bytes of workspace [`moe_forward`] needs for any token count up to `tokens` (any GPU, any
/// regime).
pub fn workspace_bytes(
    tokens: usize,
    hidden: usize,
    intermediate: usize,
    experts: usize,
    topk: usize,
) -> Result<usize> {
    // Enough for every count up to `tokens` (a caller sizes one workspace for its largest
    // batch): the streaming counts' fp32 outputs can outweigh a slightly larger GEMM count.
    let largest = WorkspaceLayout::new(tokens, hidden, intermediate, experts, topk, 2)?.total;
    let streaming = tokens.min(DECODE_MAX_TOKENS.max(stream_max_tokens()?));
    let stream = WorkspaceLayout::new(streaming, hidden, intermediate, experts, topk, 2)?.total;
    Ok(largest.max(stream))
}

/// Grid height of the prefill GEMMs: tile capacity for tile height `bm`.
fn prefill_tiles(tokens: usize, topk: usize, experts: usize, bm: usize) -> usize {
    (tokens * topk).div_ceil(bm) + experts
}

pub(crate) fn u32_of(name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::arg(format!("{name}: grid size {v} too large")))
}

/// Environment variable that picks the decode kernels (up to [`DECODE_MAX_TOKENS`] tokens):
/// `auto` (default) or `3` the streaming kernels (`moe_str_*`), `2` the lean decode kernels
/// (`moe_dec2_*`), `1` the first ones (`moe_dec_*`). All compute the same block; the older ones
/// stay for comparison.
pub const DECODE_VARIANT_ENV: &str = "GPTOSS_3090_MOE_DECODE";

/// Environment variable that moves the boundary between the streaming regime and the tiled
/// GEMMs (default [`STREAM_MAX_TOKENS`]; read once per process, so captured graphs stay valid).
pub const STREAM_MAX_ENV: &str = "GPTOSS_3090_MOE_STREAM_MAX_TOKENS";

/// Largest token count of the streaming regime by default. Up to here the layer reads every
/// expert's weights about once (8 pairs per expert at 64 tokens), so it is bound by weight
/// bytes, which the streaming kernels read at a higher rate than the tiled GEMMs decode them.
pub const STREAM_MAX_TOKENS: usize = 128;

/// Column tiles (8 routed pairs each) per pass of the streaming kernels: one (`_n1`) while the
/// experts average at most 5 routed pairs, two (`_n2`) above. An expert with more pairs than a
/// pass holds streams its weights again per pass, but the one-tile kernels are so much
/// cheaper per chunk that they win until then (H100, GPT-OSS-20B shapes, one call each:
/// 1.17x n2 at 9-33 tokens, 1.11x at 40, 1.03x at 48, 0.88x at 64; bench/results/
/// h100_2026-11-27_session9, calls 3 and 5). Running the experts with at most 8 pairs in an n1
/// launch and the rest in an n2 launch lost to both there (call 5). Since the two-tile kernels
/// run a pass of at most 8 pairs as one tile and stage a larger pass's first tile (session 18,
/// call 6, two rounds): n1 1.02x at 40 tokens, n2 1.05x at 48 (vLLM's graph size for 41-48).
pub fn stream_tiles(tokens: usize, topk: usize, experts: usize) -> usize {
    if tokens.saturating_mul(topk) <= 5 * experts {
        1
    } else {
        2
    }
}

/// Blocks per expert slot of a streaming launch: `groups` 16-row groups per expert, `slots`
/// expert slots, at most `per_block` groups per block, `resident` blocks at once. The kernel
/// gives each block an even share of its expert's groups, so any count from
/// ceil(groups / per_block) up to `groups` covers them. With few experts (one token touches
/// four) the fewest blocks would leave SMs unevenly loaded: 180 gate_up blocks on 132 SMs put
/// two blocks (16 warps) on 48 SMs and one on the rest, and an SM streams at about the same
/// rate with 8 or 16 warps (H100, session 9-10 kernel times), so the 2-block SMs set the time.
/// Spreading the groups over every resident block instead gives each SM about the same share.
/// Only a launch that fits in one wave is spread: the slots count every expert a launch may
/// touch (the kernel learns the touched ones), so with several waves a wider grid mostly adds
/// blocks for experts that are not there. H100, session 11: 1.06x at 1 token, unchanged from 4
/// to 16 tokens (a spread over several waves measured 1-2% slower there).
pub fn stream_columns(groups: usize, slots: usize, per_block: usize, resident: usize) -> usize {
    let fewest = groups.div_ceil(per_block.max(1)).max(1);
    let slots = slots.max(1);
    if fewest * slots > resident {
        return fewest;
    }
    (resident / slots).clamp(fewest, groups.max(fewest))
}

/// Development knob: the streaming kernels' 8-column tiles per pass, 1 (`moe_str_*_n1`) or 2
/// (`_n2`), instead of the automatic choice (read once per process; for sweeps).
pub const STREAM_TILES_ENV: &str = "GPTOSS_3090_MOE_STREAM_TILES";

/// Knob (read on every call, like [`STREAM_LAUNCH_ENV`]): `1` (the default) runs each pass of
/// the streaming regime (up to 8 routed pairs per column tile) as its own block row, so that an
/// expert with more pairs than one pass holds spreads its passes over the GPU instead of running
/// them in turn in one block; `0` keeps one block row per expert. The per-pair arithmetic is the
/// same either way (bit-identical on the H200, session 21), and pass items were level at up to
/// 64 uniformly routed tokens, 2% faster at 64 skewed tokens and 5-7% faster at 128.
pub const PASS_ITEMS_ENV: &str = "GPTOSS_3090_MOE_PASS_ITEMS";

fn pass_items_setting() -> Result<bool> {
    pass_items_for(std::env::var(PASS_ITEMS_ENV).ok().as_deref())
}

/// [`pass_items_setting`] for an explicit setting (`None` = the variable is unset).
fn pass_items_for(setting: Option<&str>) -> Result<bool> {
    crate::ops::env_switch(setting, PASS_ITEMS_ENV, ("0", "1"), true)
}

/// Block rows of a streaming launch for `pairs` routed pairs over `experts` experts: one per
/// expert a launch may touch, or with pass items (passes of `pass` pairs) at most one per pass:
/// sum over experts of ceil(c / pass) <= pairs / pass + touched experts.
pub fn stream_slots(pairs: usize, experts: usize, pass: Option<usize>) -> usize {
    let touched = experts.min(pairs);
    match pass {
        Some(pass) => touched + pairs / pass.max(1),
        None => touched,
    }
}

/// Column tiles per streaming pass for `t` tokens: [`STREAM_TILES_ENV`] when set, else
/// [`stream_tiles`]. Both streaming regimes launch with it.
fn stream_tiles_chosen(t: usize, k: usize, e: usize) -> Result<usize> {
    Ok(stream_tiles_override()?.unwrap_or(stream_tiles(t, k, e)))
}

fn stream_tiles_override() -> Result<Option<usize>> {
    static TILES: crate::ops::EnvCell<usize> = std::sync::OnceLock::new();
    env_count(&TILES, STREAM_TILES_ENV, "1 or 2", |n| n == 1 || n == 2)
}

fn stream_max_tokens() -> Result<usize> {
    static MAX: crate::ops::EnvCell<usize> = std::sync::OnceLock::new();
    Ok(env_count(&MAX, STREAM_MAX_ENV, "a token count", |_| true)?.unwrap_or(STREAM_MAX_TOKENS))
}

/// Which kernels the decode regime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeKernels {
    /// `moe_str_*` (then `moe_combine`).
    Stream,
    /// Older two-launch kernels: (gate_up entry, down entry, gate/up pairs per gate_up block,
    /// output rows per down block).
    Older(&'static str, &'static str, usize, usize),
}

fn decode_kernels() -> Result<DecodeKernels> {
    let setting = std::env::var(DECODE_VARIANT_ENV).ok();
    decode_kernels_for(setting.as_deref())
}

/// [`decode_kernels`] for an explicit setting (`None` = the variable is unset).
fn decode_kernels_for(setting: Option<&str>) -> Result<DecodeKernels> {
    // moe_dec2_up: 4 row groups of 8 pairs, each split over 2 warps; moe_dec2_down: 8 rows.
    const LEAN: DecodeKernels = DecodeKernels::Older("moe_dec2_up", "moe_dec2_down", 32, 8);
    // moe_dec_up: one row group of 8 pairs per warp; moe_dec_down: 16 rows.
    const FIRST: DecodeKernels =
        DecodeKernels::Older("moe_dec_up", "moe_dec_down", 8 * DEC_WARPS, 16);
    match setting.map(str::trim) {
        None | Some("") | Some("auto") | Some("3") => Ok(DecodeKernels::Stream),
        Some("2") => Ok(LEAN),
        Some("1") => Ok(FIRST),
        Some(other) => Err(Error::arg(format!(
            "{DECODE_VARIANT_ENV}={other:?}: expected auto (default), 3 (streaming kernels), \
             2 (lean decode kernels) or 1 (first decode kernels)"
        ))),
    }
}

/// One phase (gate_up or down) of a streaming launch, planned for kernel `f`.
struct StreamPhase {
    /// Warps splitting K per 16-row group.
    ks: usize,
    /// Activation columns a block stages in shared memory.
    xcols: usize,
    /// Blocks (work items) per expert slot.
    gx: usize,
    /// Dynamic shared memory the phase needs (table, rings and staged columns), before any
    /// residency padding.
    smem: usize,
}

/// Plans one phase of `f` over `rows` output rows and `k_dim` inputs per expert, `slots`
/// expert slots, `per_sm` blocks of `f` per SM with the table alone.
fn stream_phase(
    dev: &GpuDevice,
    f: &KernelFn,
    (rows, k_dim): (usize, usize),
    nt: usize,
    slots: usize,
    per_sm: usize,
    tuning: Tuning,
) -> Result<StreamPhase> {
    let threads = 32 * STR_WARPS as u32;
    let budget = dev.max_shared_per_block_optin().min(tuning.smem_budget()) as usize;
    let static_smem = dev.static_smem(f)? as usize;
    let xcols = stream_x_columns(8 * nt, k_dim, static_smem, budget, |dyn_smem| {
        let dyn_smem = u32_of("shared memory", dyn_smem)?;
        Ok(residency(dev, f, threads, dyn_smem, tuning)?.per_sm >= per_sm)
    })?;
    let chunks = stream_chunks(k_dim);
    let resident = per_sm * dev.sm_count() as usize;
    let ks = stream_split(slots * rows.div_ceil(16), chunks, resident)?;
    Ok(StreamPhase {
        ks,
        xcols,
        gx: stream_columns(rows / 16, slots, STR_WARPS / ks, resident),
        smem: STR_TABLE_BYTES + xcols * stream_x_column_bytes(k_dim),
    })
}

/// How the streaming regimes launch their two phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamLaunch {
    /// `moe_str_up_*` then `moe_str_down_*`, one block per work item.
    Split,
    /// `moe_str_fused_*`: both phases in one launch of persistent blocks that take items from
    /// a ticket counter, building the table and routing once per block.
    Fused,
}

/// Development knob for [`StreamLaunch`]: `split`, `fused` or `auto` (default: fused in the
/// decode regime from 2 tokens where the gate_up phase alone needs more than one wave of
/// blocks, see [`fused_pays`]). Read on every call, like [`DECODE_VARIANT_ENV`], so that one process can
/// compare them.
pub const STREAM_LAUNCH_ENV: &str = "GPTOSS_3090_MOE_STREAM_LAUNCH";

/// The launch [`STREAM_LAUNCH_ENV`] forces (`None`: automatic).
fn stream_launch_override() -> Result<Option<StreamLaunch>> {
    stream_launch_for(std::env::var(STREAM_LAUNCH_ENV).ok().as_deref())
}

/// [`stream_launch_override`] for an explicit setting (`None` = the variable is unset).
fn stream_launch_for(setting: Option<&str>) -> Result<Option<StreamLaunch>> {
    match setting.map(str::trim) {
        None | Some("") | Some("auto") => Ok(None),
        Some("split") => Ok(Some(StreamLaunch::Split)),
        Some("fused") => Ok(Some(StreamLaunch::Fused)),
        Some(other) => Err(Error::arg(format!(
            "{STREAM_LAUNCH_ENV}={other:?}: expected auto (default), split or fused"
        ))),
    }
}

/// Whether the fused launch beats the split one for `tokens` tokens: in the decode regime
/// (per-block routing, `grouped` false) from two tokens on, once the gate_up phase has more
/// items than `resident` blocks, so that persistent blocks save whole prologues (the 64 KB
/// table, the routing) per extra item. H100, session 13, against the split launches in the same
/// call (two rounds): 1.12x at 4 tokens, 1.06x at 8-16, equal at 2 and 32; 0.94x at 1 token on
/// the H100 and under the forced sm86 residency (the counter zeroing and the tickets cost more
/// than the down phase's earlier prime saves), and 0.79-0.85x at 64-128 tokens, where the down
/// phase's unstaged activations (more than the staged columns per pass) must bypass L1 (they
/// were written in the same launch) and the two-tile kernel spills.
fn fused_pays(grouped: bool, tokens: usize, up_items: usize, resident: usize) -> bool {
    fused_may_pay(grouped, tokens) && up_items > resident
}

/// The part of [`fused_pays`] known before any launch planning.
fn fused_may_pay(grouped: bool, tokens: usize) -> bool {
    !grouped && tokens >= 2
}

/// Launches `moe_str_fused_*` (`f`) with the two phases' plans: zeroes the workspace's
/// counters in stream order, then one wave of persistent blocks (at most one per item).
fn launch_fused(
    dev: &GpuDevice,
    f: &KernelFn,
    args: &MoeArgs,
    p: &MoeParams,
    slots: usize,
    (up, down): (StreamPhase, StreamPhase),
    tuning: Tuning,
) -> Result<()> {
    let threads = 32 * STR_WARPS as u32;
    let smem = u32_of("shared memory", up.smem.max(down.smem))?;
    let fit = residency(dev, f, threads, smem, tuning)?;
    let items = (up.gx + down.gx) * slots;
    let grid = items.min(fit.per_sm.max(1) * dev.sm_count() as usize);
    let mut q = *p;
    q.str_ks = to_i32("k split", up.ks)?;
    q.str_xcols = to_i32("staged columns", up.xcols)?;
    q.str_ks_dn = to_i32("k split", down.ks)?;
    q.str_xcols_dn = to_i32("staged columns", down.xcols)?;
    q.str_gx_up = to_i32("blocks per expert", up.gx)?;
    q.str_gx_dn = to_i32("blocks per expert", down.gx)?;
    q.str_slots = to_i32("expert slots", slots)?;
    // SAFETY: ws_sync lies inside the workspace (`layout.sync`, sync_bytes(E) bytes; validate
    // checked the workspace size); the kernel takes items up to (gx_up + gx_dn) * slots, each
    // covering at most 8 / ks groups of its expert; the dynamic shared memory holds the table
    // and the larger phase's staged columns. Tickets make any grid size deadlock-free.
    unsafe {
        dev.zero_async(q.ws_sync, sync_bytes(args.experts), args.stream)?;
        dev.launch(
            f,
            (u32_of("fused streaming", grid)?, 1, 1),
            (threads, 1, 1),
            fit.launch_smem,
            args.stream,
            &q,
        )
    }
}

/// Runs the streaming kernels (`p.str_grouped` set by the caller): `moe_str_fused_*` where
/// [`fused_pays`] (or [`STREAM_LAUNCH_ENV`] forces it) and both weights have the same
/// statistics kind, else `moe_str_up_*` then `moe_str_down_*`. Returns whether the down launch
/// combined ([`fold_combine`]), so that no `moe_combine` launch is needed.
fn launch_stream(
    dev: &GpuDevice,
    func: &dyn Fn(&str) -> Result<KernelFn>,
    args: &MoeArgs,
    p: &MoeParams,
    nt: usize,
    tuning: Tuning,
) -> Result<bool> {
    let (t, k, e) = (args.tokens, args.topk, args.experts);
    let pass_items = p.str_pass_items != 0;
    // Planned per touched expert either way (K split, staged columns, blocks per row of the
    // grid), so pass items change only the grid's rows: the same K split keeps the same sums.
    let slots = stream_slots(t * k, e, None);
    let grid_rows = stream_slots(t * k, e, pass_items.then_some(8 * nt));
    let table = u32_of("shared memory", STR_TABLE_BYTES)?;
    let threads = 32 * STR_WARPS as u32;
    let up_shape = (2 * args.intermediate, args.hidden);
    let down_shape = (args.hidden, args.intermediate);
    let plain = |nested: bool| if nested { "" } else { "_plain" };
    let forced = stream_launch_override()?;
    // Plan the fused launch only where it may pay (fused_pays: decode regime, 2+ tokens), so
    // that one token and the streaming regime skip its occupancy queries.
    // Pass items stay split: the fused kernel's counters hold one per expert slot (E), and it
    // is compiled without the pass-item lookup.
    let candidate = !pass_items
        && (forced == Some(StreamLaunch::Fused)
            || (forced.is_none() && fused_may_pay(p.str_grouped != 0, t)));
    if candidate && args.gate_up.nested == args.down.nested {
        let f = func(&format!(
            "moe_str_fused_n{nt}{}",
            plain(args.gate_up.nested)
        ))?;
        let per_sm = residency(dev, &f, threads, table, tuning)?.per_sm;
        let up = stream_phase(dev, &f, up_shape, nt, slots, per_sm, tuning)?;
        let down = stream_phase(dev, &f, down_shape, nt, slots, per_sm, tuning)?;
        let resident = per_sm * dev.sm_count() as usize;
        if forced == Some(StreamLaunch::Fused)
            || fused_pays(p.str_grouped != 0, t, up.gx * slots, resident)
        {
            return launch_fused(dev, &f, args, p, slots, (up, down), tuning).map(|()| false);
        }
    }
    let gu = ("moe_str_up", up_shape, args.gate_up.nested);
    let dn = ("moe_str_down", down_shape, args.down.nested);
    let deep = nt == 1
        && deep_ring(
            deep_ring_override()?,
            crate::ops::sm90_launch_ok(dev, tuning),
            t,
        );
    let deep_suffix = if deep { "_deep" } else { "" };
    let mut plans = Vec::with_capacity(2);
    for (name, shape, nested) in [gu, dn] {
        let f = func(&format!("{name}_n{nt}{deep_suffix}{}", plain(nested)))?;
        let per_sm = residency(dev, &f, threads, table, tuning)?.per_sm;
        let phase = stream_phase(dev, &f, shape, nt, slots, per_sm, tuning)?;
        let smem = u32_of("shared memory", phase.smem)?;
        // The tuning's residency: padded so that a forced sm86 holds a 3090's blocks per SM.
        let smem = residency(dev, &f, threads, smem, tuning)?.launch_smem;
        plans.push((name, f, phase, smem));
    }
    let down_columns = plans[1].2.gx;
    let opts = crate::ops::pdl_launch(dev, tuning, crate::ops::PdlFamily::Moe)?;
    let fold = fold_combine(
        fold_combine_override()?,
        opts.pdl,
        t,
        args.hidden,
        down_columns,
    );
    for (name, f, phase, smem) in &plans {
        let mut q = *p;
        q.str_ks = to_i32("k split", phase.ks)?;
        q.str_xcols = to_i32("staged columns", phase.xcols)?;
        q.str_fold = i32::from(fold);
        q.str_gx_dn = to_i32("blocks per expert", down_columns)?;
        // SAFETY: as in moe_forward; the grid gives every expert slot at least rows / (16 * 8 /
        // ks) blocks (each covers at most 8 / ks groups) and at most one per group; the dynamic
        // shared memory holds the table and the `xcols` staged columns the kernel indexes; it
        // reads the routing and activations and writes after its pdl_wait. Folded, the down
        // grid has `down_columns` <= H / 16 columns, so its counters lie in `layout.fold`.
        unsafe {
            dev.launch_ex(
                f,
                (
                    u32_of(name, phase.gx)?,
                    u32_of("expert slots", grid_rows)?,
                    1,
                ),
                (threads, 1, 1),
                *smem,
                args.stream,
                &q,
                opts,
            )?
        };
    }
    Ok(fold)
}

/// Knob (read on every call, so that one process can compare): `auto` (default) runs the split
/// one-tile streaming launches of one decode token on sm_90 under its own tuning with the
/// deep-ring kernels (`moe_str_*_n1_deep_*`: seven weight stages per warp instead of four,
/// the extra three in static shared memory); `on` wherever the split one-tile launches run,
/// `off` never. Same arithmetic, same bits (GPU test `test_deep_ring_gives_the_same_bits`).
pub const DEEP_RING_ENV: &str = "GPTOSS_3090_MOE_DEEP_RING";

fn deep_ring_override() -> Result<Option<bool>> {
    tri_state_for(std::env::var(DEEP_RING_ENV).ok().as_deref(), DEEP_RING_ENV)
}

/// Whether a split one-tile streaming launch of `tokens` tokens runs the deep-ring kernels:
/// `forced` when set, else one token on sm_90 under its own tuning (`sm90`). More weight bytes
/// in flight per warp pay where each SM streams with few warps and stages one activation
/// column; the deep kernels' static ring leaves room for only three staged columns. H200,
/// session 25, seven stages against four in one call (bit-identical): 1 token 35.8 vs
/// 37.0-37.2 us per layer, 2-4 tokens level, 8-16 tokens 3-4% slower, 32 tokens 10% slower.
/// A 3090 (sm_86, 100 KB per SM) has no room for them: its deep entries equal the plain ones.
pub fn deep_ring(forced: Option<bool>, sm90: bool, tokens: usize) -> bool {
    forced.unwrap_or(sm90 && tokens == 1)
}

/// Knob (read on every call, so that one process can compare): `auto` (default) folds the
/// combine into the split streaming down launch where [`fold_combine`] says it pays; `on`
/// folds wherever the split launches run, `off` never (a separate `moe_combine` launch). The
/// folded combine gives the same bits (the same routine, `combine_piece_f32`; GPU test
/// `test_folded_combine_gives_the_same_bits`).
pub const FOLD_COMBINE_ENV: &str = "GPTOSS_3090_MOE_FOLD_COMBINE";

/// Outputs (tokens x rows) up to which the last block of a down grid column sums them itself:
/// 2048 is one 8-output piece per thread of the 256-thread block. One decode token with 66
/// down columns (H200, 2 blocks per SM) has 48 rows per column.
pub const FOLD_MAX_OUTPUTS: usize = 2048;

fn fold_combine_override() -> Result<Option<bool>> {
    tri_state_for(
        std::env::var(FOLD_COMBINE_ENV).ok().as_deref(),
        FOLD_COMBINE_ENV,
    )
}

/// An `auto` / `on` / `off` knob's setting (`None` = the variable is unset; `auto` and empty
/// give `None`), or an error naming `name`.
fn tri_state_for(setting: Option<&str>, name: &str) -> Result<Option<bool>> {
    match setting.map(str::trim) {
        None | Some("") | Some("auto") => Ok(None),
        Some("on") => Ok(Some(true)),
        Some("off") => Ok(Some(false)),
        Some(other) => Err(Error::arg(format!(
            "{name}={other:?}: expected auto (default), on or off"
        ))),
    }
}

/// Whether a split streaming launch of `tokens` tokens folds the combine into its down launch
/// (`columns` grid columns over `hidden` rows): `forced` when set, else where the launches use
/// programmatic dependent launch (`pdl`: sm_90 under its own tuning) and the last block of a
/// column sums at most [`FOLD_MAX_OUTPUTS`] outputs. The fold saves a launch but serialises
/// each column's sums (behind a fence and an atomic) after its last expert block. H200,
/// session 25, the MoE layer at 24 GPT-OSS-20B shapes, fold off / on in turn, same call:
/// sm_90 tuning 36.4-36.6 -> 35.6-36.1 us at 1 token, 61.3-61.8 -> 60.7-61.3 at 2, and
/// 94.7-95.7 -> 95.9-97.0 at 4 (its column sums 720 outputs); the forced sm_86 tuning (no PDL,
/// a 3090's residency: 33 columns of 96 rows) 46.7-46.9 -> 47.2-47.7 at 1 token. So it
/// stays off there; from 2 tokens the decode regime runs the fused launch (`fused_pays`),
/// which keeps its combine launch. Since the MoE launches no longer use PDL by default
/// (`ops::PDL_ENV`, session 26), `auto` folds only under `GPTOSS_3090_PDL=on` or `moe`.
pub fn fold_combine(
    forced: Option<bool>,
    pdl: bool,
    tokens: usize,
    hidden: usize,
    columns: usize,
) -> bool {
    forced.unwrap_or_else(|| {
        let rows = 16 * (hidden / 16).div_ceil(columns.max(1));
        pdl && tokens.saturating_mul(rows) <= FOLD_MAX_OUTPUTS
    })
}

/// Runs the whole MoE block; returns the regime it used. `tuning` overrides the device's.
pub fn moe_forward(args: &MoeArgs, tuning: Option<Tuning>) -> Result<Regime> {
    let layout = args.validate()?;
    let dev: Arc<GpuDevice> = crate::cuda::device(args.device)?;
    let tuning = tuning.unwrap_or_else(|| dev.tuning());
    let regime = Regime::choose(args.tokens, args.topk, args.experts, tuning)?;
    if args.tokens == 0 {
        return Ok(regime);
    }
    let decode = decode_kernels()?;
    if regime == Regime::Decode
        && matches!(decode, DecodeKernels::Older(..))
        && args.weights_order != WeightsOrder::Rows
    {
        return Err(Error::arg(format!(
            "{DECODE_VARIANT_ENV}: the older decode kernels read the rows order only; unset it \
             for experts in {:?} order",
            args.weights_order
        )));
    }
    let mut p = args.params(&layout, regime)?;
    let s = args.stream;
    let family = args.weights_order.family();
    let func = |name: &str| dev.function_for_stream(family, &args.dtype.entry(name), s);
    let (t, k, e) = (args.tokens, args.topk, args.experts);

    // SAFETY (all launches below): `p` is a plain #[repr(C)] copy of kernels/moe.cu's
    // MoeParams; every pointer in it was checked non-null/aligned by `validate`, and the Python
    // op checked each tensor's dtype, device, contiguity and shape against these sizes; the
    // workspace is at least `layout.total` bytes. Grids match what each kernel indexes.
    // Router-weights mode: logits and top-k in their own launch, except for small batches
    // where moe_group routes (decode has no moe_group).
    let route_launch = args.route_mode == ROUTE_WEIGHTS
        || (args.route_mode == ROUTE_LOGITS && regime != Regime::Decode && p.fuse_route == 0);
    if route_launch {
        let f = func("moe_route")?;
        let grid = u32_of("route", t.div_ceil(8))?;
        unsafe { dev.launch(&f, (grid, 1, 1), (256, 1, 1), 0, s, &p)? };
    }
    let block = (32 * DEC_WARPS as u32, 1, 1);
    match regime {
        Regime::Decode => match decode {
            DecodeKernels::Stream => {
                // Each block routes (logits) or reads the routing itself; gate_up's block
                // (0, 0) stores it for moe_combine.
                p.out_f32 = 1;
                let nt = stream_tiles_chosen(t, k, e)?;
                if launch_stream(&dev, &func, args, &p, nt, tuning)? {
                    return Ok(regime);
                }
            }
            DecodeKernels::Older(up_name, down_name, pairs_per_block, rows_per_down_block) => {
                // moe_dec_up routes (logits) or reads the routing itself and groups per block;
                // moe_dec_down fuses the combine: two launches in all.
                let slots = u32_of("expert slots", e.min(t * k))?;
                let up = func(up_name)?;
                let gx = u32_of("dec_up", args.intermediate.div_ceil(pairs_per_block))?;
                unsafe { dev.launch(&up, (gx, slots, 1), block, 0, s, &p)? };
                let down = func(down_name)?;
                let gx = u32_of("dec_down", args.hidden.div_ceil(rows_per_down_block))?;
                unsafe { dev.launch(&down, (gx, 1, 1), block, 0, s, &p)? };
                return Ok(regime);
            }
        },
        Regime::Stream => {
            let nt = stream_tiles_chosen(t, k, e)?;
            // A forced fused launch wins: its kernel has no pass-item lookup.
            let fused_forced = stream_launch_override()? == Some(StreamLaunch::Fused);
            if pass_items_setting()? && !fused_forced {
                // moe_group lists each expert's passes as tiles of one pass's pairs.
                p.bm = to_i32("bm", 8 * nt)?;
                p.str_pass_items = 1;
            }
            let f = func("moe_group")?;
            unsafe { dev.launch(&f, (1, 1, 1), (1024, 1, 1), 0, s, &p)? };
            p.out_f32 = 1;
            if launch_stream(&dev, &func, args, &p, nt, tuning)? {
                return Ok(regime);
            }
        }
        Regime::Prefill { bm, stages } => {
            let f = func("moe_group")?;
            unsafe { dev.launch(&f, (1, 1, 1), (1024, 1, 1), 0, s, &p)? };
            let variant = format!("m{bm}s{stages}");
            let smem = u32_of("shared memory", Regime::gemm_smem_bytes(bm, stages))?;
            let tiles = u32_of("tiles", prefill_tiles(t, k, e, bm))?;
            let up = func(&format!("moe_gemm_up_{variant}"))?;
            let gx = u32_of("gemm_up", (2 * args.intermediate).div_ceil(GEMM_BN))?;
            unsafe { dev.launch(&up, (gx, tiles, 1), (256, 1, 1), smem, s, &p)? };
            let down = func(&format!("moe_gemm_down_{variant}"))?;
            let gx = u32_of("gemm_down", args.hidden.div_ceil(GEMM_BN))?;
            unsafe { dev.launch(&down, (gx, tiles, 1), (256, 1, 1), smem, s, &p)? };
        }
    }
    // One 8-element piece of a token per thread: ceil(H / 1024) blocks of 128 per token.
    let f = func("moe_combine")?;
    let gy = u32_of("combine", args.hidden.div_ceil(8 * 128))?;
    let grid = (u32_of("combine", t)?, gy, 1);
    let opts = crate::ops::pdl_launch(&dev, tuning, crate::ops::PdlFamily::Moe)?;
    // (moe_combine reads everything after its pdl_wait.)
    unsafe { dev.launch_ex(&f, grid, (128, 1, 1), 0, s, &p, opts)? };
    Ok(regime)
}

/// Parses a tuning name (`"sm80"`, `"sm86"`, `"sm90"`; `"auto"`/empty = the device's).
pub fn parse_tuning(name: &str) -> Result<Option<Tuning>> {
    match name.trim() {
        "" | "auto" => Ok(None),
        other => Tuning::parse(other).map(Some),
    }
}

// ---------------------------------------------------------------------------------------------
// Python bindings (registered on `gptoss_3090._native` by `crate::ops::py::register`).
// ---------------------------------------------------------------------------------------------

use pyo3::prelude::*;
use pyo3::types::PyDict;

fn item<'py, T>(d: &Bound<'py, PyDict>, key: &str) -> Result<T>
where
    T: for<'a> FromPyObject<'a, 'py>,
{
    let v = d
        .get_item(key)
        .map_err(|e| Error::arg(format!("moe_forward: reading '{key}': {e}")))?
        .ok_or_else(|| Error::arg(format!("moe_forward: missing argument '{key}'")))?;
    v.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        Error::arg(format!("moe_forward: argument '{key}': {e}"))
    })
}

fn nf4_of(d: &Bound<'_, PyDict>, prefix: &str) -> Result<Nf4Experts> {
    Ok(Nf4Experts {
        packed: item(d, &format!("{prefix}_packed"))?,
        absmax: item(d, &format!("{prefix}_absmax"))?,
        nested_absmax: item(d, &format!("{prefix}_nested_absmax"))?,
        nested_offset: item(d, &format!("{prefix}_nested_offset"))?,
        bias: item(d, &format!("{prefix}_bias"))?,
        nested: item(d, &format!("{prefix}_nested"))?,
        nnb: item(d, &format!("{prefix}_nnb"))?,
    })
}

fn args_of(d: &Bound<'_, PyDict>) -> Result<MoeArgs> {
    let dtype: String = item(d, "dtype")?;
    Ok(MoeArgs {
        device: item(d, "device")?,
        stream: item(d, "stream")?,
        dtype: Dtype::parse(&dtype)?,
        tokens: item(d, "tokens")?,
        hidden: item(d, "hidden")?,
        intermediate: item(d, "intermediate")?,
        experts: item(d, "experts")?,
        topk: item(d, "top_k")?,
        x: item(d, "x")?,
        x_stride: item(d, "x_stride")?,
        y: item(d, "y")?,
        route_mode: item(d, "route_mode")?,
        router_w: item(d, "router_weight")?,
        router_b: item(d, "router_bias")?,
        logits: item(d, "router_logits")?,
        logits_f32: item(d, "logits_f32")?,
        topk_ids: item(d, "topk_ids")?,
        topk_weights: item(d, "topk_weights")?,
        gate_up: nf4_of(d, "gu")?,
        down: nf4_of(d, "dn")?,
        nested_map: item(d, "nested_map")?,
        workspace: item(d, "workspace")?,
        workspace_bytes: item(d, "workspace_bytes")?,
        weights_order: WeightsOrder::parse(&item::<String>(d, "weights_order")?)?,
    })
}

/// `moe_forward(args: dict) -> str`: launches the MoE block on `args["stream"]` and returns the
/// regime used (`"decode"` or `"prefill_m{bm}s{stages}"`). Keys: see `MoeArgs` (pointers as
/// ints; `gu_*`/`dn_*` for the two expert tensors; `weights_order` "rows" or "chunks";
/// optional `tuning`). Raises `ValueError` for
/// bad arguments and `CudaError` for driver failures. Releases the GIL.
#[pyfunction]
#[pyo3(name = "moe_forward")]
fn py_moe_forward(py: Python<'_>, args: &Bound<'_, PyDict>) -> PyResult<String> {
    let a = args_of(args)?;
    let tuning = match args.get_item("tuning")? {
        Some(v) if !v.is_none() => parse_tuning(&v.extract::<String>()?)?,
        _ => None,
    };
    let regime = py.detach(|| crate::cuda::guard("moe forward", || moe_forward(&a, tuning)))?;
    Ok(match regime {
        Regime::Decode => "decode".to_string(),
        Regime::Stream => "stream".to_string(),
        Regime::Prefill { bm, stages } => format!("prefill_m{bm}s{stages}"),
    })
}

/// `moe_workspace_bytes(tokens, hidden, intermediate, experts, top_k) -> int`: workspace bytes
/// `moe_forward` needs for that token count (valid for every GPU and regime).
#[pyfunction]
#[pyo3(name = "moe_workspace_bytes")]
fn py_moe_workspace_bytes(
    tokens: usize,
    hidden: usize,
    intermediate: usize,
    experts: usize,
    top_k: usize,
) -> PyResult<usize> {
    Ok(workspace_bytes(
        tokens,
        hidden,
        intermediate,
        experts,
        top_k,
    )?)
}

/// `moe_regime(tokens, top_k, experts, tuning) -> str`: the regime `moe_forward` picks for a
/// token count on a tuning (`"sm80"`, `"sm86"`, `"sm90"`), without touching a GPU.
#[pyfunction]
#[pyo3(name = "moe_regime")]
fn py_moe_regime(tokens: usize, top_k: usize, experts: usize, tuning: &str) -> PyResult<String> {
    let t = parse_tuning(tuning)?
        .ok_or_else(|| Error::arg("tuning: name a concrete tuning (sm80, sm86 or sm90)"))?;
    Ok(match Regime::choose(tokens, top_k, experts, t)? {
        Regime::Decode => "decode".to_string(),
        Regime::Stream => "stream".to_string(),
        Regime::Prefill { bm, stages } => format!("prefill_m{bm}s{stages}"),
    })
}

/// Registers the MoE functions on the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_moe_forward, m)?)?;
    m.add_function(wrap_pyfunction!(py_moe_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(py_moe_regime, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn decode_kernel_choice_follows_the_setting() {
        assert_eq!(decode_kernels_for(None).unwrap(), DecodeKernels::Stream);
        assert_eq!(
            decode_kernels_for(Some(" auto")).unwrap(),
            DecodeKernels::Stream
        );
        assert_eq!(
            decode_kernels_for(Some("3")).unwrap(),
            DecodeKernels::Stream
        );
        assert!(matches!(
            decode_kernels_for(Some("2")).unwrap(),
            DecodeKernels::Older("moe_dec2_up", "moe_dec2_down", 32, 8)
        ));
        assert!(matches!(
            decode_kernels_for(Some("1")).unwrap(),
            DecodeKernels::Older("moe_dec_up", "moe_dec_down", 64, 16)
        ));
        let err = decode_kernels_for(Some("4")).unwrap_err().to_string();
        assert!(
            err.contains(DECODE_VARIANT_ENV) && err.contains("\"4\""),
            "{err}"
        );
    }

    #[test]
    fn stream_columns_spread_few_experts_over_every_sm() {
        // H100, 2 blocks per SM (264 resident). One token: gate_up 360 groups x 4 experts, 8 per
        // block (K split 1) -> 66 blocks per expert (5-6 groups each) instead of 45; down 180
        // groups, 4 per block (K split 2) -> 66 instead of 45.
        assert_eq!(stream_columns(360, 4, 8, 264), 66);
        assert_eq!(stream_columns(180, 4, 4, 264), 66);
        // Two tokens (8 slots) need two waves: the fewest blocks.
        assert_eq!(stream_columns(360, 8, 8, 264), 45);
        assert_eq!(stream_columns(360, 32, 8, 264), 45);
        // Never fewer than the groups need, never more blocks than groups.
        assert_eq!(stream_columns(2, 1, 8, 264), 2);
        assert_eq!(stream_columns(360, 4, 8, 100), 45);
        for (groups, slots, per_block, resident) in [
            (360, 4, 8, 264),
            (180, 16, 2, 82),
            (7, 3, 4, 396),
            (1, 1, 8, 1),
        ] {
            let gx = stream_columns(groups, slots, per_block, resident);
            assert!(gx >= groups.div_ceil(per_block) && gx <= groups.max(1));
            // The kernel's share of each block is at most per_block groups.
            for b in 0..gx {
                let (lo, hi) = (b * groups / gx, (b + 1) * groups / gx);
                assert!(hi - lo <= per_block, "{groups} {gx} block {b}: {lo}..{hi}");
            }
        }
    }

    #[test]
    fn stream_k_split_fills_the_gpu_once() {
        // H100, 3 blocks per SM (396 resident), K = 2880 (23 chunks).
        // One token touches 4 experts: gate_up (5760 rows) 360 blocks of 2 x 4 warps, down
        // (2880 rows) 360 blocks of 4 x 2 warps: one full wave each.
        assert_eq!(stream_k_split(4 * 360, 23, 396), 2);
        assert_eq!(stream_k_split(4 * 180, 23, 396), 4);
        // Four tokens (16 experts): already two waves of whole rows; splitting only adds
        // short warps.
        assert_eq!(stream_k_split(16 * 360, 23, 396), 1);
        // A 3090 (82 SMs, 1 block each), every expert touched: whole rows per warp.
        assert_eq!(stream_k_split(32 * 360, 23, 82), 1);
        assert_eq!(stream_k_split(1, 23, 396), 8); // one group: more warps on it
    }

    #[test]
    fn tri_state_knobs_parse() -> Result<()> {
        for name in [FOLD_COMBINE_ENV, DEEP_RING_ENV] {
            assert_eq!(tri_state_for(None, name)?, None);
            assert_eq!(tri_state_for(Some(" auto "), name)?, None);
            assert_eq!(tri_state_for(Some("on"), name)?, Some(true));
            assert_eq!(tri_state_for(Some("off"), name)?, Some(false));
            let err = tri_state_for(Some("1"), name).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("auto"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn deep_ring_serves_one_token_on_sm90() {
        assert!(deep_ring(None, true, 1));
        assert!(!deep_ring(None, true, 2));
        assert!(!deep_ring(None, false, 1)); // other GPUs, the forced sm86 tuning
        assert!(deep_ring(Some(true), false, 32));
        assert!(!deep_ring(Some(false), true, 1));
    }

    #[test]
    fn fold_combine_pays_for_one_token_only() {
        // GPT-OSS-20B down (H = 2880, 180 groups), H200 residency (264 blocks): one token has
        // 4 expert slots, 66 columns of 3 groups (48 rows): folded. Sixteen tokens with 8
        // columns (23 groups, 368 rows each) and 64 tokens are not.
        assert!(fold_combine(None, true, 1, 2880, 66));
        assert!(fold_combine(None, true, 2, 2880, 33));
        assert!(!fold_combine(None, true, 16, 2880, 8));
        assert!(!fold_combine(None, true, 64, 2880, 8));
        // One column of the whole output: 2880 outputs for its last block, over the bound.
        assert!(!fold_combine(None, true, 1, 2880, 1));
        assert!(fold_combine(None, true, 1, 2048, 1));
        // Without PDL (other GPUs, the forced sm86 tuning) it measured slower: off.
        assert!(!fold_combine(None, false, 1, 2880, 33));
        assert!(fold_combine(Some(true), false, 64, 2880, 8));
        assert!(!fold_combine(Some(false), true, 1, 2880, 66));
    }

    #[test]
    fn pass_items_knob_parses() -> Result<()> {
        assert!(pass_items_for(None)?);
        assert!(!pass_items_for(Some(" 0 "))?);
        assert!(pass_items_for(Some("1"))?);
        let err = pass_items_for(Some("yes")).unwrap_err().to_string();
        assert!(err.contains("GPTOSS_3090_MOE_PASS_ITEMS") && err.contains("0 or 1 (default)"));
        Ok(())
    }

    #[test]
    fn pass_items_fit_the_grid_and_the_tile_list() -> Result<()> {
        // Every way of spreading `pairs` over `experts` (sampled: all on one expert, even,
        // and a deterministic pseudo-random spread) needs at most stream_slots passes, and the
        // workspace's tile list holds them for passes of 8 or 16 pairs.
        let mut seed = 12345u64;
        for (tokens, experts, topk) in [(17, 32, 4), (64, 32, 4), (128, 32, 4), (100, 8, 2)] {
            let pairs = tokens * topk;
            let layout = WorkspaceLayout::new(tokens, 2880, 2880, experts, topk, 2)?;
            let mut spreads = vec![vec![0usize; experts], vec![pairs / experts; experts]];
            spreads[0][0] = pairs;
            spreads[1][0] += pairs % experts;
            for _ in 0..50 {
                let mut c = vec![0usize; experts];
                for _ in 0..pairs {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Skewed: the square of a uniform draw favours low expert indices.
                    let u = (seed >> 33) as f64 / (1u64 << 31) as f64;
                    c[((u * u) * experts as f64) as usize % experts] += 1;
                }
                spreads.push(c);
            }
            for c in &spreads {
                assert_eq!(c.iter().sum::<usize>(), pairs);
                for pass in [8, 16] {
                    let passes: usize = c.iter().map(|&n| n.div_ceil(pass)).sum();
                    assert!(passes <= stream_slots(pairs, experts, Some(pass)), "{c:?}");
                    assert!(passes <= layout.max_tiles, "{c:?}");
                }
                let touched = c.iter().filter(|&&n| n > 0).count();
                assert!(touched <= stream_slots(pairs, experts, None));
            }
        }
        Ok(())
    }

    #[test]
    fn stream_k_split_keeps_each_warp_within_the_stream_bound() {
        // Many groups favour whole rows per warp, unless a warp's stream would be too long:
        // K = 16384 (128 chunks) then needs a split of 2, K = 65536 (512 chunks) of 8.
        assert_eq!(stream_k_split(32 * 360, 128, 82), 2);
        assert_eq!(stream_k_split(32 * 360, 512, 82), 8);
        for chunks in [1, 23, 64, 65, 128, 129, 300, 512] {
            for groups in [1, 16, 360, 11520] {
                let ks = stream_k_split(groups, chunks, 396);
                assert!(
                    stream_split_fits(chunks, ks),
                    "{chunks} chunks, {groups} groups"
                );
                assert!(chunks.div_ceil(ks) <= STREAM_MAX_CHUNKS);
            }
        }
        assert!(!stream_split_fits(513, 8));
    }

    use super::*;
    use crate::ops::{stream_k_split, stream_split_fits, STREAM_MAX_CHUNKS};

    fn args(tokens: usize) -> MoeArgs {
        let nf4 = |nnb| Nf4Experts {
            packed: 0x1000,
            absmax: 0x2000,
            nested_absmax: 0x3000,
            nested_offset: 0x4000,
            bias: 0x5000,
            nested: true,
            nnb,
        };
        MoeArgs {
            device: 0,
            stream: 0,
            dtype: Dtype::Bf16,
            tokens,
            hidden: 2880,
            intermediate: 2880,
            experts: 32,
            topk: 4,
            x: 0x10000,
            x_stride: 2880,
            y: 0x20000,
            route_mode: ROUTE_GIVEN,
            router_w: 0,
            router_b: 0,
            logits: 0,
            logits_f32: false,
            topk_ids: 0x30000,
            topk_weights: 0x40000,
            gate_up: nf4(1013),
            down: nf4(507),
            nested_map: 0x6000,
            workspace: 0x100000,
            workspace_bytes: workspace_bytes(tokens, 2880, 2880, 32, 4).unwrap_or(0),
            weights_order: WeightsOrder::Rows,
        }
    }

    #[test]
    fn one_column_tile_while_experts_average_five_pairs() {
        // GPT-OSS-20B (32 experts, top-4): one tile up to 40 tokens, two from 41.
        for t in [1, 8, 9, 16, 17, 32, 40] {
            assert_eq!(stream_tiles(t, 4, 32), 1, "{t} tokens");
        }
        for t in [41, 48, 64, 128] {
            assert_eq!(stream_tiles(t, 4, 32), 2, "{t} tokens");
        }
        assert_eq!(stream_tiles(11, 4, 8), 2); // few experts: many pairs each
        assert_eq!(stream_tiles(10, 4, 8), 1);
        assert_eq!(stream_tiles(usize::MAX, 4, 32), 2);
    }

    #[test]
    fn weights_order_names_its_kernel_family() -> Result<()> {
        assert_eq!(WeightsOrder::parse("rows")?.family(), "moe");
        assert_eq!(WeightsOrder::parse(" chunks ")?.family(), "moe_chunks");
        let err = WeightsOrder::parse("columns").unwrap_err().to_string();
        assert!(
            err.contains("weights_order") && err.contains("columns"),
            "{err}"
        );
        for order in [WeightsOrder::Rows, WeightsOrder::Chunks] {
            assert!(crate::cuda::source(order.family()).is_ok());
        }
        Ok(())
    }

    #[test]
    fn stream_launch_knob_parses() -> Result<()> {
        assert_eq!(stream_launch_for(None)?, None);
        assert_eq!(stream_launch_for(Some("auto"))?, None);
        assert_eq!(
            stream_launch_for(Some(" split "))?,
            Some(StreamLaunch::Split)
        );
        assert_eq!(stream_launch_for(Some("fused"))?, Some(StreamLaunch::Fused));
        let err = stream_launch_for(Some("yes")).unwrap_err().to_string();
        assert!(
            err.contains(STREAM_LAUNCH_ENV) && err.contains("yes"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn fused_launch_where_blocks_take_several_items() {
        // H100, 2 blocks per SM (264 resident). One token: gate_up 66 blocks x 4 experts, one
        // wave: split; under the sm86 residency (132) 90 x 4: split all the same. Four tokens:
        // 45 x 16 = 720 items: fused. The streaming regime (grouped, 17-128 tokens): split.
        assert!(!fused_pays(false, 1, 264, 264));
        assert!(!fused_pays(false, 1, 360, 132));
        assert!(fused_pays(false, 4, 720, 264));
        assert!(!fused_pays(true, 64, 1440, 264));
    }

    #[test]
    fn params_struct_matches_the_kernel_layout() {
        // 26 pointers + 20 i32, then ws_sync + 8 i32, then fold_ctr (kernels/moe.cu
        // MoeParams).
        assert_eq!(
            std::mem::size_of::<MoeParams>(),
            26 * 8 + 20 * 4 + 8 + 8 * 4 + 8
        );
        assert_eq!(std::mem::offset_of!(MoeParams, ws_sync), 26 * 8 + 20 * 4);
        assert_eq!(
            std::mem::offset_of!(MoeParams, fold_ctr),
            26 * 8 + 20 * 4 + 8 + 8 * 4
        );
    }

    #[test]
    fn workspace_bytes_cover_every_smaller_count() -> Result<()> {
        let need = |t| WorkspaceLayout::new(t, 2880, 2880, 32, 4, 2).map(|l| l.total);
        for t in [1usize, 16, 128, 129, 130, 200, 2048] {
            let have = workspace_bytes(t, 2880, 2880, 32, 4)?;
            for smaller in 1..=t.min(300) {
                assert!(have >= need(smaller)?, "{t} tokens: {smaller} needs more");
            }
        }
        Ok(())
    }

    #[test]
    fn workspace_layout_is_aligned_and_disjoint() -> Result<()> {
        for t in [1usize, 3, 64, 8192] {
            let l = WorkspaceLayout::new(t, 2880, 2880, 32, 4, 2)?;
            let parts = [
                l.ids, l.wts, l.counts, l.offsets, l.meta, l.active, l.tiles, l.sorted, l.sync,
                l.fold, l.h, l.out,
            ];
            assert!(parts.iter().all(|o| o % 256 == 0));
            assert!(parts.windows(2).all(|w| w[0] < w[1]));
            let out_elem = if t <= STREAM_MAX_TOKENS { 4 } else { 2 };
            assert_eq!(l.out + align256(t * 4 * 2880 * out_elem), l.total);
            assert!(l.sorted_cap >= t * 4 + 32 * 127);
            assert!(l.max_tiles >= (t * 4).div_ceil(64) + 32);
        }
        Ok(())
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(args(5).validate().is_ok());
        let mut a = args(5);
        a.hidden = 100;
        assert!(a.validate().unwrap_err().to_string().contains("hidden"));
        // Past the streaming kernels' K bound (8 warps x 64 chunks of 128).
        let mut a = args(5);
        a.intermediate = 65536 + 64;
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("intermediate size: at most 65536"), "{err}");
        let mut a = args(5);
        a.topk = 9;
        assert!(a.validate().unwrap_err().to_string().contains("top_k"));
        let mut a = args(5);
        a.workspace_bytes -= 1;
        assert!(a.validate().unwrap_err().to_string().contains("workspace"));
        let mut a = args(5);
        a.x = 0x10008;
        assert!(a.validate().unwrap_err().to_string().contains("x:"));
        let mut a = args(5);
        a.gate_up.nnb = 1012;
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gate_up.nested_absmax"));
        let mut a = args(5);
        a.route_mode = 7;
        assert!(a.validate().unwrap_err().to_string().contains("route_mode"));
        let mut a = args(5);
        a.topk_ids = 0;
        assert!(a.validate().unwrap_err().to_string().contains("topk_ids"));
    }

    #[test]
    fn regime_is_static_in_the_token_count() {
        assert_eq!(
            Regime::choose(1, 4, 32, Tuning::Sm90).unwrap(),
            Regime::Decode
        );
        assert_eq!(
            Regime::choose(16, 4, 32, Tuning::Sm86).unwrap(),
            Regime::Decode
        );
        assert_eq!(
            Regime::choose(17, 4, 32, Tuning::Sm86).unwrap(),
            Regime::Stream
        );
        assert_eq!(
            Regime::choose(STREAM_MAX_TOKENS, 4, 32, Tuning::Sm86).unwrap(),
            Regime::Stream
        );
        assert_eq!(
            Regime::choose(STREAM_MAX_TOKENS + 1, 4, 32, Tuning::Sm90).unwrap(),
            Regime::Prefill { bm: 64, stages: 2 }
        );
        assert_eq!(
            Regime::choose(8192, 4, 32, Tuning::Sm90).unwrap(),
            Regime::Prefill { bm: 128, stages: 2 }
        );
        assert_eq!(
            Regime::choose(511, 4, 32, Tuning::Sm90).unwrap(),
            Regime::Prefill { bm: 64, stages: 2 }
        );
        assert_eq!(
            Regime::choose(512, 4, 32, Tuning::Sm80).unwrap(),
            Regime::Prefill { bm: 128, stages: 2 }
        );
        assert_eq!(
            Regime::choose(8192, 4, 32, Tuning::Sm86).unwrap(),
            Regime::Prefill { bm: 64, stages: 2 }
        );
        // Static shared memory of moe_gemm (tables) is about 1.1 KB per block.
        let fits = |bm, stages, blocks: usize, per_sm: usize| {
            blocks * (Regime::gemm_smem_bytes(bm, stages) + 2048) <= per_sm * 1024
        };
        assert!(fits(64, 2, 2, 100)); // sm_86/89
        assert!(fits(128, 4, 1, 228)); // sm_90
        assert!(fits(128, 2, 2, 164)); // m128s2, sm_80 and sm_90
        assert!(!fits(128, 2, 2, 100)); // ... but not sm_86/89
    }

    #[test]
    fn staged_columns_keep_the_occupancy_and_the_budget() -> Result<()> {
        // moe_str's static shared memory (about 4.6 KB), K = 2880: 5776 bytes per column.
        let stat = 4656;
        let per_sm = |sm_bytes: usize, blocks: usize| {
            move |dyn_smem: usize| Ok(blocks * (dyn_smem + stat + 1024) <= sm_bytes)
        };
        // (max columns, per-block budget KB, SM KB, table-only blocks per SM, expected)
        let cases = [
            (8, 224, 228, 2, 7),  // H100
            (16, 224, 228, 2, 7), // H100, two tiles: the occupancy still caps it
            (1, 224, 228, 2, 1),  // never more than asked
            (8, 99, 100, 1, 5),   // RTX 3090: 1 block per SM either way, 99 KB per block
            (8, 160, 164, 2, 2),  // A100
            (8, 66, 228, 2, 0),   // no room at all: nothing staged
        ];
        for (max_cols, budget_kb, sm_kb, blocks, want) in cases {
            let got = stream_x_columns(
                max_cols,
                2880,
                stat,
                budget_kb << 10,
                per_sm(sm_kb << 10, blocks),
            )?;
            assert_eq!(
                got, want,
                "max {max_cols}, budget {budget_kb} KB, SM {sm_kb} KB"
            );
        }
        Ok(())
    }

    #[test]
    fn params_route_given_points_at_the_callers_tensors() -> Result<()> {
        let a = args(3);
        let l = a.validate()?;
        let p = a.params(&l, Regime::Decode)?;
        assert_eq!(p.ws_ids, a.topk_ids);
        assert_eq!(p.ws_wts, a.topk_weights);
        assert_eq!(p.ws_sorted, a.workspace + l.sorted as u64);
        assert_eq!(p.fuse_route, 0);
        Ok(())
    }
}
