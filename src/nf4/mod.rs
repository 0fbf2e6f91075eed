//! Exact NF4 (bitsandbytes 0.50 semantics): code tables, dequantization and quantization.
//!
//! CONTRACT (other modules rely on these names):
//! - `BLOCKSIZE` (64), `NESTED_BLOCKSIZE` (256), `NF4_CODE: [f32; 16]`
//! - `dynamic_map_signed() -> [f32; 256]`   (bitsandbytes `create_dynamic_map(signed=True)`)
//! - `Absmax<'a>` (borrowed statistics) and `OwnedAbsmax` (owned)
//! - `expand_absmax(&Absmax, out: &mut [f32]) -> Result<()>`
//! - `dequantize_into(packed, &Absmax, code_map, n, out: DequantOut) -> Result<()>`
//! - `quantize(values: &[f32], nested: bool) -> Result<QuantizedNf4>`

pub mod py;

use crate::error::{Error, Result};

/// Elements per NF4 block.
pub const BLOCKSIZE: usize = 64;
/// Blocks per nested (double-quantization) block.
pub const NESTED_BLOCKSIZE: usize = 256;

/// NF4 code table; index = 4-bit code.
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

/// Statistics of one quantized tensor, borrowed from a file or buffer.
#[derive(Debug, Clone, Copy)]
pub enum Absmax<'a> {
    /// Not nested: one f32 absmax per 64-element block.
    Plain(&'a [f32]),
    /// Nested: one u8 code per block, decoded through `nested_map` and scaled per 256 blocks.
    Nested {
        codes: &'a [u8],
        nested_absmax: &'a [f32],
        nested_map: &'a [f32],
        offset: f32,
    },
}

/// Owned statistics produced by [`quantize`].
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedAbsmax {
    Plain(Vec<f32>),
    Nested {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
    },
}

/// Output element type of dequantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    BF16,
    F16,
    F32,
}

/// Destination of [`dequantize_into`]: bf16/f16 as raw 16-bit patterns, or f32.
pub enum DequantOut<'a> {
    Bits16(&'a mut [u16], FloatDtype),
    F32(&'a mut [f32]),
}

/// The result of quantizing one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedNf4 {
    /// Two codes per byte, first element in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: OwnedAbsmax,
}

/// bitsandbytes `create_dynamic_map(signed=True)`: 256 sorted f32 values.
pub fn dynamic_map_signed() -> [f32; 256] {
    todo!("nf4 helper")
}

/// Expands statistics to one f32 absmax per block.
pub fn expand_absmax(_stats: &Absmax, _out: &mut [f32]) -> Result<()> {
    Err(Error::arg("not implemented"))
}

/// Dequantizes `n` elements.
pub fn dequantize_into(
    _packed: &[u8],
    _stats: &Absmax,
    _code_map: &[f32],
    _n: usize,
    _out: DequantOut,
) -> Result<()> {
    Err(Error::arg("not implemented"))
}

/// Quantizes values (already exactly representable as f32) with bitsandbytes' CUDA semantics.
pub fn quantize(_values: &[f32], _nested: bool) -> Result<QuantizedNf4> {
    Err(Error::arg("not implemented"))
}
