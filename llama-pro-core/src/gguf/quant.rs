//! ggml storage types: sizes, dequantisation to f32 and the encodings we write (F32, F16, BF16,
//! Q8_0).
//!
//! The dequantisers follow ggml's `dequantize_row_*` (`ggml-quants.c`) operation for operation in
//! f32 (scale × sub-scale first, then × quant, then − min), which is also the order of gguf-py's
//! numpy reference: the fixture test asserts bitwise equality with gguf-py on random blocks.

use half::{bf16, f16};

/// A ggml tensor type (the codes of `enum ggml_type`).
#[allow(missing_docs, non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

use GgmlType::*;

const TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    // (type, code, name, block elements, block bytes)
    (F32, 0, "F32", 1, 4),
    (F16, 1, "F16", 1, 2),
    (Q4_0, 2, "Q4_0", 32, 18),
    (Q4_1, 3, "Q4_1", 32, 20),
    (Q5_0, 6, "Q5_0", 32, 22),
    (Q5_1, 7, "Q5_1", 32, 24),
    (Q8_0, 8, "Q8_0", 32, 34),
    (Q8_1, 9, "Q8_1", 32, 36),
    (Q2_K, 10, "Q2_K", 256, 84),
    (Q3_K, 11, "Q3_K", 256, 110),
    (Q4_K, 12, "Q4_K", 256, 144),
    (Q5_K, 13, "Q5_K", 256, 176),
    (Q6_K, 14, "Q6_K", 256, 210),
    (Q8_K, 15, "Q8_K", 256, 292),
    (IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (IQ2_XS, 17, "IQ2_XS", 256, 74),
    (IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (IQ1_S, 19, "IQ1_S", 256, 50),
    (IQ4_NL, 20, "IQ4_NL", 32, 18),
    (IQ3_S, 21, "IQ3_S", 256, 110),
    (IQ2_S, 22, "IQ2_S", 256, 82),
    (IQ4_XS, 23, "IQ4_XS", 256, 136),
    (I8, 24, "I8", 1, 1),
    (I16, 25, "I16", 1, 2),
    (I32, 26, "I32", 1, 4),
    (I64, 27, "I64", 1, 8),
    (F64, 28, "F64", 1, 8),
    (IQ1_M, 29, "IQ1_M", 256, 56),
    (BF16, 30, "BF16", 1, 2),
    (TQ1_0, 34, "TQ1_0", 256, 54),
    (TQ2_0, 35, "TQ2_0", 256, 66),
    (MXFP4, 39, "MXFP4", 32, 17),
];

const SUPPORTED: &[GgmlType] = &[
    F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL,
    IQ4_XS,
];

impl GgmlType {
    fn row(&self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        TABLE
            .iter()
            .find(|r| r.0 == *self)
            .expect("every type is in the table")
    }
    /// The type of a ggml code.
    pub fn from_code(code: u32) -> Option<Self> {
        TABLE.iter().find(|r| r.1 == code).map(|r| r.0)
    }
    /// The type of a name (`Q8_0`, `q8_0`, `BF16`...).
    pub fn from_name(name: &str) -> Option<Self> {
        TABLE
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }
    /// ggml's code.
    pub fn code(&self) -> u32 {
        self.row().1
    }
    /// ggml's name (`Q4_K`).
    pub fn name(&self) -> &'static str {
        self.row().2
    }
    /// Elements per block.
    pub fn block_size(&self) -> usize {
        self.row().3
    }
    /// Bytes per block.
    pub fn type_size(&self) -> usize {
        self.row().4
    }
    /// Bytes of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(&self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }
    /// Whether [`dequantize`] handles it.
    pub fn is_supported(&self) -> bool {
        SUPPORTED.contains(self)
    }
    /// The names of the types we dequantise, for messages.
    pub fn supported_names() -> String {
        SUPPORTED
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[inline]
fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `get_scale_min_k4` of ggml: the 6-bit scale and min `j` of a Q4_K/Q5_K block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The non-linear 4-bit grid of IQ4_NL / IQ4_XS (`kvalues_iq4nl`).
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Dequantise `bytes` (whole blocks of `ty`) into `out` (one f32 per element).
///
/// Panics when `ty` is not [supported](GgmlType::is_supported) or the lengths disagree; callers
/// check both (the file reader with a message naming the tensor).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let bs = ty.block_size();
    let ts = ty.type_size();
    assert_eq!(bytes.len() / ts * bs, out.len(), "{} length", ty.name());
    match ty {
        F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
            }
        }
        F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (b, y) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
                dequantize_block(ty, b, y);
            }
        }
    }
}

fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        Q4_0 => {
            let d = h(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        Q4_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0xF) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        Q5_0 => {
            let d = h(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((qs[j] as u32 & 0xF) | xh0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] as u32 >> 4) | xh1) as i32 - 16) as f32 * d;
            }
        }
        Q5_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((qs[j] as u32 & 0xF) | xh0) as f32 * d + m;
                y[j + 16] = ((qs[j] as u32 >> 4) | xh1) as f32 * d + m;
            }
        }
        Q8_0 => {
            let d = h(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        Q2_K => {
            // scales[16], qs[64], d, dmin
            let scales = &b[0..16];
            let mut q = &b[16..80];
            let (d, min) = (h(b, 80), h(b, 82));
            let mut is = 0;
            let mut yi = 0;
            for _ in 0..2 {
                let mut shift = 0;
                for _ in 0..4 {
                    for half in 0..2 {
                        let sc = scales[is];
                        is += 1;
                        let dl = d * (sc & 0xF) as f32;
                        let ml = min * (sc >> 4) as f32;
                        for l in 0..16 {
                            y[yi] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                            yi += 1;
                        }
                    }
                    shift += 2;
                }
                q = &q[32..];
            }
        }
        Q3_K => {
            // hmask[32], qs[64], scales[12], d
            let hm = &b[0..32];
            let mut q = &b[32..96];
            let sc = &b[96..108];
            let d_all = h(b, 108);
            let kmask1 = 0x0303_0303u32;
            let kmask2 = 0x0f0f_0f0fu32;
            let mut aux = [
                u32::from_le_bytes([sc[0], sc[1], sc[2], sc[3]]),
                u32::from_le_bytes([sc[4], sc[5], sc[6], sc[7]]),
                u32::from_le_bytes([sc[8], sc[9], sc[10], sc[11]]),
                0,
            ];
            let tmp = aux[2];
            aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
            aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
            aux[0] = (aux[0] & kmask2) | ((tmp & kmask1) << 4);
            aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
            let mut scales = [0i8; 16];
            for (i, a) in aux.iter().enumerate() {
                for (k, byte) in a.to_le_bytes().iter().enumerate() {
                    scales[i * 4 + k] = *byte as i8;
                }
            }
            let mut is = 0;
            let mut yi = 0;
            let mut m = 1u8;
            for _ in 0..2 {
                let mut shift = 0;
                for _ in 0..4 {
                    for half in 0..2 {
                        let dl = d_all * (scales[is] as i32 - 32) as f32;
                        is += 1;
                        for l in 0..16 {
                            let i = l + 16 * half;
                            let v =
                                ((q[i] >> shift) & 3) as i32 - if hm[i] & m != 0 { 0 } else { 4 };
                            y[yi] = dl * v as f32;
                            yi += 1;
                        }
                    }
                    shift += 2;
                    m <<= 1;
                }
                q = &q[32..];
            }
        }
        Q4_K => {
            // d, dmin, scales[12], qs[128]
            let (d, min) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let mut q = &b[16..144];
            let mut is = 0;
            let mut yi = 0;
            for _ in 0..4 {
                let (sc1, m1) = scale_min_k4(is, scales);
                let (sc2, m2) = scale_min_k4(is + 1, scales);
                let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                for l in 0..32 {
                    y[yi + l] = d1 * (q[l] & 0xF) as f32 - m1;
                    y[yi + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
                yi += 64;
                q = &q[32..];
                is += 2;
            }
        }
        Q5_K => {
            // d, dmin, scales[12], qh[32], qs[128]
            let (d, min) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let mut ql = &b[48..176];
            let (mut u1, mut u2) = (1u8, 2u8);
            let mut is = 0;
            let mut yi = 0;
            for _ in 0..4 {
                let (sc1, m1) = scale_min_k4(is, scales);
                let (sc2, m2) = scale_min_k4(is + 1, scales);
                let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                for l in 0..32 {
                    let hi1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let hi2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[yi + l] = d1 * ((ql[l] & 0xF) + hi1) as f32 - m1;
                    y[yi + 32 + l] = d2 * ((ql[l] >> 4) + hi2) as f32 - m2;
                }
                yi += 64;
                ql = &ql[32..];
                is += 2;
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        Q6_K => {
            // ql[128], qh[64], scales[16] (i8), d
            let d = h(b, 208);
            for n in 0..2 {
                let ql = &b[64 * n..64 * n + 64];
                let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                let y = &mut y[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
        Q8_K => {
            let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            for j in 0..256 {
                y[j] = d * (b[4 + j] as i8) as f32;
            }
        }
        IQ4_NL => {
            let d = h(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = d * KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as f32;
                y[j + 16] = d * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
            }
        }
        IQ4_XS => {
            // d, scales_h (u16), scales_l[4], qs[128]
            let d = h(b, 0);
            let scales_h = u16::from_le_bytes([b[2], b[3]]);
            let scales_l = &b[4..8];
            for ib in 0..8 {
                let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) as i32
                    | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
                let dl = d * (ls - 32) as f32;
                let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
                for j in 0..16 {
                    y[32 * ib + j] = dl * KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as f32;
                    y[32 * ib + j + 16] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
                }
            }
        }
        other => unreachable!("{} is not supported", other.name()),
    }
}

/// Encode f32 values as `ty` (F32, F16, BF16 or Q8_0), as gguf-py does: F16 and BF16 round to
/// nearest even; Q8_0 takes `d = max|x| / 127` per block of 32, quants `round(x / d)` (half away
/// from zero, through `x * (1/d)` as gguf-py computes it), `d` stored as f16.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    match ty {
        F32 => bytemuck::cast_slice(values).to_vec(),
        F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        Q8_0 => {
            assert!(
                values.len().is_multiple_of(32),
                "Q8_0 rows are blocks of 32"
            );
            let mut out = Vec::with_capacity(values.len() / 32 * 34);
            for block in values.chunks_exact(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|&x| (x * id).round() as i8 as u8));
            }
            out
        }
        other => panic!("quantisation to {} is not implemented", other.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) * 0.01)
            .collect();
        let q = quantize(Q8_0, &x);
        assert_eq!(q.len(), 68);
        let mut y = vec![0f32; 64];
        dequantize(Q8_0, &q, &mut y);
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let d = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= d * 0.57, "block {b}: {a} vs {c}");
            }
        }
    }

    #[test]
    fn codes_round_trip() {
        for r in TABLE {
            assert_eq!(GgmlType::from_code(r.1), Some(r.0));
            assert_eq!(GgmlType::from_name(r.2), Some(r.0));
        }
    }
}
