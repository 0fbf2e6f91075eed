//! NF4 launchers: dequantize, linear (decode and tensor-core paths), quantize.
//!
//! The `#[repr(C)]` structs mirror `kernels/nf4.cu` field for field (sizes asserted on both
//! sides). Every launcher validates its arguments (null pointers, alignment, sizes that the
//! kernels assume) and returns [`Error::InvalidArgument`] naming the argument; it then picks the
//! launch configuration from the device's [`Tuning`] and launches on the caller's stream.

use crate::cuda::{GpuDevice, Tuning};
use crate::error::{Error, Result};
use crate::ops::{
    ceil_div, check_opt_ptr, check_ptr, check_row_stride, residency, stream_chunks, stream_k_fits,
    stream_split, stream_split_fits, to_i32, Dtype, STREAM_MAX_CHUNKS, STREAM_MAX_K,
    STR_TABLE_BYTES, STR_WARPS,
};

/// Elements per NF4 block.
pub const BLOCK: i64 = 64;
/// NF4 blocks per nested block.
pub const NESTED_BLOCK: i64 = 256;
/// Most segments of a multi-segment (fused q/k/v) weight.
pub const MAX_SEGMENTS: usize = 3;

/// Mirror of `Nf4Tensor` (56 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Nf4TensorParams {
    /// u8 [numel / 2], high nibble first.
    pub packed: u64,
    /// nested ? u8 [nb] : f32 [nb].
    pub absmax: u64,
    /// f32 [E * nnb] (nested only).
    pub nested_absmax: u64,
    /// f32 [256] (nested only).
    pub nested_map: u64,
    /// f32 [E] on the device, or 0 to use `nested_offset_value`.
    pub nested_offset: u64,
    /// The offset when `nested_offset` is 0.
    pub nested_offset_value: f32,
    /// 1 = nested statistics.
    pub nested: i32,
    /// Rows of this segment (linear only).
    pub rows: i32,
    /// Padding (keeps the size a multiple of 8).
    pub pad_: i32,
}

/// Mirror of `Nf4DequantParams` (80 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Nf4DequantParams {
    /// The quantized tensor (all experts).
    pub w: Nf4TensorParams,
    /// bf16/f16 [n_experts * numel].
    pub out: u64,
    /// Elements per expert.
    pub numel: i64,
    /// Number of experts (1 for a single tensor).
    pub n_experts: i32,
    /// Nested blocks per expert.
    pub nnb: i32,
}

/// Mirror of `Nf4DequantSegsParams` (264 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Nf4DequantSegsParams {
    /// The tensors (`n_experts` 1 each).
    pub seg: [Nf4DequantParams; MAX_SEGMENTS],
    /// Block `b` serves segment `s` for `first_block[s] <= b < first_block[s + 1]`.
    pub first_block: [i32; MAX_SEGMENTS + 1],
    /// Used segments (1..=3).
    pub n_segments: i32,
    /// Padding (keeps the size a multiple of 8).
    pub pad_: i32,
}

/// Mirror of `Nf4LinearParams` (248 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Nf4LinearParams {
    /// Weight segments; output columns are concatenated in this order.
    pub seg: [Nf4TensorParams; MAX_SEGMENTS],
    /// [M, K] activations, row stride `ldx` elements.
    pub x: u64,
    /// [M, N] output, row stride `ldy` elements.
    pub y: u64,
    /// [N] bias or 0.
    pub bias: u64,
    /// Row stride of x in elements (multiple of 8).
    pub ldx: i64,
    /// Row stride of y in elements.
    pub ldy: i64,
    /// Rows of x.
    pub m: i32,
    /// Output features (sum of segment rows).
    pub n: i32,
    /// Input features (multiple of 64).
    pub k: i32,
    /// Used segments (1..=3).
    pub n_segments: i32,
    /// Split-K workspace: f32 [splits][M][N] (0 when `splits` is 1).
    pub ws: u64,
    /// K ranges per output tile (gridDim.z of the tensor-core kernel).
    pub splits: i32,
    /// Streaming kernel: warps that split K per 16-row group (1, 2, 4 or 8).
    pub str_ks: i32,
    /// Wide kernel, sm_90: 1 = launched as clusters of (1, splits, 1) that sum their K splits
    /// on chip (no workspace, no reduce launch).
    pub wide_cluster: i32,
    /// 0 (keeps the struct a multiple of 8 bytes).
    pub reserved: i32,
}

/// Mirror of `Nf4QuantizeParams` (72 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Nf4QuantizeParams {
    /// [n] input values.
    pub input: u64,
    /// u8 [ceil(n/2)] output codes.
    pub packed: u64,
    /// f32 [nb]: output (plain) or workspace (nested).
    pub absmax: u64,
    /// u8 [nb] nested codes (nested only).
    pub codes: u64,
    /// f32 [ceil(nb/256)] (nested only).
    pub nested_absmax: u64,
    /// f32 [256] signed dynamic map (nested only).
    pub nested_map: u64,
    /// f32 [1] offset output (nested only).
    pub offset: u64,
    /// Elements.
    pub n: i64,
    /// Blocks = ceil(n / 64).
    pub nb: i64,
}

/// Statistics of one NF4 tensor as device pointers (what Python passes in).
#[derive(Debug, Clone, Copy, Default)]
pub struct Nf4Stats {
    /// u8 packed codes.
    pub packed: u64,
    /// f32 absmax (plain) or u8 codes (nested).
    pub absmax: u64,
    /// f32 nested absmax (nested only).
    pub nested_absmax: u64,
    /// f32 [256] nested map (nested only).
    pub nested_map: u64,
    /// f32 [E] device offsets, or 0.
    pub nested_offset_ptr: u64,
    /// The offset used when `nested_offset_ptr` is 0.
    pub nested_offset_value: f32,
    /// Double-quantized statistics.
    pub nested: bool,
}

impl Nf4Stats {
    fn check(&self, what: &str) -> Result<()> {
        check_ptr(&format!("{what}.packed"), self.packed, 16)?;
        if self.nested {
            check_ptr(&format!("{what}.absmax (uint8 codes)"), self.absmax, 1)?;
            check_ptr(&format!("{what}.nested_absmax"), self.nested_absmax, 4)?;
            check_ptr(&format!("{what}.nested_quant_map"), self.nested_map, 4)?;
            check_opt_ptr(&format!("{what}.nested_offset"), self.nested_offset_ptr, 4)?;
            if self.nested_offset_ptr == 0 && !self.nested_offset_value.is_finite() {
                return Err(Error::arg(format!(
                    "{what}.nested_offset: expected a finite value, found {}",
                    self.nested_offset_value
                )));
            }
        } else {
            check_ptr(&format!("{what}.absmax (float32)"), self.absmax, 4)?;
        }
        Ok(())
    }

    fn params(&self, rows: i32) -> Nf4TensorParams {
        Nf4TensorParams {
            packed: self.packed,
            absmax: self.absmax,
            nested_absmax: if self.nested { self.nested_absmax } else { 0 },
            nested_map: if self.nested { self.nested_map } else { 0 },
            nested_offset: if self.nested {
                self.nested_offset_ptr
            } else {
                0
            },
            nested_offset_value: if self.nested {
                self.nested_offset_value
            } else {
                0.0
            },
            nested: self.nested as i32,
            rows,
            pad_: 0,
        }
    }
}

/// Dequantizes `n_experts` NF4 tensors of `numel` elements each (expert e: elements
/// `[e*numel, (e+1)*numel)`, nested index `e * nnb + block / 256`, offset `offsets[e]`) into
/// `out` (bf16/f16, 16-byte aligned).
///
/// # Safety
/// Every pointer must be a live device allocation of the documented size on `dev`, and
/// `stream` a stream of `dev`'s primary context.
pub unsafe fn dequantize(
    dev: &GpuDevice,
    stats: &Nf4Stats,
    numel: i64,
    n_experts: i64,
    dtype: Dtype,
    out: u64,
    stream: u64,
) -> Result<()> {
    let params = dequantize_params(stats, numel, n_experts, out)?;
    let blocks = dequantize_blocks(numel * n_experts, dev.sm_count() as u64) as u32;
    let f = dev.function_for_stream("nf4", &dtype.entry("nf4_dequant"), stream)?;
    // SAFETY: forwarded contract; params mirrors Nf4DequantParams.
    unsafe { dev.launch(&f, (blocks, 1, 1), (256, 1, 1), 0, stream, &params) }
}

/// One tensor of [`dequantize_segments`]: its statistics, its element count and its output.
#[derive(Debug, Clone, Copy)]
pub struct DequantSegment {
    /// The tensor's NF4 statistics.
    pub stats: Nf4Stats,
    /// Elements (rows x K).
    pub numel: i64,
    /// bf16/f16 output, 16-byte aligned.
    pub out: u64,
}

/// Dequantizes 1..=[`MAX_SEGMENTS`] single tensors in one launch (`nf4_dequant_segs_*`), each
/// exactly as [`dequantize`] would: the linear's dequantize + cuBLAS path turns vLLM's fused
/// q/k/v (three separately quantized tensors) into one bf16 weight this way.
///
/// # Safety
/// As [`dequantize`], for every segment.
pub unsafe fn dequantize_segments(
    dev: &GpuDevice,
    segments: &[DequantSegment],
    dtype: Dtype,
    stream: u64,
) -> Result<()> {
    let params = dequantize_segments_params(segments, dev.sm_count() as u64)?;
    let grid = params.first_block[params.n_segments as usize] as u32;
    let f = dev.function_for_stream("nf4", &dtype.entry("nf4_dequant_segs"), stream)?;
    // SAFETY: forwarded contract; params mirrors Nf4DequantSegsParams.
    unsafe { dev.launch(&f, (grid, 1, 1), (256, 1, 1), 0, stream, &params) }
}

/// Blocks [`dequantize`] launches for `total` elements on `sm_count` SMs.
fn dequantize_blocks(total: i64, sm_count: u64) -> u64 {
    // One thread per 32 elements: a warp's pass is 4 packed words per lane (1024 elements), so
    // this grid covers the tensor in one pass; the kernel's grid-stride loop covers the rest
    // when the cap applies.
    let chunks = ceil_div(total as u64, 32);
    ceil_div(chunks, 256).min(sm_count * 64).max(1)
}

/// Validates the arguments of [`dequantize_segments`] and builds its params (no GPU needed).
pub fn dequantize_segments_params(
    segments: &[DequantSegment],
    sm_count: u64,
) -> Result<Nf4DequantSegsParams> {
    if segments.is_empty() || segments.len() > MAX_SEGMENTS {
        return Err(Error::arg(format!(
            "dequantize: 1..={MAX_SEGMENTS} tensors per launch, found {}",
            segments.len()
        )));
    }
    let mut params = Nf4DequantSegsParams::default();
    for (i, s) in segments.iter().enumerate() {
        params.seg[i] = dequantize_params(&s.stats, s.numel, 1, s.out)
            .map_err(|e| Error::arg(format!("segment {i}: {e}")))?;
        let blocks = dequantize_blocks(s.numel, sm_count);
        let end = params.first_block[i] as u64 + blocks;
        params.first_block[i + 1] = i32::try_from(end)
            .map_err(|_| Error::arg(format!("dequantize: {end} blocks is too many")))?;
    }
    params.n_segments = segments.len() as i32;
    Ok(params)
}

/// Validates the arguments of [`dequantize`] and builds its params (no GPU needed).
pub fn dequantize_params(
    stats: &Nf4Stats,
    numel: i64,
    n_experts: i64,
    out: u64,
) -> Result<Nf4DequantParams> {
    stats.check("weight")?;
    check_ptr("out", out, 16)?;
    if numel <= 0 {
        return Err(Error::arg(format!("numel must be >= 1, found {numel}")));
    }
    if n_experts < 1 {
        return Err(Error::arg(format!(
            "n_experts must be >= 1, found {n_experts}"
        )));
    }
    if n_experts > 1 && numel % BLOCK != 0 {
        return Err(Error::arg(format!(
            "fused experts: elements per expert must be a multiple of 64, found {numel}"
        )));
    }
    let total = numel
        .checked_mul(n_experts)
        .ok_or_else(|| Error::arg("numel * n_experts overflows"))?;
    if total > i64::MAX / 4 {
        return Err(Error::arg(format!("{total} elements is too many")));
    }
    let nnb = ceil_div(ceil_div(numel as u64, BLOCK as u64), NESTED_BLOCK as u64) as i64;
    Ok(Nf4DequantParams {
        w: stats.params(0),
        out,
        numel,
        n_experts: to_i32("n_experts", n_experts)?,
        nnb: to_i32("nested blocks per expert", nnb)?,
    })
}

/// One weight segment of a linear layer: `rows` x K.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// The segment's NF4 statistics.
    pub stats: Nf4Stats,
    /// Output rows of this segment.
    pub rows: i64,
}

/// Which linear kernel to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearPath {
    /// Pick by M, N and the device tuning.
    Auto,
    /// The first decode kernel (M <= 16).
    Decode,
    /// Streaming kernel (M <= [`STREAM_MAX_M`], segments of 16-row multiples, one absmax
    /// format); `Auto` picks it whenever the weight allows.
    Stream,
    /// Wide streaming kernel (M <= [`WIDE_MAX_M`], [`stream_eligible`] weights): eight token
    /// tiles with the activations staged per block; its K split goes through the workspace.
    Wide,
    /// Tensor-core kernel with the large tile (128 x 128).
    MmaLarge,
    /// Tensor-core kernel with the medium tile (64 x 128).
    MmaMedium,
    /// Tensor-core kernel with the small tile (64 x 64).
    MmaSmall,
}

impl LinearPath {
    /// Parses `auto`, `stream`, `wide`, `decode`, `mma` (auto tile), `mma_l`, `mma_m`, `mma_s`.
    pub fn parse(text: &str) -> Result<Option<LinearPath>> {
        Ok(Some(match text {
            "auto" => LinearPath::Auto,
            "stream" => LinearPath::Stream,
            "wide" => LinearPath::Wide,
            "decode" => LinearPath::Decode,
            "mma" => return Ok(None),
            "mma_l" => LinearPath::MmaLarge,
            "mma_m" => LinearPath::MmaMedium,
            "mma_s" => LinearPath::MmaSmall,
            other => {
                return Err(Error::arg(format!(
                    "path '{other}': expected 'auto', 'stream', 'wide', 'decode', 'mma', 'mma_l', 'mma_m' or 'mma_s'"
                )))
            }
        }))
    }
}

/// A resolved launch configuration of the linear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearPlan {
    /// Kernel entry without the dtype suffix.
    pub entry: &'static str,
    /// Grid.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory bytes.
    pub smem: u32,
    /// K ranges per output tile (1 = no split-K).
    pub splits: u32,
    /// f32 elements of split-K workspace the launch needs (`splits * M * N`, or 0).
    pub workspace_floats: u64,
}

struct MmaConfig {
    name: &'static str,
    bm: i64,
    bn: i64,
    threads: u32,
    stages: i64,
}

impl MmaConfig {
    /// Blocks of this configuration that fit one SM by shared memory and threads, capped at
    /// the tuning's target.
    fn resident_blocks(&self, tuning: Tuning) -> u64 {
        let by_smem = tuning.smem_per_sm() / (self.smem() + 1024);
        let by_threads = 2048 / self.threads;
        (by_smem.min(by_threads) as u64).min(target_blocks_per_sm(tuning))
    }

    fn smem(&self) -> u32 {
        (self.stages * self.bm * 64 * 2
            + 2 * self.bn * 64 * 2
            + self.stages * self.bn * 32
            + 16 * 4
            + 3 * 256 * 4) as u32
    }
}

fn mma_config(size: LinearPath, tuning: Tuning) -> MmaConfig {
    let deep = tuning != Tuning::Sm86;
    match size {
        LinearPath::MmaLarge => MmaConfig {
            name: if deep {
                "nf4_linear_mma_l4"
            } else {
                "nf4_linear_mma_l3"
            },
            bm: 128,
            bn: 128,
            threads: 256,
            stages: if deep { 4 } else { 3 },
        },
        LinearPath::MmaMedium => MmaConfig {
            name: if deep {
                "nf4_linear_mma_m4"
            } else {
                "nf4_linear_mma_m3"
            },
            bm: 64,
            bn: 128,
            threads: 256,
            stages: if deep { 4 } else { 3 },
        },
        _ => MmaConfig {
            name: "nf4_linear_mma_s4",
            bm: 64,
            bn: 64,
            threads: 128,
            stages: 4,
        },
    }
}

/// Development override of the K split of the tensor-core and wide paths
/// (`GPTOSS_3090_NF4_SPLITS`, 1 to 8; read once per process), for sweeps.
fn mma_splits_override() -> Result<Option<usize>> {
    static SPLITS: crate::ops::EnvCell<usize> = std::sync::OnceLock::new();
    crate::ops::env_count(
        &SPLITS,
        "GPTOSS_3090_NF4_SPLITS",
        "a count from 1 to 8",
        |n| (1..=8).contains(&n),
    )
}

/// Largest M served by the decode kernel.
pub const DECODE_MAX_M: i64 = 16;

/// Largest M served by the streaming kernel: up to 4 column tiles of 8 tokens (eight tiles
/// spill; kernels/nf4.cu `STR_LINEAR_MIN_BLOCKS_N4`).
pub const STREAM_MAX_M: i64 = 32;

/// Largest M served by the wide streaming kernel: eight column tiles of 8 tokens.
pub const WIDE_MAX_M: i64 = 64;

/// Dynamic shared memory of the wide kernel: the code-pair table with the warps' rings, then
/// two staged chunks of 64 tokens x 128 k (kernels/nf4.cu `WIDE_SMEM_BYTES`).
pub const WIDE_SMEM_BYTES: u32 = STR_TABLE_BYTES as u32 + 2 * 64 * 256;

/// Static shared memory of the wide kernel (three nested code maps).
const WIDE_STATIC_SMEM: u32 = 3 * 256 * 4;

/// Blocks of the wide kernel one SM of `tuning` holds by shared memory (1 KB per block is the
/// system's): two on an H100, one on an A100 and on sm_86/sm_89.
fn wide_blocks_per_sm(tuning: Tuning) -> u64 {
    (tuning.smem_per_sm() / (WIDE_SMEM_BYTES + WIDE_STATIC_SMEM + 1024)).max(1) as u64
}

/// K split of the wide kernel for `n` output rows and `chunks` 128-k chunks: about four chunks
/// per split (at most 8 splits), but no more blocks than the resident block slots (`resident`
/// per SM, `sms` SMs) hold in one wave. Each split adds an fp32 [M, N] partial to the
/// workspace. H100 sweep (session 17, M = 33-64): 6 of 23 chunks on vLLM's q/k/v (5120 rows;
/// 4 and 8 were 10-15% slower) and 8 of 32 on its o projection (2880 rows) were the fastest.
/// One wave, not one more: 5760 x 2880 (45 blocks) split 6 ways left 6 of its 270 blocks for a
/// second wave on 264 slots; 5 splits ran 14-15% faster at M = 33-64 (H200, session 23).
pub fn wide_k_split(n: u64, chunks: u64, sms: u64, resident: u64) -> u64 {
    let blocks = ceil_div(n, 16 * STR_WARPS as u64).max(1);
    let fill = sms.max(1) * resident.max(1) / blocks;
    chunks.div_ceil(4).clamp(1, 8).min(fill).max(1)
}

/// Knob (read on every call, so one process can compare both): `cluster` (the default) lets
/// the wide kernel sum its K splits inside thread-block clusters where the GPU has them
/// (sm_90, native tuning); `launch` keeps the fp32 workspace and the reduce launch (the only way
/// on sm_80-sm_89, and under a forced sm_86 tuning, which stands for a 3090).
pub const WIDE_REDUCE_ENV: &str = "GPTOSS_3090_WIDE_REDUCE";

/// The largest cluster the wide kernel is launched in (the portable limit; kernels/nf4.cu
/// `WIDE_CLUSTER_MAX_SPLITS`).
const WIDE_CLUSTER_MAX_SPLITS: u64 = 8;

/// [`WIDE_REDUCE_ENV`] for an explicit setting (`None` = unset): whether clusters may be used.
fn wide_cluster_for(setting: Option<&str>) -> Result<bool> {
    crate::ops::env_switch(setting, WIDE_REDUCE_ENV, ("launch", "cluster"), true)
}

/// Whether wide launches on `dev` sum their K splits in clusters (see [`WIDE_REDUCE_ENV`]).
pub fn wide_cluster_on(dev: &GpuDevice) -> Result<bool> {
    let wanted = wide_cluster_for(std::env::var(WIDE_REDUCE_ENV).ok().as_deref())?;
    Ok(wanted && crate::ops::sm90_launch_ok(dev, dev.tuning()))
}

/// The wide kernel's plan (shared by [`plan_linear`] and the launch, so that the workspace
/// a caller sizes from the plan is the one the launch uses). `cluster`: the split is summed in
/// thread-block clusters where it fits one (2 to 8 splits), so no workspace is needed.
fn plan_wide(
    m: i64,
    n: i64,
    k: i64,
    sm_count: u32,
    tuning: Tuning,
    cluster: bool,
) -> Result<LinearPlan> {
    if !(1..=WIDE_MAX_M).contains(&m) {
        return Err(Error::arg(format!(
            "the wide path serves 1 <= M <= {WIDE_MAX_M}, found M = {m}"
        )));
    }
    let chunks = stream_chunks(k as usize) as u64;
    // Enough splits that no block streams more than STREAM_MAX_CHUNKS chunks.
    let least = chunks.div_ceil(STREAM_MAX_CHUNKS as u64).max(1);
    let splits = match mma_splits_override()? {
        Some(forced) => {
            let forced = (forced as u64).min(chunks);
            if !stream_split_fits(chunks as usize, forced as usize) {
                return Err(Error::arg(format!(
                    "GPTOSS_3090_NF4_SPLITS={forced}: the wide path needs at least {least} \
                     K splits for K = {k} (at most {STREAM_MAX_CHUNKS} chunks of 128 per split)"
                )));
            }
            forced
        }
        None => wide_k_split(
            n as u64,
            chunks,
            sm_count as u64,
            wide_blocks_per_sm(tuning),
        )
        .max(least),
    };
    let gx = u32::try_from(ceil_div(n as u64, 16 * STR_WARPS as u64))
        .map_err(|_| Error::arg("N too large for one launch"))?;
    let in_cluster = cluster && splits <= WIDE_CLUSTER_MAX_SPLITS;
    Ok(LinearPlan {
        entry: "nf4_linear_wide",
        grid: (gx, splits as u32, 1),
        threads: 32 * STR_WARPS as u32,
        smem: WIDE_SMEM_BYTES,
        splits: splits as u32,
        workspace_floats: if splits > 1 && !in_cluster {
            splits * m as u64 * n as u64
        } else {
            0
        },
    })
}

/// The wide plan on `dev`: split K inside thread-block clusters ([`wide_cluster_on`]) only where
/// the GPU runs all of the launch's clusters at once (clusters live inside one GPC, so fewer of
/// them fit than blocks per SM times SMs suggest: H200, session 24, vLLM's q/k/v); otherwise
/// the plain plan with its workspace and reduce launch. The launch and [`plan_linear`]'s caller
/// both come here, so the workspace a caller sizes is the one the launch needs. A forced split
/// (`GPTOSS_3090_NF4_SPLITS`) keeps clusters wherever it has 2 to 8 splits.
///
/// `stream`: the stream the launch will use (0: none known). Inside CUDA-graph capture the
/// kernel must already be loaded (`warmup`), as for the launch itself.
pub fn plan_wide_on(dev: &GpuDevice, m: i64, n: i64, k: i64, stream: u64) -> Result<LinearPlan> {
    let cluster = wide_cluster_on(dev)?;
    let plan = plan_wide(m, n, k, dev.sm_count(), dev.tuning(), cluster)?;
    if !cluster || plan.workspace_floats > 0 || plan.splits < 2 || mma_splits_override()?.is_some()
    {
        return Ok(plan);
    }
    // The nested kernel holds the static code maps the plain one lacks: where it fits, both do.
    let f = if stream != 0 {
        dev.function_for_stream("nf4", "nf4_linear_wide_bf16", stream)?
    } else {
        dev.function("nf4", "nf4_linear_wide_bf16")?
    };
    let active = dev.max_active_clusters(&f, plan.splits, plan.threads, plan.smem)?;
    if active >= plan.grid.0 {
        Ok(plan)
    } else {
        plan_wide(m, n, k, dev.sm_count(), dev.tuning(), false)
    }
}

/// Whether a wide plan sums its K split inside clusters (no workspace for a split).
pub fn wide_plan_clustered(plan: &LinearPlan) -> bool {
    plan.splits > 1 && plan.workspace_floats == 0
}

/// Resolves the kernel and launch configuration for an [M, K] x [N, K]^T product.
///
/// Tensor-core launches whose grid would leave block slots idle split K over `gridDim.z` (the
/// split that minimises waves x k tiles per block, `auto_k_splits`); their fp32 partials go to
/// a workspace that `nf4_linear_splitk_reduce` sums in order (deterministic).
pub fn plan_linear(
    m: i64,
    n: i64,
    k: i64,
    sm_count: u32,
    tuning: Tuning,
    path: Option<LinearPath>,
) -> Result<LinearPlan> {
    let path = match path {
        Some(LinearPath::Auto) => {
            if m <= DECODE_MAX_M {
                LinearPath::Decode
            } else {
                auto_mma_size(m, n, sm_count)
            }
        }
        Some(p) => p,
        None => auto_mma_size(m, n, sm_count),
    };
    if path == LinearPath::Wide {
        // Without clusters: plan_wide_on decides those with the device.
        return plan_wide(m, n, k, sm_count, tuning, false);
    }
    if path == LinearPath::Decode || path == LinearPath::Stream {
        if m > DECODE_MAX_M {
            return Err(Error::arg(format!(
                "the decode path serves M <= {DECODE_MAX_M}, found M = {m}"
            )));
        }
        let entry = if m <= 8 {
            "nf4_linear_decode_m8"
        } else {
            "nf4_linear_decode_m16"
        };
        // Persistent blocks (two per SM) walk the 8-row tiles.
        let tiles = ceil_div(n as u64, 8);
        return Ok(LinearPlan {
            entry,
            grid: (tiles.min(2 * sm_count.max(1) as u64) as u32, 1, 1),
            threads: 256,
            // LUT 32 KB + 2 reduction buffers 8 KB + three nested maps 3 KB (DECODE_SMEM_BYTES).
            smem: 256 * 32 * 4 + 2 * 8 * 4 * 32 * 4 + 3 * 256 * 4,
            splits: 1,
            workspace_floats: 0,
        });
    }
    let c = mma_config(path, tuning);
    let gy = ceil_div(m as u64, c.bm as u64);
    if gy > 65535 {
        return Err(Error::arg(format!("M = {m} is too large for one launch")));
    }
    let gx = ceil_div(n as u64, c.bn as u64);
    let tiles = gx * gy;
    let nkt = (k / BLOCK).max(1) as u64;
    let sms = sm_count.max(1) as u64;
    let splits = match mma_splits_override()? {
        Some(forced) => (forced as u64).min(nkt),
        None => auto_k_splits(tiles, nkt, sms, c.resident_blocks(tuning)),
    };
    Ok(LinearPlan {
        entry: c.name,
        grid: (gx as u32, gy as u32, splits as u32),
        threads: c.threads,
        smem: c.smem(),
        splits: splits as u32,
        workspace_floats: if splits > 1 {
            splits * m as u64 * n as u64
        } else {
            0
        },
    })
}

/// Blocks per SM the automatic K split counts on at most: three of the `s4` tile fit an H100 or
/// A100 SM; a 3090's 100 KB SM holds fewer (`MmaConfig::resident_blocks`).
fn target_blocks_per_sm(tuning: Tuning) -> u64 {
    if tuning == Tuning::Sm86 {
        2
    } else {
        3
    }
}

/// What a wave of blocks costs beyond its k tiles, in k tiles: filling the copy pipeline and
/// the epilogue.
const WAVE_OVERHEAD_K_TILES: u64 = 4;

/// K split of a tensor-core launch of `tiles` output tiles over `nkt` k tiles, `resident`
/// blocks per SM. A block at these sizes is latency-bound (one k tile takes about the same
/// time whatever the SM's other blocks do), so the launch takes about waves x (k tiles per
/// block + WAVE_OVERHEAD_K_TILES); the split minimising that wins, the smaller on a tie (less
/// workspace traffic). The session-7 sweep's fastest forced splits (H100, `s4`, M = 32-128)
/// are these: 8 for 45 tiles, 4 for 80 or 90, 2 for 160. Launches that fill every slot do not
/// split; each split keeps at least 4 k tiles, and there are at most 8.
fn auto_k_splits(tiles: u64, nkt: u64, sms: u64, resident: u64) -> u64 {
    let slots = resident.max(1) * sms;
    if tiles >= slots {
        return 1;
    }
    let most = (nkt / 4).clamp(1, 8);
    let cost = |s: u64| ceil_div(tiles * s, slots) * (ceil_div(nkt, s) + WAVE_OVERHEAD_K_TILES);
    (1..=most).min_by_key(|&s| (cost(s), s)).unwrap_or(1)
}

fn auto_mma_size(m: i64, n: i64, sm_count: u32) -> LinearPath {
    let blocks = |bm: i64, bn: i64| ceil_div(m as u64, bm as u64) * ceil_div(n as u64, bn as u64);
    let sms = sm_count as u64;
    if blocks(128, 128) >= sms {
        LinearPath::MmaLarge
    } else if blocks(64, 128) >= sms {
        LinearPath::MmaMedium
    } else {
        LinearPath::MmaSmall
    }
}

/// Arguments of [`linear`] besides the weight segments.
#[derive(Debug, Clone, Copy)]
pub struct LinearArgs {
    /// [M, K] activations.
    pub x: u64,
    /// Row stride of x (elements).
    pub ldx: i64,
    /// Rows of x.
    pub m: i64,
    /// Input features.
    pub k: i64,
    /// [M, N] output.
    pub y: u64,
    /// Row stride of y (elements).
    pub ldy: i64,
    /// [N] bias or 0.
    pub bias: u64,
    /// Activation / output dtype.
    pub dtype: Dtype,
}

/// y = x W^T + b with W given as 1..=3 NF4 segments (rows concatenated). Returns the plan used.
///
/// # Safety
/// Every pointer must be a live device allocation of the documented size on `dev`, and
/// `stream` a stream of `dev`'s primary context.
pub unsafe fn linear(
    dev: &GpuDevice,
    segments: &[Segment],
    a: &LinearArgs,
    path: Option<LinearPath>,
    workspace: (u64, u64),
    stream: u64,
) -> Result<LinearPlan> {
    let mut params = linear_params(segments, a)?;
    let streamable = stream_eligible(segments, a.k);
    let wants_stream = match path {
        Some(LinearPath::Stream) => true,
        Some(LinearPath::Auto) => a.m <= STREAM_MAX_M && streamable,
        _ => false,
    };
    if wants_stream {
        // M beyond the kernel's tiles: stream_entry (in linear_stream) names the bound.
        if !streamable {
            return Err(Error::arg(format!(
                "the stream path needs segments of 16-row multiples with one absmax format \
                 (all nested or all plain) and K <= {STREAM_MAX_K}"
            )));
        }
        // SAFETY: forwarded contract.
        return unsafe { linear_stream(dev, &mut params, a, stream) };
    }
    if path == Some(LinearPath::Wide) {
        if !streamable {
            return Err(Error::arg(format!(
                "the wide path needs segments of 16-row multiples with one absmax format \
                 (all nested or all plain) and K <= {STREAM_MAX_K}"
            )));
        }
        // SAFETY: forwarded contract.
        return unsafe { linear_wide(dev, &mut params, a, workspace, stream) };
    }
    let plan = plan_linear(
        a.m,
        params.n as i64,
        a.k,
        dev.sm_count(),
        dev.tuning(),
        path,
    )?;
    let reduce = attach_split_workspace(&mut params, &plan, workspace)?;
    let f = dev.function_for_stream("nf4", &a.dtype.entry(plan.entry), stream)?;
    // SAFETY: forwarded contract; params mirrors Nf4LinearParams.
    unsafe {
        dev.launch(
            &f,
            plan.grid,
            (plan.threads, 1, 1),
            plan.smem,
            stream,
            &params,
        )?;
    }
    if let Some(reduce) = reduce {
        // SAFETY: forwarded contract; the main launch wrote ws [splits][M][N].
        unsafe { launch_splitk_reduce(dev, &params, a, reduce, stream)? };
    }
    Ok(plan)
}

/// Sets the split count of `params` from `plan` and, for a split launch, checks the caller's
/// fp32 workspace `(pointer, floats)` against the plan, attaches it and returns the reduce
/// kernel that must follow (chosen here, so that a bad setting fails before the split launch).
fn attach_split_workspace(
    params: &mut Nf4LinearParams,
    plan: &LinearPlan,
    workspace: (u64, u64),
) -> Result<Option<SplitReduce>> {
    params.splits = plan.splits as i32;
    if plan.splits <= 1 {
        return Ok(None);
    }
    let vec = splitk_reduce_vec_for(std::env::var(SPLITK_REDUCE_ENV).ok().as_deref())?
        && splitk_reduce_vec_fits(params.n, params.splits);
    let (ws, ws_floats) = workspace;
    check_ptr("split-K workspace", ws, 16)?;
    if ws_floats < plan.workspace_floats {
        return Err(Error::arg(format!(
            "split-K workspace: expected >= {} float32 elements, found {ws_floats}",
            plan.workspace_floats
        )));
    }
    params.ws = ws;
    Ok(Some(if vec {
        SplitReduce::Vec4
    } else {
        SplitReduce::Scalar
    }))
}

/// The kernel that sums a split launch's partials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitReduce {
    /// `nf4_linear_splitk_reduce`: one output per thread.
    Scalar,
    /// `nf4_linear_splitk_reduce_v4`: four outputs of one row per thread.
    Vec4,
}

/// Knob (read on every call, so one process can compare both): `vec` (the default) sums the
/// split-K partials with `nf4_linear_splitk_reduce_v4` (four outputs per thread, 16-byte loads,
/// the same order: bit-identical) where N is a multiple of 4 and the split at most 8; `scalar`
/// keeps one output per thread. H200, session 22, the wide linear at M = 33-64: 2-6% faster on
/// vLLM's q/k/v and on 5760x2880, level to 2% slower on the o projection (2880x4096).
pub const SPLITK_REDUCE_ENV: &str = "GPTOSS_3090_SPLITK_REDUCE";

/// Largest K split the vectorised reduce sums (kernels/nf4.cu `SPLITK_REDUCE_MAX_SPLITS`).
const SPLITK_REDUCE_MAX_SPLITS: i32 = 8;

/// [`SPLITK_REDUCE_ENV`] for an explicit setting (`None` = unset): whether to vectorise.
fn splitk_reduce_vec_for(setting: Option<&str>) -> Result<bool> {
    crate::ops::env_switch(setting, SPLITK_REDUCE_ENV, ("scalar", "vec"), true)
}

/// Whether the vectorised reduce serves `n` output columns summed over `splits` partials.
fn splitk_reduce_vec_fits(n: i32, splits: i32) -> bool {
    n % 4 == 0 && (1..=SPLITK_REDUCE_MAX_SPLITS).contains(&splits)
}

/// `nf4_linear_splitk_reduce`: y = cast(sum over the splits of ws [splits][M][N] in order +
/// bias), after a split launch of the tensor-core or wide path.
///
/// # Safety
/// As [`linear`], and `params.ws` must hold the partials of a finished split launch.
unsafe fn launch_splitk_reduce(
    dev: &GpuDevice,
    params: &Nf4LinearParams,
    a: &LinearArgs,
    reduce: SplitReduce,
    stream: u64,
) -> Result<()> {
    let (entry, per_thread) = match reduce {
        SplitReduce::Scalar => ("nf4_linear_splitk_reduce", 1),
        SplitReduce::Vec4 => ("nf4_linear_splitk_reduce_v4", 4),
    };
    let r = dev.function_for_stream("nf4", &a.dtype.entry(entry), stream)?;
    let total = a.m as u64 * params.n as u64 / per_thread;
    // Four outputs per thread in blocks of 64: as many blocks as the scalar form's, so that a
    // small reduce (vLLM's o projection, M = 33: 93 blocks of 256) still spreads over the SMs.
    let threads = 256 / per_thread;
    let blocks = ceil_div(total, threads)
        .min(dev.sm_count() as u64 * 16 * per_thread)
        .max(1) as u32;
    // SAFETY: forwarded contract; the reduce reads ws [splits][M][N] and writes y, after its
    // pdl_wait.
    unsafe {
        dev.launch_ex(
            &r,
            (blocks, 1, 1),
            (threads as u32, 1, 1),
            0,
            stream,
            params,
            crate::ops::pdl_launch(dev, dev.tuning(), crate::ops::PdlFamily::Linear)?,
        )
    }
}

/// Whether the streaming kernel can serve this weight: every segment a multiple of 16 rows (a
/// warp's row group never straddles two), one absmax format for all, and K within the
/// streaming kernels' bound ([`STREAM_MAX_K`]).
pub fn stream_eligible(segments: &[Segment], k: i64) -> bool {
    stream_k_fits(stream_chunks(k as usize))
        && !segments.is_empty()
        && segments.iter().all(|s| s.rows % 16 == 0)
        && segments
            .iter()
            .all(|s| s.stats.nested == segments[0].stats.nested)
}

/// The streaming kernel (without the dtype suffix) for `m` tokens: 1, 2 or 4 column tiles of 8
/// tokens, so that every token fits one pass and the weights stream once.
pub fn stream_entry(m: i64, nested: bool) -> Result<&'static str> {
    Ok(match ((m + 7) / 8, nested) {
        (1, true) => "nf4_linear_str_n1",
        (1, false) => "nf4_linear_str_n1_plain",
        (2, true) => "nf4_linear_str_n2",
        (2, false) => "nf4_linear_str_n2_plain",
        (3 | 4, true) => "nf4_linear_str_n4",
        (3 | 4, false) => "nf4_linear_str_n4_plain",
        _ => {
            return Err(Error::arg(format!(
                "the stream path serves 1 <= M <= {STREAM_MAX_M}, found M = {m}"
            )))
        }
    })
}

/// The streaming launch of [`linear`] (M <= [`STREAM_MAX_M`], [`stream_eligible`] weights).
///
/// # Safety
/// As [`linear`].
unsafe fn linear_stream(
    dev: &GpuDevice,
    params: &mut Nf4LinearParams,
    a: &LinearArgs,
    stream: u64,
) -> Result<LinearPlan> {
    let entry = stream_entry(a.m, params.seg[0].nested != 0)?;
    let f = dev.function_for_stream("nf4", &a.dtype.entry(entry), stream)?;
    let threads = 32 * STR_WARPS as u32;
    // The tuning's residency: padded so that a forced sm86 holds a 3090's blocks per SM.
    let held = residency(dev, &f, threads, STR_TABLE_BYTES as u32, dev.tuning())?;
    let smem = held.launch_smem;
    let resident = held.per_sm * dev.sm_count() as usize;
    let n = params.n as usize;
    let chunks = stream_chunks(a.k as usize);
    let ks = stream_split(n / 16, chunks, resident)?;
    params.str_ks = ks as i32;
    let grid = (
        u32::try_from(n.div_ceil(16 * (STR_WARPS / ks)))
            .map_err(|_| Error::arg("N too large for one launch"))?,
        1,
        1,
    );
    // SAFETY: forwarded contract; params mirrors Nf4LinearParams and the grid covers N / 16
    // row groups of (8 / ks) per block; the kernel reads x and writes y after its pdl_wait.
    let opts = crate::ops::pdl_launch(dev, dev.tuning(), crate::ops::PdlFamily::Linear)?;
    unsafe { dev.launch_ex(&f, grid, (threads, 1, 1), smem, stream, &*params, opts)? };
    Ok(LinearPlan {
        entry,
        grid,
        threads,
        smem,
        splits: 1,
        workspace_floats: 0,
    })
}

/// The wide streaming launch of [`linear`] (M <= [`WIDE_MAX_M`], [`stream_eligible`]
/// weights), then the split-K reduce where the plan splits K.
///
/// # Safety
/// As [`linear`].
unsafe fn linear_wide(
    dev: &GpuDevice,
    params: &mut Nf4LinearParams,
    a: &LinearArgs,
    workspace: (u64, u64),
    stream: u64,
) -> Result<LinearPlan> {
    let mut plan = plan_wide_on(dev, a.m, params.n as i64, a.k, stream)?;
    let entry = if params.seg[0].nested != 0 {
        "nf4_linear_wide"
    } else {
        "nf4_linear_wide_plain"
    };
    let f = dev.function_for_stream("nf4", &a.dtype.entry(entry), stream)?;
    // A forced sm86 tuning pads the shared memory so that this GPU holds a 3090's one block.
    plan.smem = residency(dev, &f, plan.threads, plan.smem, dev.tuning())?.launch_smem;
    let mut opts = crate::ops::pdl_launch(dev, dev.tuning(), crate::ops::PdlFamily::Linear)?;
    let reduce = if wide_plan_clustered(&plan) {
        params.splits = plan.splits as i32;
        params.wide_cluster = 1;
        opts.cluster_y = plan.grid.1;
        None
    } else {
        attach_split_workspace(params, &plan, workspace)?
    };
    // SAFETY: forwarded contract; params mirrors Nf4LinearParams, the grid covers N / 16 row
    // groups of 8 per block and `splits` K ranges (one cluster per 128-row tile where the
    // clusters sum them); the kernel reads x and writes y or ws after its pdl_wait.
    unsafe {
        dev.launch_ex(
            &f,
            plan.grid,
            (plan.threads, 1, 1),
            plan.smem,
            stream,
            &*params,
            opts,
        )?
    };
    if let Some(reduce) = reduce {
        // SAFETY: forwarded contract; the main launch wrote ws [splits][M][N].
        unsafe { launch_splitk_reduce(dev, params, a, reduce, stream)? };
    }
    plan.entry = entry;
    Ok(plan)
}

/// Validates the arguments of [`linear`] and builds its params (no GPU needed).
pub fn linear_params(segments: &[Segment], a: &LinearArgs) -> Result<Nf4LinearParams> {
    if segments.is_empty() || segments.len() > MAX_SEGMENTS {
        return Err(Error::arg(format!(
            "a weight has 1..={MAX_SEGMENTS} segments, found {}",
            segments.len()
        )));
    }
    if a.m < 1 {
        return Err(Error::arg(format!("x must have >= 1 row, found {}", a.m)));
    }
    if a.k < BLOCK || a.k % BLOCK != 0 {
        return Err(Error::arg(format!(
            "in_features K must be a positive multiple of 64 (NF4 blocks must not straddle rows), found {}",
            a.k
        )));
    }
    check_ptr("x", a.x, 16)?;
    check_row_stride("x", a.ldx, a.k)?;
    check_ptr("y", a.y, 4)?;
    check_opt_ptr("bias", a.bias, 2)?;
    let mut params = Nf4LinearParams::default();
    let mut n: i64 = 0;
    for (i, s) in segments.iter().enumerate() {
        let what = format!("segment {i}");
        s.stats.check(&what)?;
        if s.rows < 1 {
            return Err(Error::arg(format!(
                "{what}: rows must be >= 1, found {}",
                s.rows
            )));
        }
        params.seg[i] = s.stats.params(to_i32("segment rows", s.rows)?);
        n += s.rows;
    }
    if a.ldy < n {
        return Err(Error::arg(format!(
            "y row stride must be >= N = {n}, found {}",
            a.ldy
        )));
    }
    params.x = a.x;
    params.y = a.y;
    params.bias = a.bias;
    params.ldx = a.ldx;
    params.ldy = a.ldy;
    params.m = to_i32("M", a.m)?;
    params.n = to_i32("N", n)?;
    params.k = to_i32("K", a.k)?;
    params.n_segments = segments.len() as i32;
    params.splits = 1;
    params.str_ks = 1;
    // Row offsets of packed data and absmax are computed in 64 bits in the kernels.
    Ok(params)
}

/// Input element type of [`quantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantInput {
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
    /// float32.
    F32,
}

impl QuantInput {
    /// Parses `bfloat16`, `float16` or `float32` (optionally `torch.`-prefixed).
    pub fn parse(text: &str) -> Result<QuantInput> {
        match text.trim().trim_start_matches("torch.") {
            "bfloat16" | "bf16" => Ok(QuantInput::Bf16),
            "float16" | "f16" | "half" => Ok(QuantInput::F16),
            "float32" | "f32" | "float" => Ok(QuantInput::F32),
            other => Err(Error::arg(format!(
                "weight dtype '{other}': expected bfloat16, float16 or float32"
            ))),
        }
    }

    fn entry(self) -> &'static str {
        match self {
            QuantInput::Bf16 => "nf4_quantize_blocks_bf16",
            QuantInput::F16 => "nf4_quantize_blocks_f16",
            QuantInput::F32 => "nf4_quantize_blocks_f32",
        }
    }

    fn align(self) -> u64 {
        match self {
            QuantInput::F32 => 4,
            _ => 2,
        }
    }
}

/// Output and workspace pointers of [`quantize`].
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantizeOut {
    /// u8 [ceil(n/2)].
    pub packed: u64,
    /// f32 [nb]: the absmax output (plain) or workspace (nested).
    pub absmax: u64,
    /// u8 [nb] nested codes (nested only).
    pub codes: u64,
    /// f32 [ceil(nb/256)] (nested only).
    pub nested_absmax: u64,
    /// f32 [256] signed dynamic map input (nested only).
    pub nested_map: u64,
    /// f32 [1] offset output (nested only).
    pub offset: u64,
}

/// Quantizes `n` values with bitsandbytes' CUDA semantics (see kernels/nf4.cu).
///
/// # Safety
/// Every pointer must be a live device allocation of the documented size on `dev`, and
/// `stream` a stream of `dev`'s primary context.
pub unsafe fn quantize(
    dev: &GpuDevice,
    input: u64,
    kind: QuantInput,
    n: i64,
    nested: bool,
    out: &QuantizeOut,
    stream: u64,
) -> Result<()> {
    let params = quantize_params(input, kind, n, nested, out)?;
    let nb = params.nb;
    let f = dev.function_for_stream("nf4", kind.entry(), stream)?;
    let grid = ceil_div(nb as u64, 8);
    // SAFETY: forwarded contract; params mirrors Nf4QuantizeParams.
    unsafe { dev.launch(&f, (grid as u32, 1, 1), (256, 1, 1), 0, stream, &params)? };
    if nested {
        let fm = dev.function_for_stream("nf4", "nf4_quantize_mean", stream)?;
        let fn_ = dev.function_for_stream("nf4", "nf4_quantize_nested", stream)?;
        let nnb = ceil_div(nb as u64, NESTED_BLOCK as u64);
        // SAFETY: as above.
        unsafe {
            dev.launch(&fm, (1, 1, 1), (1024, 1, 1), 0, stream, &params)?;
            dev.launch(&fn_, (nnb as u32, 1, 1), (256, 1, 1), 0, stream, &params)?;
        }
    }
    Ok(())
}

/// Validates the arguments of [`quantize`] and builds its params (no GPU needed).
pub fn quantize_params(
    input: u64,
    kind: QuantInput,
    n: i64,
    nested: bool,
    out: &QuantizeOut,
) -> Result<Nf4QuantizeParams> {
    check_ptr("weight", input, kind.align())?;
    check_ptr("packed", out.packed, 1)?;
    check_ptr("absmax", out.absmax, 4)?;
    if n < 1 {
        return Err(Error::arg(format!(
            "weight must have >= 1 element, found {n}"
        )));
    }
    if nested {
        check_ptr("absmax codes", out.codes, 1)?;
        check_ptr("nested_absmax", out.nested_absmax, 4)?;
        check_ptr("nested_quant_map", out.nested_map, 4)?;
        check_ptr("nested_offset", out.offset, 4)?;
    }
    let nb = ceil_div(n as u64, BLOCK as u64) as i64;
    if ceil_div(nb as u64, 8) > i32::MAX as u64 {
        return Err(Error::arg(format!("weight of {n} elements is too large")));
    }
    Ok(Nf4QuantizeParams {
        input,
        packed: out.packed,
        absmax: out.absmax,
        codes: out.codes,
        nested_absmax: out.nested_absmax,
        nested_map: out.nested_map,
        offset: out.offset,
        n,
        nb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_kernel_structs() {
        // The .cu static_asserts the same sizes; both must change together.
        assert_eq!(std::mem::size_of::<Nf4TensorParams>(), 56);
        assert_eq!(std::mem::size_of::<Nf4DequantParams>(), 80);
        assert_eq!(std::mem::size_of::<Nf4DequantSegsParams>(), 3 * 80 + 24);
        assert_eq!(std::mem::size_of::<Nf4LinearParams>(), 248);
        assert_eq!(std::mem::size_of::<Nf4QuantizeParams>(), 72);
        assert_eq!(std::mem::align_of::<Nf4LinearParams>(), 8);
    }

    #[test]
    fn splitk_reduce_knob_parses_and_fits() -> Result<()> {
        assert!(splitk_reduce_vec_for(None)?);
        assert!(!splitk_reduce_vec_for(Some(" scalar "))?);
        assert!(splitk_reduce_vec_for(Some("vec"))?);
        let err = splitk_reduce_vec_for(Some("fast")).unwrap_err().to_string();
        assert!(
            err.contains("GPTOSS_3090_SPLITK_REDUCE") && err.contains("scalar or vec (default)")
        );
        assert!(splitk_reduce_vec_fits(5120, 6));
        assert!(splitk_reduce_vec_fits(128, 8));
        assert!(!splitk_reduce_vec_fits(130, 2)); // rows of 4 outputs would straddle rows
        assert!(!splitk_reduce_vec_fits(128, 9)); // beyond the kernel's unrolled partials
        assert!(!splitk_reduce_vec_fits(128, 0));
        Ok(())
    }

    #[test]
    fn wide_plans_split_k_about_four_chunks_each() -> Result<()> {
        // H100 (132 SMs, 2 blocks each): vLLM's q/k/v (5120 x 2880: 40 blocks, 23 chunks) and
        // o (2880 x 4096: 23 blocks, 32 chunks) take the sweep's fastest splits.
        assert_eq!(wide_k_split(5120, 23, 132, 2), 6);
        assert_eq!(wide_k_split(2880, 32, 132, 2), 8);
        // 5760 rows (45 blocks): 5 splits fill 225 of 264 slots; 6 would need a second wave.
        assert_eq!(wide_k_split(5760, 23, 132, 2), 5);
        // 82 SMs of one block each (a 3090, where `auto` runs the tensor-core path at M > 32
        // and the wide kernel only when asked for): q/k/v splits 2 ways (80 blocks), not 3.
        assert_eq!(wide_k_split(5120, 23, 82, 1), 2);
        // A grid that already fills the GPU does not split; nor does a short K.
        assert_eq!(wide_k_split(128 * 300, 23, 132, 2), 1);
        assert_eq!(wide_k_split(128, 2, 132, 2), 1);
        let plan = plan_wide(64, 5120, 2880, 132, Tuning::Sm90, false)?;
        assert_eq!(plan.grid, (40, 6, 1));
        assert_eq!(plan.workspace_floats, 6 * 64 * 5120);
        assert_eq!(plan.smem, WIDE_SMEM_BYTES);
        // One block per SM by shared memory on an A100 and a 3090.
        assert_eq!(wide_blocks_per_sm(Tuning::Sm90), 2);
        assert_eq!(wide_blocks_per_sm(Tuning::Sm80), 1);
        assert_eq!(wide_blocks_per_sm(Tuning::Sm86), 1);
        assert!(plan_wide(65, 5120, 2880, 132, Tuning::Sm90, false).is_err());
        assert_eq!(LinearPath::parse("wide")?, Some(LinearPath::Wide));
        let single = plan_linear(64, 5120, 256, 132, Tuning::Sm90, Some(LinearPath::Wide))?;
        assert_eq!((single.splits, single.workspace_floats), (1, 0));
        // A grid that fills the GPU still splits a long K: at most 64 chunks per split
        // (K = 16384: 128 chunks, 2 splits).
        let long = plan_wide(64, 128 * 300, 16384, 132, Tuning::Sm90, false)?;
        assert_eq!(long.splits, 2);
        Ok(())
    }

    #[test]
    fn clustered_wide_plans_need_no_workspace() -> Result<()> {
        // vLLM's q/k/v at M = 64 on an H100: 6 splits, summed in clusters of 6 (where the
        // device runs 40 of them at once: plan_wide_on).
        let plan = plan_wide(64, 5120, 2880, 132, Tuning::Sm90, true)?;
        assert_eq!((plan.grid, plan.workspace_floats), ((40, 6, 1), 0));
        assert!(wide_plan_clustered(&plan));
        let o = plan_wide(64, 2880, 4096, 132, Tuning::Sm90, true)?;
        assert_eq!((o.splits, o.workspace_floats), (8, 0));
        // plan_linear plans without clusters.
        let o = plan_linear(64, 2880, 4096, 132, Tuning::Sm90, Some(LinearPath::Wide))?;
        assert_eq!((o.splits, o.workspace_floats), (8, 8 * 64 * 2880));
        // Without clusters the same plan sizes the workspace.
        let plain = plan_wide(64, 5120, 2880, 132, Tuning::Sm90, false)?;
        assert_eq!(plain.workspace_floats, 6 * 64 * 5120);
        assert!(!wide_plan_clustered(&plain));
        Ok(())
    }

    #[test]
    fn wide_reduce_knob_parses() -> Result<()> {
        assert!(wide_cluster_for(None)?);
        assert!(wide_cluster_for(Some(" cluster"))?);
        assert!(!wide_cluster_for(Some("launch"))?);
        let err = wide_cluster_for(Some("dsmem")).unwrap_err().to_string();
        assert!(
            err.contains(WIDE_REDUCE_ENV) && err.contains("launch"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn streaming_paths_need_k_within_the_stream_bound() {
        let seg = |rows: i64| Segment {
            rows,
            stats: Nf4Stats {
                nested: true,
                ..Nf4Stats::default()
            },
        };
        assert!(stream_eligible(&[seg(4096), seg(512)], 2880));
        assert!(stream_eligible(&[seg(16)], 65536));
        assert!(!stream_eligible(&[seg(16)], 65536 + 64));
        assert!(!stream_eligible(&[seg(8)], 2880));
    }

    #[test]
    fn dequantize_segments_split_the_grid_in_order() -> Result<()> {
        let seg = |numel: i64| DequantSegment {
            stats: Nf4Stats {
                packed: 1 << 20,
                absmax: 2 << 20,
                ..Default::default()
            },
            numel,
            out: 3 << 20,
        };
        // vLLM's q/k/v of GPT-OSS: 4096, 512 and 512 rows of 2880, on 132 SMs.
        let p =
            dequantize_segments_params(&[seg(4096 * 2880), seg(512 * 2880), seg(512 * 2880)], 132)?;
        assert_eq!(p.n_segments, 3);
        assert_eq!(p.first_block, [0, 1440, 1620, 1800]);
        assert_eq!(p.seg[1].numel, 512 * 2880);
        // Past the cap a segment's blocks stride over it, as dequantize's do.
        let big = dequantize_segments_params(&[seg(1 << 30)], 132)?;
        assert_eq!(big.first_block[1], 132 * 64);
        assert!(dequantize_segments_params(&[], 132).is_err());
        assert!(dequantize_segments_params(&[seg(64); 4], 132).is_err());
        let mut bad = seg(64);
        bad.out = 3;
        let err = dequantize_segments_params(&[seg(64), bad], 132)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("segment 1"), "{err}");
        Ok(())
    }

    #[test]
    fn mma_smem_matches_the_kernel() {
        let s = |p, t| mma_config(p, t).smem();
        assert_eq!(s(LinearPath::MmaLarge, Tuning::Sm90), 117_824);
        assert_eq!(s(LinearPath::MmaLarge, Tuning::Sm86), 97_344);
        assert_eq!(s(LinearPath::MmaMedium, Tuning::Sm80), 85_056);
        assert_eq!(s(LinearPath::MmaMedium, Tuning::Sm86), 72_768);
        assert_eq!(s(LinearPath::MmaSmall, Tuning::Sm86), 60_480);
        for p in [
            LinearPath::MmaLarge,
            LinearPath::MmaMedium,
            LinearPath::MmaSmall,
        ] {
            assert!(s(p, Tuning::Sm86) <= Tuning::Sm86.smem_budget(), "{p:?}");
        }
    }

    #[test]
    fn stream_entries_hold_every_token_in_one_pass() {
        for (m, want) in [
            (1, "n1"),
            (8, "n1"),
            (9, "n2"),
            (16, "n2"),
            (17, "n4"),
            (32, "n4"),
        ] {
            assert_eq!(
                stream_entry(m, true).unwrap(),
                format!("nf4_linear_str_{want}")
            );
            assert_eq!(
                stream_entry(m, false).unwrap(),
                format!("nf4_linear_str_{want}_plain")
            );
        }
        for m in [0, 33, 64] {
            assert!(stream_entry(m, true).is_err(), "M = {m}");
        }
    }

    #[test]
    fn plans() {
        let p = plan_linear(1, 5760, 2880, 132, Tuning::Sm90, Some(LinearPath::Auto)).unwrap();
        assert_eq!(p.entry, "nf4_linear_decode_m8");
        assert_eq!(p.grid.0, 264);
        let p = plan_linear(16, 5760, 2880, 132, Tuning::Sm90, Some(LinearPath::Auto)).unwrap();
        assert_eq!(p.entry, "nf4_linear_decode_m16");
        assert_eq!(p.grid.0, 264);
        assert_eq!(p.smem, 44_032);
        let p = plan_linear(2048, 5760, 2880, 132, Tuning::Sm86, Some(LinearPath::Auto)).unwrap();
        assert_eq!(p.entry, "nf4_linear_mma_l3");
        assert_eq!(p.grid, (45, 16, 1));
        let p = plan_linear(64, 5760, 2880, 132, Tuning::Sm90, Some(LinearPath::Auto)).unwrap();
        assert_eq!(p.entry, "nf4_linear_mma_s4");
        assert_eq!(p.splits, 4);
        assert_eq!(p.grid, (90, 1, 4));
        assert_eq!(p.workspace_floats, 4 * 64 * 5760);
        let p = plan_linear(2048, 5760, 2880, 132, Tuning::Sm86, Some(LinearPath::Auto)).unwrap();
        assert_eq!((p.splits, p.workspace_floats), (1, 0));
        assert!(plan_linear(17, 64, 2880, 132, Tuning::Sm90, Some(LinearPath::Decode)).is_err());
    }

    #[test]
    fn k_splits_minimise_waves_times_k_tiles() {
        let splits = |m, n, k, tuning| {
            let p = plan_linear(m, n, k, 132, tuning, Some(LinearPath::Auto)).unwrap();
            (p.entry, p.splits)
        };
        // The session-7 sweep's fastest forced splits (H100): o at M = 64 (45 tiles) 8, q/k/v
        // at M = 64 (80 tiles) 4 and at M = 128 (160 tiles) 2.
        for (m, n, k, want) in [
            (64, 2880, 4096, 8),
            (64, 5120, 2880, 4),
            (128, 5120, 2880, 2),
            (128, 2880, 4096, 4),
            (128, 5760, 2880, 2),
        ] {
            let got = splits(m, n, k, Tuning::Sm90);
            assert_eq!(got, ("nf4_linear_mma_s4", want), "{n}x{k} M = {m}");
        }
        // Enough tiles for a full wave: no split.
        assert_eq!(splits(2048, 5760, 2880, Tuning::Sm90).1, 1);
        // A 3090's SM holds one `s4` block (59 KB of its 100 KB): 82 SMs, 45 tiles of 64 k
        // tiles: 5 splits take 3 waves of 13 (+ 4) k tiles, 2 splits 2 waves of 32 (+ 4).
        assert_eq!(auto_k_splits(45, 64, 82, 1), 5);
        assert_eq!(splits(64, 2880, 4096, Tuning::Sm86).1, 5);
        // Short K: every split keeps at least 4 k tiles.
        assert_eq!(auto_k_splits(10, 8, 132, 3), 2);
        assert_eq!(auto_k_splits(10, 2, 132, 3), 1);
        // Ties go to the smaller split: 100 slots, 36 tiles of 40 k tiles: 2 splits (one wave
        // of 20 + 4) or 5 (two waves of 8 + 4).
        assert_eq!(auto_k_splits(36, 40, 100, 1), 2);
        assert!(LinearPath::parse("bogus").is_err());
    }
}
