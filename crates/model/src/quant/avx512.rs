//! The AVX-512 VNNI path of [`super::QuantMatrix`].
//!
//! Weights are repacked once, at load, into pairs of blocks laid out for
//! `vpdpbusd` (unsigned weight bytes × signed activation bytes, four
//! products summed into each 32-bit lane); activations are quantized into
//! the same layout once per matmul. A tile of two weight rows × up to eight
//! tokens unpacks each weight pair once and uses it for every token of the
//! tile, so a step of many tokens is a matrix-matrix product, not many
//! matrix-vector ones.
//!
//! The 64 values of a pair of blocks `a`, `b` are ordered
//! `a[0..16] b[0..16] a[16..32] b[16..32]`: lanes 0–3 hold `a`'s first half,
//! 4–7 `b`'s, 8–11 `a`'s second half and 12–15 `b`'s. It is the order
//! Q4_1's low and high nibbles fall into with no shuffle.
//!
//! Every output goes through the same operations whatever the number of
//! tokens in the matmul and wherever it falls in a tile, so a sequence's
//! logits do not depend on what else is in its batch: batched greedy
//! decoding and speculative verification give the tokens one sequence
//! decoded alone would.

use std::arch::x86_64::*;

use half::f16;

use super::{BlockQ4_1, BlockQ8_0, SendPtr, WeightBlock, QK};

/// Where value `j` of the pair's block `half` goes in the pair's order.
fn pair_index(half: usize, j: usize) -> usize {
    (j / 16) * 32 + half * 16 + j % 16
}

/// A weight format's pair of blocks, repacked for the kernel.
pub trait Pair: Copy + Send + Sync + std::fmt::Debug + 'static {
    type Block: WeightBlock;
    /// Weights stored as `q + 128` (signed formats): the kernel takes the
    /// bias back out through the activations' [`XPair::neg_bias`].
    const BIASED: bool;
    fn pack(a: &Self::Block, b: &Self::Block) -> Self;
    /// The two blocks back (`mins` for formats with an offset).
    fn unpack(&self, mins: [f16; 2]) -> [Self::Block; 2];
    /// The 64 weight bytes in the pair's order and each lane's scale.
    ///
    /// # Safety
    /// The CPU must have the features [`super::Isa::Avx512Vnni`] names.
    unsafe fn load(&self) -> (__m512i, __m512);
}

/// Q4_1 blocks two at a time; their offsets `m` live in [`Packed::mins`].
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_1Pair {
    d: [f16; 2],
    /// Both blocks' nibble bytes, `a`'s then `b`'s.
    qs: [u8; 32],
}

/// Q8_0 blocks two at a time, as `q + 128` in the pair's order.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8_0Pair {
    d: [f16; 2],
    qs: [u8; 64],
}

/// Each lane's scale from the pair's two f16 scales.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn lane_scales(d: &[f16; 2]) -> __m512 {
    let both = _mm512_cvtph_ps(_mm256_set1_epi32(
        (d as *const _ as *const i32).read_unaligned(),
    ));
    // `both` alternates d[0], d[1]: pick lane 0 or 1 for each lane.
    let pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    _mm512_permutexvar_ps(pick, both)
}

impl Pair for Q4_1Pair {
    type Block = BlockQ4_1;
    const BIASED: bool = false;

    fn pack(a: &BlockQ4_1, b: &BlockQ4_1) -> Self {
        let mut qs = [0u8; 32];
        qs[..16].copy_from_slice(&a.qs);
        qs[16..].copy_from_slice(&b.qs);
        Self { d: [a.d, b.d], qs }
    }

    fn unpack(&self, mins: [f16; 2]) -> [BlockQ4_1; 2] {
        std::array::from_fn(|h| BlockQ4_1 {
            d: self.d[h],
            m: mins[h],
            qs: self.qs[h * 16..(h + 1) * 16].try_into().expect("16 bytes"),
        })
    }

    #[target_feature(enable = "avx512f,avx512bw,f16c,avx2")]
    #[inline]
    unsafe fn load(&self) -> (__m512i, __m512) {
        let raw = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        let low = _mm256_set1_epi8(0x0F);
        let lo = _mm256_and_si256(raw, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        (
            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
            lane_scales(&self.d),
        )
    }
}

impl Pair for Q8_0Pair {
    type Block = BlockQ8_0;
    const BIASED: bool = true;

    fn pack(a: &BlockQ8_0, b: &BlockQ8_0) -> Self {
        let mut qs = [0u8; 64];
        for (h, blk) in [a, b].into_iter().enumerate() {
            for (j, &q) in blk.qs.iter().enumerate() {
                qs[pair_index(h, j)] = (q as u8) ^ 0x80;
            }
        }
        Self { d: [a.d, b.d], qs }
    }

    fn unpack(&self, _mins: [f16; 2]) -> [BlockQ8_0; 2] {
        std::array::from_fn(|h| BlockQ8_0 {
            d: self.d[h],
            qs: std::array::from_fn(|j| (self.qs[pair_index(h, j)] ^ 0x80) as i8),
        })
    }

    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn load(&self) -> (__m512i, __m512) {
        (
            _mm512_loadu_si512(self.qs.as_ptr() as *const __m512i),
            lane_scales(&self.d),
        )
    }
}

/// Two activation blocks in the pair's order.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct XPair {
    qs: [i8; 64],
    /// Each lane's activation scale.
    scale: [f32; 16],
    /// Each lane's `-128 × Σ` of its four bytes: added to the dot product of
    /// weights stored as `q + 128`, it leaves the dot product of `q`. Zero
    /// for unbiased weights (the kernel starts every dot product from it).
    neg_bias: [i32; 16],
}

const ZERO_X: XPair = XPair {
    qs: [0; 64],
    scale: [0.0; 16],
    neg_bias: [0; 16],
};

/// Quantizes two blocks of 32 activations (the second absent past the row's
/// end) as [`super::quantize_block`] does, into the pair's order, rounding
/// to nearest even. Returns the pair and each block's `d × Σ q`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn quantize_pair(a: &[f32], b: Option<&[f32]>, biased: bool) -> (XPair, f32, f32) {
    let mut x = ZERO_X;
    let mut quantize = |xs: &[f32], h: usize| -> (f32, f32) {
        let lo = _mm512_loadu_ps(xs.as_ptr());
        let hi = _mm512_loadu_ps(xs[16..].as_ptr());
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, id));
        let qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, id));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        // Values 0..16 and 16..32 go to their quarter of the pair.
        _mm_storeu_si128(
            x.qs[h * 16..].as_mut_ptr() as *mut __m128i,
            _mm512_cvtepi32_epi8(qlo),
        );
        _mm_storeu_si128(
            x.qs[32 + h * 16..].as_mut_ptr() as *mut __m128i,
            _mm512_cvtepi32_epi8(qhi),
        );
        (d, d * sum as f32)
    };
    let (da, sa) = quantize(a, 0);
    let (db, sb) = b.map_or((0.0, 0.0), |b| quantize(b, 1));
    let second = 0xF0F0; // the lanes of the pair's second block
    _mm512_store_ps(
        x.scale.as_mut_ptr(),
        _mm512_mask_mov_ps(_mm512_set1_ps(da), second, _mm512_set1_ps(db)),
    );
    if biased {
        let y = _mm512_load_si512(x.qs.as_ptr() as *const __m512i);
        let bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), y);
        _mm512_store_si512(
            x.neg_bias.as_mut_ptr() as *mut __m512i,
            _mm512_sub_epi32(_mm512_setzero_si512(), bias),
        );
    }
    (x, sa, sb)
}

/// Values per row of [`Packed::mins`] and of the activation sums: the
/// block count rounded up to whole 16-lane vectors (zero padded), and even
/// (so a pair's second block always has a slot).
fn mins_width(kb: usize) -> usize {
    kb.next_multiple_of(16)
}

/// A weight matrix in pairs of blocks: `pairs` row-major (`kb / 2` rounded
/// up per row, a zero block padding odd counts), and for formats with an
/// offset each block's `m`, row-major, [`mins_width`] per row.
#[derive(Debug)]
pub struct Packed<P: Pair> {
    pairs: Vec<P>,
    mins: Vec<f16>,
    pairs_per_row: usize,
    /// Blocks per row rounded up to whole vectors (see [`mins_width`]).
    mins_per_row: usize,
}

impl<P: Pair> Packed<P> {
    pub fn new(blocks: &[P::Block], rows: usize, kb: usize) -> Self {
        let pairs_per_row = kb.div_ceil(2);
        let has_mins = P::Block::ZERO.min().is_some();
        // Formats without offsets keep an all-zero row width too: the
        // activation sums share it, and the offsets' loop skips them.
        let mins_per_row = mins_width(kb);
        let mut pairs = Vec::with_capacity(rows * pairs_per_row);
        let mut mins = vec![f16::ZERO; if has_mins { rows * mins_per_row } else { 0 }];
        for (r, row) in blocks.chunks_exact(kb).enumerate() {
            for p in row.chunks(2) {
                pairs.push(P::pack(&p[0], p.get(1).unwrap_or(&P::Block::ZERO)));
            }
            if has_mins {
                for (m, b) in mins[r * mins_per_row..].iter_mut().zip(row) {
                    *m = b.min().expect("checked above");
                }
            }
        }
        Self {
            pairs,
            mins,
            pairs_per_row,
            mins_per_row,
        }
    }

    /// The blocks of `rows × kb` again, in GGUF order.
    pub fn blocks(&self, kb: usize) -> Vec<P::Block> {
        let rows = self.pairs.len() / self.pairs_per_row.max(1);
        let mut out = Vec::with_capacity(rows * kb);
        for r in 0..rows {
            for (p, pair) in self.pairs_per_row(r).iter().enumerate() {
                let min = |i: usize| {
                    self.mins
                        .get(r * self.mins_per_row + i)
                        .copied()
                        .unwrap_or(f16::ZERO)
                };
                let [a, b] = pair.unpack([min(2 * p), min(2 * p + 1)]);
                out.push(a);
                if 2 * p + 1 < kb {
                    out.push(b);
                }
            }
        }
        out
    }

    /// Stacks matrices with the same column count.
    pub fn concat(parts: &[&Self]) -> Self {
        Self {
            pairs: parts.iter().flat_map(|p| p.pairs.iter().copied()).collect(),
            mins: parts.iter().flat_map(|p| p.mins.iter().copied()).collect(),
            pairs_per_row: parts[0].pairs_per_row,
            mins_per_row: parts[0].mins_per_row,
        }
    }

    fn pairs_per_row(&self, r: usize) -> &[P] {
        &self.pairs[r * self.pairs_per_row..(r + 1) * self.pairs_per_row]
    }

    fn mins_row(&self, r: usize) -> &[f16] {
        &self.mins[r * self.mins_per_row..(r + 1) * self.mins_per_row]
    }

    /// `x [m, k] → out [m, n]` for this matrix of `n` rows.
    ///
    /// # Safety
    /// The CPU must have the features [`super::Isa::Avx512Vnni`] names.
    pub unsafe fn forward(&self, x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let (np, mw) = (self.pairs_per_row, self.mins_per_row);
        let mut xp = vec![ZERO_X; m * np];
        let mut sums = vec![0f32; m * mw];
        xp.par_chunks_mut(np)
            .zip(sums.par_chunks_mut(mw))
            .zip(x.par_chunks(k))
            .for_each(|((pairs, sums), row)| {
                for (p, pair) in pairs.iter_mut().enumerate() {
                    let block = |b: usize| row.get(b * QK..(b + 1) * QK);
                    // SAFETY: the caller vouches for the features.
                    let (x, sa, sb) = unsafe {
                        quantize_pair(block(2 * p).expect("in range"), block(2 * p + 1), P::BIASED)
                    };
                    *pair = x;
                    sums[2 * p] = sa;
                    sums[2 * p + 1] = sb;
                }
            });
        let out_ptr = SendPtr(out.as_mut_ptr());
        let work = Work {
            w: self,
            xp: &xp,
            sums: &sums,
            m,
            n,
            out: &out_ptr,
        };
        // Tasks own 16 output features; tokens go through them 64 at a time
        // so a task's activations stay in the core's L2 cache.
        const ROWS_PER_TASK: usize = 16;
        (0..n.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|task| {
                let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
                // SAFETY: the caller vouches for the features; this task alone
                // writes the columns `rows` of `out`.
                unsafe { work.rows(rows) };
            });
    }
}

/// What the tasks of one matmul share.
struct Work<'a, P: Pair> {
    w: &'a Packed<P>,
    xp: &'a [XPair],
    sums: &'a [f32],
    m: usize,
    n: usize,
    out: &'a SendPtr,
}

impl<P: Pair> Work<'_, P> {
    /// # Safety
    /// AVX-512 VNNI present; only this call writes the columns `rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    unsafe fn rows(&self, rows: std::ops::Range<usize>) {
        const TOKENS_PER_PASS: usize = 64;
        for t0 in (0..self.m).step_by(TOKENS_PER_PASS) {
            let t1 = (t0 + TOKENS_PER_PASS).min(self.m);
            let mut r = rows.start;
            while r + 2 <= rows.end {
                self.tokens::<2>(r, t0, t1);
                r += 2;
            }
            if r < rows.end {
                self.tokens::<1>(r, t0, t1);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    unsafe fn tokens<const R: usize>(&self, r: usize, t0: usize, t1: usize) {
        let mut t = t0;
        while t + 8 <= t1 {
            self.tile::<R, 8>(r, t);
            t += 8;
        }
        // The rest in one tile, so its weights are unpacked once: a decode
        // verifying 2 to 7 drafts is one tile. (Each token's sums are the
        // same in a tile of any width.)
        match t1 - t {
            0 => {}
            1 => self.tile::<R, 1>(r, t),
            2 => self.tile::<R, 2>(r, t),
            3 => self.tile::<R, 3>(r, t),
            4 => self.tile::<R, 4>(r, t),
            5 => self.tile::<R, 5>(r, t),
            6 => self.tile::<R, 6>(r, t),
            _ => self.tile::<R, 7>(r, t),
        }
    }

    /// Rows `r..r + R` × tokens `t..t + T`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    #[inline]
    unsafe fn tile<const R: usize, const T: usize>(&self, r: usize, t: usize) {
        let np = self.w.pairs_per_row;
        let w: [&[P]; R] = std::array::from_fn(|i| self.w.pairs_per_row(r + i));
        let x: [&[XPair]; T] = std::array::from_fn(|j| &self.xp[(t + j) * np..(t + j + 1) * np]);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut q = [_mm512_setzero_si512(); R];
        let mut ws = [_mm512_setzero_ps(); R];
        for p in 0..np {
            for i in 0..R {
                (q[i], ws[i]) = w[i][p].load();
            }
            for j in 0..T {
                let xp = &x[j][p];
                let y = _mm512_load_si512(xp.qs.as_ptr() as *const __m512i);
                let xs = _mm512_load_ps(xp.scale.as_ptr());
                for i in 0..R {
                    // `neg_bias` is zero for unbiased formats: loading it
                    // costs a load, where a fresh zero would cost an ALU op.
                    let start = _mm512_load_si512(xp.neg_bias.as_ptr() as *const __m512i);
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, q[i], y));
                    acc[i][j] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ws[i], xs), acc[i][j]);
                }
            }
        }
        let mw = self.w.mins_per_row;
        let has_mins = !self.w.mins.is_empty();
        for (i, row) in acc.iter().enumerate() {
            for (j, &sum) in row.iter().enumerate() {
                let mut v = sum;
                if has_mins {
                    // Q4_1's offsets: Σ over blocks of m × the block's activation sum.
                    let (mins, sums) = (self.w.mins_row(r + i), &self.sums[(t + j) * mw..]);
                    let mut off = _mm512_setzero_ps();
                    for c in (0..mw).step_by(16) {
                        let m = _mm512_cvtph_ps(_mm256_loadu_si256(
                            mins[c..].as_ptr() as *const __m256i
                        ));
                        off = _mm512_fmadd_ps(m, _mm512_loadu_ps(sums[c..].as_ptr()), off);
                    }
                    v = _mm512_add_ps(v, off);
                }
                *self.out.0.add((t + j) * self.n + r + i) = _mm512_reduce_add_ps(v);
            }
        }
    }
}
