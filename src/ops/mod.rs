//! Launchers: argument validation, launch configuration and kernel launch for each op family.
//!
//! Each family (`nf4`, and later `moe`, `attention`) has a `#[repr(C)]` params struct that
//! mirrors the one in `kernels/<family>.cu` field for field (pointers as `u64`, sizes as
//! `i32`/`i64`; fields ordered so that no implicit padding appears; sizes asserted in tests),
//! and a launcher that checks every argument, picks the launch configuration from the device's
//! [`crate::cuda::Tuning`] and launches on the caller's stream (PyTorch's current stream, passed
//! as a raw handle). Python validates tensors first (`gptoss_3090.ops`); the checks here are the
//! second line of defence so that no bad pointer or size reaches a kernel.
pub mod attention;
pub mod moe;
pub mod nf4;
pub mod py;
pub mod router;

use std::sync::OnceLock;

use crate::cuda::{GpuDevice, KernelFn, Tuning};
use crate::error::{Error, Result};

/// Element type of activations and outputs; mirrors `DTYPE_BF16` / `DTYPE_F16` in common.cuh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// bfloat16.
    Bf16 = 0,
    /// IEEE half.
    F16 = 1,
}

impl Dtype {
    /// Parses `"bfloat16"`/`"bf16"` or `"float16"`/`"f16"`/`"half"` (also with a `torch.` prefix).
    pub fn parse(text: &str) -> Result<Dtype> {
        match text.trim().trim_start_matches("torch.") {
            "bfloat16" | "bf16" => Ok(Dtype::Bf16),
            "float16" | "f16" | "fp16" | "half" => Ok(Dtype::F16),
            other => Err(Error::arg(format!(
                "dtype '{other}': expected bfloat16 or float16"
            ))),
        }
    }

    /// Kernel entry suffix: `"bf16"` or `"f16"`.
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// `"{base}_{suffix}"`, the kernel entry name for this dtype.
    pub fn entry(self, base: &str) -> String {
        format!("{base}_{}", self.suffix())
    }
}

/// Checks that a device pointer argument is non-null and `align`-byte aligned.
pub fn check_ptr(name: &str, ptr: u64, align: u64) -> Result<()> {
    if ptr == 0 {
        return Err(Error::arg(format!("{name}: null device pointer")));
    }
    if align > 1 && ptr % align != 0 {
        return Err(Error::arg(format!(
            "{name}: pointer 0x{ptr:x} is not {align}-byte aligned"
        )));
    }
    Ok(())
}

/// Checks an optional pointer (0 = absent) for alignment.
pub fn check_opt_ptr(name: &str, ptr: u64, align: u64) -> Result<()> {
    if ptr == 0 {
        Ok(())
    } else {
        check_ptr(name, ptr, align)
    }
}

/// Checks the row stride (in elements) of a row-major activation matrix whose rows hold `len`
/// elements: at least `len`, and a multiple of 8 so that every row starts 16-byte aligned (the
/// kernels read rows with 16-byte loads).
pub fn check_row_stride(what: &str, stride: i64, len: i64) -> Result<()> {
    if stride < len || stride % 8 != 0 {
        return Err(Error::arg(format!(
            "{what}: row stride must be >= {len} (the row length) and a multiple of 8 elements, \
             found {stride}"
        )));
    }
    Ok(())
}

/// `ceil(a / b)` for positive sizes.
pub fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

/// Converts a size to `i32` for a params struct, naming it in the error.
pub fn to_i32(name: &str, v: i64) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::arg(format!("{name} = {v} does not fit in int32")))
}

/// Warps per streaming block (kernels/common.cuh `STR_WARPS`).
pub const STR_WARPS: usize = 8;
/// Dynamic shared memory of a streaming block (kernels/common.cuh `STR_TABLE_BYTES`): the
/// code-pair table with the warps' rings in its holes.
pub const STR_TABLE_BYTES: usize = 256 * 256;

/// Most 128-k chunks one warp streams (kernels/common.cuh `StrStats`): the statistics of a
/// stream then span at most two nested-absmax blocks (256 blocks of 64 each), which the
/// kernels load once per stream instead of once per chunk.
pub const STREAM_MAX_CHUNKS: usize = 64;

/// Largest K the streaming kernels serve: [`STREAM_MAX_CHUNKS`] chunks of 128 per warp at a K
/// split of [`STR_WARPS`].
pub const STREAM_MAX_K: usize = 128 * STREAM_MAX_CHUNKS * STR_WARPS;

/// 128-k chunks of a streaming row of `k` elements (a final 64-element block is a half chunk).
pub fn stream_chunks(k: usize) -> usize {
    (k / 64).div_ceil(2)
}

/// Whether K split `ks` keeps every warp's share of `chunks` chunks within
/// [`STREAM_MAX_CHUNKS`] (the kernels give a warp at most `ceil(chunks / ks)`).
pub fn stream_split_fits(chunks: usize, ks: usize) -> bool {
    ks > 0 && chunks.div_ceil(ks) <= STREAM_MAX_CHUNKS
}

/// Whether some K split of the streaming kernels (at most [`STR_WARPS`]) serves `chunks`
/// 128-k chunks: K up to [`STREAM_MAX_K`].
pub fn stream_k_fits(chunks: usize) -> bool {
    stream_split_fits(chunks, STR_WARPS)
}

/// The K split of a streaming launch: `GPTOSS_3090_MOE_STREAM_KS` if set, else
/// [`stream_k_split`]; an error naming the bound if the warps' streams would be too long.
pub fn stream_split(groups: usize, chunks: usize, resident: usize) -> Result<usize> {
    let ks = match stream_ks_override()? {
        Some(ks) => ks,
        None => stream_k_split(groups, chunks, resident),
    };
    if !stream_split_fits(chunks, ks) {
        return Err(Error::arg(format!(
            "K of {chunks} chunks of 128 split {ks} ways: the streaming kernels take at most \
             {STREAM_MAX_CHUNKS} chunks per warp (K split {ks}: K <= {})",
            128 * STREAM_MAX_CHUNKS * ks
        )));
    }
    Ok(ks)
}

/// K split of a streaming launch with `groups` 16-row groups (all expert slots) of `chunks`
/// 128-k chunks each and room for `resident` blocks at once: 1, 2, 4 or 8 warps per group,
/// whichever minimises `block waves x (chunks per warp + STREAM_WARP_OVERHEAD)`. A single
/// decode token thus still fills the GPU, while a split that only trades one partial wave for
/// many short warps (each paying the pipeline fill, the block prologue and the reduction) is
/// not taken. Always a power of two (as is `GPTOSS_3090_MOE_STREAM_KS`): the kernels split
/// their warps with shifts and masks.
///
/// Only splits that keep each warp's stream within [`STREAM_MAX_CHUNKS`] are considered; for
/// `chunks` beyond `8 * STREAM_MAX_CHUNKS` none is (callers check [`stream_k_fits`] first).
pub fn stream_k_split(groups: usize, chunks: usize, resident: usize) -> usize {
    let resident = resident.max(1);
    let mut best = (STR_WARPS, f64::INFINITY);
    for ks in [1usize, 2, 4, 8] {
        if !stream_split_fits(chunks, ks) {
            continue;
        }
        let waves = groups.div_ceil(STR_WARPS / ks).div_ceil(resident) as f64;
        let cost = waves * (chunks as f64 / ks as f64 + STREAM_WARP_OVERHEAD);
        if cost < best.1 {
            best = (ks, cost);
        }
    }
    best.0
}

/// Read-once cell of a development knob: the parsed setting, or the error text.
pub(crate) type EnvCell<T> = OnceLock<std::result::Result<Option<T>, String>>;

/// A development knob: an environment variable read once per process (`cell` keeps the
/// answer, so a captured graph never sees it change). Unset or empty: `None`; a value `parse`
/// rejects is an error naming the variable and what it `expected`.
pub(crate) fn env_setting<T: Clone>(
    cell: &'static EnvCell<T>,
    name: &str,
    expected: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>> {
    cell.get_or_init(|| {
        let Ok(raw) = std::env::var(name) else {
            return Ok(None);
        };
        let text = raw.trim();
        if text.is_empty() {
            return Ok(None);
        }
        parse(text)
            .map(Some)
            .ok_or_else(|| format!("{name}={raw:?}: expected {expected}"))
    })
    .clone()
    .map_err(Error::arg)
}

/// Knob (read on every call, so one process can compare): which kernel families launch with
/// programmatic dependent launch where the GPU has it (sm_90, native tuning): each such kernel
/// starts while the previous kernel in the stream drains, builds its tables and puts its first
/// weights in flight, and waits (`griddepcontrol.wait`) only where it reads that kernel's
/// results. `linear` (the default): the streaming NF4 linear, the wide linear and its split-K
/// reduce ([`PdlFamily::Linear`]); `moe`: the MoE's streaming kernels and its combine; `on`:
/// both; `off`: none (the only way on sm_80-sm_89, and under a forced sm_86 tuning, which
/// stands for a 3090).
///
/// Why `linear`: in vLLM's captured batch-1 decode graphs (H200, session 26, one sitting) the
/// o projection started behind our attention kernel and saved more than it cost the attention,
/// while the MoE's down launch, started early behind gate_up, ran about 4 us per layer longer
/// (with or without the folded combine): linear only 461-466 tok/s, off 448-451, both 424-447.
/// Back to back in `bench_moe.py` (with or without a foreign kernel before each layer) the MoE
/// launches were level or faster with PDL, so only the end-to-end trace shows this.
pub const PDL_ENV: &str = "GPTOSS_3090_PDL";

/// The kernel families [`PDL_ENV`] can switch separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PdlFamily {
    /// The NF4 linear's streaming and wide kernels and its split-K reduce.
    Linear,
    /// The MoE's streaming kernels and its combine.
    Moe,
}

/// [`PDL_ENV`] for an explicit setting (`None` = unset): whether `family` may use PDL.
pub(crate) fn pdl_for(setting: Option<&str>, family: PdlFamily) -> Result<bool> {
    match setting.map(str::trim) {
        None | Some("") | Some("linear") => Ok(family == PdlFamily::Linear),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some("moe") => Ok(family == PdlFamily::Moe),
        Some(other) => Err(Error::arg(format!(
            "{PDL_ENV}={other:?}: expected linear (default), moe, on or off"
        ))),
    }
}

/// Whether launches on `dev` under `tuning` may carry the sm_90 launch attributes (clusters,
/// PDL): the GPU has them and runs its own sm_90 configuration, not a forced sm_86 one, which
/// stands for a 3090 that has neither.
pub(crate) fn sm90_launch_ok(dev: &crate::cuda::GpuDevice, tuning: crate::cuda::Tuning) -> bool {
    dev.has_sm90_launch() && tuning == crate::cuda::Tuning::Sm90
}

/// The launch options of the kernels [`PDL_ENV`] covers on `dev` under `tuning`.
pub(crate) fn pdl_launch(
    dev: &crate::cuda::GpuDevice,
    tuning: crate::cuda::Tuning,
    family: PdlFamily,
) -> Result<crate::cuda::LaunchOptions> {
    let pdl =
        pdl_for(std::env::var(PDL_ENV).ok().as_deref(), family)? && sm90_launch_ok(dev, tuning);
    Ok(crate::cuda::LaunchOptions { cluster_y: 1, pdl })
}

/// A two-way knob read on every call (so that one process can compare both settings):
/// `setting` is the variable's value (`None` = unset); `off` or `on` choose, unset or empty
/// gives `default_on`, anything else is an error naming `name` and both choices.
pub(crate) fn env_switch(
    setting: Option<&str>,
    name: &str,
    (off, on): (&str, &str),
    default_on: bool,
) -> Result<bool> {
    match setting.map(str::trim) {
        None | Some("") => Ok(default_on),
        Some(v) if v == off => Ok(false),
        Some(v) if v == on => Ok(true),
        Some(other) => {
            let tag = |choice: &str, is_default: bool| {
                if is_default {
                    format!("{choice} (default)")
                } else {
                    choice.to_string()
                }
            };
            Err(Error::arg(format!(
                "{name}={other:?}: expected {} or {}",
                tag(off, !default_on),
                tag(on, default_on)
            )))
        }
    }
}

/// [`env_setting`] for a count that `allowed` accepts.
pub(crate) fn env_count(
    cell: &'static EnvCell<usize>,
    name: &str,
    expected: &str,
    allowed: fn(usize) -> bool,
) -> Result<Option<usize>> {
    env_setting(cell, name, expected, |t| {
        t.parse::<usize>().ok().filter(|&n| allowed(n))
    })
}

/// Development override of the streaming K split (`GPTOSS_3090_MOE_STREAM_KS`).
pub fn stream_ks_override() -> Result<Option<usize>> {
    static KS: EnvCell<usize> = OnceLock::new();
    env_count(&KS, "GPTOSS_3090_MOE_STREAM_KS", "1, 2, 4 or 8", |ks| {
        [1, 2, 4, 8].contains(&ks)
    })
}

/// Bytes of one activation column a streaming block stages in shared memory (kernels/common.cuh
/// `str_x_stride`: K plus 8 elements of padding, 2 bytes each).
pub fn stream_x_column_bytes(k: usize) -> usize {
    2 * (k + 8)
}

/// Activation columns a streaming block stages in shared memory: the most, up to `max_cols`,
/// whose dynamic shared memory (`STR_TABLE_BYTES` plus the columns) with `static_smem` stays
/// within `budget` bytes per block and for which `keeps_occupancy(dynamic bytes)` holds (the
/// table-only kernel's blocks per SM). Staging must never cost resident warps: they are what
/// hides the weights' DRAM latency.
pub fn stream_x_columns(
    max_cols: usize,
    k: usize,
    static_smem: usize,
    budget: usize,
    mut keeps_occupancy: impl FnMut(usize) -> Result<bool>,
) -> Result<usize> {
    if let Some(n) = stream_xcols_override()? {
        return Ok(n.min(max_cols));
    }
    for n in (1..=max_cols).rev() {
        let dyn_smem = STR_TABLE_BYTES + n * stream_x_column_bytes(k);
        if dyn_smem + static_smem <= budget && keeps_occupancy(dyn_smem)? {
            return Ok(n);
        }
    }
    Ok(0)
}

/// Shared memory the CUDA runtime reserves for each resident block (sm_80 and newer).
const BLOCK_SMEM_RESERVE: u32 = 1024;

/// How many blocks of `block_smem` bytes (static + dynamic) an SM with `sm_smem` bytes of shared
/// memory holds, counting shared memory alone.
pub fn blocks_by_smem(sm_smem: u32, block_smem: u32) -> u32 {
    sm_smem / (block_smem + BLOCK_SMEM_RESERVE)
}

/// The dynamic shared memory (at least `dyn_smem`, rounded up to 1 KB) that makes a block with
/// `static_smem` bytes of static shared memory too large for more than `target` (>= 1) of them
/// to share an SM of `sm_smem` bytes. The kernels never index past what they asked for, so the
/// padding only changes how many blocks an SM holds.
pub fn dyn_smem_for_at_most(sm_smem: u32, static_smem: u32, dyn_smem: u32, target: u32) -> u32 {
    let footprint = sm_smem / (target.max(1) + 1) + 1; // per block, the reserve included
    let need = footprint.saturating_sub(static_smem + BLOCK_SMEM_RESERVE);
    need.max(dyn_smem).div_ceil(1024) * 1024
}

/// Where a streaming launch's blocks per SM come from and what it launches with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// Blocks of the launch one SM holds, as `tuning`'s GPUs would hold them.
    pub per_sm: usize,
    /// Dynamic shared memory to launch with (the request, or padded; see [`residency`]).
    pub launch_smem: u32,
}

/// Blocks per SM of a launch of `f` with `threads` threads and `dyn_smem` bytes of dynamic
/// shared memory, under `tuning`. Normally what the device holds. When the tuning is forced to a
/// family with less shared memory per SM than this device (the RTX 3090's sm86 on an H100: 100
/// against 228 KB), the blocks the smaller SM would hold, and a dynamic size padded so that this
/// device holds no more: the forced configuration then also runs at a 3090's occupancy (one
/// streaming block of 8 warps per SM instead of two or three), which is what its measurements
/// stand in for. Falls back to the device's own residency where the padding cannot reproduce it.
pub fn residency(
    dev: &GpuDevice,
    f: &KernelFn,
    threads: u32,
    dyn_smem: u32,
    tuning: Tuning,
) -> Result<Residency> {
    let real = dev.max_active_blocks(f, threads, dyn_smem)?;
    let own = Residency {
        per_sm: real as usize,
        launch_smem: dyn_smem,
    };
    if dev.shared_per_sm() <= tuning.smem_per_sm() {
        return Ok(own);
    }
    let static_smem = dev.static_smem(f)?;
    let target = blocks_by_smem(tuning.smem_per_sm(), static_smem + dyn_smem).min(real);
    if target == 0 || target == real {
        return Ok(own);
    }
    let padded = dyn_smem_for_at_most(dev.shared_per_sm(), static_smem, dyn_smem, target);
    if padded + static_smem > dev.max_shared_per_block_optin()
        || dev.max_active_blocks(f, threads, padded)? != target
    {
        return Ok(own);
    }
    Ok(Residency {
        per_sm: target as usize,
        launch_smem: padded,
    })
}

/// Development override of the staged activation columns (`GPTOSS_3090_STREAM_XCOLS`; 0 turns
/// staging off).
pub fn stream_xcols_override() -> Result<Option<usize>> {
    static XCOLS: EnvCell<usize> = OnceLock::new();
    env_count(
        &XCOLS,
        "GPTOSS_3090_STREAM_XCOLS",
        "a count from 0 to 16",
        |n| n <= 16,
    )
}

/// Fixed cost of one streaming warp in chunk times (block prologue, pipeline fill, reduction).
const STREAM_WARP_OVERHEAD: f64 = 4.0;

#[cfg(test)]
mod tests {
    use super::*;

    const KB: u32 = 1024;

    #[test]
    fn pdl_knob_parses() -> Result<()> {
        for family in [PdlFamily::Linear, PdlFamily::Moe] {
            assert!(pdl_for(Some(" on "), family)?);
            assert!(!pdl_for(Some("off"), family)?);
        }
        for default in [None, Some(""), Some("linear")] {
            assert!(pdl_for(default, PdlFamily::Linear)?);
            assert!(!pdl_for(default, PdlFamily::Moe)?);
        }
        assert!(pdl_for(Some("moe"), PdlFamily::Moe)?);
        assert!(!pdl_for(Some("moe"), PdlFamily::Linear)?);
        let err = pdl_for(Some("maybe"), PdlFamily::Moe)
            .unwrap_err()
            .to_string();
        assert!(err.contains(PDL_ENV) && err.contains("linear"), "{err}");
        Ok(())
    }

    #[test]
    fn blocks_by_smem_counts_the_per_block_reserve() {
        // A streaming block: 64 KB table + 3 KB static. An RTX 3090 SM (100 KB) holds one, an
        // H100 SM (228 KB) three; with five staged columns (5 x 5776 B) the H100 holds two.
        assert_eq!(blocks_by_smem(100 * KB, 67 * KB), 1);
        assert_eq!(blocks_by_smem(228 * KB, 67 * KB), 3);
        assert_eq!(blocks_by_smem(228 * KB, 67 * KB + 5 * 5776), 2);
        assert_eq!(blocks_by_smem(100 * KB, 100 * KB), 0);
    }

    #[test]
    fn padding_holds_an_sm_to_the_target() {
        for (sm, stat, dynamic) in [
            (228 * KB, 3 * KB, 64 * KB),
            (228 * KB, 3 * KB, 64 * KB + 5 * 5776),
            (164 * KB, 0, 40 * KB),
            (228 * KB, 0, 2 * KB),
        ] {
            for target in 1..=3 {
                let before = blocks_by_smem(sm, stat + dynamic);
                if before <= target {
                    continue;
                }
                let padded = dyn_smem_for_at_most(sm, stat, dynamic, target);
                assert!(padded >= dynamic && padded % KB == 0, "{padded}");
                assert_eq!(
                    blocks_by_smem(sm, stat + padded),
                    target,
                    "sm {sm} static {stat} dyn {dynamic} target {target} -> {padded}"
                );
            }
        }
        // Already large enough: only rounded up.
        assert_eq!(dyn_smem_for_at_most(228 * KB, 0, 200 * KB + 1, 1), 201 * KB);
    }
}
