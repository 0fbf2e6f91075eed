//! One bitsandbytes 4-bit weight, recognised from its own keys and its JSON quant state.
//!
//! `QuantState.as_dict(packed=True)` stores, next to `<module>.weight` (the packed codes,
//! uint8 `[ceil(n/2), 1]`):
//! `<w>.absmax` (uint8 `[nb]` when nested, f32 `[nb]` otherwise), `<w>.quant_map` (f32 `[16]`),
//! `<w>.nested_absmax` (f32 `[ceil(nb/256)]`), `<w>.nested_quant_map` (f32 `[256]`) and
//! `<w>.quant_state.bitsandbytes__nf4`, a uint8 tensor holding UTF-8 JSON:
//! `{"quant_type", "blocksize", "dtype", "shape"}` plus, when nested,
//! `{"nested_blocksize", "nested_dtype", "nested_offset"}`.
//!
//! Only NF4 with blocksize 64, nested blocksize 256 and nested dtype float32, original dtype
//! bfloat16 or float16, is accepted; anything else is an error naming the key.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::shards::{describe, ShardSet, TensorEntry};
use crate::error::{Error, Result};
use crate::nf4::{self, Absmax, DequantOut, FloatDtype, NF4_CODE};
use safetensors::Dtype;

/// Suffix (after the weight key) of the NF4 quant-state JSON blob.
pub const NF4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";
/// Suffix of an FP4 quant state (recognised only to reject it clearly).
pub const FP4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__fp4";

/// Elements per NF4 block accepted in checkpoints.
pub const BLOCKSIZE: usize = 64;
/// Blocks per nested block accepted in checkpoints.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The parsed quant-state JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantStateJson {
    /// `quant_type` (`"nf4"` / `"fp4"`).
    pub quant_type: String,
    /// `blocksize`.
    pub blocksize: u64,
    /// `dtype`: the original (and dequantized) dtype, e.g. `"bfloat16"`.
    pub dtype: String,
    /// `shape` of the original weight.
    pub shape: Vec<usize>,
    /// The nested (double-quantization) fields, when present.
    pub nested: Option<NestedJson>,
}

/// Nested-statistics fields of the quant-state JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedJson {
    /// `nested_blocksize`.
    pub blocksize: u64,
    /// `nested_dtype`.
    pub dtype: String,
    /// `nested_offset`: the mean of the absmax values, rounded to f32 as bitsandbytes does.
    pub offset: f32,
}

fn field<'a>(key: &str, obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value> {
    obj.get(name).ok_or_else(|| {
        Error::tensor(
            key,
            format!("quant-state JSON with a '{name}' field"),
            format!(
                "no '{name}' (keys: {})",
                obj.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

fn str_field(key: &str, obj: &Map<String, Value>, name: &str) -> Result<String> {
    let v = field(key, obj, name)?;
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::tensor(key, format!("'{name}' to be a string"), v.to_string()))
}

fn uint_field(key: &str, obj: &Map<String, Value>, name: &str) -> Result<u64> {
    let v = field(key, obj, name)?;
    v.as_u64().ok_or_else(|| {
        Error::tensor(
            key,
            format!("'{name}' to be a non-negative integer"),
            v.to_string(),
        )
    })
}

/// Parses the JSON blob stored under `key` (`<w>.quant_state.bitsandbytes__*`).
pub fn parse_quant_state(key: &str, bytes: &[u8]) -> Result<QuantStateJson> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::tensor(key, "UTF-8 JSON bytes", format!("invalid UTF-8 ({e})")))?;
    let value: Value = serde_json::from_str(text).map_err(|e| Error::Json {
        what: format!("quant state '{key}'"),
        message: e.to_string(),
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| Error::tensor(key, "a JSON object", value.to_string()))?;
    let quant_type = str_field(key, obj, "quant_type")?;
    let blocksize = uint_field(key, obj, "blocksize")?;
    let dtype = str_field(key, obj, "dtype")?;
    let shape_v = field(key, obj, "shape")?;
    let shape = shape_v
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
        })
        .ok_or_else(|| {
            Error::tensor(
                key,
                "'shape' to be a list of non-negative integers",
                shape_v.to_string(),
            )
        })?;
    let any_nested = ["nested_blocksize", "nested_dtype", "nested_offset"]
        .iter()
        .any(|n| obj.contains_key(*n));
    let nested = if any_nested {
        let nb = uint_field(key, obj, "nested_blocksize")?;
        let nd = str_field(key, obj, "nested_dtype")?;
        let ov = field(key, obj, "nested_offset")?;
        let off = ov
            .as_f64()
            .ok_or_else(|| Error::tensor(key, "'nested_offset' to be a number", ov.to_string()))?;
        // bitsandbytes: torch.tensor(float(nested_offset)) -> f32, round to nearest.
        let offset = off as f32;
        if !offset.is_finite() {
            return Err(Error::tensor(
                key,
                "a finite f32 'nested_offset'",
                ov.to_string(),
            ));
        }
        Some(NestedJson {
            blocksize: nb,
            dtype: nd,
            offset,
        })
    } else {
        None
    };
    Ok(QuantStateJson {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested,
    })
}

/// Statistics of an NF4 weight beyond the per-block absmax.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedRefs {
    /// `<w>.nested_absmax`, f32 `[ceil(nb/256)]`.
    pub nested_absmax: TensorEntry,
    /// `<w>.nested_quant_map`, f32 `[256]`.
    pub nested_quant_map: TensorEntry,
    /// `nested_offset` from the JSON.
    pub offset: f32,
}

/// A validated NF4 weight: where each of its pieces lives and what it decodes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// The weight key (`<module>.weight`).
    pub key: String,
    /// Original shape (from the JSON).
    pub shape: Vec<usize>,
    /// Number of elements.
    pub numel: usize,
    /// Number of 64-element blocks.
    pub blocks: usize,
    /// Original (and dequantized) dtype.
    pub dtype: FloatDtype,
    /// `<w>`: packed codes, uint8, `ceil(numel/2)` bytes.
    pub packed: TensorEntry,
    /// `<w>.absmax`: uint8 (nested) or f32 `[blocks]`.
    pub absmax: TensorEntry,
    /// `<w>.quant_map`: f32 `[16]`, equal to the NF4 table.
    pub quant_map: TensorEntry,
    /// Nested statistics, when double-quantized.
    pub nested: Option<NestedRefs>,
    /// `<w>.quant_state.bitsandbytes__nf4`.
    pub state: TensorEntry,
}

/// The torch name of a dequantization dtype.
pub fn float_dtype_name(d: FloatDtype) -> &'static str {
    match d {
        FloatDtype::BF16 => "bfloat16",
        FloatDtype::F16 => "float16",
        FloatDtype::F32 => "float32",
    }
}

/// Decodes little-endian f32 values (works on unaligned mapped bytes).
pub fn read_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn expect_tensor<'a>(
    shards: &'a ShardSet,
    key: &str,
    weight_key: &str,
    role: &str,
) -> Result<&'a TensorEntry> {
    shards.get(key).ok_or_else(|| Error::MissingTensor {
        key: key.to_string(),
        context: format!("the {role} of NF4 weight '{weight_key}'"),
    })
}

fn check_entry(key: &str, e: &TensorEntry, dtype: Dtype, shapes: &[Vec<usize>]) -> Result<()> {
    if e.dtype != dtype || !shapes.iter().any(|s| s == &e.shape) {
        return Err(Error::tensor(
            key,
            describe(dtype, shapes.first().map_or(&[][..], |s| &s[..])),
            describe(e.dtype, &e.shape),
        ));
    }
    Ok(())
}

impl Nf4Tensor {
    /// Builds and validates the NF4 weight `weight_key` whose quant state is present.
    /// Every key it uses is added to `consumed`.
    pub fn resolve(
        shards: &ShardSet,
        weight_key: &str,
        consumed: &mut HashSet<String>,
    ) -> Result<Nf4Tensor> {
        let state_key = format!("{weight_key}{NF4_STATE_SUFFIX}");
        let state = expect_tensor(shards, &state_key, weight_key, "quant state")?.clone();
        if state.dtype != Dtype::U8 || state.shape.len() != 1 {
            return Err(Error::tensor(
                &state_key,
                "uint8 [n] JSON bytes",
                describe(state.dtype, &state.shape),
            ));
        }
        let qs = parse_quant_state(&state_key, shards.bytes(&state)?)?;
        if qs.quant_type != "nf4" {
            return Err(Error::tensor(
                &state_key,
                "quant_type nf4",
                format!("quant_type {}", qs.quant_type),
            ));
        }
        if qs.blocksize != BLOCKSIZE as u64 {
            return Err(Error::tensor(
                &state_key,
                format!("blocksize {BLOCKSIZE}"),
                format!("blocksize {}", qs.blocksize),
            ));
        }
        let dtype = match qs.dtype.as_str() {
            "bfloat16" => FloatDtype::BF16,
            "float16" => FloatDtype::F16,
            other => {
                return Err(Error::tensor(
                    &state_key,
                    "dtype bfloat16 or float16",
                    format!("dtype {other}"),
                ))
            }
        };
        if let Some(n) = &qs.nested {
            if n.blocksize != NESTED_BLOCKSIZE as u64 {
                return Err(Error::tensor(
                    &state_key,
                    format!("nested_blocksize {NESTED_BLOCKSIZE}"),
                    format!("nested_blocksize {}", n.blocksize),
                ));
            }
            if n.dtype != "float32" {
                return Err(Error::tensor(
                    &state_key,
                    "nested_dtype float32",
                    format!("nested_dtype {}", n.dtype),
                ));
            }
        }
        let numel = qs
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::tensor(
                    &state_key,
                    "a non-empty shape",
                    format!("shape {:?}", qs.shape),
                )
            })?;
        let blocks = numel.div_ceil(BLOCKSIZE);
        let packed_len = numel.div_ceil(2);

        let packed = expect_tensor(shards, weight_key, weight_key, "packed data")?.clone();
        check_entry(
            weight_key,
            &packed,
            Dtype::U8,
            &[vec![packed_len, 1], vec![packed_len]],
        )?;

        let absmax_key = format!("{weight_key}.absmax");
        let absmax = expect_tensor(shards, &absmax_key, weight_key, "absmax")?.clone();
        let absmax_dtype = if qs.nested.is_some() {
            Dtype::U8
        } else {
            Dtype::F32
        };
        check_entry(&absmax_key, &absmax, absmax_dtype, &[vec![blocks]])?;

        let qmap_key = format!("{weight_key}.quant_map");
        let quant_map = expect_tensor(shards, &qmap_key, weight_key, "quant_map")?.clone();
        check_entry(&qmap_key, &quant_map, Dtype::F32, &[vec![16]])?;
        let qmap = read_f32s(shards.bytes(&quant_map)?);
        let same = qmap.len() == 16
            && qmap
                .iter()
                .zip(NF4_CODE.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            return Err(Error::tensor(
                &qmap_key,
                format!("the NF4 code table {NF4_CODE:?}"),
                format!("{qmap:?}"),
            ));
        }

        let nab_key = format!("{weight_key}.nested_absmax");
        let nqm_key = format!("{weight_key}.nested_quant_map");
        let nested = match &qs.nested {
            Some(n) => {
                let nab = expect_tensor(shards, &nab_key, weight_key, "nested_absmax")?.clone();
                check_entry(
                    &nab_key,
                    &nab,
                    Dtype::F32,
                    &[vec![blocks.div_ceil(NESTED_BLOCKSIZE)]],
                )?;
                let nqm = expect_tensor(shards, &nqm_key, weight_key, "nested_quant_map")?.clone();
                check_entry(&nqm_key, &nqm, Dtype::F32, &[vec![256]])?;
                consumed.insert(nab_key);
                consumed.insert(nqm_key);
                Some(NestedRefs {
                    nested_absmax: nab,
                    nested_quant_map: nqm,
                    offset: n.offset,
                })
            }
            None => {
                for k in [&nab_key, &nqm_key] {
                    if shards.get(k).is_some() {
                        return Err(Error::UnexpectedTensor {
                            key: k.clone(),
                            context: format!(
                                "the quant state {state_key} is not nested (no nested_* fields)"
                            ),
                        });
                    }
                }
                None
            }
        };
        consumed.insert(state_key);
        consumed.insert(weight_key.to_string());
        consumed.insert(absmax_key);
        consumed.insert(qmap_key);
        Ok(Nf4Tensor {
            key: weight_key.to_string(),
            shape: qs.shape,
            numel,
            blocks,
            dtype,
            packed,
            absmax,
            quant_map,
            nested,
            state,
        })
    }

    /// Total stored bytes (all component tensors including the JSON blob).
    pub fn stored_bytes(&self) -> usize {
        let mut n = self.packed.nbytes()
            + self.absmax.nbytes()
            + self.quant_map.nbytes()
            + self.state.nbytes();
        if let Some(nr) = &self.nested {
            n += nr.nested_absmax.nbytes() + nr.nested_quant_map.nbytes();
        }
        n
    }

    /// Bytes our runtime keeps on the GPU for this weight: packed codes, absmax as stored
    /// (uint8 when nested), nested absmax and offset. The shared 16/256-entry maps are not
    /// counted here.
    pub fn gpu_bytes(&self) -> usize {
        let mut n = self.packed.nbytes() + self.absmax.nbytes();
        if let Some(nr) = &self.nested {
            n += nr.nested_absmax.nbytes() + 4;
        }
        n
    }

    /// Dequantizes into `out` (`numel` raw bf16/f16 bit patterns), bit-exactly as bitsandbytes.
    pub fn dequantize_into(&self, shards: &ShardSet, out: &mut [u16]) -> Result<()> {
        if out.len() != self.numel {
            return Err(Error::arg(format!(
                "dequantize '{}': expected an output of {} elements, found {}",
                self.key,
                self.numel,
                out.len()
            )));
        }
        let packed = shards.bytes(&self.packed)?;
        let qmap = read_f32s(shards.bytes(&self.quant_map)?);
        match &self.nested {
            Some(n) => {
                let codes = shards.bytes(&self.absmax)?;
                let nab = read_f32s(shards.bytes(&n.nested_absmax)?);
                let nmap = read_f32s(shards.bytes(&n.nested_quant_map)?);
                let stats = Absmax::Nested {
                    codes,
                    nested_absmax: &nab,
                    nested_map: &nmap,
                    offset: n.offset,
                };
                nf4::dequantize_into(
                    packed,
                    &stats,
                    &qmap,
                    self.numel,
                    DequantOut::Bits16(out, self.dtype),
                )
            }
            None => {
                let abs = read_f32s(shards.bytes(&self.absmax)?);
                let stats = Absmax::Plain(&abs);
                nf4::dequantize_into(
                    packed,
                    &stats,
                    &qmap,
                    self.numel,
                    DequantOut::Bits16(out, self.dtype),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_state() -> Result<()> {
        let blob = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [640, 320], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 2.535595655441284}"#;
        let qs = parse_quant_state("k", blob)?;
        assert_eq!(qs.quant_type, "nf4");
        assert_eq!(qs.blocksize, 64);
        assert_eq!(qs.dtype, "bfloat16");
        assert_eq!(qs.shape, vec![640, 320]);
        let n = qs.nested.ok_or_else(|| Error::arg("no nested"))?;
        assert_eq!(n.blocksize, 256);
        assert_eq!(n.dtype, "float32");
        assert_eq!(n.offset, 2.535_595_655_441_284_f64 as f32);
        Ok(())
    }

    #[test]
    fn parses_plain_state() -> Result<()> {
        let blob =
            br#"{"quant_type": "fp4", "blocksize": 128, "dtype": "float16", "shape": [8, 64]}"#;
        let qs = parse_quant_state("k", blob)?;
        assert_eq!(qs.quant_type, "fp4");
        assert_eq!(qs.blocksize, 128);
        assert!(qs.nested.is_none());
        Ok(())
    }

    #[test]
    fn rejects_garbage_states() {
        let cases: [&[u8]; 7] = [
            b"\xff\xfe",
            b"not json",
            b"[1, 2]",
            br#"{"blocksize": 64, "dtype": "bfloat16", "shape": [8, 64]}"#,
            br#"{"quant_type": "nf4", "blocksize": -1, "dtype": "bfloat16", "shape": [8, 64]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, -64]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 64], "nested_offset": 1.0}"#,
        ];
        for c in cases {
            match parse_quant_state("layer.weight.quant_state.bitsandbytes__nf4", c) {
                Ok(v) => panic!("accepted {v:?}"),
                Err(e) => assert!(e.to_string().contains("layer.weight.quant_state"), "{e}"),
            }
        }
    }
}
