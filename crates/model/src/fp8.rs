//! Block-scaled FP8 weights, as DeepSeek-V3/R1 ship them: `float8_e4m3fn`
//! values with one f32 scale (`weight_scale_inv`, the factor that
//! dequantizes) per `block` of rows × columns; edge blocks may be partial.
//! On the CPU a matrix stays FP8 in memory, one byte a weight, and is
//! dequantized a block at a time inside the matmul.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `float8_e4m3fn` → f32 for every byte: 1 sign bit, 4 exponent bits (bias
/// 7), 3 mantissa bits, subnormals, no infinities, NaN at `S.1111.111`.
fn table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
            let exp = ((b >> 3) & 0xF) as i32;
            let man = (b & 0x7) as f32;
            *v = if b & 0x7F == 0x7F {
                f32::NAN
            } else if exp == 0 {
                sign * man / 8.0 * 2f32.powi(-6)
            } else {
                sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
        }
        t
    })
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
        let t = table();
        let row = &self.data[i * self.cols..(i + 1) * self.cols];
        let mut j = 0;
        while j < self.cols {
            // Up to the next column-block boundary, one scale.
            let end = ((self.col0 + j) / self.block[1] + 1) * self.block[1] - self.col0;
            let end = end.min(self.cols);
            let s = self.scale(i, j);
            for (o, &b) in out[j..end].iter_mut().zip(&row[j..end]) {
                *o = t[b as usize] * s;
            }
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
        let (tokens, k) = x.dims2()?;
        if k != self.cols {
            return Err(Error::Config(format!(
                "an FP8 matrix [{}, {}] times input width {k}",
                self.rows, self.cols
            )));
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let strips: Vec<Vec<f32>> = (0..self.rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|task| {
                let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(self.rows);
                let width = rows.len();
                let mut w = vec![0f32; self.cols];
                let mut strip = vec![0f32; tokens * width];
                for (r, i) in rows.enumerate() {
                    self.dequantize_row(i, &mut w);
                    for t in 0..tokens {
                        strip[t * width + r] = dot(&xs[t * k..(t + 1) * k], &w);
                    }
                }
                strip
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

    /// Bytes held: one per weight, four per scale.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }
}

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

    #[test]
    fn the_table_decodes_e4m3fn() {
        let t = table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0); // exponent 7, mantissa 0
        assert_eq!(t[0x7E], 448.0); // the largest finite value
        assert_eq!(t[0xFE], -448.0);
        assert_eq!(t[0x01], 2f32.powi(-9)); // the smallest subnormal
        assert!(t[0x7F].is_nan() && t[0xFF].is_nan());
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
        let dense = |i: usize, j: usize| {
            table()[data[i * cols + j] as usize] * scales[(i / 2) * sc + j / 3]
        };
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
