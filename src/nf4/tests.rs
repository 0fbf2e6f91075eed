//! Unit tests for exact NF4. Random inputs are fresh per run; the seed is printed on failure.
// Index loops mirror the element/block formulas being checked.
#![allow(clippy::needless_range_loop)]
use super::*;

/// xorshift64* with a per-run seed.
struct Rng(u64);

impl Rng {
    fn fresh() -> (Self, u64) {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x1234_5678);
        let seed = nanos | 1;
        (Rng(seed), seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// Round-to-nearest-even f32 -> bf16 written independently of `half` (finite inputs).
fn rne_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

fn code_at(packed: &[u8], i: usize) -> u8 {
    let byte = packed[i / 2];
    if i % 2 == 0 {
        byte >> 4
    } else {
        byte & 0x0F
    }
}

fn dequant_f32(q: &QuantizedNf4, n: usize) -> Vec<f32> {
    let map = dynamic_map_signed();
    let mut out = vec![0.0f32; n];
    dequantize_into(
        &q.packed,
        &q.absmax.as_absmax(&map),
        &NF4_CODE,
        n,
        DequantOut::F32(&mut out),
    )
    .unwrap();
    out
}

#[test]
fn thresholds_are_the_f32_neighbours_of_the_exact_midpoints() {
    // The exact midpoint of two f32 values is representable in f64.
    let mut off_by_one = Vec::new();
    for k in 0..15 {
        let exact = (f64::from(NF4_CODE[k]) + f64::from(NF4_CODE[k + 1])) / 2.0;
        let t = NF4_THRESHOLDS[k];
        let (lo, hi) = if f64::from(t) <= exact {
            (t, next_up(t))
        } else {
            (next_down(t), t)
        };
        assert!(
            f64::from(lo) <= exact && exact <= f64::from(hi),
            "threshold {k} = {t} is not next to the midpoint {exact}"
        );
        let fp32_mid = (NF4_CODE[k] + NF4_CODE[k + 1]) * 0.5;
        if fp32_mid != t {
            assert!(
                fp32_mid == next_up(t) || fp32_mid == next_down(t),
                "threshold {k}"
            );
            off_by_one.push(k);
        }
    }
    // Rounding the CUDA decimal literals directly to f32 moves exactly these four.
    assert_eq!(off_by_one, vec![0, 8, 12, 14]);
}

#[test]
fn nf4_encode_is_nearest_code_ties_lower() {
    for k in 0..15 {
        let t = NF4_THRESHOLDS[k];
        // Exactly on the midpoint: lower code.
        assert_eq!(nf4_encode(t), k as u8, "at threshold {k}");
        // One ulp above: upper code. One ulp below: lower code.
        let up = next_up(t);
        let down = next_down(t);
        assert_eq!(nf4_encode(up), k as u8 + 1, "above threshold {k}");
        assert_eq!(nf4_encode(down), k as u8, "below threshold {k}");
    }
    for (c, &v) in NF4_CODE.iter().enumerate() {
        assert_eq!(nf4_encode(v), c as u8, "code value {c}");
    }
    assert_eq!(nf4_encode(f32::NAN), 0);
    assert_eq!(nf4_encode(-2.0), 0);
    assert_eq!(nf4_encode(2.0), 15);
    // Brute-force nearest over a fine grid (away from exact midpoints the choice is unique).
    let (mut rng, seed) = Rng::fresh();
    for _ in 0..100_000 {
        let x = (rng.uniform() * 2.2 - 1.1) as f32;
        let c = nf4_encode(x);
        let best = NF4_CODE
            .iter()
            .map(|&v| (f64::from(x) - f64::from(v)).abs())
            .fold(f64::INFINITY, f64::min);
        let d = (f64::from(x) - f64::from(NF4_CODE[usize::from(c)])).abs();
        assert!(d <= best + 1e-7, "seed {seed}: x={x} code {c} not nearest");
    }
}

fn next_up(x: f32) -> f32 {
    if x >= 0.0 {
        f32::from_bits(x.to_bits() + 1)
    } else {
        f32::from_bits(x.to_bits() - 1)
    }
}

fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

#[test]
fn midpoint_values_in_a_block_quantize_to_lower_code() {
    // absmax 1.0 -> reciprocal 1.0, so the normalised values are the inputs themselves.
    let mut values = vec![1.0f32];
    values.extend(NF4_THRESHOLDS);
    values.extend(NF4_THRESHOLDS.iter().map(|&t| next_up(t)));
    values.resize(BLOCKSIZE, 0.0);
    let q = quantize(&values, false).unwrap();
    assert_eq!(q.absmax, OwnedAbsmax::Plain(vec![1.0]));
    assert_eq!(code_at(&q.packed, 0), 15);
    for k in 0..15 {
        assert_eq!(code_at(&q.packed, 1 + k), k as u8, "midpoint {k}");
        assert_eq!(
            code_at(&q.packed, 16 + k),
            k as u8 + 1,
            "above midpoint {k}"
        );
    }
    for i in 31..BLOCKSIZE {
        assert_eq!(code_at(&q.packed, i), 7, "zero at {i}");
    }
}

#[test]
fn dequantize_hand_checked_plain() {
    // Block 0 (absmax 2): codes 7, 15, 0, 8, ... ; block 1 (absmax 0.5): partial, 3 elements.
    let n: usize = 67;
    let mut packed = vec![0x77u8; n.div_ceil(2)];
    packed[0] = 0x7F; // elements 0 (code 7) and 1 (code 15)
    packed[1] = 0x08; // elements 2 (code 0) and 3 (code 8)
    packed[32] = 0xE1; // elements 64 (code 14) and 65 (code 1)
    packed[33] = 0x50; // element 66 (code 5); low nibble unused
    let absmax = [2.0f32, 0.5];
    let mut out = vec![f32::NAN; n];
    dequantize_into(
        &packed,
        &Absmax::Plain(&absmax),
        &NF4_CODE,
        n,
        DequantOut::F32(&mut out),
    )
    .unwrap();
    assert_eq!(out[0], 0.0);
    assert_eq!(out[1], 2.0);
    assert_eq!(out[2], -2.0);
    assert_eq!(out[3], NF4_CODE[8] * 2.0);
    assert!(out[4..64].iter().all(|&v| v == 0.0));
    assert_eq!(out[64], NF4_CODE[14] * 0.5);
    assert_eq!(out[65], NF4_CODE[1] * 0.5);
    assert_eq!(out[66], NF4_CODE[5] * 0.5);

    let mut bits = vec![0u16; n];
    dequantize_into(
        &packed,
        &Absmax::Plain(&absmax),
        &NF4_CODE,
        n,
        DequantOut::Bits16(&mut bits, FloatDtype::BF16),
    )
    .unwrap();
    for (i, (&b, &f)) in bits.iter().zip(&out).enumerate() {
        assert_eq!(b, rne_bf16(f), "bf16 element {i}");
    }
    let mut bits = vec![0u16; n];
    dequantize_into(
        &packed,
        &Absmax::Plain(&absmax),
        &NF4_CODE,
        n,
        DequantOut::Bits16(&mut bits, FloatDtype::F16),
    )
    .unwrap();
    assert_eq!(bits[1], 0x4000); // 2.0
    assert_eq!(bits[2], 0xC000); // -2.0
    for (i, (&b, &f)) in bits.iter().zip(&out).enumerate() {
        // f16 has 11 significant bits: |error| <= half an ulp of the value.
        let back = half::f16::from_bits(b).to_f32();
        let ulp = if f == 0.0 {
            0.0
        } else {
            2f32.powi(f.abs().log2().floor() as i32 - 10)
        };
        assert!(
            (back - f).abs() <= ulp / 2.0,
            "f16 element {i}: {f} -> {back}"
        );
    }
}

#[test]
fn bf16_cast_is_round_to_nearest_even() {
    // Exact ties between two bf16 values: round to the even mantissa.
    let tie_down = f32::from_bits(0x3F80_8000); // 1 + 2^-8: between 0x3F80 and 0x3F81
    let tie_up = f32::from_bits(0x3F81_8000); // between 0x3F81 and 0x3F82
    assert_eq!(half::bf16::from_f32(tie_down).to_bits(), 0x3F80);
    assert_eq!(half::bf16::from_f32(tie_up).to_bits(), 0x3F82);
    let (mut rng, seed) = Rng::fresh();
    for _ in 0..100_000 {
        let r = rng.next_u64();
        let exponent = 1 + (r >> 32) as u32 % 253;
        let x = f32::from_bits((exponent << 23) | (r as u32 & 0x007F_FFFF));
        let x = if rng.next_u64() & 1 == 0 { x } else { -x };
        assert_eq!(
            half::bf16::from_f32(x).to_bits(),
            rne_bf16(x),
            "seed {seed}: {x:e}"
        );
    }
}

#[test]
fn dequantize_nested_matches_two_roundings() {
    let (mut rng, seed) = Rng::fresh();
    let nb = 600; // 3 nested blocks, the last partial
    let n = nb * BLOCKSIZE - 10;
    let map = dynamic_map_signed();
    let codes: Vec<u8> = (0..nb).map(|_| rng.next_u64() as u8).collect();
    let nested_absmax: Vec<f32> = (0..3).map(|_| rng.uniform() as f32 * 0.1).collect();
    let offset = rng.uniform() as f32 * 0.05 + 0.01;
    let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.next_u64() as u8).collect();
    let stats = Absmax::Nested {
        codes: &codes,
        nested_absmax: &nested_absmax,
        nested_map: &map,
        offset,
    };
    let mut expanded = vec![0.0f32; nb];
    expand_absmax(&stats, &mut expanded).unwrap();
    for b in 0..nb {
        // f64 emulation of fp32 ops is exact (double rounding is innocuous for p' >= 2p + 2).
        let prod =
            (f64::from(map[usize::from(codes[b])]) * f64::from(nested_absmax[b / 256])) as f32;
        let want = (f64::from(prod) + f64::from(offset)) as f32;
        assert_eq!(
            expanded[b].to_bits(),
            want.to_bits(),
            "seed {seed}: block {b}"
        );
    }
    let mut out = vec![0.0f32; n];
    dequantize_into(&packed, &stats, &NF4_CODE, n, DequantOut::F32(&mut out)).unwrap();
    let mut bf = vec![0u16; n];
    dequantize_into(
        &packed,
        &stats,
        &NF4_CODE,
        n,
        DequantOut::Bits16(&mut bf, FloatDtype::BF16),
    )
    .unwrap();
    for i in 0..n {
        let want = (f64::from(NF4_CODE[usize::from(code_at(&packed, i))])
            * f64::from(expanded[i / BLOCKSIZE])) as f32;
        assert_eq!(out[i].to_bits(), want.to_bits(), "seed {seed}: element {i}");
        assert_eq!(bf[i], rne_bf16(want), "seed {seed}: bf16 element {i}");
    }
}

#[test]
fn round_trip_error_within_nf4_bound() {
    let (mut rng, seed) = Rng::fresh();
    let n = 192 * 320 + 37; // partial last block
    let values = rng.normals(n, 0.02);
    let max_half_gap = NF4_CODE
        .windows(2)
        .map(|w| (w[1] - w[0]) / 2.0)
        .fold(0.0f32, f32::max);

    let q = quantize(&values, false).unwrap();
    let OwnedAbsmax::Plain(absmax) = &q.absmax else {
        panic!("expected plain statistics")
    };
    assert_eq!(absmax.len(), n.div_ceil(BLOCKSIZE));
    for (b, block) in values.chunks(BLOCKSIZE).enumerate() {
        let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(absmax[b], m, "seed {seed}: absmax {b}");
    }
    let deq = dequant_f32(&q, n);
    for (i, (&v, &d)) in values.iter().zip(&deq).enumerate() {
        let bound = max_half_gap * absmax[i / BLOCKSIZE] * (1.0 + 1e-5);
        assert!(
            (v - d).abs() <= bound,
            "seed {seed}: element {i}: {v} -> {d}"
        );
    }

    let qn = quantize(&values, true).unwrap();
    assert_eq!(
        qn.packed, q.packed,
        "nested does not change the 4-bit codes"
    );
    let OwnedAbsmax::Nested {
        codes,
        nested_absmax,
        offset,
    } = &qn.absmax
    else {
        panic!("expected nested statistics")
    };
    assert_eq!(codes.len(), absmax.len());
    assert_eq!(nested_absmax.len(), absmax.len().div_ceil(NESTED_BLOCKSIZE));
    let mean = absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len() as f64;
    assert!((f64::from(*offset) - mean).abs() <= mean * 1e-7);
    let map = dynamic_map_signed();
    let max_map_half_gap = map
        .windows(2)
        .map(|w| (w[1] - w[0]) / 2.0)
        .fold(0.0f32, f32::max);
    let mut expanded = vec![0.0f32; absmax.len()];
    expand_absmax(&qn.absmax.as_absmax(&map), &mut expanded).unwrap();
    for (b, (&e, &a)) in expanded.iter().zip(absmax.iter()).enumerate() {
        let bound = max_map_half_gap * nested_absmax[b / NESTED_BLOCKSIZE] * 1.001 + 1e-7;
        assert!(
            (e - a).abs() <= bound,
            "seed {seed}: nested absmax {b}: {a} -> {e}"
        );
    }
    let deqn = dequant_f32(&qn, n);
    for (i, (&v, &d)) in values.iter().zip(&deqn).enumerate() {
        let b = i / BLOCKSIZE;
        let bound = max_half_gap * expanded[b] + (expanded[b] - absmax[b]).abs() + 1e-7;
        assert!(
            (v - d).abs() <= bound,
            "seed {seed}: nested element {i}: {v} -> {d}"
        );
    }
}

#[test]
fn dynamic_encode_is_nearest() {
    let map = dynamic_map_signed();
    let (mut rng, seed) = Rng::fresh();
    for i in 0..200_000 {
        let x = if i < 256 {
            map[i]
        } else {
            // Spread over many magnitudes, like normalised (absmax - mean) values.
            let mag = 10f64.powf(-7.0 * rng.uniform()) as f32;
            if rng.next_u64() & 1 == 0 {
                mag
            } else {
                -mag
            }
        };
        let c = usize::from(dynamic_encode(&map, x));
        let d = (f64::from(x) - f64::from(map[c])).abs();
        let best = map
            .iter()
            .map(|&v| (f64::from(x) - f64::from(v)).abs())
            .fold(f64::INFINITY, f64::min);
        // The CUDA search compares against fp32 midpoints, so it may only lose a tie that the
        // midpoint rounding decided.
        assert!(
            d <= best + f64::from(x.abs()) * 1e-6,
            "seed {seed}: x={x:e} code {c}"
        );
        if i < 256 {
            assert_eq!(map[c], x, "map value {i}");
        }
    }
}

#[test]
fn dynamic_map_shape() {
    let map = dynamic_map_signed();
    assert!(map.windows(2).all(|w| w[0] <= w[1]), "sorted");
    assert_eq!(map[0], -0.992_968_75);
    assert_eq!(map[255], 1.0);
    assert_eq!(map.iter().filter(|&&v| v == 0.0).count(), 1);
    assert_eq!(map.iter().filter(|&&v| v < 0.0).count(), 127);
}

#[test]
fn all_zero_block_gets_code_zero_and_decodes_to_zero() {
    let (mut rng, _) = Rng::fresh();
    let mut values = rng.normals(3 * BLOCKSIZE, 1.0);
    values[BLOCKSIZE..2 * BLOCKSIZE].fill(0.0);
    for nested in [false, true] {
        let q = quantize(&values, nested).unwrap();
        for i in BLOCKSIZE..2 * BLOCKSIZE {
            assert_eq!(code_at(&q.packed, i), 0, "element {i}");
        }
        if let OwnedAbsmax::Plain(a) = &q.absmax {
            assert_eq!(a[1], 0.0);
        }
        let deq = dequant_f32(&q, values.len());
        if !nested {
            assert!(deq[BLOCKSIZE..2 * BLOCKSIZE].iter().all(|&v| v == 0.0));
        } else {
            // The nested absmax of a zero block decodes near (not exactly) zero.
            let OwnedAbsmax::Nested { nested_absmax, .. } = &q.absmax else {
                panic!()
            };
            let bound = nested_absmax[0] * 0.01 + 1e-6;
            assert!(deq[BLOCKSIZE..2 * BLOCKSIZE]
                .iter()
                .all(|&v| v.abs() <= bound));
        }
    }
}

#[test]
fn partial_last_block_and_odd_length() {
    let (mut rng, seed) = Rng::fresh();
    for n in [1usize, 2, 63, 64, 65, 100, 101, 127, 129] {
        let mut values = rng.normals(n, 1.0);
        // Make the partial block's absmax smaller than the full block's, so mixing them shows.
        for v in values.iter_mut().skip(64) {
            *v *= 0.1;
        }
        let q = quantize(&values, false).unwrap();
        assert_eq!(q.packed.len(), n.div_ceil(2), "n={n}");
        let OwnedAbsmax::Plain(absmax) = &q.absmax else {
            panic!()
        };
        assert_eq!(absmax.len(), n.div_ceil(64), "n={n}");
        for (b, block) in values.chunks(64).enumerate() {
            let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(absmax[b], m, "seed {seed}: n={n} block {b}");
            let recip = 1.0 / m;
            for (j, &v) in block.iter().enumerate() {
                assert_eq!(code_at(&q.packed, b * 64 + j), nf4_encode(v * recip));
            }
        }
        if n % 2 == 1 {
            // The padding element is a zero: code 7.
            assert_eq!(q.packed[n / 2] & 0x0F, 7, "n={n}");
        }
        let deq = dequant_f32(&q, n);
        assert_eq!(deq.len(), n);
    }
}

#[test]
fn two_thread_path_matches_single_thread() {
    let (mut rng, seed) = Rng::fresh();
    let n = PARALLEL_MIN_ELEMENTS + 3 * 64 + 17;
    let values = rng.normals(n, 0.05);
    let q = quantize(&values, true).unwrap();
    let blocks = n.div_ceil(BLOCKSIZE);
    let mut absmax = vec![0.0f32; blocks];
    let mut packed = vec![0u8; n.div_ceil(2)];
    quant_run(&values, &mut absmax, &mut packed);
    assert_eq!(q.packed, packed, "seed {seed}");
    let stats = Absmax::Plain(&absmax);
    let mut par = vec![0u16; n];
    dequantize_into(
        &packed,
        &stats,
        &NF4_CODE,
        n,
        DequantOut::Bits16(&mut par, FloatDtype::BF16),
    )
    .unwrap();
    let mut single = vec![0u16; n];
    dequant_run(&packed, &absmax, &NF4_CODE, &mut single, &|v: f32| {
        half::bf16::from_f32(v).to_bits()
    });
    assert!(par == single, "seed {seed}");
}

fn err_text(r: Result<()>) -> String {
    match r {
        Ok(()) => panic!("expected an error"),
        Err(e) => {
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            e.to_string()
        }
    }
}

#[test]
fn length_validation_names_the_argument() {
    let n = 130; // 3 blocks, 65 bytes
    let packed = vec![0u8; 65];
    let absmax = vec![1.0f32; 3];
    let mut out = vec![0.0f32; n];

    let e = err_text(dequantize_into(
        &packed[..64],
        &Absmax::Plain(&absmax),
        &NF4_CODE,
        n,
        DequantOut::F32(&mut out),
    ));
    assert!(
        e.contains("packed") && e.contains("65") && e.contains("64"),
        "{e}"
    );

    let e = err_text(dequantize_into(
        &packed,
        &Absmax::Plain(&absmax[..2]),
        &NF4_CODE,
        n,
        DequantOut::F32(&mut out),
    ));
    assert!(
        e.contains("absmax") && e.contains('3') && e.contains('2'),
        "{e}"
    );

    let e = err_text(dequantize_into(
        &packed,
        &Absmax::Plain(&absmax),
        &NF4_CODE[..15],
        n,
        DequantOut::F32(&mut out),
    ));
    assert!(
        e.contains("quant_map") && e.contains("16") && e.contains("15"),
        "{e}"
    );

    let e = err_text(dequantize_into(
        &packed,
        &Absmax::Plain(&absmax),
        &NF4_CODE,
        n,
        DequantOut::F32(&mut out[..129]),
    ));
    assert!(
        e.contains("output") && e.contains("130") && e.contains("129"),
        "{e}"
    );

    let mut bits = vec![0u16; n];
    let e = err_text(dequantize_into(
        &packed,
        &Absmax::Plain(&absmax),
        &NF4_CODE,
        n,
        DequantOut::Bits16(&mut bits, FloatDtype::F32),
    ));
    assert!(e.contains("float32"), "{e}");

    // Nested: 300 blocks -> 2 nested scales, 256-entry map.
    let n = 300 * 64;
    let packed = vec![0u8; n / 2];
    let codes = vec![0u8; 300];
    let map = dynamic_map_signed();
    let mut out = vec![0.0f32; n];
    let e = err_text(dequantize_into(
        &packed,
        &Absmax::Nested {
            codes: &codes,
            nested_absmax: &[1.0],
            nested_map: &map,
            offset: 0.0,
        },
        &NF4_CODE,
        n,
        DequantOut::F32(&mut out),
    ));
    assert!(
        e.contains("nested_absmax") && e.contains('2') && e.contains('1'),
        "{e}"
    );
    let e = err_text(dequantize_into(
        &packed,
        &Absmax::Nested {
            codes: &codes,
            nested_absmax: &[1.0, 1.0],
            nested_map: &map[..255],
            offset: 0.0,
        },
        &NF4_CODE,
        n,
        DequantOut::F32(&mut out),
    ));
    assert!(
        e.contains("nested_quant_map") && e.contains("256") && e.contains("255"),
        "{e}"
    );
    let e = err_text(expand_absmax(
        &Absmax::Nested {
            codes: &codes,
            nested_absmax: &[1.0, 1.0],
            nested_map: &map,
            offset: 0.0,
        },
        &mut [0.0; 299],
    ));
    assert!(e.contains("300") && e.contains("299"), "{e}");

    // Extra packed bytes are allowed (>= ceil(n/2)).
    dequantize_into(
        &[0u8; 70],
        &Absmax::Plain(&[1.0; 3]),
        &NF4_CODE,
        130,
        DequantOut::F32(&mut [0.0; 130]),
    )
    .unwrap();
    // n = 0 is a valid empty tensor.
    dequantize_into(
        &[],
        &Absmax::Plain(&[]),
        &NF4_CODE,
        0,
        DequantOut::F32(&mut []),
    )
    .unwrap();
}

#[test]
fn quantize_rejects_bad_input() {
    let e = quantize(&[], false).unwrap_err().to_string();
    assert!(e.contains("values"), "{e}");
    let e = quantize(&[1.0, f32::NAN], true).unwrap_err().to_string();
    assert!(e.contains("values[1]"), "{e}");
    let e = quantize(&[f32::INFINITY], true).unwrap_err().to_string();
    assert!(e.contains("values[0]"), "{e}");
    assert!(FloatDtype::from_name("float64").is_err());
    assert_eq!(FloatDtype::from_name("bfloat16").unwrap(), FloatDtype::BF16);
}
