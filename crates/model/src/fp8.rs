//! FP8 (`float8_e4m3fn`): its values, which the KV cache can hold, and
//! block-scaled FP8 weights, as DeepSeek-V3/R1 ship them: values with one
//! f32 scale (`weight_scale_inv`, the factor that dequantizes) per `block`
//! of rows × columns; edge blocks may be partial. On the CPU a matrix
//! stays FP8 in memory, one byte a weight, and is dequantized a block at a
//! time inside the matmul.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// One `float8_e4m3fn` value: 1 sign bit, 4 exponent bits (bias 7), 3
/// mantissa bits, subnormals, no infinities; ±448 at most. The NaN byte
/// `S.1111.111` (which [`Fp8::from_f32`] writes only for a NaN) decodes as
/// ±480.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Fp8(pub u8);

/// 2^120: an fp8 magnitude placed in an f32's exponent and mantissa bits
/// (`eeee.mmm` at bits 20–26) reads as its value × 2^-120, f32 subnormals
/// included, so one multiply decodes normal and subnormal values alike.
pub(crate) const FP8_UNBIAS: f32 = f32::from_bits((127 + 120) << 23);

impl Fp8 {
    /// The value, exactly. Bit arithmetic and one multiply, with no
    /// branch, so a row decodes in vector registers.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        let b = self.0 as u32;
        f32::from_bits(((b & 0x80) << 24) | ((b & 0x7F) << 20)) * FP8_UNBIAS
    }

    /// The nearest value, ties to even, saturating at ±448: NVIDIA's
    /// `__NV_SATFINITE` conversion, as vLLM's kernels write an fp8 cache.
    #[inline(always)]
    pub fn from_f32(x: f32) -> Self {
        let sign = ((x.to_bits() >> 24) & 0x80) as u8;
        let a = x.abs();
        let magnitude = if a.is_nan() {
            0x7F
        } else if a >= 464.0 {
            // 464 lies halfway between 448 and the 480 fp8 cannot hold.
            0x7E
        } else if a < 1.0 / 64.0 {
            // Subnormal: a multiple of 2^-9 (8 × 2^-9 is the least normal).
            (a * 512.0).round_ties_even() as u8
        } else {
            // Round off 20 mantissa bits to nearest even, then rebias the
            // exponent from f32's 127 to fp8's 7.
            let b = a.to_bits();
            let r = b + 0x7_FFFF + ((b >> 20) & 1);
            ((r >> 20) - (120 << 3)) as u8
        };
        Fp8(sign | magnitude)
    }
}

/// Decodes `src` into `dst`, times `scale`.
#[inline(always)]
fn decode_run(src: &[u8], scale: f32, dst: &mut [f32]) {
    for (o, &b) in dst.iter_mut().zip(src) {
        *o = Fp8(b).to_f32() * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_run_avx2(src: &[u8], scale: f32, dst: &mut [f32]) {
    // The same code, compiled with 8-wide vectors.
    decode_run(src, scale, dst)
}

/// One FP8 matrix `[rows, cols]` (or a tensor-parallel slice of one).
#[derive(Debug)]
pub struct Fp8Matrix {
    data: Vec<u8>,
    rows: usize,
    cols: usize,
    /// The scales of the blocks this slice touches, `[scale_rows, scale_cols]`.
    scales: Vec<f32>,
    scale_cols: usize,
    /// Where this slice starts in the whole matrix, in elements (a slice
    /// need not start on a block boundary).
    row0: usize,
    col0: usize,
    block: [usize; 2],
}

impl Fp8Matrix {
    /// `data` is the slice `[row0..row0 + rows, col0..col0 + cols]` of a
    /// matrix whose `scales` (all of them, `[ceil(R / b0), ceil(C / b1)]`,
    /// `scale_cols` wide) are given.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        data: Vec<u8>,
        rows: usize,
        cols: usize,
        row0: usize,
        col0: usize,
        scales: &[f32],
        scale_cols: usize,
        block: [usize; 2],
    ) -> Result<Self> {
        let bad = |msg: String| Error::BadWeight {
            name: name.into(),
            msg,
        };
        if data.len() != rows * cols || block[0] == 0 || block[1] == 0 {
            return Err(bad(format!(
                "{} bytes for [{rows}, {cols}] in blocks {block:?}",
                data.len()
            )));
        }
        let (r0, r1) = (row0 / block[0], (row0 + rows).div_ceil(block[0]));
        let (c0, c1) = (col0 / block[1], (col0 + cols).div_ceil(block[1]));
        if c1 > scale_cols || r1 * scale_cols > scales.len() {
            return Err(bad(format!(
                "{} scales ({scale_cols} wide) do not cover [{}, {}] in blocks {block:?}",
                scales.len(),
                row0 + rows,
                col0 + cols
            )));
        }
        let mut mine = Vec::with_capacity((r1 - r0) * (c1 - c0));
        for r in r0..r1 {
            mine.extend_from_slice(&scales[r * scale_cols + c0..r * scale_cols + c1]);
        }
        Ok(Self {
            data,
            rows,
            cols,
            scales: mine,
            scale_cols: c1 - c0,
            row0,
            col0,
            block,
        })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The scale of the block holding element `(i, j)` of this slice.
    fn scale(&self, i: usize, j: usize) -> f32 {
        let br = (self.row0 + i) / self.block[0] - self.row0 / self.block[0];
        let bc = (self.col0 + j) / self.block[1] - self.col0 / self.block[1];
        self.scales[br * self.scale_cols + bc]
    }

    /// Row `i` dequantized into `out` (`cols` long).
    fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        let row = &self.data[i * self.cols..(i + 1) * self.cols];
        let simd = crate::quant::has_avx2();
        let mut j = 0;
        while j < self.cols {
            // Up to the next column-block boundary, one scale.
            let end = ((self.col0 + j) / self.block[1] + 1) * self.block[1] - self.col0;
            let end = end.min(self.cols);
            let s = self.scale(i, j);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { decode_run_avx2(&row[j..end], s, &mut out[j..end]) };
                j = end;
                continue;
            }
            let _ = simd;
            decode_run(&row[j..end], s, &mut out[j..end]);
            j = end;
        }
    }

    /// The whole slice in f32.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(i, row)| self.dequantize_row(i, row));
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// `x [tokens, cols] → [tokens, rows]`: each task dequantizes a run of
    /// rows once and multiplies it with every token.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        const ROWS_PER_TASK: usize = 16;
        let dtype = x.dtype();
        let (tokens, xs) = crate::layers::matmul_input(x, self.cols, "FP8")?;
        let simd = crate::quant::has_avx2();
        let strips: Vec<Vec<f32>> = (0..self.rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|task| {
                let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(self.rows);
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    return unsafe { self.strip_avx2(rows, &xs, tokens) };
                }
                let _ = simd;
                self.strip(rows, &xs, tokens)
            })
            .collect();
        let mut out = vec![0f32; tokens * self.rows];
        for (task, strip) in strips.iter().enumerate() {
            let width = strip.len() / tokens.max(1);
            for t in 0..tokens {
                let dst = t * self.rows + task * ROWS_PER_TASK;
                out[dst..dst + width].copy_from_slice(&strip[t * width..(t + 1) * width]);
            }
        }
        Ok(Tensor::from_vec(out, (tokens, self.rows), x.device())?.to_dtype(dtype)?)
    }

    /// `rows` of the product for every token, token-major: each row is
    /// decoded once and met by every token.
    #[inline(always)]
    fn strip(&self, rows: std::ops::Range<usize>, xs: &[f32], tokens: usize) -> Vec<f32> {
        let (k, width) = (self.cols, rows.len());
        let mut w = vec![0f32; k];
        let mut strip = vec![0f32; tokens * width];
        for (r, i) in rows.enumerate() {
            self.dequantize_row(i, &mut w);
            for t in 0..tokens {
                strip[t * width + r] = dot(&xs[t * k..(t + 1) * k], &w);
            }
        }
        strip
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn strip_avx2(
        &self,
        rows: std::ops::Range<usize>,
        xs: &[f32],
        tokens: usize,
    ) -> Vec<f32> {
        // The same code, compiled with 8-wide vectors.
        self.strip(rows, xs, tokens)
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte against the format's definition.
    #[test]
    fn every_e4m3fn_byte_decodes_to_its_value() {
        for b in 0..=255u8 {
            if b & 0x7F == 0x7F {
                continue; // NaN, never stored
            }
            let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
            let (exp, man) = (((b >> 3) & 0xF) as i32, (b & 0x7) as f32);
            let want = if exp == 0 {
                sign * man / 8.0 * 2f32.powi(-6)
            } else {
                sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
            assert_eq!(Fp8(b).to_f32(), want, "byte {b:#04x}");
        }
        assert_eq!(Fp8(0x38).to_f32(), 1.0);
        assert_eq!(Fp8(0x7E).to_f32(), 448.0);
        assert_eq!(Fp8(0x01).to_f32(), 2f32.powi(-9));
    }

    #[test]
    fn every_byte_decodes_as_nvidias_conversion_does() {
        for b in (0..=255u8).filter(|b| b & 0x7F != 0x7F) {
            let want = float8::F8E4M3::from_bits(b).to_f32();
            assert_eq!(Fp8(b).to_f32().to_bits(), want.to_bits(), "byte {b:#04x}");
        }
    }

    #[test]
    fn values_round_as_nvidias_conversion_does() {
        // Every f32 from 2^-12 to past the saturation point, at a step of
        // 1/2048 of each value (so ties, values just off them, subnormals
        // and the top of the range all come up), both signs; and zero, the
        // extremes, and values that must saturate.
        let mut xs = vec![
            0.0f32,
            1e-30,
            2e-10,
            448.0,
            463.9,
            464.0,
            465.0,
            1e6,
            f32::MAX,
        ];
        let mut x = 2f32.powi(-12);
        while x < 1000.0 {
            xs.push(x);
            x += x * (1.0 / 2048.0);
        }
        for x in xs.iter().flat_map(|&x| [x, -x]) {
            let want = float8::F8E4M3::from_f32(x).to_bits();
            assert_eq!(Fp8::from_f32(x).0, want, "{x}");
        }
        // A value's own byte round-trips.
        for b in (0..=255u8).filter(|b| b & 0x7F != 0x7F) {
            assert_eq!(Fp8::from_f32(Fp8(b).to_f32()).0, b);
        }
    }

    #[allow(clippy::needless_range_loop)] // indices name rows and columns
    /// A [5, 7] matrix in 2 × 3 blocks (partial at both edges), whole and
    /// as a slice starting inside a block, against a plain dequantized matmul.
    #[test]
    fn blocks_partial_edges_and_slices_multiply_like_the_dense_matrix() {
        let (rows, cols, block) = (5usize, 7usize, [2, 3]);
        let data: Vec<u8> = (0..rows * cols).map(|i| ((i * 37) % 0x7E) as u8).collect();
        let (sr, sc) = (rows.div_ceil(2), cols.div_ceil(3));
        let scales: Vec<f32> = (0..sr * sc).map(|i| 0.5 + i as f32 * 0.25).collect();
        let dense =
            |i: usize, j: usize| Fp8(data[i * cols + j]).to_f32() * scales[(i / 2) * sc + j / 3];
        let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.7).sin()).collect();
        let xt = Tensor::from_vec(x.clone(), (2, cols), &Device::Cpu).unwrap();
        let check = |m: &Fp8Matrix, r0: usize, c0: usize| {
            let (r, c) = m.shape();
            let y = m
                .forward(&xt.narrow(1, c0, c).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for t in 0..2 {
                for i in 0..r {
                    let want: f32 = (0..c)
                        .map(|j| x[t * cols + c0 + j] * dense(r0 + i, c0 + j))
                        .sum();
                    assert!(
                        (y[t][i] - want).abs() < 1e-4,
                        "({t}, {i}): {} vs {want}",
                        y[t][i]
                    );
                }
            }
            let d = m.dequantize().unwrap().to_vec2::<f32>().unwrap();
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(d[i][j], dense(r0 + i, c0 + j));
                }
            }
        };
        let whole =
            Fp8Matrix::new("w", data.clone(), rows, cols, 0, 0, &scales, sc, block).unwrap();
        check(&whole, 0, 0);
        // Rows 1..4 (starting inside the first row block), columns 2..7.
        let slice: Vec<u8> = (1..4)
            .flat_map(|i| data[i * cols + 2..(i + 1) * cols].to_vec())
            .collect();
        let part = Fp8Matrix::new("w", slice, 3, 5, 1, 2, &scales, sc, block).unwrap();
        check(&part, 1, 2);
    }
}
