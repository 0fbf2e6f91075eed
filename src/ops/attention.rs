//! Attention launchers: KV-cache write, varlen (prefill / mixed) attention and split-KV decode
//! (with its in-kernel combine), for GPT-OSS (learned per-head sinks, optional sliding window,
//! GQA, head_dim 64) over vLLM 0.26's paged KV cache or plain `[T, H, 64]` tensors.
//! Kernels: `kernels/attention.cu`.
//!
//! # Dispatch ([`forward`])
//! With `G = num_q_heads / num_kv_heads` (a power of two <= 16), the decode kernel packs the
//! `q_len * G` query rows of one KV head into one 16-row mma tile, so it serves requests with
//! `q_len <= 16 / G` (plain decode, and 2-token speculative steps for G = 8). Requests with longer
//! queries go to the FlashAttention-2 style varlen kernel. A batch whose `max_query_len` fits the
//! decode kernel launches only the decode path; otherwise both kernels are launched over the whole
//! batch and each skips the requests of the other kind (the grids depend only on the token and
//! request counts, never on device data).
//!
//! # Split-KV
//! The decode grid is `(num_reqs, num_kv_heads, splits)`; [`decode_splits`] picks `splits` from
//! the request count, the SM count, an upper bound of the context length and the workspace size.
//! Each CTA derives its key range from the request's `seq_len` at run time, so one captured CUDA
//! graph serves every context length (splits that find no keys write an empty partial). With one
//! split the decode kernel writes the output itself; with more, every CTA writes its partial to
//! the workspace and the last CTA of each (request, KV head) to arrive (an atomic counter in the
//! workspace, reset by that CTA) merges the partials and the sink, all in the same launch.
//!
//! # Workspace
//! One fp32 buffer sized by [`workspace_floats`] for a number of (request, split) pairs: the
//! arrival counters (u32, must start at zero: allocate it zeroed), then the partial accumulators
//! `[rows][64]` and `(max, sum)` pairs `[rows][2]`. It depends only on constants, so one buffer
//! serves every batch and every captured graph; launches that share it must be stream-ordered.
use std::sync::atomic::{AtomicI64, Ordering};

use crate::cuda::{GpuDevice, Tuning};
use crate::error::{Error, Result};
use crate::ops::{ceil_div, check_opt_ptr, check_ptr, to_i32, Dtype};

/// Kernel family name (`kernels/attention.cu`).
pub const SOURCE: &str = "attention";
/// The only head size the kernels support.
pub const HEAD_DIM: i64 = 64;
/// Rows of the decode kernel's mma tile (`q_len * G` must fit).
pub const DECODE_ROWS: i64 = 16;
/// Floats per workspace row: 64 accumulator values + (max, sum).
pub const WS_FLOATS_PER_ROW: i64 = HEAD_DIM + 2;
/// Fewest keys one planned decode split covers of the context bound `max_seq_len`: it bounds the
/// split count (the grid, fixed when a graph is captured).
pub const MIN_KEYS_PER_SPLIT: i64 = 256;
/// Fewest keys a decode split takes at run time, unless overridden ([`run_min_keys_per_split`]):
/// a context shorter than the bound fills only the first splits, the rest exit at once.
pub const RUN_MIN_KEYS_PER_SPLIT: i64 = 256;
/// The decode grid aims at this many CTAs per SM (measured on H100: one to two CTAs per SM of
/// long splits beat many short ones, whose partials and merge cost more than they save).
const TARGET_CTAS_PER_SM: i64 = 2;

// Benchmark/tuning overrides (0 = automatic), set through `attention_set_overrides`.
static SPLITS_OVERRIDE: AtomicI64 = AtomicI64::new(0);
static STAGES_OVERRIDE: AtomicI64 = AtomicI64::new(0);
static VARLEN_ROWS_OVERRIDE: AtomicI64 = AtomicI64::new(0);
static MIN_KEYS_OVERRIDE: AtomicI64 = AtomicI64::new(0);

/// Fewest keys a decode split takes at run time: [`RUN_MIN_KEYS_PER_SPLIT`] or the override.
pub fn run_min_keys_per_split() -> i64 {
    match MIN_KEYS_OVERRIDE.load(Ordering::Relaxed) {
        0 => RUN_MIN_KEYS_PER_SPLIT,
        n => n,
    }
}

/// Forces the decode split count, the decode pipeline depth (2 to 4), the varlen tile rows
/// (64 or 128) and the fewest keys a decode split takes at run time (a multiple of 16, 16 to
/// 4096) for every later launch (`None` = automatic). A benchmarking and tuning hook: the split count is still
/// capped by [`MAX_SPLITS`] and the workspace.
pub fn set_overrides(
    splits: Option<i64>,
    decode_stages: Option<i64>,
    varlen_rows: Option<i64>,
    min_keys: Option<i64>,
) -> Result<()> {
    if let Some(s) = splits {
        if !(1..=MAX_SPLITS).contains(&s) {
            return Err(Error::arg(format!(
                "splits = {s}: expected 1..={MAX_SPLITS}"
            )));
        }
    }
    if let Some(s) = decode_stages {
        if !(2..=4).contains(&s) {
            return Err(Error::arg(format!(
                "decode_stages = {s}: expected 2, 3 or 4"
            )));
        }
    }
    if let Some(r) = varlen_rows {
        if r != 64 && r != 128 {
            return Err(Error::arg(format!("varlen_rows = {r}: expected 64 or 128")));
        }
    }
    check_min_keys(min_keys)?;
    SPLITS_OVERRIDE.store(splits.unwrap_or(0), Ordering::Relaxed);
    STAGES_OVERRIDE.store(decode_stages.unwrap_or(0), Ordering::Relaxed);
    VARLEN_ROWS_OVERRIDE.store(varlen_rows.unwrap_or(0), Ordering::Relaxed);
    MIN_KEYS_OVERRIDE.store(min_keys.unwrap_or(0), Ordering::Relaxed);
    Ok(())
}

/// Sets only the fewest keys a decode split takes at run time (`None`: the default,
/// [`RUN_MIN_KEYS_PER_SPLIT`]), leaving the other overrides as they are: the serving setting
/// `GPTOSS_3090_ATTN_MIN_KEYS`, applied before any graph is captured (the value is a launch
/// parameter, so a captured graph keeps the one it was captured with).
pub fn set_run_min_keys(min_keys: Option<i64>) -> Result<()> {
    check_min_keys(min_keys)?;
    MIN_KEYS_OVERRIDE.store(min_keys.unwrap_or(0), Ordering::Relaxed);
    Ok(())
}

fn check_min_keys(min_keys: Option<i64>) -> Result<()> {
    match min_keys {
        Some(k) if !(16..=4096).contains(&k) || k % 16 != 0 => Err(Error::arg(format!(
            "min_keys = {k}: expected a multiple of 16 in 16..=4096"
        ))),
        _ => Ok(()),
    }
}
/// Dynamic shared memory per decode pipeline stage: 4 warps x 16 keys x (K + V) x 128 bytes.
pub const DECODE_STAGE_BYTES: i64 = 4 * 16 * 2 * 128;
/// Most splits per (request, KV head).
pub const MAX_SPLITS: i64 = 64;

/// `AttnKvRows` of `kernels/attention.cu`, field for field: new K/V rows and where they land
/// in the paged cache (shared by the separate KV write and the RoPE launch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnKvRows {
    /// `[num_tokens, num_kv_heads, 64]` keys.
    pub key: u64,
    /// `[num_tokens, num_kv_heads, 64]` values.
    pub value: u64,
    /// K half of the cache (`kv_cache.data_ptr()`).
    pub k_cache: u64,
    /// V half of the cache (`kv_cache.data_ptr() + 64 elements`).
    pub v_cache: u64,
    /// `[>= num_tokens]` int32 or int64 slots.
    pub slot_mapping: u64,
    /// `key.stride(0)`, elements.
    pub key_stride_tok: i64,
    /// `key.stride(1)`.
    pub key_stride_head: i64,
    /// `value.stride(0)`.
    pub value_stride_tok: i64,
    /// `value.stride(1)`.
    pub value_stride_head: i64,
    /// `kv_cache.stride(0)` (logical `(blocks, kv_heads, block_size, 128)`).
    pub cache_stride_block: i64,
    /// `kv_cache.stride(2)`.
    pub cache_stride_tok: i64,
    /// `kv_cache.stride(1)`.
    pub cache_stride_head: i64,
    /// KV heads.
    pub num_kv_heads: i32,
    /// Tokens per cache block.
    pub block_size: i32,
    /// 1 if `slot_mapping` is int64.
    pub slot_is_i64: i32,
}

/// `AttnKvWriteParams` of `kernels/attention.cu`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnKvWriteParams {
    /// The rows and their destination.
    pub kv: AttnKvRows,
    /// Rows to write.
    pub num_tokens: i32,
}

/// `AttnParams` of `kernels/attention.cu`, field for field (see the comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnParams {
    /// Queries `[T, Hq, 64]`.
    pub q: u64,
    /// Output `[T, Hq, 64]`.
    pub o: u64,
    /// K base (paged: the cache; plain: `k`).
    pub k: u64,
    /// V base (paged: the cache + 64 elements; plain: `v`).
    pub v: u64,
    /// int32 `[num_reqs, bt_stride]`, or 0 in plain mode.
    pub block_table: u64,
    /// int32 `[num_reqs + 1]`.
    pub query_start_loc: u64,
    /// int32 `[num_reqs]`.
    pub seq_lens: u64,
    /// `[Hq]` sinks or 0.
    pub sinks: u64,
    /// fp32 `[rows][64]` split accumulators (or 0).
    pub ws_acc: u64,
    /// fp32 `[rows][2]` split (max, sum) (or 0).
    pub ws_ml: u64,
    /// u32 `[num_reqs * num_kv_heads]` arrival counters (or 0).
    pub ws_ctr: u64,
    /// `q.stride(0)`.
    pub q_stride_tok: i64,
    /// `q.stride(1)`.
    pub q_stride_head: i64,
    /// `o.stride(0)`.
    pub o_stride_tok: i64,
    /// `o.stride(1)`.
    pub o_stride_head: i64,
    /// Cache block stride (paged).
    pub kv_stride_block: i64,
    /// Token stride of K/V.
    pub kv_stride_tok: i64,
    /// Head stride of K/V.
    pub kv_stride_head: i64,
    /// `block_table.stride(0)`.
    pub bt_stride: i64,
    /// Requests.
    pub num_reqs: i32,
    /// Query heads.
    pub num_q_heads: i32,
    /// KV heads.
    pub num_kv_heads: i32,
    /// `num_q_heads / num_kv_heads`.
    pub group: i32,
    /// Tokens per cache block.
    pub block_size: i32,
    /// Sliding window (0 = causal).
    pub window: i32,
    /// 0 none, 1 fp32, 2 bf16, 3 fp16.
    pub sink_mode: i32,
    /// Decode splits.
    pub num_splits: i32,
    /// Smallest q_len this launch handles.
    pub min_q_len: i32,
    /// Largest q_len this launch handles.
    pub max_q_len: i32,
    /// Fewest keys per decode split.
    pub min_chunk: i32,
    /// 1 in plain mode.
    pub plain_kv: i32,
    /// Softmax scale times log2(e).
    pub scale_log2: f32,
    /// Padding to 8 bytes.
    pub _pad: i32,
    /// New keys `[T, Hkv, 64]` for the folded KV-cache write (0: the cache holds them).
    pub k_new: u64,
    /// New values `[T, Hkv, 64]` (0 with `k_new`).
    pub v_new: u64,
    /// `key.stride(0)`.
    pub k_new_stride_tok: i64,
    /// `key.stride(1)`.
    pub k_new_stride_head: i64,
    /// `value.stride(0)`.
    pub v_new_stride_tok: i64,
    /// `value.stride(1)`.
    pub v_new_stride_head: i64,
    /// fp32 `[rope_positions, 64]` RoPE cos/sin table (0: q and the new keys arrive rotated).
    pub rope_cos_sin: u64,
    /// Rows of the RoPE table.
    pub rope_positions: i64,
}

/// `AttnRopeWriteParams` of `kernels/attention.cu`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnRopeWriteParams {
    /// Queries `[T, Hq, 64]`.
    pub q: u64,
    /// Rotated queries `[T, Hq, 64]` (the attention's output buffer).
    pub q_out: u64,
    /// int32 `[num_reqs + 1]`.
    pub query_start_loc: u64,
    /// int32 `[num_reqs]`.
    pub seq_lens: u64,
    /// fp32 `[positions, 64]` cos/sin.
    pub rope_cos_sin: u64,
    /// `q.stride(0)`.
    pub q_stride_tok: i64,
    /// `q.stride(1)`.
    pub q_stride_head: i64,
    /// `q_out.stride(0)`.
    pub qo_stride_tok: i64,
    /// `q_out.stride(1)`.
    pub qo_stride_head: i64,
    /// The new keys (rotated on the way) and values, and their cache slots.
    pub kv: AttnKvRows,
    /// Query tokens.
    pub num_tokens: i32,
    /// Requests.
    pub num_reqs: i32,
    /// Query heads.
    pub num_q_heads: i32,
}

/// vLLM's rotary table, for attention that applies GPT-OSS's RoPE itself.
#[derive(Clone, Copy, Debug)]
pub struct RopeArgs {
    /// fp32 `[positions, 64]`, contiguous: cos of the 32 frequencies, then their sin.
    pub cos_sin: u64,
    /// Rows of the table; every position must be below it.
    pub positions: i64,
}

/// Arguments of [`kv_cache_write`] (raw pointers and element strides, as Python passes them).
#[derive(Clone, Debug)]
pub struct KvWriteArgs {
    /// Element type of key, value and the cache.
    pub dtype: Dtype,
    /// `key.data_ptr()`, `[num_tokens(+padding), num_kv_heads, head_size]`.
    pub key: u64,
    /// `key.stride()`.
    pub key_strides: [i64; 3],
    /// `value.data_ptr()`.
    pub value: u64,
    /// `value.stride()`.
    pub value_strides: [i64; 3],
    /// `kv_cache.data_ptr()`, logical `(num_blocks, num_kv_heads, block_size, 2 * head_size)`.
    pub cache: u64,
    /// `kv_cache.shape`.
    pub cache_shape: [i64; 4],
    /// `kv_cache.stride()`.
    pub cache_strides: [i64; 4],
    /// `slot_mapping.data_ptr()`.
    pub slot_mapping: u64,
    /// Whether `slot_mapping` is int64 (else int32).
    pub slot_is_i64: bool,
    /// `slot_mapping.shape[0]`: rows written.
    pub num_tokens: i64,
    /// `key.shape[1]`.
    pub num_kv_heads: i64,
    /// `key.shape[2]`.
    pub head_size: i64,
}

/// Where the keys and values come from.
#[derive(Clone, Debug)]
pub enum KvSource {
    /// vLLM's paged cache.
    Paged {
        /// `kv_cache.data_ptr()`.
        cache: u64,
        /// `kv_cache.shape` `(num_blocks, num_kv_heads, block_size, 2 * head_size)`.
        cache_shape: [i64; 4],
        /// `kv_cache.stride()`.
        cache_strides: [i64; 4],
        /// int32 block table `[num_reqs(+), max_blocks]`.
        block_table: u64,
        /// `block_table.shape`.
        block_table_shape: [i64; 2],
        /// `block_table.stride(0)`.
        block_table_stride: i64,
    },
    /// Plain `[T, Hkv, 64]` keys and values of the same tokens as the queries.
    Plain {
        /// `k.data_ptr()`.
        k: u64,
        /// `k.shape`.
        k_shape: [i64; 3],
        /// `k.stride()`.
        k_strides: [i64; 3],
        /// `v.data_ptr()`.
        v: u64,
        /// `v.stride()`; must equal `k_strides`.
        v_strides: [i64; 3],
    },
}

/// How the sinks are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkMode {
    /// No sinks: plain softmax.
    None = 0,
    /// fp32 `[Hq]`.
    F32 = 1,
    /// bf16 `[Hq]` (vLLM's GPT-OSS parameter).
    Bf16 = 2,
    /// fp16 `[Hq]`.
    F16 = 3,
}

/// Arguments of [`forward`].
#[derive(Clone, Debug)]
pub struct ForwardArgs {
    /// Element type of q, the cache / k, v, and the output.
    pub dtype: Dtype,
    /// `query.data_ptr()`, `[T, Hq, head_size]`.
    pub q: u64,
    /// `query.shape`.
    pub q_shape: [i64; 3],
    /// `query.stride()`.
    pub q_strides: [i64; 3],
    /// `output.data_ptr()`.
    pub o: u64,
    /// `output.shape` (must equal `q_shape`).
    pub o_shape: [i64; 3],
    /// `output.stride()`.
    pub o_strides: [i64; 3],
    /// Keys and values.
    pub kv: KvSource,
    /// int32 `[num_reqs + 1]`.
    pub query_start_loc: u64,
    /// int32 `[num_reqs]` (context + new tokens).
    pub seq_lens: u64,
    /// Requests in the batch.
    pub num_reqs: i64,
    /// `[Hq]` sinks (0 when `sink_mode` is `None`).
    pub sinks: u64,
    /// Sink storage.
    pub sink_mode: SinkMode,
    /// fp32 workspace for decode splits (0 = none: one split).
    pub workspace: u64,
    /// Floats in the workspace.
    pub workspace_floats: i64,
    /// Sliding window (None = causal).
    pub window: Option<i64>,
    /// Softmax scale (applied to q.k, not to the sink).
    pub scale: f32,
    /// Upper bound of the query lengths (vLLM `max_query_len`).
    pub max_query_len: i64,
    /// Upper bound of the sequence lengths (vLLM `max_seq_len`; use the model's maximum when
    /// capturing a CUDA graph, so the split count suits every later context).
    pub max_seq_len: i64,
    /// The queries' own K/V rows, still to be written into the paged cache (`None`: the cache
    /// already holds them). Where the decode kernel serves every request (no varlen launch) it
    /// writes them itself, at the slots the block table gives (vLLM derives `slot_mapping`
    /// from the same table), and reads them from here; otherwise `attn_kv_write` runs first.
    pub new_kv: Option<KvWriteArgs>,
    /// RoPE (GPT-OSS's neox style over all 64 dims) on the queries and the new keys, at the
    /// positions vLLM's rotary op uses (query `i` of request `r` at `seq_lens[r] - q_len + i`).
    /// Needs `new_kv`. Where the decode kernel serves every request it rotates them in its
    /// launch; otherwise `attn_rope_write` rotates the queries into `o` (the attention then reads
    /// them from there) and writes the rotated keys into the cache, in place of `kv_cache_write`.
    pub rope: Option<RopeArgs>,
}

/// The launch plan [`forward`] would use (exposed for tests and benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Whether the decode kernel runs, and with how many splits (0 = not launched).
    pub decode_splits: i64,
    /// Whether the varlen kernel runs.
    pub varlen: bool,
    /// Query rows per varlen CTA (64 or 128).
    pub varlen_rows: i64,
    /// Pipeline stages of the decode kernel (2 to 4; 16 KB of shared memory each).
    pub decode_stages: i64,
}

/// Floats of a workspace holding `request_splits` (request, split) pairs of `num_kv_heads` heads.
pub fn workspace_floats(request_splits: i64, num_kv_heads: i64) -> i64 {
    let slots = request_splits.max(0) * num_kv_heads.max(0);
    round_up4(slots) + slots * DECODE_ROWS * WS_FLOATS_PER_ROW
}

/// How many (request, split) pairs a workspace of `floats` floats holds for `num_kv_heads`.
pub fn workspace_capacity(floats: i64, num_kv_heads: i64) -> i64 {
    if floats <= 0 || num_kv_heads <= 0 {
        return 0;
    }
    let mut r = floats / (num_kv_heads * (1 + DECODE_ROWS * WS_FLOATS_PER_ROW));
    while r > 0 && workspace_floats(r, num_kv_heads) > floats {
        r -= 1;
    }
    r
}

fn round_up4(n: i64) -> i64 {
    (n + 3) / 4 * 4
}

/// Number of KV splits for the decode kernel.
///
/// About [`TARGET_CTAS_PER_SM`] `(request, KV head, split)` CTAs per SM, no split shorter than
/// [`MIN_KEYS_PER_SPLIT`] keys of a context of `max_seq_len` (sliding layers only visit
/// `window + max_query_len - 1` keys), at most [`MAX_SPLITS`], and no more than the workspace
/// holds (`capacity` (request, split) pairs; 0 means one split).
#[allow(clippy::too_many_arguments)]
pub fn decode_splits(
    num_reqs: i64,
    num_kv_heads: i64,
    max_seq_len: i64,
    window: Option<i64>,
    max_query_len: i64,
    sm_count: i64,
    _tuning: Tuning,
    capacity: i64,
) -> i64 {
    let num_reqs = num_reqs.max(1);
    let ctas = num_reqs * num_kv_heads.max(1);
    let span = match window {
        Some(w) => max_seq_len.min(w + max_query_len.max(1) - 1 + 15),
        None => max_seq_len,
    }
    .max(1);
    let by_len = ceil_div(span as u64, MIN_KEYS_PER_SPLIT as u64) as i64;
    let by_ws = capacity / num_reqs;
    let max_s = by_len.min(by_ws).clamp(1, MAX_SPLITS);
    let want = (sm_count.max(1) * TARGET_CTAS_PER_SM) / ctas;
    let forced = SPLITS_OVERRIDE.load(Ordering::Relaxed);
    if forced > 0 {
        return forced.min(by_ws).clamp(1, MAX_SPLITS);
    }
    want.clamp(1, max_s)
}

/// Validates an element stride tuple of a `[T, H, 64]` tensor: last dim contiguous, 16-byte rows.
fn check_rows(name: &str, strides: &[i64; 3]) -> Result<()> {
    if strides[2] != 1 {
        return Err(Error::arg(format!(
            "{name}: the last dimension must be contiguous (stride 1), found stride {}",
            strides[2]
        )));
    }
    if strides[0] % 8 != 0 || strides[1] % 8 != 0 || strides[0] < 0 || strides[1] < 0 {
        return Err(Error::arg(format!(
            "{name}: strides {strides:?} must be non-negative multiples of 8 elements (16-byte rows)"
        )));
    }
    Ok(())
}

fn check_cache(shape: &[i64; 4], strides: &[i64; 4]) -> Result<()> {
    if shape[3] != 2 * HEAD_DIM {
        return Err(Error::tensor(
            "kv_cache",
            format!("last dimension 2 * head_size = {}", 2 * HEAD_DIM),
            format!("shape {shape:?}"),
        ));
    }
    if strides[3] != 1 {
        return Err(Error::tensor(
            "kv_cache",
            "a contiguous last dimension (stride 1)",
            format!("strides {strides:?}"),
        ));
    }
    if strides[..3].iter().any(|s| *s < 0 || s % 8 != 0) {
        return Err(Error::tensor(
            "kv_cache",
            "strides that are non-negative multiples of 8 elements (16-byte rows)",
            format!("strides {strides:?}"),
        ));
    }
    if shape[2] <= 0 || shape[2] % 16 != 0 {
        return Err(Error::tensor(
            "kv_cache",
            "a block size (dimension 2) that is a positive multiple of 16",
            format!("shape {shape:?}"),
        ));
    }
    Ok(())
}

/// Writes `key`/`value` rows into the paged cache at `slot_mapping` (negative slots skipped).
///
/// # Safety
/// Every pointer must be a live device allocation of the described shape and strides on `dev`,
/// and `stream` a stream of `dev`'s primary context.
pub unsafe fn kv_cache_write(dev: &GpuDevice, stream: u64, a: &KvWriteArgs) -> Result<()> {
    let p = kv_write_params(a)?;
    if a.num_tokens == 0 {
        return Ok(());
    }
    let threads = 256u64;
    let total = a.num_tokens as u64 * a.num_kv_heads as u64 * 16;
    let blocks = u32::try_from(ceil_div(total, threads)).map_err(|_| {
        Error::arg(format!(
            "kv_cache_write: {} tokens is too many",
            a.num_tokens
        ))
    })?;
    let f = dev.function_for_stream(SOURCE, &a.dtype.entry("attn_kv_write"), stream)?;
    // SAFETY: forwarded to the caller (pointers/shapes), params mirror the kernel struct.
    unsafe { dev.launch(&f, (blocks, 1, 1), (threads as u32, 1, 1), 0, stream, &p) }
}

/// Validates a KV write and builds the kernel's parameters.
fn kv_write_params(a: &KvWriteArgs) -> Result<AttnKvWriteParams> {
    if a.head_size != HEAD_DIM {
        return Err(Error::arg(format!(
            "key: head_size must be {HEAD_DIM}, found {}",
            a.head_size
        )));
    }
    check_cache(&a.cache_shape, &a.cache_strides)?;
    if a.cache_shape[1] != a.num_kv_heads {
        return Err(Error::arg(format!(
            "kv_cache has {} KV heads (dimension 1) but key has {}",
            a.cache_shape[1], a.num_kv_heads
        )));
    }
    check_rows("key", &a.key_strides)?;
    check_rows("value", &a.value_strides)?;
    check_ptr("key", a.key, 16)?;
    check_ptr("value", a.value, 16)?;
    check_ptr("kv_cache", a.cache, 16)?;
    check_ptr(
        "slot_mapping",
        a.slot_mapping,
        if a.slot_is_i64 { 8 } else { 4 },
    )?;
    if a.num_tokens < 0 || a.num_kv_heads <= 0 {
        return Err(Error::arg(format!(
            "kv_cache_write: num_tokens = {} and num_kv_heads = {} must be >= 0 and > 0",
            a.num_tokens, a.num_kv_heads
        )));
    }
    Ok(AttnKvWriteParams {
        kv: AttnKvRows {
            key: a.key,
            value: a.value,
            k_cache: a.cache,
            v_cache: a.cache + (HEAD_DIM as u64) * 2,
            slot_mapping: a.slot_mapping,
            key_stride_tok: a.key_strides[0],
            key_stride_head: a.key_strides[1],
            value_stride_tok: a.value_strides[0],
            value_stride_head: a.value_strides[1],
            cache_stride_block: a.cache_strides[0],
            cache_stride_tok: a.cache_strides[2],
            cache_stride_head: a.cache_strides[1],
            num_kv_heads: to_i32("num_kv_heads", a.num_kv_heads)?,
            block_size: to_i32("block_size", a.cache_shape[2])?,
            slot_is_i64: i32::from(a.slot_is_i64),
        },
        num_tokens: to_i32("num_tokens", a.num_tokens)?,
    })
}

/// Checks that `w` writes the new rows of the `t` queries of `a` into `a`'s own paged cache.
fn check_new_kv(a: &ForwardArgs, w: &KvWriteArgs, t: i64) -> Result<AttnKvWriteParams> {
    let p = kv_write_params(w)?;
    let cache = match &a.kv {
        KvSource::Paged { cache, .. } => *cache,
        KvSource::Plain { .. } => {
            return Err(Error::arg(
                "new K/V rows (key, value, slot_mapping) need the paged cache".to_string(),
            ))
        }
    };
    if w.cache != cache || w.dtype != a.dtype {
        return Err(Error::arg(
            "the KV write must target the attention's own kv_cache, in its dtype".to_string(),
        ));
    }
    if w.num_tokens < t {
        return Err(Error::arg(format!(
            "slot_mapping has {} rows, fewer than the {t} query tokens",
            w.num_tokens
        )));
    }
    Ok(p)
}

/// Checks the RoPE table against the positions a launch may use (below `max_seq_len`).
fn check_rope(r: &RopeArgs, max_seq_len: i64) -> Result<RopeArgs> {
    check_ptr("rope_cos_sin", r.cos_sin, 16)?;
    if r.positions < max_seq_len {
        return Err(Error::arg(format!(
            "rope_cos_sin has {} positions, fewer than max_seq_len = {max_seq_len}",
            r.positions
        )));
    }
    Ok(*r)
}

/// The RoPE launch's parameters from the attention's and the KV write's.
fn rope_write_params(
    p: &AttnParams,
    w: &AttnKvWriteParams,
    r: RopeArgs,
    num_tokens: i64,
) -> Result<AttnRopeWriteParams> {
    Ok(AttnRopeWriteParams {
        q: p.q,
        q_out: p.o,
        query_start_loc: p.query_start_loc,
        seq_lens: p.seq_lens,
        rope_cos_sin: r.cos_sin,
        q_stride_tok: p.q_stride_tok,
        q_stride_head: p.q_stride_head,
        qo_stride_tok: p.o_stride_tok,
        qo_stride_head: p.o_stride_head,
        kv: w.kv,
        num_tokens: to_i32("num_tokens", num_tokens)?,
        num_reqs: p.num_reqs,
        num_q_heads: p.num_q_heads,
    })
}

/// Rotates the queries into `q_out` and writes the rotated keys and the values into the cache:
/// one half-warp per (token, head) row.
///
/// # Safety
/// As [`forward`].
unsafe fn rope_write(
    dev: &GpuDevice,
    stream: u64,
    dtype: Dtype,
    rp: &AttnRopeWriteParams,
) -> Result<()> {
    let rows = rp.num_tokens as u64 * (rp.num_q_heads as u64 + 2 * rp.kv.num_kv_heads as u64);
    let blocks = u32::try_from(ceil_div(rows, 16))
        .map_err(|_| Error::arg(format!("rope: {} tokens is too many", rp.num_tokens)))?;
    let f = dev.function_for_stream(SOURCE, &dtype.entry("attn_rope_write"), stream)?;
    // SAFETY: forwarded to the caller; params mirror the kernel struct.
    unsafe { dev.launch(&f, (blocks, 1, 1), (256, 1, 1), 0, stream, rp) }
}

/// Validated common parameters plus the numbers the dispatch needs.
struct Prepared {
    p: AttnParams,
    num_tokens: i64,
    group: i64,
}

fn prepare(a: &ForwardArgs) -> Result<Prepared> {
    let [t, hq, d] = a.q_shape;
    if d != HEAD_DIM {
        return Err(Error::arg(format!(
            "query: head_size must be {HEAD_DIM}, found {d}"
        )));
    }
    if a.o_shape[1] != hq || a.o_shape[2] != d || a.o_shape[0] < t {
        return Err(Error::arg(format!(
            "output: expected shape [>= {t}, {hq}, {d}], found {:?}",
            a.o_shape
        )));
    }
    check_rows("query", &a.q_strides)?;
    check_rows("output", &a.o_strides)?;
    check_ptr("query", a.q, 16)?;
    check_ptr("output", a.o, 16)?;
    check_ptr("query_start_loc", a.query_start_loc, 4)?;
    check_ptr("seq_lens", a.seq_lens, 4)?;
    match a.sink_mode {
        SinkMode::None => {}
        SinkMode::F32 => check_ptr("sinks", a.sinks, 4)?,
        SinkMode::Bf16 | SinkMode::F16 => check_ptr("sinks", a.sinks, 2)?,
    }
    check_opt_ptr("workspace", a.workspace, 16)?;
    if a.num_reqs < 0 {
        return Err(Error::arg(format!(
            "num_reqs = {} must be >= 0",
            a.num_reqs
        )));
    }
    if let Some(w) = a.window {
        if w <= 0 {
            return Err(Error::arg(format!(
                "sliding_window = {w} must be positive (None for causal)"
            )));
        }
    }
    if !(a.scale.is_finite()) {
        return Err(Error::arg(format!("scale = {} must be finite", a.scale)));
    }
    let mut p = AttnParams {
        q: a.q,
        o: a.o,
        query_start_loc: a.query_start_loc,
        seq_lens: a.seq_lens,
        sinks: if a.sink_mode == SinkMode::None {
            0
        } else {
            a.sinks
        },
        q_stride_tok: a.q_strides[0],
        q_stride_head: a.q_strides[1],
        o_stride_tok: a.o_strides[0],
        o_stride_head: a.o_strides[1],
        num_reqs: to_i32("num_reqs", a.num_reqs)?,
        num_q_heads: to_i32("num_q_heads", hq)?,
        window: to_i32("sliding_window", a.window.unwrap_or(0))?,
        sink_mode: a.sink_mode as i32,
        scale_log2: a.scale * std::f32::consts::LOG2_E,
        min_chunk: run_min_keys_per_split() as i32,
        ..Default::default()
    };
    let hkv = match &a.kv {
        KvSource::Paged {
            cache,
            cache_shape,
            cache_strides,
            block_table,
            block_table_shape,
            block_table_stride,
        } => {
            check_cache(cache_shape, cache_strides)?;
            check_ptr("kv_cache", *cache, 16)?;
            check_ptr("block_table", *block_table, 4)?;
            if block_table_shape[0] < a.num_reqs {
                return Err(Error::tensor(
                    "block_table",
                    format!("at least num_reqs = {} rows", a.num_reqs),
                    format!("shape {block_table_shape:?}"),
                ));
            }
            p.k = *cache;
            p.v = *cache + (HEAD_DIM as u64) * 2;
            p.block_table = *block_table;
            p.bt_stride = *block_table_stride;
            p.kv_stride_block = cache_strides[0];
            p.kv_stride_head = cache_strides[1];
            p.kv_stride_tok = cache_strides[2];
            p.block_size = to_i32("block_size", cache_shape[2])?;
            cache_shape[1]
        }
        KvSource::Plain {
            k,
            k_shape,
            k_strides,
            v,
            v_strides,
        } => {
            check_rows("k", k_strides)?;
            if k_strides != v_strides {
                return Err(Error::arg(format!(
                    "k and v must have the same strides, found {k_strides:?} and {v_strides:?}"
                )));
            }
            if k_shape[0] < t || k_shape[2] != HEAD_DIM {
                return Err(Error::arg(format!(
                    "k: expected shape [>= {t}, num_kv_heads, {HEAD_DIM}], found {k_shape:?}"
                )));
            }
            check_ptr("k", *k, 16)?;
            check_ptr("v", *v, 16)?;
            p.k = *k;
            p.v = *v;
            p.plain_kv = 1;
            p.kv_stride_tok = k_strides[0];
            p.kv_stride_head = k_strides[1];
            p.block_size = 16;
            k_shape[1]
        }
    };
    if hkv <= 0 || hq % hkv != 0 {
        return Err(Error::arg(format!(
            "num_q_heads = {hq} must be a positive multiple of num_kv_heads = {hkv}"
        )));
    }
    let group = hq / hkv;
    if !(group as u64).is_power_of_two() || group > DECODE_ROWS {
        return Err(Error::arg(format!(
            "num_q_heads / num_kv_heads = {group} must be a power of two <= {DECODE_ROWS}"
        )));
    }
    p.num_kv_heads = to_i32("num_kv_heads", hkv)?;
    p.group = group as i32;
    Ok(Prepared {
        p,
        num_tokens: t,
        group,
    })
}

/// The launch plan for `a` on a device with `sm_count` SMs and `tuning`.
pub fn plan(a: &ForwardArgs, group: i64, num_kv_heads: i64, sm_count: i64, tuning: Tuning) -> Plan {
    let dec_max = DECODE_ROWS / group;
    let capacity = if a.workspace == 0 {
        0
    } else {
        workspace_capacity(a.workspace_floats, num_kv_heads)
    };
    let splits = decode_splits(
        a.num_reqs,
        num_kv_heads,
        a.max_seq_len,
        a.window,
        a.max_query_len.min(dec_max),
        sm_count,
        tuning,
        capacity,
    );
    Plan {
        decode_splits: splits,
        varlen: a.max_query_len > dec_max,
        varlen_rows: match VARLEN_ROWS_OVERRIDE.load(Ordering::Relaxed) {
            0 => 64,
            r => r,
        },
        // Two stages (32 KB) measured as fast as three or four on H100 (the tile copies are
        // issued without waiting on the block table) and keep more CTAs resident on sm_86.
        decode_stages: match STAGES_OVERRIDE.load(Ordering::Relaxed) {
            0 => 2,
            s => s,
        },
    }
}

/// Attention over the paged cache (or plain tensors): the decode and/or the varlen kernel.
///
/// # Safety
/// Every pointer must be a live device allocation of the described shape and strides on `dev`
/// (the int32 metadata must describe valid requests: `query_start_loc` non-decreasing within
/// `[0, T]`, `seq_lens[r] >= q_len(r)`, block-table entries valid block ids for every token
/// below `seq_lens[r]`), and `stream` a stream of `dev`'s primary context.
pub unsafe fn forward(dev: &GpuDevice, stream: u64, a: &ForwardArgs) -> Result<Plan> {
    let Prepared {
        mut p,
        num_tokens,
        group,
    } = prepare(a)?;
    let hkv = p.num_kv_heads as i64;
    let plan = plan(a, group, hkv, dev.sm_count() as i64, dev.tuning());
    let rope = match (&a.rope, &a.new_kv) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(Error::arg(
                "rope_cos_sin needs the new K/V rows (key, value, slot_mapping)".to_string(),
            ))
        }
        (Some(r), Some(_)) => Some(check_rope(r, a.max_seq_len)?),
    };
    if let Some(w) = &a.new_kv {
        // (kv_write_params checked the key's KV heads against the cache's, which are hkv.)
        let wp = check_new_kv(a, w, num_tokens)?;
        if plan.varlen {
            match rope {
                Some(r) => {
                    if a.num_reqs > 0 && num_tokens > 0 {
                        let rp = rope_write_params(&p, &wp, r, num_tokens)?;
                        // SAFETY: forwarded to the caller.
                        unsafe { rope_write(dev, stream, a.dtype, &rp)? };
                    }
                    // The attention reads the rotated queries from the output buffer: each CTA
                    // loads its query rows before it stores the same rows' output.
                    p.q = p.o;
                    p.q_stride_tok = p.o_stride_tok;
                    p.q_stride_head = p.o_stride_head;
                }
                // SAFETY: forwarded to the caller.
                None => unsafe { kv_cache_write(dev, stream, w)? },
            }
        } else {
            if let Some(r) = rope {
                p.rope_cos_sin = r.cos_sin;
                p.rope_positions = r.positions;
            }
            p.k_new = wp.kv.key;
            p.v_new = wp.kv.value;
            p.k_new_stride_tok = wp.kv.key_stride_tok;
            p.k_new_stride_head = wp.kv.key_stride_head;
            p.v_new_stride_tok = wp.kv.value_stride_tok;
            p.v_new_stride_head = wp.kv.value_stride_head;
        }
    }
    if a.num_reqs == 0 || num_tokens == 0 {
        return Ok(plan);
    }
    let dec_max = DECODE_ROWS / group;
    let dtype = a.dtype;

    // Decode path (requests with 1 <= q_len <= dec_max).
    p.num_splits = to_i32("num_splits", plan.decode_splits)?;
    p.min_q_len = 1;
    p.max_q_len = to_i32("max_q_len", dec_max)?;
    if p.num_splits > 1 {
        // Layout: counters | accumulators | (max, sum), for `capacity` (request, split) pairs.
        let capacity = workspace_capacity(a.workspace_floats, hkv);
        if a.num_reqs * plan.decode_splits > capacity || a.workspace == 0 {
            return Err(Error::arg(format!(
                "workspace holds {capacity} (request, split) pairs, {} x {} needed",
                a.num_reqs, plan.decode_splits
            )));
        }
        let slots = capacity * hkv;
        let rows = slots * DECODE_ROWS;
        p.ws_ctr = a.workspace;
        p.ws_acc = a.workspace + 4 * round_up4(slots) as u64;
        p.ws_ml = p.ws_acc + 4 * (rows * HEAD_DIM) as u64;
    }
    let reqs = u32::try_from(a.num_reqs)
        .map_err(|_| Error::arg(format!("num_reqs = {} is too large", a.num_reqs)))?;
    let dec_entry = dtype.entry(&format!("attn_decode_s{}", plan.decode_stages));
    let f = dev.function_for_stream(SOURCE, &dec_entry, stream)?;
    let grid = (reqs, hkv as u32, p.num_splits as u32);
    // SAFETY: forwarded to the caller; params mirror the kernel struct.
    let smem = (plan.decode_stages * DECODE_STAGE_BYTES) as u32;
    unsafe { dev.launch(&f, grid, (128, 1, 1), smem, stream, &p)? };

    // Varlen path (requests with q_len > dec_max). New K/V rows were written above.
    if plan.varlen {
        p.min_q_len = to_i32("min_q_len", dec_max + 1)?;
        p.max_q_len = i32::MAX;
        p.num_splits = 1;
        let rows = plan.varlen_rows;
        let tokens_per_tile = rows / group;
        let tiles = num_tokens / tokens_per_tile + a.num_reqs;
        let tiles = u32::try_from(tiles)
            .map_err(|_| Error::arg(format!("{num_tokens} query tokens is too many")))?;
        let entry = dtype.entry(&format!("attn_fwd_m{rows}"));
        let f = dev.function_for_stream(SOURCE, &entry, stream)?;
        let threads = (rows / 16 * 32) as u32;
        // SAFETY: as above.
        unsafe { dev.launch(&f, (tiles, hkv as u32, 1), (threads, 1, 1), 0, stream, &p)? };
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_structs() {
        // AttnKvRows: 5 pointers + 7 i64 + 3 i32, padded to 8 bytes; the write adds an i32.
        // AttnParams: 11 pointers + 8 i64 + 12 i32 + f32 + pad, then the new K/V rows:
        // 2 pointers + 4 i64.
        let kv_rows = 5 * 8 + 7 * 8 + 3 * 4 + 4;
        assert_eq!(std::mem::size_of::<AttnKvRows>(), kv_rows);
        assert_eq!(std::mem::size_of::<AttnKvWriteParams>(), kv_rows + 8);
        assert_eq!(
            std::mem::size_of::<AttnParams>(),
            11 * 8 + 8 * 8 + 12 * 4 + 8 + 2 * 8 + 4 * 8 + 8 + 8
        );
        assert_eq!(
            std::mem::offset_of!(AttnParams, rope_cos_sin),
            11 * 8 + 8 * 8 + 12 * 4 + 8 + 2 * 8 + 4 * 8
        );
        // 5 pointers + 4 i64, the rows, 3 i32 + pad.
        assert_eq!(std::mem::offset_of!(AttnRopeWriteParams, kv), 5 * 8 + 4 * 8);
        assert_eq!(
            std::mem::size_of::<AttnRopeWriteParams>(),
            5 * 8 + 4 * 8 + kv_rows + 3 * 4 + 4
        );
        assert_eq!(
            std::mem::offset_of!(AttnParams, k_new),
            11 * 8 + 8 * 8 + 12 * 4 + 8
        );
        assert_eq!(std::mem::align_of::<AttnParams>(), 8);
    }

    fn paged_args(cache: u64) -> ForwardArgs {
        ForwardArgs {
            dtype: Dtype::Bf16,
            q: 256,
            q_shape: [3, 64, 64],
            q_strides: [4096, 64, 1],
            o: 512,
            o_shape: [3, 64, 64],
            o_strides: [4096, 64, 1],
            kv: KvSource::Paged {
                cache,
                cache_shape: [10, 8, 16, 128],
                cache_strides: [16384, 2048, 128, 1],
                block_table: 1024,
                block_table_shape: [3, 4],
                block_table_stride: 4,
            },
            query_start_loc: 2048,
            seq_lens: 4096,
            num_reqs: 3,
            sinks: 0,
            sink_mode: SinkMode::None,
            workspace: 0,
            workspace_floats: 0,
            window: None,
            scale: 0.125,
            max_query_len: 1,
            max_seq_len: 100,
            new_kv: None,
            rope: None,
        }
    }

    fn new_rows(cache: u64, rows: i64) -> KvWriteArgs {
        KvWriteArgs {
            dtype: Dtype::Bf16,
            key: 8192,
            key_strides: [5120, 64, 1],
            value: 16384,
            value_strides: [5120, 64, 1],
            cache,
            cache_shape: [10, 8, 16, 128],
            cache_strides: [16384, 2048, 128, 1],
            slot_mapping: 32768,
            slot_is_i64: true,
            num_tokens: rows,
            num_kv_heads: 8,
            head_size: 64,
        }
    }

    #[test]
    fn new_kv_rows_must_fit_the_attention() {
        let a = paged_args(1 << 20);
        let ok = check_new_kv(&a, &new_rows(1 << 20, 3), 3).expect("valid new rows");
        assert_eq!(
            (ok.kv.key, ok.kv.key_stride_tok, ok.kv.value_stride_head),
            (8192, 5120, 64)
        );
        let err = |w: &KvWriteArgs, a: &ForwardArgs| match check_new_kv(a, w, 3) {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        };
        assert!(err(&new_rows(2 << 20, 3), &a).contains("own kv_cache"));
        assert!(err(&new_rows(1 << 20, 2), &a).contains("fewer than"));
        let mut w = new_rows(1 << 20, 3);
        w.head_size = 128;
        assert!(err(&w, &a).contains("head_size"));
        w = new_rows(1 << 20, 3);
        w.key_strides = [5120, 64, 2];
        assert!(err(&w, &a).contains("contiguous"));
        w = new_rows(1 << 20, 3);
        w.dtype = Dtype::F16;
        assert!(err(&w, &a).contains("dtype"));
        w = new_rows(1 << 20, 3);
        w.num_kv_heads = 4;
        assert!(err(&w, &a).contains("KV heads"));
        let mut plain = a.clone();
        plain.kv = KvSource::Plain {
            k: 1 << 20,
            k_shape: [3, 8, 64],
            k_strides: [512, 64, 1],
            v: 2 << 20,
            v_strides: [512, 64, 1],
        };
        assert!(err(&new_rows(1 << 20, 3), &plain).contains("paged"));
    }

    #[test]
    fn rope_table_must_cover_every_position() {
        let ok = RopeArgs {
            cos_sin: 1 << 20,
            positions: 131072,
        };
        assert!(check_rope(&ok, 131072).is_ok());
        let msg = |r: RopeArgs, max_seq_len: i64| match check_rope(&r, max_seq_len) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {r:?} for max_seq_len {max_seq_len}"),
        };
        assert!(msg(ok, 131073).contains("fewer than max_seq_len = 131073"));
        assert!(msg(RopeArgs { cos_sin: 0, ..ok }, 16).contains("null"));
        assert!(msg(
            RopeArgs {
                cos_sin: (1 << 20) + 4,
                ..ok
            },
            16
        )
        .contains("rope_cos_sin"));
    }

    #[test]
    fn workspace_layout() {
        for hkv in [1, 8] {
            for r in [1, 3, 512] {
                let f = workspace_floats(r, hkv);
                assert_eq!(workspace_capacity(f, hkv), r);
                assert_eq!(workspace_capacity(f - 1, hkv), r - 1);
            }
        }
        assert_eq!(workspace_capacity(0, 8), 0);
    }

    #[test]
    fn splits_policy() {
        let cap = 512;
        let h100 = |b, ctx, w| decode_splits(b, 8, ctx, w, 1, 132, Tuning::Sm90, cap);
        // One long request: about two CTAs per SM.
        assert_eq!(h100(1, 131072, None), 33);
        // Short context: no split shorter than MIN_KEYS_PER_SPLIT keys.
        assert_eq!(h100(1, 1024, None), 1024 / MIN_KEYS_PER_SPLIT);
        // Sliding layers visit at most window + 15 keys: one split.
        assert_eq!(h100(1, 131072, Some(128)), 1);
        assert_eq!(h100(4, 16384, None), 8);
        assert_eq!(h100(16, 8192, None), 2);
        // Big batches fill the GPU without splitting.
        assert_eq!(h100(64, 8192, None), 1);
        // No workspace: one split.
        assert_eq!(
            decode_splits(1, 8, 131072, None, 1, 132, Tuning::Sm90, 0),
            1
        );
        // The workspace caps the split count.
        assert_eq!(
            decode_splits(16, 8, 131072, None, 1, 500, Tuning::Sm90, 32),
            2
        );
        // Forced splits (benchmark hook) are still capped by the workspace.
        set_overrides(Some(8), None, None, None).unwrap();
        assert_eq!(
            decode_splits(16, 8, 131072, None, 1, 132, Tuning::Sm90, 32),
            2
        );
        assert_eq!(
            decode_splits(1, 8, 1024, None, 1, 132, Tuning::Sm90, cap),
            8
        );
        // The run-time split length does not change the plan.
        set_overrides(None, None, None, Some(64)).unwrap();
        assert_eq!(run_min_keys_per_split(), 64);
        assert_eq!(h100(1, 1024, None), 1024 / MIN_KEYS_PER_SPLIT);
        set_overrides(None, None, None, None).unwrap();
        assert_eq!(run_min_keys_per_split(), RUN_MIN_KEYS_PER_SPLIT);
        assert!(set_overrides(Some(0), None, None, None).is_err());
        assert!(set_overrides(None, Some(5), None, None).is_err());
        assert!(set_overrides(None, None, Some(32), None).is_err());
        assert!(set_overrides(None, None, None, Some(40)).is_err());
        assert!(set_overrides(None, None, None, Some(0)).is_err());
        // The serving setting moves only the run-time split length.
        set_overrides(Some(8), None, None, None).unwrap();
        set_run_min_keys(Some(512)).unwrap();
        assert_eq!(run_min_keys_per_split(), 512);
        assert_eq!(SPLITS_OVERRIDE.load(Ordering::Relaxed), 8);
        assert!(set_run_min_keys(Some(500)).is_err());
        assert_eq!(run_min_keys_per_split(), 512);
        set_run_min_keys(None).unwrap();
        assert_eq!(run_min_keys_per_split(), RUN_MIN_KEYS_PER_SPLIT);
        set_overrides(None, None, None, None).unwrap();
    }
}

/// Python bindings (`gptoss_3090._native.attention_*`), registered by `ops::py::register`.
pub mod py {
    use pyo3::prelude::*;

    use super::{
        decode_splits, forward, kv_cache_write, workspace_floats, ForwardArgs, KvSource,
        KvWriteArgs, RopeArgs, SinkMode,
    };
    use crate::cuda;
    use crate::error::Error;
    use crate::ops::Dtype;

    fn parse_sink_mode(code: i64) -> Result<SinkMode, Error> {
        match code {
            0 => Ok(SinkMode::None),
            1 => Ok(SinkMode::F32),
            2 => Ok(SinkMode::Bf16),
            3 => Ok(SinkMode::F16),
            _ => Err(Error::arg(format!(
                "sink_mode = {code}: expected 0 (none), 1 (float32), 2 (bfloat16) or 3 (float16)"
            ))),
        }
    }

    /// Writes key/value rows into the paged KV cache (`slot < 0` rows are skipped).
    #[pyfunction]
    #[allow(clippy::too_many_arguments)]
    fn attention_kv_write(
        py: Python<'_>,
        ordinal: i32,
        stream: u64,
        dtype: &str,
        key: u64,
        key_strides: [i64; 3],
        value: u64,
        value_strides: [i64; 3],
        cache: u64,
        cache_shape: [i64; 4],
        cache_strides: [i64; 4],
        slot_mapping: u64,
        slot_is_i64: bool,
        num_tokens: i64,
        num_kv_heads: i64,
        head_size: i64,
    ) -> PyResult<()> {
        let args = KvWriteArgs {
            dtype: Dtype::parse(dtype)?,
            key,
            key_strides,
            value,
            value_strides,
            cache,
            cache_shape,
            cache_strides,
            slot_mapping,
            slot_is_i64,
            num_tokens,
            num_kv_heads,
            head_size,
        };
        py.detach(|| {
            let dev = cuda::device(ordinal)?;
            // SAFETY: Python validated the tensors (device, dtype, shapes, strides) and passes
            // their live data pointers and torch's current stream of this device.
            unsafe { kv_cache_write(&dev, stream, &args) }
        })?;
        Ok(())
    }

    /// Attention (decode and/or varlen kernels) over the paged cache or plain k/v tensors.
    /// Returns `(decode_splits, varlen_launched)`.
    #[pyfunction]
    #[pyo3(signature = (
        ordinal, stream, dtype, q, q_shape, q_strides, o, o_shape, o_strides,
        query_start_loc, seq_lens, num_reqs, sinks, sink_mode, workspace, workspace_floats,
        window, scale, max_query_len, max_seq_len, *,
        cache = 0, cache_shape = [0; 4], cache_strides = [0; 4],
        block_table = 0, block_table_shape = [0; 2], block_table_stride = 0,
        k = 0, k_shape = [0; 3], k_strides = [0; 3], v = 0, v_strides = [0; 3],
        new_key = 0, new_key_strides = [0; 3], new_value = 0, new_value_strides = [0; 3],
        new_key_shape = [0; 3], slot_mapping = 0, slot_is_i64 = false, new_rows = 0,
        rope_cos_sin = 0, rope_positions = 0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        py: Python<'_>,
        ordinal: i32,
        stream: u64,
        dtype: &str,
        q: u64,
        q_shape: [i64; 3],
        q_strides: [i64; 3],
        o: u64,
        o_shape: [i64; 3],
        o_strides: [i64; 3],
        query_start_loc: u64,
        seq_lens: u64,
        num_reqs: i64,
        sinks: u64,
        sink_mode: i64,
        workspace: u64,
        workspace_floats: i64,
        window: Option<i64>,
        scale: f64,
        max_query_len: i64,
        max_seq_len: i64,
        cache: u64,
        cache_shape: [i64; 4],
        cache_strides: [i64; 4],
        block_table: u64,
        block_table_shape: [i64; 2],
        block_table_stride: i64,
        k: u64,
        k_shape: [i64; 3],
        k_strides: [i64; 3],
        v: u64,
        v_strides: [i64; 3],
        new_key: u64,
        new_key_strides: [i64; 3],
        new_value: u64,
        new_value_strides: [i64; 3],
        new_key_shape: [i64; 3],
        slot_mapping: u64,
        slot_is_i64: bool,
        new_rows: i64,
        rope_cos_sin: u64,
        rope_positions: i64,
    ) -> PyResult<(i64, bool)> {
        let dtype = Dtype::parse(dtype)?;
        // The queries' own K/V rows, when the caller has not written them into the cache yet.
        let new_kv = (new_key != 0).then(|| KvWriteArgs {
            dtype,
            key: new_key,
            key_strides: new_key_strides,
            value: new_value,
            value_strides: new_value_strides,
            cache,
            cache_shape,
            cache_strides,
            slot_mapping,
            slot_is_i64,
            num_tokens: new_rows,
            num_kv_heads: new_key_shape[1],
            head_size: new_key_shape[2],
        });
        let kv = if cache != 0 {
            KvSource::Paged {
                cache,
                cache_shape,
                cache_strides,
                block_table,
                block_table_shape,
                block_table_stride,
            }
        } else {
            KvSource::Plain {
                k,
                k_shape,
                k_strides,
                v,
                v_strides,
            }
        };
        let args = ForwardArgs {
            dtype,
            q,
            q_shape,
            q_strides,
            o,
            o_shape,
            o_strides,
            kv,
            query_start_loc,
            seq_lens,
            num_reqs,
            sinks,
            sink_mode: parse_sink_mode(sink_mode)?,
            workspace,
            workspace_floats,
            window,
            scale: scale as f32,
            max_query_len,
            max_seq_len,
            new_kv,
            rope: (rope_cos_sin != 0).then_some(RopeArgs {
                cos_sin: rope_cos_sin,
                positions: rope_positions,
            }),
        };
        let plan = py.detach(|| {
            let dev = cuda::device(ordinal)?;
            // SAFETY: Python validated the tensors and metadata and passes live data pointers
            // and torch's current stream of this device.
            unsafe { forward(&dev, stream, &args) }
        })?;
        Ok((plan.decode_splits, plan.varlen))
    }

    /// The decode split count `attention_forward` uses for these sizes on GPU `ordinal`.
    #[pyfunction]
    #[allow(clippy::too_many_arguments)]
    fn attention_decode_splits(
        ordinal: i32,
        num_reqs: i64,
        num_kv_heads: i64,
        max_seq_len: i64,
        window: Option<i64>,
        max_query_len: i64,
        workspace_floats: i64,
    ) -> PyResult<i64> {
        let dev = cuda::device(ordinal)?;
        let capacity = super::workspace_capacity(workspace_floats, num_kv_heads);
        Ok(decode_splits(
            num_reqs,
            num_kv_heads,
            max_seq_len,
            window,
            max_query_len,
            dev.sm_count() as i64,
            dev.tuning(),
            capacity,
        ))
    }

    /// Forces the decode split count / decode pipeline stages / varlen tile rows / fewest keys
    /// a decode split takes at run time for later launches (None = automatic). Benchmarking and tuning hook.
    #[pyfunction]
    #[pyo3(signature = (splits = None, decode_stages = None, varlen_rows = None, min_keys = None))]
    fn attention_set_overrides(
        splits: Option<i64>,
        decode_stages: Option<i64>,
        varlen_rows: Option<i64>,
        min_keys: Option<i64>,
    ) -> PyResult<()> {
        super::set_overrides(splits, decode_stages, varlen_rows, min_keys)?;
        Ok(())
    }

    /// Sets the fewest keys a decode split takes at run time (None: the default), leaving the
    /// other overrides alone.
    #[pyfunction]
    #[pyo3(signature = (min_keys = None))]
    fn attention_set_run_min_keys(min_keys: Option<i64>) -> PyResult<()> {
        super::set_run_min_keys(min_keys)?;
        Ok(())
    }

    /// The fewest keys a decode split takes at run time, as later launches will use it.
    #[pyfunction]
    fn attention_run_min_keys() -> i64 {
        super::run_min_keys_per_split()
    }

    /// Floats of a split workspace for `request_splits` (request, split) pairs.
    #[pyfunction]
    fn attention_workspace_floats(request_splits: i64, num_kv_heads: i64) -> i64 {
        workspace_floats(request_splits, num_kv_heads)
    }

    /// Adds the attention launchers to the extension module.
    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(attention_kv_write, m)?)?;
        m.add_function(wrap_pyfunction!(attention_forward, m)?)?;
        m.add_function(wrap_pyfunction!(attention_decode_splits, m)?)?;
        m.add_function(wrap_pyfunction!(attention_workspace_floats, m)?)?;
        m.add_function(wrap_pyfunction!(attention_set_overrides, m)?)?;
        m.add_function(wrap_pyfunction!(attention_set_run_min_keys, m)?)?;
        m.add_function(wrap_pyfunction!(attention_run_min_keys, m)?)?;
        Ok(())
    }
}
