//! Dense 16-bit weights (bf16 or f16, as Hugging Face checkpoints and f16
//! GGUFs store them) multiplied on the CPU as they are stored.
//!
//! candle multiplies dense weights in the activations' dtype, f32 on the
//! CPU: twice the bytes of the checkpoint in memory and on every decode
//! step, which reads all weights once per token. Here each weight is widened
//! to f32 in a register as it is used (exact for both formats), so a step
//! reads half the bytes, and one weight load serves a tile of tokens.
//!
//! An output is one accumulator per (row, token) over the row in 16-wide
//! chunks (8-wide on AVX2), summed across lanes at the end. Its operations
//! do not depend on the tile or batch it runs in, so a token's outputs are
//! the same bits alone or beside others; speculative decoding's exactness
//! rests on that, as it does for the quantized kernels.

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::layers::matmul_input;
use crate::quant::Isa;

/// How the 16 bits of a weight encode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    Bf16,
    F16,
}

impl HalfKind {
    fn name(self) -> &'static str {
        match self {
            HalfKind::Bf16 => "bf16",
            HalfKind::F16 => "f16",
        }
    }

    fn to_f32(self, bits: u16) -> f32 {
        match self {
            HalfKind::Bf16 => bf16::from_bits(bits).to_f32(),
            HalfKind::F16 => f16::from_bits(bits).to_f32(),
        }
    }
}

/// A `[rows, cols]` weight matrix (rows = output features) of bf16 or f16.
pub struct HalfMatrix {
    rows: usize,
    cols: usize,
    kind: HalfKind,
    /// The path `forward` takes.
    isa: Isa,
    /// Row-major, as stored.
    bits: Vec<u16>,
}

impl std::fmt::Debug for HalfMatrix {
    /// The shape and kind, not the values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("kind", &self.kind)
            .field("isa", &self.isa)
            .finish()
    }
}

impl HalfMatrix {
    /// The little-endian bytes of a `[rows, cols]` matrix, in one or more
    /// consecutive parts (a shard's rows), for [`Isa::chosen`].
    pub fn from_parts(
        name: &str,
        kind: HalfKind,
        parts: &[&[u8]],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        Self::from_parts_for(Isa::chosen(), name, kind, parts, rows, cols)
    }

    /// As [`HalfMatrix::from_parts`], for the path `isa` (capped by what the
    /// CPU supports).
    pub fn from_parts_for(
        isa: Isa,
        name: &str,
        kind: HalfKind,
        parts: &[&[u8]],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len != rows * cols * 2 {
            return Err(Error::BadWeight {
                name: name.into(),
                msg: format!("{len} bytes for a [{rows}, {cols}] matrix of 16-bit values"),
            });
        }
        let mut bits = crate::pages::with_huge_pages(rows * cols);
        for part in parts {
            bits.extend(
                part.chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]])),
            );
        }
        Ok(Self {
            rows,
            cols,
            kind,
            isa: isa.min(Isa::supported()),
            bits,
        })
    }

    /// Stacks matrices with the same column count and kind (fused
    /// projections).
    pub fn concat_rows(parts: &[&Self]) -> Self {
        let first = parts[0];
        assert!(
            parts
                .iter()
                .all(|p| p.cols == first.cols && p.kind == first.kind && p.isa == first.isa),
            "stacked matrices differ in columns, kind or path"
        );
        let mut bits = crate::pages::with_huge_pages(parts.iter().map(|p| p.bits.len()).sum());
        for p in parts {
            bits.extend_from_slice(&p.bits);
        }
        Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            kind: first.kind,
            isa: first.isa,
            bits,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn kind(&self) -> HalfKind {
        self.kind
    }

    /// The matrix as dense f32 (embedding lookups).
    pub fn dequantize(&self) -> Result<Tensor> {
        let out: Vec<f32> = self.bits.iter().map(|&b| self.kind.to_f32(b)).collect();
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// `x [tokens, cols] → [tokens, rows]`, in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, x) = matmul_input(x, self.cols, self.kind.name())?;
        let mut out = vec![0f32; m * self.rows];
        self.forward_into(&x, m, &mut out);
        Ok(Tensor::from_vec(out, (m, self.rows), &Device::Cpu)?)
    }

    /// `x [m, cols]` (row-major) times the matrix into `out [m, rows]`.
    fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        // Tasks own strips of weight rows, read once from memory and kept in
        // cache while every token passes over them. Enough tasks to balance
        // the pool, each big enough to pay for its scheduling.
        let threads = rayon::current_num_threads();
        let per_task = n.div_ceil(threads * 4).next_multiple_of(8).max(32);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let rows = task * per_task..((task + 1) * per_task).min(n);
            let strip = Strip {
                w: &self.bits,
                x,
                k,
                m,
                n,
                out: &out_ptr,
            };
            match self.isa {
                // SAFETY: the isa is capped by what the CPU supports, and the
                // strip writes only the output columns `rows`, which no other
                // task owns.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni | Isa::Amx => unsafe {
                    match self.kind {
                        HalfKind::Bf16 => strip.rows_avx512::<true>(rows),
                        HalfKind::F16 => strip.rows_avx512::<false>(rows),
                    }
                },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe {
                    match self.kind {
                        HalfKind::Bf16 => strip.rows_avx2::<true>(rows),
                        HalfKind::F16 => strip.rows_avx2::<false>(rows),
                    }
                },
                // SAFETY: as above.
                _ => unsafe { strip.rows_scalar(self.kind, rows) },
            }
        });
    }
}

/// What one task needs to fill the output columns of its weight rows.
struct Strip<'a> {
    w: &'a [u16],
    x: &'a [f32],
    k: usize,
    m: usize,
    n: usize,
    out: &'a SendPtr,
}

impl Strip<'_> {
    fn wrow(&self, r: usize) -> *const u16 {
        self.w[r * self.k..].as_ptr()
    }

    fn xrow(&self, t: usize) -> *const f32 {
        self.x[t * self.k..].as_ptr()
    }

    /// # Safety
    /// Only one task may write the columns `rows` of the output.
    unsafe fn rows_scalar(&self, kind: HalfKind, rows: std::ops::Range<usize>) {
        for r in rows {
            let w = &self.w[r * self.k..(r + 1) * self.k];
            for t in 0..self.m {
                let x = &self.x[t * self.k..(t + 1) * self.k];
                let dot = w.iter().zip(x).map(|(&w, &x)| kind.to_f32(w) * x).sum();
                *self.out.0.add(t * self.n + r) = dot;
            }
        }
    }

    /// Tiles of `R` rows × `T` tokens from token `t0`, over `rows`; a last
    /// few rows one at a time.
    ///
    /// # Safety
    /// `K`'s features must be present; only one task may write `rows`.
    #[inline]
    unsafe fn tiles<K: Kernel, const BF16: bool, const R: usize, const T: usize>(
        &self,
        rows: &std::ops::Range<usize>,
        t0: usize,
    ) {
        let xs: [*const f32; T] = std::array::from_fn(|i| self.xrow(t0 + i));
        let store = |r: usize, dots: [f32; T]| {
            for (i, v) in dots.into_iter().enumerate() {
                *self.out.0.add((t0 + i) * self.n + r) = v;
            }
        };
        let mut r = rows.start;
        while r + R <= rows.end {
            let ws = std::array::from_fn(|i| self.wrow(r + i));
            // The next tile's rows follow this one's in memory.
            let next = self.w.as_ptr().wrapping_add((r + R) * self.k);
            for (i, d) in K::dots::<BF16, R, T>(ws, xs, self.k, next)
                .into_iter()
                .enumerate()
            {
                store(r + i, d);
            }
            r += R;
        }
        for r in r..rows.end {
            let next = self.w.as_ptr().wrapping_add((r + 1) * self.k);
            store(
                r,
                K::dots::<BF16, 1, T>([self.wrow(r)], xs, self.k, next)[0],
            );
        }
    }

    /// Every token over `rows` on AVX-512, in tiles of 4 rows × 6 tokens:
    /// their 24 sums, the tokens' chunks and a widened weight chunk fill 31
    /// of the 32 registers, and 24 FMAs take 10 loads and 4 widenings (the
    /// widening shares a port with the FMAs; 2 × 8 took 10 loads for 16,
    /// 4% slower on a 512-token prefill). A lone token (a decode)
    /// takes four rows at a time: enough independent FMA chains, and fewer
    /// concurrent streams from memory than eight (which ran slower).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be present; only one task may write `rows`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_avx512<const BF16: bool>(&self, rows: std::ops::Range<usize>) {
        let mut t = 0;
        while t + 6 <= self.m {
            self.tiles::<Avx512, BF16, 4, 6>(&rows, t);
            t += 6;
        }
        match self.m - t {
            5 => self.tiles::<Avx512, BF16, 4, 5>(&rows, t),
            4 => self.tiles::<Avx512, BF16, 4, 4>(&rows, t),
            3 => self.tiles::<Avx512, BF16, 4, 3>(&rows, t),
            2 => self.tiles::<Avx512, BF16, 4, 2>(&rows, t),
            1 => self.tiles::<Avx512, BF16, 4, 1>(&rows, t),
            _ => {}
        }
    }

    /// As [`Strip::rows_avx512`] with AVX2's 16 registers: two tokens by
    /// four rows.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; only one task may write `rows`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_avx2<const BF16: bool>(&self, rows: std::ops::Range<usize>) {
        let mut t = 0;
        while t + 2 <= self.m {
            self.tiles::<Avx2, BF16, 4, 2>(&rows, t);
            t += 2;
        }
        if t < self.m {
            self.tiles::<Avx2, BF16, 4, 1>(&rows, t);
        }
    }
}

/// A SIMD path's dot products: `R` weight rows against `T` activation rows
/// of `k` values, one accumulator per pair, summed across lanes at the end.
trait Kernel {
    /// `next` is where the next tile's `R` rows start: they are prefetched
    /// while this tile computes, so a batch's compute hides the weights'
    /// reading from memory (the hardware prefetcher alone leaves a batch of
    /// 9 tokens costing the reading plus the compute).
    ///
    /// # Safety
    /// The path's CPU features; every pointer in `w` and `x` must have `k`
    /// readable values (`next` may point anywhere).
    unsafe fn dots<const BF16: bool, const R: usize, const T: usize>(
        w: [*const u16; R],
        x: [*const f32; T],
        k: usize,
        next: *const u16,
    ) -> [[f32; T]; R];
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx512 {
    /// 16 values at a time; the tail under a mask.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn dots<const BF16: bool, const R: usize, const T: usize>(
        w: [*const u16; R],
        x: [*const f32; T],
        k: usize,
        next: *const u16,
    ) -> [[f32; T]; R] {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut xv = [_mm512_setzero_ps(); T];
        let mut i = 0;
        while i < k {
            let mask: __mmask16 = if k - i >= 16 {
                0xFFFF
            } else {
                (1 << (k - i)) - 1
            };
            // This step covers R × 32 bytes of weights: as many of the next
            // tile's.
            let ahead = next.wrapping_add(i * R) as *const i8;
            for line in 0..R.div_ceil(2) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
            }
            for t in 0..T {
                xv[t] = _mm512_maskz_loadu_ps(mask, x[t].add(i));
            }
            for r in 0..R {
                let h = _mm256_maskz_loadu_epi16(mask, w[r].add(i) as *const i16);
                let wv = if BF16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                } else {
                    _mm512_cvtph_ps(h)
                };
                for t in 0..T {
                    acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            i += 16;
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
            }
        }
        out
    }
}

/// The sum of a register's eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx2 {
    /// 8 values at a time; the tail in scalar code.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots<const BF16: bool, const R: usize, const T: usize>(
        w: [*const u16; R],
        x: [*const f32; T],
        k: usize,
        next: *const u16,
    ) -> [[f32; T]; R] {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut xv = [_mm256_setzero_ps(); T];
        let mut i = 0;
        while i + 8 <= k {
            // As on AVX-512: R × 16 bytes of the next tile's weights per step.
            if i % 32 == 0 {
                let ahead = next.wrapping_add(i * R) as *const i8;
                for line in 0..R {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
                }
            }
            for t in 0..T {
                xv[t] = _mm256_loadu_ps(x[t].add(i));
            }
            for r in 0..R {
                let h = _mm_loadu_si128(w[r].add(i) as *const __m128i);
                let wv = if BF16 {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                } else {
                    _mm256_cvtph_ps(h)
                };
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            i += 8;
        }
        let kind = if BF16 { HalfKind::Bf16 } else { HalfKind::F16 };
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                let mut tail = 0f32;
                for j in i..k {
                    tail += kind.to_f32(*w[r].add(j)) * *x[t].add(j);
                }
                out[r][t] = hsum(acc[r][t]) + tail;
            }
        }
        out
    }
}

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (see `forward_into`).
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values spread over a few binades, both signs.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn matrix(isa: Isa, kind: HalfKind, rows: usize, cols: usize) -> (HalfMatrix, Vec<f32>) {
        let bytes: Vec<u8> = values(rows * cols, 7)
            .into_iter()
            .flat_map(|v| match kind {
                HalfKind::Bf16 => bf16::from_f32(v).to_le_bytes(),
                HalfKind::F16 => f16::from_f32(v).to_le_bytes(),
            })
            .collect();
        // Two parts, as a shard's rows arrive.
        let (a, b) = bytes.split_at(bytes.len() / 2 / (cols * 2) * (cols * 2));
        let m = HalfMatrix::from_parts_for(isa, "w", kind, &[a, b], rows, cols).unwrap();
        let dense = m.bits.iter().map(|&b| kind.to_f32(b)).collect();
        (m, dense)
    }

    /// Every path the CPU has, for every kind, on shapes with tails (k not a
    /// multiple of 16 or 8, rows not a multiple of a tile, tokens past 4):
    /// close to the f64 product of the widened weights, and each token's
    /// outputs the same bits alone as in any batch.
    #[test]
    fn every_path_matches_the_widened_product_and_is_batch_invariant() {
        let isas = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];
        for isa in isas.into_iter().filter(|&i| i <= Isa::supported()) {
            for kind in [HalfKind::Bf16, HalfKind::F16] {
                for (rows, cols) in [(37, 64), (70, 101), (9, 7)] {
                    let (w, dense) = matrix(isa, kind, rows, cols);
                    let m = 11;
                    let x = values(m * cols, 3);
                    let mut out = vec![0f32; m * rows];
                    w.forward_into(&x, m, &mut out);
                    for t in 0..m {
                        for r in 0..rows {
                            let want: f64 = (0..cols)
                                .map(|j| dense[r * cols + j] as f64 * x[t * cols + j] as f64)
                                .sum();
                            let got = out[t * rows + r] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * cols as f64,
                                "{isa:?} {kind:?} [{rows}x{cols}] token {t} row {r}: {got} vs {want}"
                            );
                        }
                    }
                    // Batch invariance: each token alone, and a batch of 3.
                    for t in 0..m {
                        let mut one = vec![0f32; rows];
                        w.forward_into(&x[t * cols..(t + 1) * cols], 1, &mut one);
                        assert_eq!(
                            one.map_bits(),
                            out[t * rows..(t + 1) * rows].map_bits(),
                            "{isa:?} {kind:?}: token {t} alone differs from its batch"
                        );
                    }
                    let mut three = vec![0f32; 3 * rows];
                    w.forward_into(&x[4 * cols..7 * cols], 3, &mut three);
                    assert_eq!(three.map_bits(), out[4 * rows..7 * rows].map_bits());
                }
            }
        }
    }

    trait Bits {
        fn map_bits(&self) -> Vec<u32>;
    }
    impl Bits for [f32] {
        fn map_bits(&self) -> Vec<u32> {
            self.iter().map(|v| v.to_bits()).collect()
        }
    }
    impl Bits for Vec<f32> {
        fn map_bits(&self) -> Vec<u32> {
            self.as_slice().map_bits()
        }
    }

    #[test]
    fn stacking_and_dequantizing_keep_the_values() {
        let (a, da) = matrix(Isa::Scalar, HalfKind::Bf16, 3, 20);
        let (b, db) = matrix(Isa::Scalar, HalfKind::Bf16, 5, 20);
        let s = HalfMatrix::concat_rows(&[&a, &b]);
        assert_eq!(s.rows(), 8);
        let dense: Vec<f32> = s
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(dense, [da, db].concat());
    }

    #[test]
    fn a_wrong_byte_count_is_refused_with_the_shape() {
        let err = HalfMatrix::from_parts("layers.0.w", HalfKind::F16, &[&[0u8; 10]], 2, 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layers.0.w") && err.contains("[2, 3]"),
            "{err}"
        );
    }
}
