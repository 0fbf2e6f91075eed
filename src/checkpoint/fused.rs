//! Virtual fused experts: one layer's per-expert NF4 tensors presented as `[E, N, K]` without
//! dequantizing.
//!
//! For layer L and projection `gate_up` (`N = 2I, K = H`) or `down` (`N = H, K = I`):
//!
//! | buffer | dtype | shape | content |
//! |---|---|---|---|
//! | `packed` | uint8 | `[E, N*K/2]` | each expert's packed codes, concatenated (high nibble first) |
//! | `absmax` | uint8 (nested) / float32 | `[E, N*K/64]` | each expert's per-block absmax (codes) |
//! | `nested_absmax` | float32 | `[E, nnb]` | nnb = ceil(nb/256); expert e block b uses `[e, b/256]` |
//! | `nested_offset` | float32 | `[E]` | each expert's nested offset |
//! | `bias` | bias dtype | `[E, N]` | each expert's bias |
//! | `quant_map` | float32 | `[16]` | the NF4 table (identical for every expert) |
//! | `nested_quant_map` | float32 | `[256]` | the 8-bit signed dynamic map (checked identical) |
//!
//! (`nested_*` exist only when the experts are double-quantized.) Expert e, element (n, k):
//! flat index `i = n*K + k`, code = nibble `i` of `packed[e]`, scale =
//! `nested_quant_map[absmax[e, i/64]] * nested_absmax[e, (i/64)/256] + nested_offset[e]`.
//! Because the nested block count per expert (e.g. 259,200 / 256 = 1012.5) is not a multiple
//! of 256, the nested statistics are indexed per expert, never with a global block index.
//!
//! The gate/up row interleaving is preserved exactly as stored: for `gate_up`, row `2j` of
//! expert e is gate unit j and row `2j+1` is up unit j (likewise for the bias).
//!
//! Building reads each source byte once (one memcpy per expert and buffer) straight from the
//! mapping into buffers the caller provides, over a few threads, and drops the mapped pages
//! from the process's resident set afterwards.

use safetensors::Dtype;

use super::model::{Linear, Weight};
use super::quant_state::{float_dtype_name, read_f32s, Nf4Tensor, BLOCKSIZE, NESTED_BLOCKSIZE};
use super::shards::{dtype_name, ShardSet};
use super::Checkpoint;
use crate::error::{Error, Result};
use crate::nf4::{self, Absmax, DequantOut, FloatDtype};

/// Which expert projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// `gate_up_projs`: `[2I, H]` per expert, rows interleaved gate/up.
    GateUp,
    /// `down_projs`: `[H, I]` per expert.
    Down,
}

impl Proj {
    /// Parses `"gate_up"` or `"down"`.
    pub fn parse(s: &str) -> Result<Proj> {
        match s {
            "gate_up" => Ok(Proj::GateUp),
            "down" => Ok(Proj::Down),
            other => Err(Error::arg(format!(
                "projection: expected 'gate_up' or 'down', found '{other}'"
            ))),
        }
    }

    /// `"gate_up"` / `"down"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proj::GateUp => "gate_up",
            Proj::Down => "down",
        }
    }
}

/// Description of one fused buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferSpec {
    /// Buffer name (`"packed"`, `"absmax"`, ...).
    pub name: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
    /// torch dtype name.
    pub dtype: &'static str,
    /// Size in bytes.
    pub nbytes: usize,
}

/// Sizes of one layer's fused projection.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedLayout {
    /// Layer index.
    pub layer: usize,
    /// Projection.
    pub proj: Proj,
    /// E.
    pub experts: usize,
    /// N (rows per expert).
    pub n: usize,
    /// K (columns per expert).
    pub k: usize,
    /// Double-quantized statistics.
    pub nested: bool,
    /// Original / dequantized dtype.
    pub dtype: FloatDtype,
    /// Dtype of the stacked biases.
    pub bias_dtype: Dtype,
}

impl FusedLayout {
    /// Elements per expert (N*K).
    pub fn numel(&self) -> usize {
        self.n * self.k
    }
    /// Packed bytes per expert.
    pub fn packed_per_expert(&self) -> usize {
        self.numel() / 2
    }
    /// 64-element blocks per expert.
    pub fn blocks_per_expert(&self) -> usize {
        self.numel() / BLOCKSIZE
    }
    /// Nested blocks per expert (`ceil(blocks/256)`), 0 if not nested.
    pub fn nested_blocks_per_expert(&self) -> usize {
        if self.nested {
            self.blocks_per_expert().div_ceil(NESTED_BLOCKSIZE)
        } else {
            0
        }
    }
    /// Bytes of one absmax entry (1 nested, 4 otherwise).
    pub fn absmax_item(&self) -> usize {
        if self.nested {
            1
        } else {
            4
        }
    }
    /// Bytes of one bias element.
    pub fn bias_item(&self) -> usize {
        self.bias_dtype.bitsize() / 8
    }

    /// All buffers, in a fixed order; `nested_*` only when nested.
    pub fn buffers(&self) -> Vec<BufferSpec> {
        let e = self.experts;
        let mut v = vec![
            BufferSpec {
                name: "packed",
                shape: vec![e, self.packed_per_expert()],
                dtype: "uint8",
                nbytes: e * self.packed_per_expert(),
            },
            BufferSpec {
                name: "absmax",
                shape: vec![e, self.blocks_per_expert()],
                dtype: if self.nested { "uint8" } else { "float32" },
                nbytes: e * self.blocks_per_expert() * self.absmax_item(),
            },
        ];
        if self.nested {
            let nnb = self.nested_blocks_per_expert();
            v.push(BufferSpec {
                name: "nested_absmax",
                shape: vec![e, nnb],
                dtype: "float32",
                nbytes: e * nnb * 4,
            });
            v.push(BufferSpec {
                name: "nested_offset",
                shape: vec![e],
                dtype: "float32",
                nbytes: e * 4,
            });
        }
        v.push(BufferSpec {
            name: "bias",
            shape: vec![e, self.n],
            dtype: dtype_name(self.bias_dtype),
            nbytes: e * self.n * self.bias_item(),
        });
        v.push(BufferSpec {
            name: "quant_map",
            shape: vec![16],
            dtype: "float32",
            nbytes: 64,
        });
        if self.nested {
            v.push(BufferSpec {
                name: "nested_quant_map",
                shape: vec![256],
                dtype: "float32",
                nbytes: 1024,
            });
        }
        v
    }

    /// Sum of all buffer sizes.
    pub fn total_bytes(&self) -> usize {
        self.buffers().iter().map(|b| b.nbytes).sum()
    }

    /// torch name of the dequantized dtype.
    pub fn dtype_name(&self) -> &'static str {
        float_dtype_name(self.dtype)
    }
}

/// Caller-provided destination buffers (raw bytes, sizes as in [`FusedLayout::buffers`]).
pub struct FusedOut<'a> {
    /// `packed`.
    pub packed: &'a mut [u8],
    /// `absmax`.
    pub absmax: &'a mut [u8],
    /// `nested_absmax` (required iff nested).
    pub nested_absmax: Option<&'a mut [u8]>,
    /// `nested_offset` (required iff nested).
    pub nested_offset: Option<&'a mut [u8]>,
    /// `bias`.
    pub bias: &'a mut [u8],
    /// `quant_map`.
    pub quant_map: &'a mut [u8],
    /// `nested_quant_map` (required iff nested).
    pub nested_quant_map: Option<&'a mut [u8]>,
}

/// Per-expert sources, borrowed from the mapping.
struct ExpertSrc<'a> {
    packed: &'a [u8],
    absmax: &'a [u8],
    nested_absmax: &'a [u8],
    offset: f32,
    bias: &'a [u8],
}

fn experts_of(ckpt: &Checkpoint, layer: usize, proj: Proj) -> Result<&[Linear]> {
    let layers = &ckpt.model.layers;
    let l = layers.get(layer).ok_or_else(|| {
        Error::arg(format!(
            "layer: expected an index in 0..{}, found {layer}",
            layers.len()
        ))
    })?;
    Ok(match proj {
        Proj::GateUp => &l.gate_up,
        Proj::Down => &l.down,
    })
}

fn nf4_of(lin: &Linear) -> Result<&Nf4Tensor> {
    match &lin.weight {
        Weight::Nf4(t) => Ok(t),
        Weight::Plain(p) => Err(Error::tensor(
            &p.key,
            "an NF4 expert weight (fused experts need NF4)",
            "an unquantized weight",
        )),
    }
}

/// Validates that the experts of (layer, proj) can be fused and returns the layout.
/// Checks: every expert NF4, same shape, same dtype, same nesting, element count a multiple
/// of 64 (and even), same bias dtype and length, identical nested quant maps.
pub fn layout(ckpt: &Checkpoint, layer: usize, proj: Proj) -> Result<FusedLayout> {
    let experts = experts_of(ckpt, layer, proj)?;
    let first_lin = experts
        .first()
        .ok_or_else(|| Error::arg(format!("layer {layer} has no experts")))?;
    let first = nf4_of(first_lin)?;
    let (n, k) = match first.shape.as_slice() {
        [n, k] => (*n, *k),
        other => {
            return Err(Error::tensor(
                &first.key,
                "a 2-D weight",
                format!("shape {other:?}"),
            ))
        }
    };
    if first.numel % BLOCKSIZE != 0 {
        return Err(Error::tensor(
            &first.key,
            format!("an element count divisible by {BLOCKSIZE} to fuse experts"),
            format!("{} elements", first.numel),
        ));
    }
    let bias_of = |lin: &Linear| -> Result<(Dtype, Vec<usize>)> {
        let b = lin.bias.as_ref().ok_or_else(|| Error::MissingTensor {
            key: lin.weight.key().replace(".weight", ".bias"),
            context: "expert bias".to_string(),
        })?;
        Ok((b.entry.dtype, b.entry.shape.clone()))
    };
    let (bias_dtype, bias_shape) = bias_of(first_lin)?;
    let first_nqm = match &first.nested {
        Some(nr) => Some(ckpt.shards.bytes(&nr.nested_quant_map)?),
        None => None,
    };
    for lin in experts.iter().skip(1) {
        let t = nf4_of(lin)?;
        if t.shape != first.shape {
            return Err(Error::tensor(
                &t.key,
                format!("shape {:?} like {}", first.shape, first.key),
                format!("shape {:?}", t.shape),
            ));
        }
        if t.dtype != first.dtype {
            return Err(Error::tensor(
                &t.key,
                format!("dtype {} like {}", float_dtype_name(first.dtype), first.key),
                format!("dtype {}", float_dtype_name(t.dtype)),
            ));
        }
        if t.nested.is_some() != first.nested.is_some() {
            let s = |x: bool| if x { "nested" } else { "not nested" };
            return Err(Error::tensor(
                &t.key,
                format!(
                    "{} statistics like {}",
                    s(first.nested.is_some()),
                    first.key
                ),
                s(t.nested.is_some()),
            ));
        }
        let (bd, bs) = bias_of(lin)?;
        let bkey = lin.weight.key().replace(".weight", ".bias");
        if bd != bias_dtype || bs != bias_shape {
            return Err(Error::tensor(
                bkey,
                format!("{} {:?} like expert 0", dtype_name(bias_dtype), bias_shape),
                format!("{} {:?}", dtype_name(bd), bs),
            ));
        }
        if let (Some(nr), Some(m0)) = (&t.nested, first_nqm) {
            if ckpt.shards.bytes(&nr.nested_quant_map)? != m0 {
                return Err(Error::tensor(
                    format!("{}.nested_quant_map", t.key),
                    format!("the same nested_quant_map as {}", first.key),
                    "a different map (fused experts share one map)",
                ));
            }
        }
    }
    Ok(FusedLayout {
        layer,
        proj,
        experts: experts.len(),
        n,
        k,
        nested: first.nested.is_some(),
        dtype: first.dtype,
        bias_dtype,
    })
}

fn check_len(name: &str, buf: &[u8], expected: usize) -> Result<()> {
    if buf.len() != expected {
        return Err(Error::arg(format!(
            "fused buffer '{name}': expected {expected} bytes, found {}",
            buf.len()
        )));
    }
    Ok(())
}

fn need<'a>(name: &str, b: &'a mut Option<&mut [u8]>) -> Result<&'a mut [u8]> {
    match b {
        Some(x) => Ok(&mut **x),
        None => Err(Error::arg(format!(
            "fused buffer '{name}': required for nested statistics, found None"
        ))),
    }
}

/// Maps every page of a destination buffer in one call (`MADV_POPULATE_WRITE`, Linux 5.14+):
/// a freshly allocated buffer otherwise takes one page fault per 4 KiB page during the copy.
/// Best effort: on older kernels or special memory the copy simply faults as usual.
fn prefault_for_write(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buf.as_mut_ptr() as usize;
        let first = start.div_ceil(PAGE) * PAGE;
        let last = (start + buf.len()) / PAGE * PAGE;
        if last > first {
            // SAFETY: [first, last) lies inside `buf`, which we hold exclusively; the advice
            // only populates page tables and does not change the buffer's contents.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Copies experts `srcs` into the given destination slices (each sized for exactly these experts).
fn copy_experts(
    srcs: &[ExpertSrc<'_>],
    packed: &mut [u8],
    absmax: &mut [u8],
    nested_absmax: &mut [u8],
    offsets: &mut [u8],
    bias: &mut [u8],
) {
    let n = srcs.len().max(1);
    let pp = packed.len() / n;
    let ap = absmax.len() / n;
    let np = nested_absmax.len() / n;
    let op = offsets.len() / n;
    let bp = bias.len() / n;
    let dests = packed
        .chunks_mut(pp.max(1))
        .zip(absmax.chunks_mut(ap.max(1)))
        .zip(bias.chunks_mut(bp.max(1)));
    for (s, ((p, a), b)) in srcs.iter().zip(dests) {
        prefault_for_write(p);
        p.copy_from_slice(s.packed);
        a.copy_from_slice(s.absmax);
        b.copy_from_slice(s.bias);
    }
    if np > 0 {
        for (s, d) in srcs.iter().zip(nested_absmax.chunks_mut(np)) {
            d.copy_from_slice(s.nested_absmax);
        }
    }
    if op > 0 {
        for (s, d) in srcs.iter().zip(offsets.chunks_mut(op)) {
            d.copy_from_slice(&s.offset.to_le_bytes());
        }
    }
}

/// Fills the caller's buffers with the fused view of (layer, proj), in one pass over the mapped
/// bytes, using up to `threads` threads (experts split evenly). Call without the GIL.
pub fn fill(
    ckpt: &Checkpoint,
    lay: &FusedLayout,
    mut out: FusedOut<'_>,
    threads: usize,
) -> Result<()> {
    let e = lay.experts;
    for spec in lay.buffers() {
        let buf: &[u8] = match spec.name {
            "packed" => &*out.packed,
            "absmax" => &*out.absmax,
            "nested_absmax" => need("nested_absmax", &mut out.nested_absmax)?,
            "nested_offset" => need("nested_offset", &mut out.nested_offset)?,
            "bias" => &*out.bias,
            "quant_map" => &*out.quant_map,
            _ => need("nested_quant_map", &mut out.nested_quant_map)?,
        };
        check_len(spec.name, buf, spec.nbytes)?;
    }
    if !lay.nested {
        for (name, b) in [
            ("nested_absmax", &out.nested_absmax),
            ("nested_offset", &out.nested_offset),
            ("nested_quant_map", &out.nested_quant_map),
        ] {
            if b.is_some() {
                return Err(Error::arg(format!(
                    "fused buffer '{name}': expected None (layer {} {} is not nested), found a buffer",
                    lay.layer,
                    lay.proj.as_str()
                )));
            }
        }
    }

    let shards: &ShardSet = &ckpt.shards;
    let linears = experts_of(ckpt, lay.layer, lay.proj)?;
    let mut srcs = Vec::with_capacity(e);
    let mut ranges = Vec::with_capacity(e * 4);
    for lin in linears {
        let t = nf4_of(lin)?;
        let bias = lin.bias.as_ref().ok_or_else(|| Error::MissingTensor {
            key: t.key.replace(".weight", ".bias"),
            context: "expert bias".to_string(),
        })?;
        let (nab, offset) = match &t.nested {
            Some(nr) => (shards.bytes(&nr.nested_absmax)?, nr.offset),
            None => (&[][..], 0.0),
        };
        for entry in [&t.packed, &t.absmax, &bias.entry] {
            ranges.push(entry.clone());
        }
        let src = ExpertSrc {
            packed: shards.bytes(&t.packed)?,
            absmax: shards.bytes(&t.absmax)?,
            nested_absmax: nab,
            offset,
            bias: shards.bytes(&bias.entry)?,
        };
        // The layout may come from the caller: every source must have exactly the per-expert
        // size the destination slots have, or the copy would not line up.
        let sizes = [
            ("packed", src.packed.len(), lay.packed_per_expert()),
            (
                "absmax",
                src.absmax.len(),
                lay.blocks_per_expert() * lay.absmax_item(),
            ),
            (
                "nested_absmax",
                src.nested_absmax.len(),
                lay.nested_blocks_per_expert() * 4,
            ),
            ("bias", src.bias.len(), lay.n * lay.bias_item()),
        ];
        for (what, found, expected) in sizes {
            if found != expected {
                return Err(Error::tensor(
                    &t.key,
                    format!(
                        "{expected} bytes of {what} per expert (layout of layer {})",
                        lay.layer
                    ),
                    format!("{found} bytes"),
                ));
            }
        }
        srcs.push(src);
    }
    if srcs.len() != e {
        return Err(Error::arg(format!(
            "layer {}: expected {e} experts, found {}",
            lay.layer,
            srcs.len()
        )));
    }
    for r in &ranges {
        if let Ok(s) = shards.shard(r) {
            s.will_need(r.start, r.end);
        }
    }

    // The shared maps: taken from expert 0 (validated identical across experts).
    let t0 = linears.first().map(nf4_of).transpose()?;
    if let Some(t0) = t0 {
        out.quant_map.copy_from_slice(shards.bytes(&t0.quant_map)?);
        if let (Some(d), Some(nr)) = (out.nested_quant_map.as_deref_mut(), &t0.nested) {
            d.copy_from_slice(shards.bytes(&nr.nested_quant_map)?);
        }
    }

    let mut empty_nab: [u8; 0] = [];
    let mut empty_off: [u8; 0] = [];
    let nab_buf: &mut [u8] = match out.nested_absmax {
        Some(b) => b,
        None => &mut empty_nab,
    };
    let off_buf: &mut [u8] = match out.nested_offset {
        Some(b) => b,
        None => &mut empty_off,
    };

    let threads = threads.clamp(1, e.max(1));
    let per = e.div_ceil(threads);
    let pp = lay.packed_per_expert() * per;
    let ap = lay.blocks_per_expert() * lay.absmax_item() * per;
    let np = lay.nested_blocks_per_expert() * 4 * per;
    let op = if lay.nested { 4 * per } else { 0 };
    let bp = lay.n * lay.bias_item() * per;

    fn chunks(buf: &mut [u8], size: usize, count: usize) -> Vec<&mut [u8]> {
        if size == 0 {
            return (0..count).map(|_| &mut [][..]).collect();
        }
        buf.chunks_mut(size).collect()
    }
    let groups = srcs.chunks(per).collect::<Vec<_>>();
    let g = groups.len();
    let parts = chunks(out.packed, pp, g)
        .into_iter()
        .zip(chunks(out.absmax, ap, g))
        .zip(chunks(nab_buf, np, g))
        .zip(chunks(off_buf, op, g))
        .zip(chunks(out.bias, bp, g));
    if threads == 1 {
        for (src, ((((p, a), nb), o), b)) in groups.iter().zip(parts) {
            copy_experts(src, p, a, nb, o, b);
        }
    } else {
        std::thread::scope(|s| {
            for (src, ((((p, a), nb), o), b)) in groups.iter().zip(parts) {
                s.spawn(move || copy_experts(src, p, a, nb, o, b));
            }
        });
    }

    for r in &ranges {
        if let Ok(s) = shards.shard(r) {
            s.release(r.start, r.end);
        }
    }
    Ok(())
}

/// Read-only fused buffers (raw bytes) plus their geometry, e.g. handed back from Python.
pub struct FusedView<'a> {
    /// E.
    pub experts: usize,
    /// N.
    pub n: usize,
    /// K.
    pub k: usize,
    /// Output dtype.
    pub dtype: FloatDtype,
    /// `packed` bytes.
    pub packed: &'a [u8],
    /// `absmax` bytes (uint8 codes when nested, f32 otherwise).
    pub absmax: &'a [u8],
    /// `nested_absmax` bytes (nested only).
    pub nested_absmax: Option<&'a [u8]>,
    /// `nested_offset` bytes (nested only).
    pub nested_offset: Option<&'a [u8]>,
    /// `quant_map` bytes.
    pub quant_map: &'a [u8],
    /// `nested_quant_map` bytes (nested only).
    pub nested_quant_map: Option<&'a [u8]>,
}

fn slice_of<'a>(name: &str, buf: &'a [u8], per: usize, e: usize, total: usize) -> Result<&'a [u8]> {
    check_len(name, buf, total)?;
    buf.get(e * per..(e + 1) * per)
        .ok_or_else(|| Error::arg(format!("fused buffer '{name}': expert {e} out of range")))
}

/// Dequantizes expert `e` straight from fused buffers: `N*K` raw 16-bit values of `v.dtype`.
/// The output is allocated only after the buffer sizes have been checked against the shape.
pub fn dequantize_expert(v: &FusedView<'_>, e: usize) -> Result<Vec<u16>> {
    if e >= v.experts {
        return Err(Error::arg(format!(
            "expert: expected an index in 0..{}, found {e}",
            v.experts
        )));
    }
    let numel =
        v.n.checked_mul(v.k)
            .filter(|&x| x > 0 && x % BLOCKSIZE == 0)
            .ok_or_else(|| {
                Error::arg(format!(
                    "fused shape: expected N*K > 0 and divisible by {BLOCKSIZE}, found N={} K={}",
                    v.n, v.k
                ))
            })?;
    let total = |per: usize| -> Result<usize> {
        per.checked_mul(v.experts)
            .ok_or_else(|| Error::arg("fused shape: size overflow"))
    };
    let nb = numel / BLOCKSIZE;
    let packed = slice_of("packed", v.packed, numel / 2, e, total(numel / 2)?)?;
    check_len("quant_map", v.quant_map, 64)?;
    let qmap = read_f32s(v.quant_map);
    if matches!(v.dtype, FloatDtype::F32) {
        return Err(Error::arg(
            "dtype: expected bfloat16 or float16, found float32",
        ));
    }
    let mut bits = vec![0u16; numel];
    let out = &mut bits[..];
    let done = match (v.nested_absmax, v.nested_offset, v.nested_quant_map) {
        (Some(nab), Some(off), Some(nqm)) => {
            let nnb = nb.div_ceil(NESTED_BLOCKSIZE);
            let codes = slice_of("absmax", v.absmax, nb, e, total(nb)?)?;
            let nab = read_f32s(slice_of("nested_absmax", nab, nnb * 4, e, total(nnb * 4)?)?);
            let off = read_f32s(slice_of("nested_offset", off, 4, e, total(4)?)?);
            check_len("nested_quant_map", nqm, 1024)?;
            let nmap = read_f32s(nqm);
            let stats = Absmax::Nested {
                codes,
                nested_absmax: &nab,
                nested_map: &nmap,
                offset: off.first().copied().unwrap_or(0.0),
            };
            nf4::dequantize_into(
                packed,
                &stats,
                &qmap,
                numel,
                DequantOut::Bits16(out, v.dtype),
            )
        }
        (None, None, None) => {
            let abs = read_f32s(slice_of("absmax", v.absmax, nb * 4, e, total(nb * 4)?)?);
            let stats = Absmax::Plain(&abs);
            nf4::dequantize_into(
                packed,
                &stats,
                &qmap,
                numel,
                DequantOut::Bits16(out, v.dtype),
            )
        }
        _ => Err(Error::arg(
            "fused buffers: nested_absmax, nested_offset and nested_quant_map must be all given \
             (nested) or all None",
        )),
    };
    done.map(|()| bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes_for_gpt_oss_20b_gate_up() {
        let lay = FusedLayout {
            layer: 0,
            proj: Proj::GateUp,
            experts: 32,
            n: 5760,
            k: 2880,
            nested: true,
            dtype: FloatDtype::BF16,
            bias_dtype: Dtype::BF16,
        };
        assert_eq!(lay.packed_per_expert(), 8_294_400);
        assert_eq!(lay.blocks_per_expert(), 259_200);
        assert_eq!(lay.nested_blocks_per_expert(), 1013);
        let names: Vec<_> = lay.buffers().iter().map(|b| b.name).collect();
        assert_eq!(
            names,
            [
                "packed",
                "absmax",
                "nested_absmax",
                "nested_offset",
                "bias",
                "quant_map",
                "nested_quant_map"
            ]
        );
        let expected = 32 * (8_294_400 + 259_200 + 1013 * 4 + 4 + 5760 * 2) + 64 + 1024;
        assert_eq!(lay.total_bytes(), expected);
        let plain = FusedLayout {
            nested: false,
            ..lay
        };
        assert_eq!(plain.buffers().len(), 4);
        assert_eq!(
            plain.total_bytes(),
            32 * (8_294_400 + 259_200 * 4 + 5760 * 2) + 64
        );
    }

    #[test]
    fn projection_names() {
        assert_eq!(
            Proj::parse("gate_up").map(Proj::as_str).ok(),
            Some("gate_up")
        );
        assert_eq!(Proj::parse("down").map(Proj::as_str).ok(), Some("down"));
        let err = Proj::parse("up")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("'up'"), "{err}");
    }
}
