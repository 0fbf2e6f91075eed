//! Exact NF4 (bitsandbytes 0.50 semantics): code tables, dequantization and quantization.
//!
//! CONTRACT (other modules rely on these names):
//! - `BLOCKSIZE` (64), `NESTED_BLOCKSIZE` (256), `NF4_CODE: [f32; 16]`
//! - `dynamic_map_signed() -> [f32; 256]`   (bitsandbytes `create_dynamic_map(signed=True)`)
//! - `Absmax<'a>` (borrowed statistics) and `OwnedAbsmax` (owned)
//! - `expand_absmax(&Absmax, out: &mut [f32]) -> Result<()>`
//! - `dequantize_into(packed, &Absmax, code_map, n, out: DequantOut) -> Result<()>`
//! - `quantize(values: &[f32], nested: bool) -> Result<QuantizedNf4>`
//!
//! # Bit-exactness
//!
//! Dequantization reproduces bitsandbytes (CPU and CUDA) bit for bit:
//!
//! ```text
//! nested:     absmax_f32[b] = nested_map[code[b]] * nested_absmax[b / 256] + offset   (fp32 mul, then fp32 add)
//! not nested: absmax_f32[b] = absmax[b]
//! W[i]      = cast(code_map[code(i)] * absmax_f32[i / 64])   (fp32 product, one round-to-nearest-even cast)
//! ```
//!
//! Rust never contracts `a * b + c` into a fused multiply-add unless `mul_add` is called, so the two
//! roundings above are exactly the ones bitsandbytes performs.
//!
//! Quantization mirrors bitsandbytes' CUDA kernels (`kQuantizeBlockwise*`, `dQuantizeNF4`,
//! `dQuantize<0>`): per-block absmax in fp32, values multiplied by the fp32 reciprocal `1/absmax`,
//! NF4 code chosen by comparing against the CUDA thresholds [`NF4_THRESHOLDS`] (ties go to the
//! lower code), all-zero blocks get code 0 (`0 * inf = NaN` fails every comparison), the 8-bit
//! nested codes by the CUDA binary search + midpoint rule. Note that with nested statistics an
//! all-zero block decodes to `-absmax_f32[b]` (its decoded absmax is small but not exactly 0), as
//! it does for a CUDA-made checkpoint; without nesting it decodes to -0.0.
//!
//! Where this cannot be bit-identical to a CUDA-made checkpoint:
//! - bitsandbytes builds its CUDA library with `--use_fast_math`, so its `1.0f / absmax` is
//!   `rcp.approx.ftz.f32` (up to 1 ulp off). We use the correctly rounded reciprocal. A code can
//!   differ only where `value * (1/absmax)` lies within about one ulp of a threshold.
//! - The nested offset is the mean of the block absmax values accumulated in f64 and rounded once
//!   to f32; torch's fp32 `mean()` (CPU or CUDA) may differ in the last bit.
//!
//! Checked on an H100 against bitsandbytes 0.50.2's CUDA kernels (bf16/fp16, nested or not,
//! tensors up to 5760x2880, partial and odd-length tails): dequantization bit-identical; 4-bit
//! and 8-bit codes identical in every run (the fast reciprocal equals the correctly rounded one
//! for ~86% of inputs and is 1 ulp off otherwise, which almost never moves a code); the offset
//! was 1 ulp off in 2 of 10 tensors, which changed no code.
//!
//! bitsandbytes' CPU path differs from its CUDA path: code 7 for an all-zero block, fp32
//! midpoints instead of the CUDA literals (see [`NF4_THRESHOLDS`]), division instead of the
//! reciprocal for a partial last block, and a 65,536-bin approximation for the 8-bit nested codes.

pub mod py;

use crate::error::{Error, Result};

/// Elements per NF4 block.
pub const BLOCKSIZE: usize = 64;
/// Blocks per nested (double-quantization) block.
pub const NESTED_BLOCKSIZE: usize = 256;

/// NF4 code table; index = 4-bit code.
// The literals are bitsandbytes' decimal strings; they round to the intended f32 values.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Decision thresholds of the NF4 quantizer, exactly as bitsandbytes' CUDA `dQuantizeNF4` has them.
///
/// A value `x` gets the code `#{k : x > NF4_THRESHOLDS[k]}`, so a value exactly on a threshold
/// goes to the lower code and NaN gets code 0.
///
/// The CUDA source writes the midpoints of adjacent codes as decimal `float` literals, which the
/// compiler rounds directly to f32 (checked with NVRTC's PTX output). For 11 of the 15 this is
/// the fp32 midpoint `(c[k] + c[k+1]) / 2`; for k = 0, 8, 12 and 14 the exact midpoint is a tie
/// between two f32 values and the literal lands one ulp away from the round-to-even fp32
/// midpoint. bitsandbytes' CPU quantizer (`torch.bucketize` over fp32 midpoints) therefore
/// disagrees with CUDA for a normalised value exactly equal to one of those four values.
// The literals are kept exactly as in the CUDA source: rounding them is the point.
#[allow(clippy::excessive_precision)]
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// Inputs at least this long are split over two threads.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 20;

/// Statistics of one quantized tensor, borrowed from a file or buffer.
#[derive(Debug, Clone, Copy)]
pub enum Absmax<'a> {
    /// Not nested: one f32 absmax per 64-element block.
    Plain(&'a [f32]),
    /// Nested: one u8 code per block, decoded through `nested_map` and scaled per 256 blocks.
    Nested {
        /// One 8-bit code per 64-element block.
        codes: &'a [u8],
        /// One f32 scale per 256 blocks (`ceil(codes.len() / 256)` values).
        nested_absmax: &'a [f32],
        /// The 256-entry 8-bit code map (`weight.nested_quant_map`).
        nested_map: &'a [f32],
        /// Added after decoding (`nested_offset` in the quant-state JSON).
        offset: f32,
    },
}

impl Absmax<'_> {
    /// Number of 64-element blocks these statistics describe.
    pub fn blocks(&self) -> usize {
        match self {
            Absmax::Plain(a) => a.len(),
            Absmax::Nested { codes, .. } => codes.len(),
        }
    }
}

/// Owned statistics produced by [`quantize`].
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedAbsmax {
    /// Not nested: one f32 absmax per 64-element block.
    Plain(Vec<f32>),
    /// Nested: 8-bit codes (decoded through [`dynamic_map_signed`]), per-256-block scales and
    /// the offset.
    Nested {
        /// One 8-bit code per 64-element block.
        codes: Vec<u8>,
        /// One f32 scale per 256 blocks.
        nested_absmax: Vec<f32>,
        /// Mean of the block absmax values, added back after decoding.
        offset: f32,
    },
}

impl OwnedAbsmax {
    /// Borrows these statistics; `nested_map` is used only for the nested variant (pass
    /// [`dynamic_map_signed`], which is what [`quantize`] encodes with).
    pub fn as_absmax<'a>(&'a self, nested_map: &'a [f32]) -> Absmax<'a> {
        match self {
            OwnedAbsmax::Plain(a) => Absmax::Plain(a),
            OwnedAbsmax::Nested {
                codes,
                nested_absmax,
                offset,
            } => Absmax::Nested {
                codes,
                nested_absmax,
                nested_map,
                offset: *offset,
            },
        }
    }
}

/// Output element type of dequantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// bfloat16 (raw bits in a `u16`).
    BF16,
    /// IEEE float16 (raw bits in a `u16`).
    F16,
    /// IEEE float32.
    F32,
}

impl FloatDtype {
    /// Parses the torch-style name: `"bfloat16"`, `"float16"` or `"float32"`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "bfloat16" => Ok(FloatDtype::BF16),
            "float16" => Ok(FloatDtype::F16),
            "float32" => Ok(FloatDtype::F32),
            other => Err(Error::arg(format!(
                "dtype: expected 'bfloat16', 'float16' or 'float32', found '{other}'"
            ))),
        }
    }

    /// The torch-style name.
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::BF16 => "bfloat16",
            FloatDtype::F16 => "float16",
            FloatDtype::F32 => "float32",
        }
    }
}

/// Destination of [`dequantize_into`]: bf16/f16 as raw 16-bit patterns, or f32.
pub enum DequantOut<'a> {
    /// 16-bit output; the dtype must be [`FloatDtype::BF16`] or [`FloatDtype::F16`].
    Bits16(&'a mut [u16], FloatDtype),
    /// f32 output.
    F32(&'a mut [f32]),
}

/// The result of quantizing one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedNf4 {
    /// Two codes per byte, first element in the high nibble.
    pub packed: Vec<u8>,
    /// Block statistics.
    pub absmax: OwnedAbsmax,
}

/// `torch.linspace(0.1, 1.0, steps, dtype=float32)` as torch's x86 CPU kernels (AVX2/AVX-512
/// builds) compute it: `step = (end - start) / (steps - 1)` in fp32, the first half as
/// `fma(step, i, start)`, the second half as `fma(-step, steps - 1 - i, end)`.
///
/// torch's non-vectorised "DEFAULT" CPU build rounds the product separately and gives a slightly
/// different table; the AVX2 one is what every x86 machine made checkpoints with, and what the
/// tests compare against.
fn torch_linspace_01_1(steps: usize) -> Vec<f32> {
    let start = 0.1f32;
    let end = 1.0f32;
    if steps < 2 {
        return vec![start; steps];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes `create_dynamic_map(signed=True)`: 256 sorted f32 values.
///
/// For exponent `e` in 0..7 the map holds `±f32(10^(e-6)) * m` for the fp32 midpoints `m` of
/// `linspace(0.1, 1, 2^e + 1)`, plus 0 and 1; the whole list is sorted. The linspace follows
/// torch's x86 AVX2/AVX-512 kernels (fused multiply-add); torch's non-vectorised build gives a
/// table differing in 42 entries by one ulp. Checkpoints store their own map
/// (`weight.nested_quant_map`), which dequantization uses.
pub fn dynamic_map_signed() -> [f32; 256] {
    // Python computes 10 ** (e - 6) in f64; torch rounds the scalar to f32 for the product.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (e, &scale) in SCALES.iter().enumerate() {
        let bounds = torch_linspace_01_1((1usize << e) + 1);
        let scale = scale as f32;
        for pair in bounds.windows(2) {
            if let [a, b] = pair {
                let mean = (a + b) / 2.0;
                data.push(scale * mean);
                data.push(-(scale * mean));
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0.0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// The NF4 code of an already normalised value (bitsandbytes CUDA `dQuantizeNF4`).
#[inline]
pub fn nf4_encode(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().map(|&t| u8::from(x > t)).sum()
}

/// The 8-bit code of an already normalised value: bitsandbytes CUDA `dQuantize<0>` (binary search
/// over the sorted 256-entry map, then a midpoint comparison), reproduced step by step.
#[inline]
fn dynamic_encode(map: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = map[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = map[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = map[255];
    }
    if lower_pivot == 0 {
        lower = map[0];
    }
    // Every pivot stays in 0..=255, so the casts below are lossless.
    let code = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot
        } else {
            pivot
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot
        } else {
            pivot
        }
    };
    code as u8
}

/// How many worker threads to use for `n` elements (1 or 2).
fn workers(n: usize) -> usize {
    if n < PARALLEL_MIN_ELEMENTS {
        return 1;
    }
    std::thread::available_parallelism()
        .map(|p| p.get().min(2))
        .unwrap_or(1)
}

/// Element index where the second of two workers starts: a block boundary near the middle.
fn split_point(n: usize) -> usize {
    let blocks = n.div_ceil(BLOCKSIZE);
    (blocks / 2 * BLOCKSIZE).min(n)
}

fn ceil_div_msg(what: &str, expected: usize, found: usize, why: String) -> Error {
    Error::arg(format!(
        "{what}: expected {expected}, found {found} ({why})"
    ))
}

/// Expands statistics to one f32 absmax per block.
///
/// `out.len()` must equal the number of blocks (`stats.blocks()`). Nested statistics need
/// `ceil(blocks / 256)` nested scales and a 256-entry map.
pub fn expand_absmax(stats: &Absmax, out: &mut [f32]) -> Result<()> {
    let blocks = stats.blocks();
    if out.len() != blocks {
        return Err(ceil_div_msg(
            "absmax output length",
            blocks,
            out.len(),
            "one f32 per 64-element block".into(),
        ));
    }
    match *stats {
        Absmax::Plain(a) => out.copy_from_slice(a),
        Absmax::Nested {
            codes,
            nested_absmax,
            nested_map,
            offset,
        } => {
            let nested_blocks = blocks.div_ceil(NESTED_BLOCKSIZE);
            if nested_absmax.len() != nested_blocks {
                return Err(ceil_div_msg(
                    "nested_absmax length",
                    nested_blocks,
                    nested_absmax.len(),
                    format!("ceil({blocks} absmax codes / {NESTED_BLOCKSIZE})"),
                ));
            }
            let map: &[f32; 256] = nested_map.try_into().map_err(|_| {
                Error::arg(format!(
                    "nested_quant_map length: expected 256, found {}",
                    nested_map.len()
                ))
            })?;
            for ((out_chunk, code_chunk), &scale) in out
                .chunks_mut(NESTED_BLOCKSIZE)
                .zip(codes.chunks(NESTED_BLOCKSIZE))
                .zip(nested_absmax)
            {
                for (o, &c) in out_chunk.iter_mut().zip(code_chunk) {
                    // Two separate roundings, as bitsandbytes: (map * scale) then + offset.
                    let scaled = map[usize::from(c)] * scale;
                    *o = scaled + offset;
                }
            }
        }
    }
    Ok(())
}

/// Dequantizes one contiguous run of whole blocks (the last may be partial).
///
/// `absmax` has one value per block of `out`; `packed` holds at least `ceil(out.len() / 2)` bytes.
fn dequant_run<T: Copy>(
    packed: &[u8],
    absmax: &[f32],
    code_map: &[f32; 16],
    out: &mut [T],
    cast: &impl Fn(f32) -> T,
) {
    for ((out_block, bytes), &scale) in out
        .chunks_mut(BLOCKSIZE)
        .zip(packed.chunks(BLOCKSIZE / 2))
        .zip(absmax)
    {
        // The fp32 product only depends on (code, block): cast each of the 16 once per block.
        let lut: [T; 16] = std::array::from_fn(|c| cast(code_map[c] * scale));
        for (pair, &byte) in out_block.chunks_mut(2).zip(bytes) {
            let hi = lut[usize::from(byte >> 4)];
            let lo = lut[usize::from(byte & 0x0F)];
            match pair {
                [a, b] => {
                    *a = hi;
                    *b = lo;
                }
                [a] => *a = hi,
                _ => {}
            }
        }
    }
}

/// Dequantizes `n` elements, splitting over two threads for large `n`.
fn dequant_parallel<T: Copy + Send>(
    packed: &[u8],
    absmax: &[f32],
    code_map: &[f32; 16],
    out: &mut [T],
    cast: impl Fn(f32) -> T + Sync,
) {
    let n = out.len();
    if workers(n) < 2 {
        dequant_run(packed, absmax, code_map, out, &cast);
        return;
    }
    let mid = split_point(n);
    let (out_a, out_b) = out.split_at_mut(mid);
    let (packed_a, packed_b) = packed.split_at((mid / 2).min(packed.len()));
    let (abs_a, abs_b) = absmax.split_at((mid / BLOCKSIZE).min(absmax.len()));
    let cast = &cast;
    std::thread::scope(|s| {
        s.spawn(move || dequant_run(packed_b, abs_b, code_map, out_b, cast));
        dequant_run(packed_a, abs_a, code_map, out_a, cast);
    });
}

/// Dequantizes `n` elements.
///
/// Checks: `code_map` has 16 entries, `packed` at least `ceil(n/2)` bytes, the statistics exactly
/// `ceil(n/64)` blocks (nested: `ceil(blocks/256)` scales and a 256-entry map), the output exactly
/// `n` elements of a matching dtype. The last block may be partial (`n % 64 != 0`); element `i`
/// always uses block `i / 64`, as bitsandbytes does.
pub fn dequantize_into(
    packed: &[u8],
    stats: &Absmax,
    code_map: &[f32],
    n: usize,
    out: DequantOut,
) -> Result<()> {
    let code_map: &[f32; 16] = code_map.try_into().map_err(|_| {
        Error::arg(format!(
            "quant_map length: expected 16, found {}",
            code_map.len()
        ))
    })?;
    let need_bytes = n.div_ceil(2);
    if packed.len() < need_bytes {
        return Err(Error::arg(format!(
            "packed length: expected at least {need_bytes} bytes (ceil(n / 2) for n = {n}), found {}",
            packed.len()
        )));
    }
    let blocks = n.div_ceil(BLOCKSIZE);
    if stats.blocks() != blocks {
        return Err(ceil_div_msg(
            "absmax length",
            blocks,
            stats.blocks(),
            format!("ceil(n / {BLOCKSIZE}) for n = {n}"),
        ));
    }
    let out_len = match &out {
        DequantOut::Bits16(o, _) => o.len(),
        DequantOut::F32(o) => o.len(),
    };
    if out_len != n {
        return Err(Error::arg(format!(
            "output length: expected {n}, found {out_len}"
        )));
    }
    let mut expanded;
    let absmax: &[f32] = match *stats {
        Absmax::Plain(a) => a,
        Absmax::Nested { .. } => {
            expanded = vec![0.0f32; blocks];
            expand_absmax(stats, &mut expanded)?;
            &expanded
        }
    };
    let packed = packed.get(..need_bytes).unwrap_or(packed);
    match out {
        DequantOut::F32(o) => dequant_parallel(packed, absmax, code_map, o, |v| v),
        DequantOut::Bits16(o, FloatDtype::BF16) => {
            dequant_parallel(packed, absmax, code_map, o, |v| {
                half::bf16::from_f32(v).to_bits()
            })
        }
        DequantOut::Bits16(o, FloatDtype::F16) => {
            dequant_parallel(packed, absmax, code_map, o, |v| {
                half::f16::from_f32(v).to_bits()
            })
        }
        DequantOut::Bits16(_, FloatDtype::F32) => {
            return Err(Error::arg(
                "dtype: float32 output needs DequantOut::F32, not a 16-bit buffer",
            ))
        }
    }
    Ok(())
}

/// Quantizes one contiguous run of blocks: fills `absmax` (one per block) and `packed`
/// (`ceil(values.len() / 2)` bytes).
fn quant_run(values: &[f32], absmax: &mut [f32], packed: &mut [u8]) {
    for ((block, am), bytes) in values
        .chunks(BLOCKSIZE)
        .zip(absmax.iter_mut())
        .zip(packed.chunks_mut(BLOCKSIZE / 2))
    {
        // CUDA: fmaxf over |v| starting from -FLT_MAX; inputs are finite here.
        let m = block.iter().fold(-f32::MAX, |m, v| m.max(v.abs()));
        *am = m;
        let recip = 1.0f32 / m;
        for (pair, byte) in block.chunks(2).zip(bytes.iter_mut()) {
            // A missing second element is loaded as 0.0 by the CUDA kernel (then scaled).
            let (a, b) = match pair {
                [a, b] => (*a, *b),
                [a] => (*a, 0.0),
                _ => (0.0, 0.0),
            };
            *byte = (nf4_encode(a * recip) << 4) | nf4_encode(b * recip);
        }
    }
}

/// 8-bit blockwise quantization of `values` with the given map and block size, as bitsandbytes'
/// CUDA `kQuantizeBlockwise<float, B, _, 0, General8bit>`: returns (codes, per-block absmax).
fn quantize_blockwise_8bit(
    values: &[f32],
    map: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let m = block.iter().fold(-f32::MAX, |m, v| m.max(v.abs()));
        scales.push(m);
        let recip = 1.0f32 / m;
        codes.extend(block.iter().map(|&v| dynamic_encode(map, v * recip)));
    }
    (codes, scales)
}

/// Quantizes values (already exactly representable as f32) with bitsandbytes' CUDA semantics.
///
/// Blocks of 64 consecutive values; the last block may be partial. With `nested`, the block
/// absmax values are double-quantized: `offset = mean(absmax)` (f64 accumulation, one rounding
/// to f32), then `absmax - offset` is quantized 8-bit with [`dynamic_map_signed`] in blocks of 256.
/// Rejects empty input and non-finite values.
pub fn quantize(values: &[f32], nested: bool) -> Result<QuantizedNf4> {
    if values.is_empty() {
        return Err(Error::arg("values: expected at least one element, found 0"));
    }
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::arg(format!(
            "values[{i}] = {v}: NF4 quantization needs finite values"
        )));
    }
    let n = values.len();
    let blocks = n.div_ceil(BLOCKSIZE);
    let mut absmax = vec![0.0f32; blocks];
    let mut packed = vec![0u8; n.div_ceil(2)];
    if workers(n) < 2 {
        quant_run(values, &mut absmax, &mut packed);
    } else {
        let mid = split_point(n);
        let (va, vb) = values.split_at(mid);
        let (aa, ab) = absmax.split_at_mut(mid / BLOCKSIZE);
        let (pa, pb) = packed.split_at_mut(mid / 2);
        std::thread::scope(|s| {
            s.spawn(move || quant_run(vb, ab, pb));
            quant_run(va, aa, pa);
        });
    }
    if !nested {
        return Ok(QuantizedNf4 {
            packed,
            absmax: OwnedAbsmax::Plain(absmax),
        });
    }
    let sum: f64 = absmax.iter().map(|&a| f64::from(a)).sum();
    let offset = (sum / blocks as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let map = dynamic_map_signed();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centred, &map, NESTED_BLOCKSIZE);
    Ok(QuantizedNf4 {
        packed,
        absmax: OwnedAbsmax::Nested {
            codes,
            nested_absmax,
            offset,
        },
    })
}

#[cfg(test)]
mod tests;
