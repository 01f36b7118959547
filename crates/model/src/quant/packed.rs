//! The SIMD paths of [`super::QuantMatrix`]: AVX-512 VNNI and AVX2.
//!
//! Weights are repacked once, at load, so that 64 bytes hold four
//! consecutive quantized values of each of 16 rows, one row per 32-bit
//! lane. AVX-512 reads those bytes as one register, AVX2 as two (rows 0–7
//! and 8–15). A multiply-add of such a register with four activation bytes
//! broadcast to every lane adds the products into each row's sum: `vpdpbusd`
//! (VNNI) straight into 32-bit sums; on AVX2, `vpmaddubsw` into 16-bit pairs,
//! which are summed in 16 bits over the block (4-bit values cannot overflow
//! them) and widened once. A block's 32 values all share their scales, so its
//! dot products stay integers until the block ends: then one conversion and
//! two FMAs per register of rows and token apply the weight and activation
//! scales (and Q4_1's offsets). An output is a lane of a vector, never a
//! horizontal sum.
//!
//! A tile is a register of rows × up to eight (AVX-512) or six (AVX2)
//! tokens: each weight register is unpacked once and used for every token
//! of the tile, so a step of many tokens is a matrix-matrix product, not
//! many matrix-vector ones. With AMX, each 16 tokens of a group (and a
//! rest of 8 to 15) are one tile: a block's 8 chunks are an AMX weight
//! tile as they stand (Q8_0) or once their nibbles are split (Q4_1), the
//! tokens' activation blocks the other operand, and one instruction gives
//! all their integer sums.
//!
//! Every output goes through the same operations whatever the number of
//! tokens in the matmul and wherever it falls in a tile, so a sequence's
//! logits do not depend on what else is in its batch: batched greedy
//! decoding and speculative verification give the tokens one sequence
//! decoded alone would.

use std::arch::x86_64::*;

use half::f16;

use crate::pages::filled;

use super::{amx, BlockQ4_1, BlockQ8_0, BlockQ8_1, Isa, SendPtr, WeightBlock, QK, ZERO_Q8};

/// Rows per group: one 32-bit lane of an AVX-512 register each.
const LANES: usize = 16;
/// Rows per AVX2 register: half a group.
const HALF: usize = 8;

/// 64 bytes: four values of each of a group's 16 rows.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Chunk([u8; 64]);

/// How a weight format's blocks go into a group's lanes.
pub trait Packing: Send + Sync + std::fmt::Debug + 'static {
    type Block: WeightBlock;
    /// Bytes of a block's values in one lane's share of the layout.
    const Q_BYTES: usize;
    /// Values stored as `q + 128` (signed formats): the activations' sums
    /// take the bias back out (see [`Packed::forward`]).
    const BIASED: bool;
    /// The block's value bytes as the layout stores them.
    fn values(b: &Self::Block) -> Vec<u8>;
    /// A block from its stored value bytes, scale and offset.
    fn block(values: &[u8], d: f16, m: f16) -> Self::Block;
    /// Adds one block's integer dot products of the group's 16 rows with
    /// `T` tokens' activation blocks `x` into `acc`.
    ///
    /// # Safety
    /// The CPU must have the features [`super::Isa::Avx512Vnni`] names;
    /// `q` holds `Q_BYTES / 4` chunks.
    unsafe fn dots<const T: usize>(q: &[Chunk], x: &[&BlockQ8_1; T], acc: &mut [__m512i; T]);
    /// As [`Packing::dots`] for rows `8 * half..8 * half + 8` of the group,
    /// on AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2; `q` holds `Q_BYTES / 4` chunks.
    unsafe fn dots_avx2<const T: usize>(
        q: &[Chunk],
        half: usize,
        x: &[&BlockQ8_1; T],
        acc: &mut [__m256i; T],
    );
    /// A block's values as an AMX weight tile: 8 rows of 64 bytes, each
    /// four values of the 16 rows as unsigned bytes (the chunks themselves,
    /// or their nibbles unpacked into `buf`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW; `q` holds `Q_BYTES / 4` chunks;
    /// `buf` is writable (not necessarily initialized).
    unsafe fn amx_weights(q: &[Chunk], buf: *mut [Chunk; 8]) -> *const u8;
}

/// `acc + w · (four activation bytes from `at`, in every lane)`, in 32-bit
/// lanes: `vpdpbusd` with the activations as a broadcast memory operand.
/// (Written out because LLVM loads the four bytes into a register and
/// broadcasts them there: one more vector µop per `vpdpbusd`, which made the
/// broadcasts the kernel's hottest instructions.)
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn dpbusd_broadcast(acc: __m512i, w: __m512i, x: &BlockQ8_1, at: usize) -> __m512i {
    debug_assert!(at + 4 <= x.qs.len());
    let mut acc = acc;
    std::arch::asm!(
        "vpdpbusd {acc}, {w}, dword ptr [{x}]{{1to16}}",
        acc = inout(zmm_reg) acc,
        w = in(zmm_reg) w,
        x = in(reg) x.qs.as_ptr().add(at),
        options(pure, readonly, nostack, preserves_flags),
    );
    acc
}

/// Four activation bytes from `at`, in every lane of an AVX2 register.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn broadcast4_avx2(x: &BlockQ8_1, at: usize) -> __m256i {
    _mm256_set1_epi32((x.qs.as_ptr().add(at) as *const i32).read_unaligned())
}

/// The low and high nibbles of half `half` of a chunk (four bytes of each
/// of 8 rows), as bytes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles(chunk: &Chunk, half: usize) -> (__m256i, __m256i) {
    let raw = _mm256_load_si256(chunk.0.as_ptr().add(32 * half) as *const __m256i);
    let low = _mm256_set1_epi8(0x0F);
    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    (_mm256_and_si256(raw, low), hi)
}

/// Q4_1: chunk `c` holds each row's nibble bytes `4c..4c + 4`, whose low
/// nibbles are values `4c..4c + 4` and high nibbles `16 + 4c..`.
#[derive(Debug)]
pub struct Q4_1Packing;

impl Packing for Q4_1Packing {
    type Block = BlockQ4_1;
    const Q_BYTES: usize = 16;
    const BIASED: bool = false;

    fn values(b: &BlockQ4_1) -> Vec<u8> {
        b.qs.to_vec()
    }

    fn block(values: &[u8], d: f16, m: f16) -> BlockQ4_1 {
        BlockQ4_1 {
            d,
            m,
            qs: values.try_into().expect("16 bytes"),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn dots<const T: usize>(q: &[Chunk], x: &[&BlockQ8_1; T], acc: &mut [__m512i; T]) {
        let low = _mm512_set1_epi8(0x0F);
        // With few tokens, the high nibbles' sums go apart: two chains of
        // dependent `vpdpbusd`s rather than one twice as long. (Integer
        // sums: the split changes no bit.)
        let mut high = [_mm512_setzero_si512(); T];
        for (c, chunk) in q.iter().enumerate().take(4) {
            let raw = _mm512_load_si512(chunk.0.as_ptr() as *const __m512i);
            let lo = _mm512_and_si512(raw, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            for j in 0..T {
                acc[j] = dpbusd_broadcast(acc[j], lo, x[j], 4 * c);
                let h = if T < 4 { &mut high[j] } else { &mut acc[j] };
                *h = dpbusd_broadcast(*h, hi, x[j], 16 + 4 * c);
            }
        }
        if T < 4 {
            for j in 0..T {
                acc[j] = _mm512_add_epi32(acc[j], high[j]);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dots_avx2<const T: usize>(
        q: &[Chunk],
        half: usize,
        x: &[&BlockQ8_1; T],
        acc: &mut [__m256i; T],
    ) {
        // `vpmaddubsw` pairs of 4-bit values by 8-bit activations: at most
        // 2 × 15 × 128 = 3,840 each, so the block's eight stay within i16.
        let mut pairs = [_mm256_setzero_si256(); T];
        for (c, chunk) in q.iter().enumerate().take(4) {
            let (lo, hi) = nibbles(chunk, half);
            for j in 0..T {
                let p = _mm256_maddubs_epi16(lo, broadcast4_avx2(x[j], 4 * c));
                pairs[j] = _mm256_add_epi16(pairs[j], p);
                let p = _mm256_maddubs_epi16(hi, broadcast4_avx2(x[j], 16 + 4 * c));
                pairs[j] = _mm256_add_epi16(pairs[j], p);
            }
        }
        let ones = _mm256_set1_epi16(1);
        for j in 0..T {
            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(pairs[j], ones));
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn amx_weights(q: &[Chunk], buf: *mut [Chunk; 8]) -> *const u8 {
        let buf = buf as *mut __m512i;
        // Low nibbles are values 0..16 (tile rows 0..4), high ones 16..32.
        let low = _mm512_set1_epi8(0x0F);
        for (c, chunk) in q.iter().enumerate().take(4) {
            let raw = _mm512_load_si512(chunk.0.as_ptr() as *const __m512i);
            let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            _mm512_store_si512(buf.add(c), _mm512_and_si512(raw, low));
            _mm512_store_si512(buf.add(4 + c), hi);
        }
        buf as *const u8
    }
}

/// Q8_0: chunk `c` holds each row's values `4c..4c + 4`, as `q + 128`.
#[derive(Debug)]
pub struct Q8_0Packing;

impl Packing for Q8_0Packing {
    type Block = BlockQ8_0;
    const Q_BYTES: usize = 32;
    const BIASED: bool = true;

    fn values(b: &BlockQ8_0) -> Vec<u8> {
        b.qs.iter().map(|&q| q as u8 ^ 0x80).collect()
    }

    fn block(values: &[u8], d: f16, _m: f16) -> BlockQ8_0 {
        BlockQ8_0 {
            d,
            qs: std::array::from_fn(|j| (values[j] ^ 0x80) as i8),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn dots<const T: usize>(q: &[Chunk], x: &[&BlockQ8_1; T], acc: &mut [__m512i; T]) {
        // Two chains with few tokens, as for Q4_1.
        let mut odd = [_mm512_setzero_si512(); T];
        for c in (0..8).step_by(2) {
            let even_w = _mm512_load_si512(q[c].0.as_ptr() as *const __m512i);
            let odd_w = _mm512_load_si512(q[c + 1].0.as_ptr() as *const __m512i);
            for j in 0..T {
                acc[j] = dpbusd_broadcast(acc[j], even_w, x[j], 4 * c);
                let o = if T < 4 { &mut odd[j] } else { &mut acc[j] };
                *o = dpbusd_broadcast(*o, odd_w, x[j], 4 * c + 4);
            }
        }
        if T < 4 {
            for j in 0..T {
                acc[j] = _mm512_add_epi32(acc[j], odd[j]);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dots_avx2<const T: usize>(
        q: &[Chunk],
        half: usize,
        x: &[&BlockQ8_1; T],
        acc: &mut [__m256i; T],
    ) {
        // A biased byte times an 8-bit activation can pass i16 in
        // `vpmaddubsw`'s pairs: split it into nibbles, `q + 128 = 16 h + l`,
        // whose pairs sum within i16 over the block as Q4_1's do.
        let mut lows = [_mm256_setzero_si256(); T];
        let mut highs = [_mm256_setzero_si256(); T];
        for (c, chunk) in q.iter().enumerate().take(8) {
            let (lo, hi) = nibbles(chunk, half);
            for j in 0..T {
                let y = broadcast4_avx2(x[j], 4 * c);
                lows[j] = _mm256_add_epi16(lows[j], _mm256_maddubs_epi16(lo, y));
                highs[j] = _mm256_add_epi16(highs[j], _mm256_maddubs_epi16(hi, y));
            }
        }
        let ones = _mm256_set1_epi16(1);
        let sixteens = _mm256_set1_epi16(16);
        for j in 0..T {
            let sum = _mm256_add_epi32(
                _mm256_madd_epi16(lows[j], ones),
                _mm256_madd_epi16(highs[j], sixteens),
            );
            acc[j] = _mm256_add_epi32(acc[j], sum);
        }
    }

    /// Q8_0's chunks are a weight tile as they are.
    unsafe fn amx_weights(q: &[Chunk], _buf: *mut [Chunk; 8]) -> *const u8 {
        q.as_ptr() as *const u8
    }
}

/// Where byte `i` of lane `lane`'s values goes among a block's chunks.
fn position(lane: usize, i: usize) -> (usize, usize) {
    (i / 4, lane * 4 + i % 4)
}

/// A weight matrix in groups of 16 rows (the last one zero padded). Per
/// group and block, row-major: 16 scales, 16 offsets (formats with them)
/// and `Q_BYTES / 4` chunks of values.
#[derive(Debug)]
pub struct Packed<P: Packing> {
    rows: usize,
    /// Blocks per row.
    kb: usize,
    d: Vec<f16>,
    m: Vec<f16>,
    q: Vec<Chunk>,
    _format: std::marker::PhantomData<P>,
}

impl<P: Packing> Packed<P> {
    const CHUNKS: usize = P::Q_BYTES / 4;

    pub fn new(blocks: &[P::Block], rows: usize, kb: usize) -> Self {
        let groups = rows.div_ceil(LANES);
        let has_min = P::Block::ZERO.min().is_some();
        let mut d = filled(groups * kb * LANES, f16::ZERO);
        let mut m = filled(if has_min { d.len() } else { 0 }, f16::ZERO);
        let zero = P::values(&P::Block::ZERO);
        let mut q = filled(groups * kb * Self::CHUNKS, Chunk([0; 64]));
        for g in 0..groups {
            for b in 0..kb {
                let at = g * kb + b;
                for lane in 0..LANES {
                    let r = g * LANES + lane;
                    let values = match blocks.get(r * kb + b).filter(|_| r < rows) {
                        Some(blk) => {
                            d[at * LANES + lane] = blk.d();
                            if has_min {
                                m[at * LANES + lane] = blk.min().expect("checked above");
                            }
                            P::values(blk)
                        }
                        None => zero.clone(),
                    };
                    for (i, &v) in values.iter().enumerate() {
                        let (c, byte) = position(lane, i);
                        q[at * Self::CHUNKS + c].0[byte] = v;
                    }
                }
            }
        }
        Self {
            rows,
            kb,
            d,
            m,
            q,
            _format: std::marker::PhantomData,
        }
    }

    /// The blocks again, in GGUF order.
    pub fn blocks(&self) -> Vec<P::Block> {
        let mut out = Vec::with_capacity(self.rows * self.kb);
        let mut values = vec![0u8; P::Q_BYTES];
        for r in 0..self.rows {
            let (g, lane) = (r / LANES, r % LANES);
            for b in 0..self.kb {
                let at = g * self.kb + b;
                for (i, v) in values.iter_mut().enumerate() {
                    let (c, byte) = position(lane, i);
                    *v = self.q[at * Self::CHUNKS + c].0[byte];
                }
                let m = self.m.get(at * LANES + lane).copied().unwrap_or(f16::ZERO);
                out.push(P::block(&values, self.d[at * LANES + lane], m));
            }
        }
        out
    }

    /// `x [m, k] → out [m, n]` for this matrix of `n` rows, on the path
    /// `isa` (AVX2 or AVX-512 VNNI).
    ///
    /// # Safety
    /// The CPU must have the features `isa` names.
    pub unsafe fn forward(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        out: &mut [f32],
    ) {
        debug_assert!(isa >= Isa::Avx2);
        let avx512 = isa >= Isa::Avx512Vnni;
        use rayon::prelude::*;
        let kb = self.kb;
        let mut xq = vec![ZERO_Q8; m * kb];
        // Each activation block's integer sum: for values stored as
        // `q + 128`, a block's dot products start from -128 × it.
        let mut sums = vec![0i32; m * kb];
        // A few tokens' blocks take microseconds: waking the pool for them
        // would cost more than it saves (a verify of 2 to 7 tokens paid
        // ~15 µs a matmul for it on a 2-vCPU VM).
        const BLOCKS_PER_TASK: usize = 2048;
        xq.par_chunks_mut(kb)
            .zip(sums.par_chunks_mut(kb))
            .zip(x.par_chunks(k))
            .with_min_len(BLOCKS_PER_TASK.div_ceil(kb))
            .for_each(|((q, sums), row)| {
                for ((b, sum), xs) in q.iter_mut().zip(sums).zip(row.chunks_exact(QK)) {
                    // SAFETY: the caller vouches for the features.
                    (*b, *sum) = unsafe {
                        if avx512 {
                            quantize_block(xs)
                        } else {
                            quantize_block_avx2(xs)
                        }
                    };
                }
            });
        let out_ptr = SendPtr(out.as_mut_ptr());
        let work = Work {
            w: self,
            xq: &xq,
            sums: &sums,
            m,
            n,
            out: &out_ptr,
            amx: isa == Isa::Amx,
        };
        // A task owns one group of output features; tokens go through it 64
        // at a time so its activations stay in the core's L2 cache.
        // A lone token's group is little work: take several per task.
        let min_len = (8 / m).max(1);
        (0..n.div_ceil(LANES))
            .into_par_iter()
            .with_min_len(min_len)
            .for_each(|g| {
                // SAFETY: the caller vouches for the features; this task alone
                // writes group `g`'s columns of `out`.
                unsafe {
                    if avx512 {
                        work.group(g)
                    } else {
                        work.group_avx2(g)
                    }
                };
            });
    }
}

/// 32 activations to 8 bits with one scale (ggml's Q8_1), as
/// [`super::quantize_block`] does but rounding ties to even; with the
/// block's integer sum.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block(xs: &[f32]) -> (BlockQ8_1, i32) {
    let lo = _mm512_loadu_ps(xs.as_ptr());
    let hi = _mm512_loadu_ps(xs[16..].as_ptr());
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, id));
    let qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, id));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    let mut b = ZERO_Q8;
    _mm_storeu_si128(b.qs.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(
        b.qs[16..].as_mut_ptr() as *mut __m128i,
        _mm512_cvtepi32_epi8(qhi),
    );
    b.d = d;
    b.s = d * sum as f32;
    (b, sum)
}

/// [`quantize_block`] on AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(xs: &[f32]) -> (BlockQ8_1, i32) {
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs[8 * i..].as_ptr()));
    let sign = _mm256_set1_ps(-0.0);
    let abs = |v| _mm256_andnot_ps(sign, v);
    let max8 = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let max4 = _mm_max_ps(_mm256_castps256_ps128(max8), _mm256_extractf128_ps(max8, 1));
    let max2 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
    let amax = _mm_cvtss_f32(_mm_max_ss(max2, _mm_movehdup_ps(max2)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)));
    let sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sum8);
    let sum = lanes.iter().sum::<i32>();
    // The packs work within 128-bit halves: 32-bit groups come out in the
    // order 0 2 4 6 1 3 5 7, which the permutation undoes.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut b = ZERO_Q8;
    _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, bytes);
    b.d = d;
    b.s = d * sum as f32;
    (b, sum)
}

/// What the tasks of one matmul share.
struct Work<'a, P: Packing> {
    w: &'a Packed<P>,
    xq: &'a [BlockQ8_1],
    sums: &'a [i32],
    m: usize,
    n: usize,
    out: &'a SendPtr,
    /// Tiles of 8 to 16 tokens go through AMX.
    amx: bool,
}

/// One AMX tile's integer sums: up to 16 tokens × 16 rows.
#[repr(C, align(64))]
struct TileSums([i32; 256]);

impl<P: Packing> Work<'_, P> {
    /// # Safety
    /// AVX-512 VNNI present; only this call writes group `g`'s columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    unsafe fn group(&self, g: usize) {
        const TOKENS_PER_PASS: usize = 64;
        for t0 in (0..self.m).step_by(TOKENS_PER_PASS) {
            let t1 = (t0 + TOKENS_PER_PASS).min(self.m);
            let mut t = t0;
            if self.amx {
                while t + 16 <= t1 {
                    self.tile_amx::<16>(g, t);
                    t += 16;
                }
                // A rest of 8 or more tokens is one shorter AMX tile (fewer
                // tile rows); below that VNNI is as fast (`matmul_bench`).
                if t1 - t >= 8 {
                    match t1 - t {
                        8 => self.tile_amx::<8>(g, t),
                        9 => self.tile_amx::<9>(g, t),
                        10 => self.tile_amx::<10>(g, t),
                        11 => self.tile_amx::<11>(g, t),
                        12 => self.tile_amx::<12>(g, t),
                        13 => self.tile_amx::<13>(g, t),
                        14 => self.tile_amx::<14>(g, t),
                        _ => self.tile_amx::<15>(g, t),
                    }
                    t = t1;
                }
            }
            while t + 8 <= t1 {
                self.tile::<8>(g, t);
                t += 8;
            }
            // The rest in one tile, so its weights are unpacked once: a
            // decode verifying 2 to 7 drafts is one tile. (Each token's sums
            // are the same in a tile of any width.)
            match t1 - t {
                0 => {}
                1 => self.tile::<1>(g, t),
                2 => self.tile::<2>(g, t),
                3 => self.tile::<3>(g, t),
                4 => self.tile::<4>(g, t),
                5 => self.tile::<5>(g, t),
                6 => self.tile::<6>(g, t),
                _ => self.tile::<7>(g, t),
            }
        }
    }

    /// Group `g`'s 16 rows × tokens `t..t + T`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    #[inline]
    unsafe fn tile<const T: usize>(&self, g: usize, t: usize) {
        let kb = self.w.kb;
        let chunks = Packed::<P>::CHUNKS;
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..kb {
            let at = g * kb + b;
            self.prefetch_next_group(at);
            let x: [&BlockQ8_1; T] = std::array::from_fn(|j| &self.xq[(t + j) * kb + b]);
            let mut dots = [_mm512_setzero_si512(); T];
            if P::BIASED {
                for (j, dot) in dots.iter_mut().enumerate() {
                    *dot = _mm512_set1_epi32(-128 * self.sums[(t + j) * kb + b]);
                }
            }
            P::dots::<T>(&self.w.q[at * chunks..(at + 1) * chunks], &x, &mut dots);
            self.scale_block(at, &dots, &x, &mut acc);
        }
        self.store_tile(g, t, acc);
    }

    /// The next group's block `at`'s weights into the cache: a task's
    /// groups follow one another, so its weights arrive while this group
    /// computes (the hardware prefetcher alone leaves a few tokens paying
    /// for the reading and the compute one after the other).
    #[inline]
    fn prefetch_next_group(&self, at: usize) {
        let chunks = Packed::<P>::CHUNKS;
        let ahead = self.w.q.as_ptr().wrapping_add((at + self.w.kb) * chunks) as *const i8;
        for c in 0..chunks {
            // SAFETY: a prefetch reads nothing; past the end it is dropped.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(c * 64)) };
        }
    }

    /// Adds block `at`'s share to a tile's 16-row outputs from its integer
    /// sums `dots` with the tokens' activation blocks `x`: the weight and
    /// activation scales, then Q4_1's offsets (m × the activation block's
    /// sum). Every AVX-512 path goes through here, so an output has the same
    /// bits whichever made its sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    #[inline]
    unsafe fn scale_block<const T: usize>(
        &self,
        at: usize,
        dots: &[__m512i; T],
        x: &[&BlockQ8_1; T],
        acc: &mut [__m512; T],
    ) {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(
            self.w.d[at * LANES..].as_ptr() as *const __m256i
        ));
        for j in 0..T {
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(x[j].d));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[j]), scale, acc[j]);
        }
        if !self.w.m.is_empty() {
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(
                self.w.m[at * LANES..].as_ptr() as *const __m256i
            ));
            for j in 0..T {
                acc[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[j].s), acc[j]);
            }
        }
    }

    /// A tile's outputs: tokens `t..t + T` × group `g`'s rows (the last
    /// group may hold fewer than 16).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_tile<const T: usize>(&self, g: usize, t: usize, acc: [__m512; T]) {
        let r = g * LANES;
        let mask: __mmask16 = if self.n - r >= LANES {
            0xFFFF
        } else {
            (1u16 << (self.n - r)) - 1
        };
        for (j, v) in acc.into_iter().enumerate() {
            _mm512_mask_storeu_ps(self.out.0.add((t + j) * self.n + r), mask, v);
        }
    }

    /// [`Work::tile`] for `T` tokens (up to 16), with each block's integer
    /// sums from one AMX tile product; the scales go through the same
    /// [`Work::scale_block`].
    ///
    /// # Safety
    /// As [`Work::group`], and [`amx::usable`] returned true.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
    unsafe fn tile_amx<const T: usize>(&self, g: usize, t: usize) {
        amx::configure(T);
        let kb = self.w.kb;
        let chunks = Packed::<P>::CHUNKS;
        let mut acc = [_mm512_setzero_ps(); T];
        // Scratch the tile instructions write before anything reads it (left
        // uninitialized: zeroing it cost more than the products).
        let mut sums = std::mem::MaybeUninit::<[TileSums; amx::SUM_TILES]>::uninit();
        let sums = sums.as_mut_ptr() as *mut TileSums;
        let mut unpacked = std::mem::MaybeUninit::<[[Chunk; 8]; amx::SUM_TILES]>::uninit();
        let unpacked = unpacked.as_mut_ptr() as *mut [Chunk; 8];
        // Token j's block b is `xq[(t + j) * kb + b]`: one tile row per
        // token, a row of blocks apart.
        let x_stride = kb * std::mem::size_of::<BlockQ8_1>();
        // A pipeline, so no step waits on what it has just written: step i
        // unpacks block i + 2's weights, starts block i's product, stores
        // block i - 1's sums and scales block i - 2's. (A tile load of
        // bytes stored a moment before stalls until they reach the cache.)
        const AHEAD: usize = 2;
        let weights = |b: usize| {
            let at = g * kb + b;
            self.prefetch_next_group(at);
            let q = &self.w.q[at * chunks..(at + 1) * chunks];
            P::amx_weights(q, unpacked.add(b % amx::SUM_TILES))
        };
        let mut w = [std::ptr::null(); amx::SUM_TILES];
        for (b, w) in w.iter_mut().enumerate().take(AHEAD.min(kb)) {
            *w = weights(b);
        }
        for i in 0..kb + 2 {
            if i + AHEAD < kb {
                w[(i + AHEAD) % amx::SUM_TILES] = weights(i + AHEAD);
            }
            if i < kb {
                let slot = i % amx::SUM_TILES;
                amx::multiply(slot, self.xq[t * kb + i].qs.as_ptr(), x_stride, w[slot]);
            }
            if (1..=kb).contains(&i) {
                let slot = (i - 1) % amx::SUM_TILES;
                amx::store(slot, sums.add(slot) as *mut i32);
            }
            if i < 2 {
                continue;
            }
            let b = i - 2;
            let sums = sums.add(b % amx::SUM_TILES) as *const i32;
            // Token j's block and integer sum are `kb` entries after j - 1's
            // (pointers: bounds checks kept the loops from unrolling).
            let xs = self.xq[t * kb + b..].as_ptr();
            let x_sums = self.sums[t * kb + b..].as_ptr();
            debug_assert!((t + T - 1) * kb + b < self.xq.len());
            let x: [&BlockQ8_1; T] = std::array::from_fn(|j| &*xs.add(j * kb));
            let dots: [__m512i; T] = std::array::from_fn(|j| {
                let dot = _mm512_load_si512(sums.add(16 * j) as *const __m512i);
                if P::BIASED {
                    _mm512_add_epi32(_mm512_set1_epi32(-128 * *x_sums.add(j * kb)), dot)
                } else {
                    dot
                }
            });
            self.scale_block(g * kb + b, &dots, &x, &mut acc);
        }
        self.store_tile(g, t, acc);
    }

    /// [`Work::group`] on AVX2: each half of the group in turn, six tokens
    /// a tile (the weights' nibbles are split once for six; Q8_0 splits
    /// twice as many as Q4_1, and its lm_head took 16% less time than in
    /// tiles of four), and a rest of up to five in one tile, so a verify
    /// of four drafts unpacks the weights once.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; only this call writes group `g`'s columns.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_avx2(&self, g: usize) {
        const TOKENS_PER_PASS: usize = 64;
        for t0 in (0..self.m).step_by(TOKENS_PER_PASS) {
            let t1 = (t0 + TOKENS_PER_PASS).min(self.m);
            // The group's second half is padding where the matrix ends.
            for half in (0..2).filter(|h| g * LANES + h * HALF < self.n) {
                let mut t = t0;
                while t + 6 <= t1 {
                    self.tile_avx2::<6>(g, half, t);
                    t += 6;
                }
                match t1 - t {
                    0 => {}
                    1 => self.tile_avx2::<1>(g, half, t),
                    2 => self.tile_avx2::<2>(g, half, t),
                    3 => self.tile_avx2::<3>(g, half, t),
                    4 => self.tile_avx2::<4>(g, half, t),
                    _ => self.tile_avx2::<5>(g, half, t),
                }
            }
        }
    }

    /// Rows `8 * half..8 * half + 8` of group `g` × tokens `t..t + T`, on AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile_avx2<const T: usize>(&self, g: usize, half: usize, t: usize) {
        let kb = self.w.kb;
        let chunks = Packed::<P>::CHUNKS;
        let has_min = !self.w.m.is_empty();
        // Pointers, checked once here: bounds checks on every block's
        // indices kept the loop's registers spilling to the stack.
        let first = g * kb;
        let rows = first * LANES + half * HALF;
        assert!((t + T) * kb <= self.xq.len() && (first + kb) * chunks <= self.w.q.len());
        assert!(rows + (kb - 1) * LANES + HALF <= self.w.d.len());
        assert!(!has_min || self.w.m.len() == self.w.d.len());
        assert!(!P::BIASED || self.sums.len() == self.xq.len());
        let xs = self.xq.as_ptr().add(t * kb);
        let sums = self.sums.as_ptr().wrapping_add(t * kb);
        let q = self.w.q.as_ptr().add(first * chunks);
        let d = self.w.d.as_ptr().add(rows);
        let m = self.w.m.as_ptr().wrapping_add(rows);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..kb {
            if half == 0 {
                // The second half finds the lines in cache.
                self.prefetch_next_group(first + b);
            }
            let x: [&BlockQ8_1; T] = std::array::from_fn(|j| &*xs.add(j * kb + b));
            let mut dots = [_mm256_setzero_si256(); T];
            if P::BIASED {
                for (j, dot) in dots.iter_mut().enumerate() {
                    *dot = _mm256_set1_epi32(-128 * *sums.add(j * kb + b));
                }
            }
            let block = std::slice::from_raw_parts(q.add(b * chunks), chunks);
            P::dots_avx2::<T>(block, half, &x, &mut dots);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(d.add(b * LANES) as *const __m128i));
            for j in 0..T {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[j].d));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[j]), scale, acc[j]);
            }
            if has_min {
                let m = _mm256_cvtph_ps(_mm_loadu_si128(m.add(b * LANES) as *const __m128i));
                for j in 0..T {
                    acc[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[j].s), acc[j]);
                }
            }
        }
        // The last register of rows may be short.
        let r = g * LANES + half * HALF;
        let live = (self.n - r).min(HALF);
        for (j, v) in acc.into_iter().enumerate() {
            let dst = self.out.0.add((t + j) * self.n + r);
            if live == HALF {
                _mm256_storeu_ps(dst, v);
            } else {
                let mut lanes = [0f32; HALF];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, live);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD quantizers give the scalar one's blocks (the inputs have no
    /// ties, where the scalar rounding goes away from zero and theirs to
    /// even), and the blocks' integer sums.
    #[test]
    fn simd_quantizers_match_the_scalar_one() {
        let isa = Isa::supported();
        if isa < Isa::Avx2 {
            return;
        }
        for seed in 0..50usize {
            let xs: Vec<f32> = (0..QK)
                .map(|i| ((i * 7919 + seed * 104_729) % 1013) as f32 / 1013.0 - 0.37)
                .map(|v| v * (1 + seed % 7) as f32)
                .collect();
            let want = super::super::quantize_block(&xs);
            let sum: i32 = want.qs.iter().map(|&q| q as i32).sum();
            // SAFETY: `isa` is what this CPU supports.
            let mut got = vec![unsafe { quantize_block_avx2(&xs) }];
            if isa == Isa::Avx512Vnni {
                got.push(unsafe { quantize_block(&xs) });
            }
            for (b, s) in got {
                assert_eq!(b.qs, want.qs, "seed {seed}");
                assert_eq!((b.d, b.s, s), (want.d, want.s, sum), "seed {seed}");
            }
        }
        let zeros = [0f32; QK];
        // SAFETY: as above.
        let (b, s) = unsafe { quantize_block_avx2(&zeros) };
        assert_eq!((b.qs, b.d, s), ([0; QK], 0.0, 0));
    }
}
