//! strata's own CPU kernels for the GGUF formats candle has no fast path
//! for (Q4_1) or a slow one at batch sizes above one (Q8_0).
//!
//! Activations are quantized per 32-element block to 8 bits (ggml's Q8_1,
//! with the block sum kept for Q4_1's offset term). Where the CPU has AVX2
//! or AVX-512 VNNI, weights are repacked at load ([`packed`]): one register
//! holds four consecutive values of each of 8 (AVX2) or 16 (AVX-512) rows,
//! so a block's integer dot products for all those rows come from
//! multiply-adds against four activation bytes broadcast to every lane, and
//! a tile of tokens shares each unpacked weight register; with AMX
//! ([`amx`]), up to 16 tokens × 16 rows of a block are one tile product. [`Isa`]
//! is the run-time choice; `STRATA_CPU_ISA` caps it (benchmarks and tests
//! compare the paths on one machine). The scalar path reads the GGUF
//! blocks as they are.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod packed;

use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};

const QK: usize = 32;

/// An activation block: `x[j] ≈ d * qs[j]`, `s = d * Σ qs`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(8))]
pub struct BlockQ8_1 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

const ZERO_Q8: BlockQ8_1 = BlockQ8_1 {
    d: 0.0,
    s: 0.0,
    qs: [0; 32],
};

/// The instruction sets the quantized matmul has a path for, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2, FMA and F16C: repacked weights, tiles of 8 rows × 6 tokens,
    /// `vpmaddubsw` products summed in 16 bits within a block.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI: repacked weights, tiles of 16 rows × 8
    /// tokens, `vpdpbusd`.
    Avx512Vnni,
    /// AVX-512 VNNI with AMX-INT8 (Sapphire Rapids and later): the same
    /// layout, with tiles of 8 to 16 tokens × 16 rows one AMX product per
    /// block.
    Amx,
}

impl Isa {
    /// The best path this CPU supports.
    pub fn supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512vnni")
                && has_avx2()
            {
                return if amx::usable() {
                    Isa::Amx
                } else {
                    Isa::Avx512Vnni
                };
            }
        }
        if has_avx2() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// The path matmuls take: [`Isa::supported`], capped by
    /// `STRATA_CPU_ISA` (`scalar`, `avx2`, `avx512` or `amx`; a path the CPU lacks
    /// is never taken). Read once per process.
    pub fn chosen() -> Isa {
        static CHOSEN: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cap = std::env::var("STRATA_CPU_ISA").ok();
            Self::capped(cap.as_deref())
        })
    }

    /// [`Isa::supported`] capped by a `STRATA_CPU_ISA` value; an unknown one
    /// is logged and ignored.
    pub fn capped(cap: Option<&str>) -> Isa {
        let best = Self::supported();
        let cap = match cap.map(str::trim) {
            None | Some("") => return best,
            Some("scalar") => Isa::Scalar,
            Some("avx2") => Isa::Avx2,
            Some("avx512") => Isa::Avx512Vnni,
            Some("amx") => Isa::Amx,
            Some(other) => {
                tracing::warn!(
                    "STRATA_CPU_ISA={other:?} is not one of scalar, avx2, avx512, amx: using {best:?}"
                );
                return best;
            }
        };
        best.min(cap)
    }
}

/// A GGUF weight block type this module has kernels for.
pub trait WeightBlock: Copy + Send + Sync + std::fmt::Debug + 'static {
    const NAME: &'static str;
    const BYTES: usize;
    /// The block of zeros (pads the last group of rows in the packed layout).
    const ZERO: Self;
    /// How the SIMD kernels lay the blocks out.
    #[cfg(target_arch = "x86_64")]
    type Packing: packed::Packing<Block = Self>;
    fn parse(b: &[u8]) -> Self;
    /// The block's scale.
    fn d(&self) -> f16;
    /// The block's additive offset, for formats that have one.
    fn min(&self) -> Option<f16>;
    fn dequantize(&self, out: &mut Vec<f32>);
    fn dot_scalar(w: &[Self], x: &[BlockQ8_1]) -> f32;
}

/// GGUF Q4_1: `x[j] = d * (qs[j] & 15) + m`, `x[j + 16] = d * (qs[j] >> 4) + m`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// GGUF Q8_0: `x[j] = d * qs[j]`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    d: f16,
    qs: [i8; 32],
}

impl WeightBlock for BlockQ4_1 {
    const NAME: &'static str = "Q4_1";
    const BYTES: usize = 20;
    const ZERO: Self = Self {
        d: f16::ZERO,
        m: f16::ZERO,
        qs: [0; 16],
    };
    #[cfg(target_arch = "x86_64")]
    type Packing = packed::Q4_1Packing;

    fn d(&self) -> f16 {
        self.d
    }

    fn min(&self) -> Option<f16> {
        Some(self.m)
    }

    fn parse(b: &[u8]) -> Self {
        Self {
            d: f16::from_le_bytes([b[0], b[1]]),
            m: f16::from_le_bytes([b[2], b[3]]),
            qs: b[4..20].try_into().expect("16 bytes"),
        }
    }

    fn dequantize(&self, out: &mut Vec<f32>) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        out.extend(self.qs.iter().map(|q| d * (q & 15) as f32 + m));
        out.extend(self.qs.iter().map(|q| d * (q >> 4) as f32 + m));
    }

    fn dot_scalar(w: &[Self], x: &[BlockQ8_1]) -> f32 {
        let mut total = 0f32;
        for (a, b) in w.iter().zip(x) {
            let mut acc = 0i32;
            for j in 0..16 {
                acc += (a.qs[j] & 15) as i32 * b.qs[j] as i32;
                acc += (a.qs[j] >> 4) as i32 * b.qs[j + 16] as i32;
            }
            total += a.d.to_f32() * b.d * acc as f32 + a.m.to_f32() * b.s;
        }
        total
    }
}

impl WeightBlock for BlockQ8_0 {
    const NAME: &'static str = "Q8_0";
    const BYTES: usize = 34;
    const ZERO: Self = Self {
        d: f16::ZERO,
        qs: [0; 32],
    };
    #[cfg(target_arch = "x86_64")]
    type Packing = packed::Q8_0Packing;

    fn d(&self) -> f16 {
        self.d
    }

    fn min(&self) -> Option<f16> {
        None
    }

    fn parse(b: &[u8]) -> Self {
        let mut qs = [0i8; 32];
        for (q, &v) in qs.iter_mut().zip(&b[2..34]) {
            *q = v as i8;
        }
        Self {
            d: f16::from_le_bytes([b[0], b[1]]),
            qs,
        }
    }

    fn dequantize(&self, out: &mut Vec<f32>) {
        let d = self.d.to_f32();
        out.extend(self.qs.iter().map(|&q| d * q as f32));
    }

    fn dot_scalar(w: &[Self], x: &[BlockQ8_1]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(a, b)| {
                let acc: i32 =
                    a.qs.iter()
                        .zip(&b.qs)
                        .map(|(&p, &q)| p as i32 * q as i32)
                        .sum();
                a.d.to_f32() * b.d * acc as f32
            })
            .sum()
    }
}

/// A `[rows, cols]` quantized weight matrix (rows = output features).
#[derive(Debug)]
pub struct QuantMatrix<B: WeightBlock> {
    rows: usize,
    cols: usize,
    /// The path `store` is laid out for and forward takes.
    isa: Isa,
    store: Store<B>,
}

/// The blocks as the chosen [`Isa`] reads them.
#[derive(Debug)]
enum Store<B: WeightBlock> {
    /// GGUF order (the scalar path).
    Blocks(Vec<B>),
    #[cfg(target_arch = "x86_64")]
    Groups(packed::Packed<B::Packing>),
}

pub type Q4_1Matrix = QuantMatrix<BlockQ4_1>;
pub type Q8_0Matrix = QuantMatrix<BlockQ8_0>;

impl<B: WeightBlock> QuantMatrix<B> {
    /// Parses the GGUF bytes of a `[rows, cols]` tensor, laid out for
    /// [`Isa::chosen`].
    pub fn from_bytes(name: &str, bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_bytes_for(Isa::chosen(), name, bytes, rows, cols)
    }

    /// As [`QuantMatrix::from_bytes`], for the path `isa` (capped by what
    /// the CPU supports).
    pub fn from_bytes_for(
        isa: Isa,
        name: &str,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let bad = |msg: String| Error::BadWeight {
            name: name.into(),
            msg,
        };
        if !cols.is_multiple_of(QK) {
            return Err(bad(format!("{cols} columns is not a multiple of {QK}")));
        }
        let n = rows * cols / QK;
        if bytes.len() != n * B::BYTES {
            return Err(bad(format!(
                "{} bytes for {n} {} blocks",
                bytes.len(),
                B::NAME
            )));
        }
        let blocks: Vec<B> = bytes.chunks_exact(B::BYTES).map(B::parse).collect();
        let isa = isa.min(Isa::supported());
        let store = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx => {
                Store::Groups(packed::Packed::new(&blocks, rows, cols / QK))
            }
            _ => Store::Blocks(blocks),
        };
        Ok(Self {
            rows,
            cols,
            isa,
            store,
        })
    }

    /// Stacks matrices with the same column count and layout (fused
    /// projections).
    pub fn concat_rows(parts: &[&Self]) -> Self {
        let cols = parts[0].cols;
        assert!(parts.iter().all(|p| p.cols == cols), "column counts differ");
        assert!(
            parts.iter().all(|p| p.isa == parts[0].isa),
            "layouts differ"
        );
        let rows = parts.iter().map(|p| p.rows).sum();
        let blocks: Vec<B> = parts.iter().flat_map(|p| p.blocks().into_owned()).collect();
        let store = match &parts[0].store {
            Store::Blocks(_) => Store::Blocks(blocks),
            // Groups of 16 rows do not stack where a part's rows leave one
            // short: pack the stacked blocks afresh.
            #[cfg(target_arch = "x86_64")]
            Store::Groups(_) => Store::Groups(packed::Packed::new(&blocks, rows, cols / QK)),
        };
        Self {
            rows,
            cols,
            isa: parts[0].isa,
            store,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The path this matrix's layout is for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The blocks in GGUF order.
    fn blocks(&self) -> std::borrow::Cow<'_, [B]> {
        match &self.store {
            Store::Blocks(b) => std::borrow::Cow::Borrowed(b),
            #[cfg(target_arch = "x86_64")]
            Store::Groups(p) => std::borrow::Cow::Owned(p.blocks()),
        }
    }

    /// The matrix as dense f32 (for an embedding stored quantized).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in self.blocks().iter() {
            b.dequantize(&mut out);
        }
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// `x [tokens, cols] → [tokens, rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, x) = crate::layers::matmul_input(x, self.cols, B::NAME)?;
        let (k, n) = (self.cols, self.rows);
        let mut out = vec![0f32; m * n];
        match &self.store {
            Store::Blocks(blocks) => forward_blocks(blocks, &x, m, k, n, &mut out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Groups` is only built for a path the CPU supports.
            Store::Groups(packed) => unsafe { packed.forward(self.isa, &x, m, k, n, &mut out) },
        }
        Ok(Tensor::from_vec(out, (m, n), &Device::Cpu)?)
    }
}

/// The scalar path: `x [m, k] → out [m, n]` over GGUF-order blocks.
fn forward_blocks<B: WeightBlock>(
    blocks: &[B],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    let kb = k / QK;
    let mut xq = vec![ZERO_Q8; m * kb];
    xq.par_chunks_mut(kb)
        .zip(x.par_chunks(k))
        .for_each(|(q, row)| quantize_row(row, q));
    // Work items are chunks of weight rows; each one reads its rows once
    // and multiplies them with every token, writing a column strip of `out`.
    const ROWS_PER_TASK: usize = 16;
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n);
            let strip = Strip {
                w: blocks,
                kb,
                xq: &xq,
                m,
                n,
                out: &out_ptr,
            };
            // SAFETY: `strip` writes only the columns in `rows`, which no
            // other task owns.
            unsafe { strip.rows_scalar(rows) };
        });
}

/// What one task needs to fill the output columns of its weight rows.
struct Strip<'a, B> {
    w: &'a [B],
    /// Blocks per row.
    kb: usize,
    xq: &'a [BlockQ8_1],
    m: usize,
    n: usize,
    out: &'a SendPtr,
}

impl<B: WeightBlock> Strip<'_, B> {
    fn wrow(&self, r: usize) -> &[B] {
        &self.w[r * self.kb..(r + 1) * self.kb]
    }
    fn xrow(&self, t: usize) -> &[BlockQ8_1] {
        &self.xq[t * self.kb..(t + 1) * self.kb]
    }

    /// # Safety
    /// Only one task may write the columns `rows` of the output.
    unsafe fn rows_scalar(&self, rows: std::ops::Range<usize>) {
        for r in rows {
            for t in 0..self.m {
                *self.out.0.add(t * self.n + r) = B::dot_scalar(self.wrow(r), self.xrow(t));
            }
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (see `forward`).
unsafe impl Sync for SendPtr {}

pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn quantize_row(x: &[f32], out: &mut [BlockQ8_1]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        *b = quantize_block(xs);
    }
}

/// 32 activations to 8 bits with one scale (ggml's Q8_1).
fn quantize_block(xs: &[f32]) -> BlockQ8_1 {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut b = ZERO_Q8;
    let mut sum = 0i32;
    for (q, v) in b.qs.iter_mut().zip(xs) {
        let r = (v * id).round() as i32;
        *q = r as i8;
        sum += r;
    }
    b.d = d;
    b.s = d * sum as f32;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF bytes of a `[rows, cols]` matrix with varied blocks.
    pub(super) fn bytes<B: WeightBlock>(rows: usize, cols: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for b in 0..rows * cols / QK {
            out.extend(f16::from_f32(0.01 + (b % 7) as f32 * 0.003).to_le_bytes());
            if B::BYTES == 20 {
                out.extend(f16::from_f32(-0.05 + (b % 5) as f32 * 0.02).to_le_bytes());
            }
            let payload = B::BYTES - out.len() % B::BYTES;
            out.extend((0..payload).map(|j| ((b * 31 + j * 17) % 256) as u8));
        }
        out
    }

    /// Every path the CPU supports against the dequantized product and the
    /// scalar kernel, on a shape with odd rows, an odd block count and a
    /// token count that leaves remainders in every tile size.
    fn check<B: WeightBlock>() {
        // 37 rows: two groups of 16 and a short one; 70 tokens: past the
        // AVX-512 kernel's 64 per pass.
        let (rows, cols, tokens) = (37, 96, 70);
        let gguf = bytes::<B>(rows, cols);
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| ((i * 13) % 29) as f32 / 29.0 - 0.5)
            .collect();
        let input = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).unwrap();
        let mut vnni = None;
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx] {
            if isa > Isa::supported() {
                continue;
            }
            let w = QuantMatrix::<B>::from_bytes_for(isa, "w", &gguf, rows, cols).unwrap();
            assert_eq!(w.isa(), isa);
            let dense: Vec<f32> = w
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let blocks: Vec<B> = gguf.chunks_exact(B::BYTES).map(B::parse).collect();
            let got: Vec<Vec<f32>> = w.forward(&input).unwrap().to_vec2().unwrap();
            // AMX computes the same integer sums as VNNI and scales them
            // alike: the same bits.
            match isa {
                Isa::Avx512Vnni => vnni = Some(got.clone()),
                Isa::Amx => assert!(vnni.as_ref() == Some(&got), "{}: AMX != VNNI", B::NAME),
                _ => {}
            }
            for t in 0..tokens {
                let mut q = vec![ZERO_Q8; cols / QK];
                quantize_row(&x[t * cols..(t + 1) * cols], &mut q);
                for r in 0..rows {
                    let exact: f32 = (0..cols)
                        .map(|c| dense[r * cols + c] * x[t * cols + c])
                        .sum();
                    // 8-bit activations: each is off by at most half its block's step.
                    let tol: f32 = (0..cols)
                        .map(|c| dense[r * cols + c].abs() * q[c / QK].d / 2.0)
                        .sum::<f32>()
                        + 1e-4;
                    assert!(
                        (got[t][r] - exact).abs() < tol,
                        "{} {isa:?}: {} vs {exact}",
                        B::NAME,
                        got[t][r]
                    );
                    let scalar = B::dot_scalar(&blocks[r * cols / QK..(r + 1) * cols / QK], &q);
                    assert!(
                        (got[t][r] - scalar).abs() < 1e-3,
                        "{} {isa:?}: {} vs scalar {scalar}",
                        B::NAME,
                        got[t][r]
                    );
                }
            }
            // A token's outputs are the same bits whatever else is in the
            // batch (speculative verification and batched greedy decoding
            // rely on it).
            for t in [0, 7, tokens - 1] {
                let alone: Vec<f32> = w
                    .forward(&input.narrow(0, t, 1).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(alone, got[t], "{} {isa:?}: token {t} alone", B::NAME);
            }
            // ... and in a batch of every tile width.
            for m in 2..8 {
                let part: Vec<Vec<f32>> = w
                    .forward(&input.narrow(0, 0, m).unwrap())
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                assert_eq!(part[..], got[..m], "{} {isa:?}: a batch of {m}", B::NAME);
            }
        }
    }

    #[test]
    fn the_packed_layout_gives_back_the_gguf_blocks() {
        let isa = Isa::supported();
        if isa < Isa::Avx2 {
            return;
        }
        let (rows, cols) = (5, 96);
        let gguf = bytes::<BlockQ4_1>(rows, cols);
        let plain = Q4_1Matrix::from_bytes_for(Isa::Scalar, "w", &gguf, rows, cols).unwrap();
        let packed = Q4_1Matrix::from_bytes_for(isa, "w", &gguf, rows, cols).unwrap();
        let stacked = Q4_1Matrix::concat_rows(&[&packed, &packed]);
        let dense = |m: &Q4_1Matrix| m.dequantize().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(dense(&packed), dense(&plain));
        assert_eq!(dense(&stacked)[rows..], dense(&plain)[..]);
        let gguf = bytes::<BlockQ8_0>(rows, cols);
        let plain = Q8_0Matrix::from_bytes_for(Isa::Scalar, "w", &gguf, rows, cols).unwrap();
        let packed = Q8_0Matrix::from_bytes_for(isa, "w", &gguf, rows, cols).unwrap();
        assert_eq!(
            packed.dequantize().unwrap().to_vec2::<f32>().unwrap(),
            plain.dequantize().unwrap().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn the_chosen_path_is_the_best_the_cpu_has_unless_capped() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let vnni = avx2
                && has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512vnni");
            // AMX-INT8 is CPUID leaf 7's EDX bit 25; the kernel may still
            // refuse it (then the test expects VNNI).
            let amx = vnni && (std::arch::x86_64::__cpuid_count(7, 0).edx >> 25) & 1 == 1;
            let want = match (avx2, vnni) {
                (_, true) if amx && amx::usable() => Isa::Amx,
                (_, true) => Isa::Avx512Vnni,
                (true, false) => Isa::Avx2,
                _ => Isa::Scalar,
            };
            assert_eq!(Isa::supported(), want);
        }
        let best = Isa::supported();
        assert_eq!(Isa::capped(None), best);
        assert_eq!(Isa::capped(Some("scalar")), Isa::Scalar);
        assert_eq!(Isa::capped(Some("avx2")), best.min(Isa::Avx2));
        assert_eq!(Isa::capped(Some("avx512")), best.min(Isa::Avx512Vnni));
        // Never a path the CPU lacks, and nonsense changes nothing.
        assert_eq!(Isa::capped(Some("amx")), best);
        assert_eq!(Isa::capped(Some("sse9")), best);
    }

    /// AMX tiles give the VNNI kernel's bits at every block count and tile
    /// height: the tile pipeline runs a few blocks ahead, so rows of one to
    /// six blocks take its start and end paths. (Skipped where the CPU has
    /// no AMX.)
    fn amx_matches_vnni<B: WeightBlock>() {
        if Isa::supported() < Isa::Amx {
            return;
        }
        // 40 tokens: two full tiles and a tile of 8; 27: one and a tile of
        // 11; 7: VNNI alone (and the tile shapes change between them).
        let rows = 21;
        for (tokens, cols) in [40, 27, 7]
            .into_iter()
            .flat_map(|t| (QK..=6 * QK).step_by(QK).map(move |c| (t, c)))
        {
            let gguf = bytes::<B>(rows, cols);
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| ((i * 17) % 31) as f32 / 31.0 - 0.5)
                .collect();
            let input = Tensor::from_vec(x, (tokens, cols), &Device::Cpu).unwrap();
            let run = |isa| {
                let w = QuantMatrix::<B>::from_bytes_for(isa, "w", &gguf, rows, cols).unwrap();
                w.forward(&input).unwrap().to_vec2::<f32>().unwrap()
            };
            assert_eq!(
                run(Isa::Amx),
                run(Isa::Avx512Vnni),
                "{} {cols} columns, {tokens} tokens",
                B::NAME
            );
        }
    }

    #[test]
    fn amx_tiles_give_the_vnni_bits() {
        amx_matches_vnni::<BlockQ4_1>();
        amx_matches_vnni::<BlockQ8_0>();
    }

    #[test]
    fn q4_1_matches_the_dequantized_product_and_the_scalar_kernel() {
        check::<BlockQ4_1>();
    }

    #[test]
    fn q8_0_matches_the_dequantized_product_and_the_scalar_kernel() {
        check::<BlockQ8_0>();
    }
}
