//! Block-scaled FP8 weights, as DeepSeek-V3/R1 ship them: `float8_e4m3fn`
//! values with one f32 scale (`weight_scale_inv`, the factor that
//! dequantizes) per `block` of rows × columns; edge blocks may be partial.
//! On the CPU a matrix stays FP8 in memory, one byte a weight, and is
//! dequantized a block at a time inside the matmul.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `float8_e4m3fn` → f32: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
/// bits, subnormals, no infinities. In bit arithmetic rather than a table
/// so a row decodes in vector registers. The NaN byte `S.1111.111` (which
/// no quantizer writes: the largest finite value is 448) decodes as ±480.
#[inline(always)]
fn e4m3(b: u8) -> f32 {
    let b = b as u32;
    let sign = (b & 0x80) << 24;
    let exp = (b >> 3) & 0xF;
    let man = b & 0x7;
    let normal = sign | ((exp + 120) << 23) | (man << 20);
    // A subnormal is man × 2^-9: the same as a normal with exponent 1,
    // less 2^-6.
    let sub = f32::from_bits(sign | (121 << 23) | (man << 20)) - f32::from_bits(sign | (121 << 23));
    if exp == 0 {
        sub
    } else {
        f32::from_bits(normal)
    }
}

/// Decodes `src` into `dst`, times `scale`.
#[inline(always)]
fn decode_run(src: &[u8], scale: f32, dst: &mut [f32]) {
    for (o, &b) in dst.iter_mut().zip(src) {
        *o = e4m3(b) * scale;
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
            assert_eq!(e4m3(b), want, "byte {b:#04x}");
        }
        assert_eq!(e4m3(0x38), 1.0);
        assert_eq!(e4m3(0x7E), 448.0);
        assert_eq!(e4m3(0x01), 2f32.powi(-9));
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
        let dense = |i: usize, j: usize| e4m3(data[i * cols + j]) * scales[(i / 2) * sc + j / 3];
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
