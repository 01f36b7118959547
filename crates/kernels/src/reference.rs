//! CPU references, one per kernel, in plain f32 loops. Each kernel's CPU
//! implementation (the op's CPU path) is its reference, and the GPU check
//! compares the kernels with them. Slices of rows may be strided: row `t`
//! starts at `t * stride`. Row-wise ones split their rows across the rayon
//! pool; a row's operations are the same either way.

use rayon::prelude::*;
use strata_types::{RopeStyle, BLOCK_SIZE};

use crate::Heads;

/// Rotary tables as the kernels read them: `cos`/`sin` are
/// `[positions, head_dim / 2]`.
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub style: RopeStyle,
}

impl Rotation<'_> {
    /// Rotates one head vector in place for position `pos`.
    pub fn apply(&self, head: &mut [f32], pos: usize) {
        let half = head.len() / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for i in 0..half {
            let (a, b) = match self.style {
                RopeStyle::Half => (i, i + half),
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            };
            let (x, y) = (head[a], head[b]);
            head[a] = x * cos[i] - y * sin[i];
            head[b] = x * sin[i] + y * cos[i];
        }
    }
}

/// `kernels/rms_norm.cu`: `residual += x` (when `x` is given), then
/// `out = residual / sqrt(mean(residual²) + eps) * weight`, per row of
/// `weight.len()` elements.
pub fn add_rms_norm(
    x: Option<&[f32]>,
    residual: &mut [f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let hidden = weight.len();
    let rows = residual
        .par_chunks_mut(hidden)
        .zip(out.par_chunks_mut(hidden))
        .enumerate();
    rows.for_each(|(row, (r, o))| {
        wide(|| {
            if let Some(x) = x {
                for (r, x) in r.iter_mut().zip(&x[row * hidden..(row + 1) * hidden]) {
                    *r += x;
                }
            }
            // One running sum, as every stage and rank has summed it: eight
            // lanes would be faster but move the bits, and with them the
            // tensor-parallel layouts' distance from one rank on the tiny
            // fixture past its test's 1e-4 (to 2.2e-4).
            let mean = r.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            for ((o, r), w) in o.iter_mut().zip(r.iter()).zip(weight) {
                *o = r * inv * w;
            }
        })
    });
}

/// Runs `f` compiled for AVX2 where the CPU has it. The row loops here are
/// plain Rust, which x86-64's baseline target vectorizes four floats wide
/// at most. The bits are the same either way: the operations and their
/// order do not change, and Rust never fuses `a * b + c`.
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `kernels/activation.cu`: rows of `[gate | up]` (each `inter` wide) to
/// `silu(gate) * up`.
pub fn silu_and_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    let rows = gate_up.par_chunks(2 * inter).zip(out.par_chunks_mut(inter));
    rows.for_each(|(gu, o)| {
        let (g, u) = gu.split_at(inter);
        wide(|| {
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = silu(*g) * u;
            }
        })
    });
}

/// `x · sigmoid(x)`, with `e^-|x|` from [`fast_exp`] so that a row
/// vectorises (libm's `expf` was 2.5% of a 16-stream step on the CPU).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = fast_exp(-x.abs());
    let sigmoid = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
    x * sigmoid
}

/// `e^x` for `x <= 0` to 4e-6 relative error (the f32 rounding of `x·log2 e`
/// dominates), in plain arithmetic the
/// compiler can vectorise (libm's `expf` is a call per element).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let z = x.max(-87.0) * std::f32::consts::LOG2_E;
    let n = nearest(z);
    let f = z - n;
    // 2^f for f in [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 7.
    const C: [f32; 7] = [
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_356,
        0.000_154_035_3,
        0.000_015_252_73,
    ];
    let mut p = C[6];
    for c in C[..6].iter().rev() {
        p = p * f + c;
    }
    let p = 1.0 + f * p;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `z` rounded to the nearest integer, ties to even, for `|z| < 2^22`, in
/// two additions: at 1.5 · 2^23 an f32 has no fraction bits left.
/// `round_ties_even` is the same value, but x86-64's baseline has no
/// instruction for it, and its libm call (`rintf`) was 5% of a 64-stream
/// step.
#[inline(always)]
fn nearest(z: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (z + SHIFT) - SHIFT
}

/// `kernels/rotary.cu`: rotates `x` (`[tokens, heads, head_dim]`) in place,
/// token `t` at `positions[t]`.
pub fn rotary(x: &mut [f32], positions: &[u32], rope: Rotation, head_dim: usize) {
    let per_token = x.len() / positions.len().max(1);
    for (t, &pos) in positions.iter().enumerate() {
        for head in x[t * per_token..(t + 1) * per_token].chunks_mut(head_dim) {
            rope.apply(head, pos as usize);
        }
    }
}

/// `kernels/kv_cache.cu`: writes token `t`'s rotated key and its value into
/// cache slot `slots[t]`. `k`/`v` rows are `kv_heads * head_dim` wide and
/// `k_stride`/`v_stride` apart; the caches are `[slots, kv_heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn write_kv(
    k: &[f32],
    k_stride: usize,
    v: &[f32],
    v_stride: usize,
    positions: &[u32],
    slots: &[u32],
    rope: Rotation,
    heads: Heads,
    k_cache: &mut [f32],
    v_cache: &mut [f32],
) {
    let row = heads.num_kv_heads * heads.head_dim;
    for (t, (&pos, &slot)) in positions.iter().zip(slots).enumerate() {
        let dst = slot as usize * row;
        k_cache[dst..dst + row].copy_from_slice(&k[t * k_stride..t * k_stride + row]);
        for head in k_cache[dst..dst + row].chunks_mut(heads.head_dim) {
            rope.apply(head, pos as usize);
        }
        v_cache[dst..dst + row].copy_from_slice(&v[t * v_stride..t * v_stride + row]);
    }
}

/// `kernels/paged_attention.cu`: causal attention for a flattened batch.
/// Token `t` (query row at `t * q_stride`, before rope) belongs to sequence
/// `token_seq[t]` and attends to positions `0..=positions[t]` through row
/// `token_seq[t]` of `block_tables` (`[seqs, max_blocks]`). Writes
/// `[tokens, num_heads * head_dim]` to `out`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    positions: &[u32],
    token_seq: &[u32],
    block_tables: &[u32],
    max_blocks: usize,
    rope: Rotation,
    heads: Heads,
    out: &mut [f32],
) {
    let d = heads.head_dim;
    let group = heads.num_heads / heads.num_kv_heads;
    let row = heads.num_kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut qh = vec![0f32; d];
    for (t, (&pos, &seq)) in positions.iter().zip(token_seq).enumerate() {
        let table = &block_tables[seq as usize * max_blocks..(seq as usize + 1) * max_blocks];
        let pos = pos as usize;
        for h in 0..heads.num_heads {
            qh.copy_from_slice(&q[t * q_stride + h * d..t * q_stride + (h + 1) * d]);
            rope.apply(&mut qh, pos);
            let kv_off = (h / group) * d;
            let slot = |p: usize| {
                (table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE) * row + kv_off
            };
            let scores: Vec<f32> = (0..=pos)
                .map(|p| {
                    let k = &k_cache[slot(p)..slot(p) + d];
                    qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            let o = &mut out[(t * heads.num_heads + h) * d..(t * heads.num_heads + h + 1) * d];
            o.fill(0.0);
            for (p, w) in weights.iter().enumerate() {
                for (o, v) in o.iter_mut().zip(&v_cache[slot(p)..slot(p) + d]) {
                    *o += w / total * v;
                }
            }
        }
    }
}

/// `kernels/sampling.cu`: the first index of the largest value, NaN counted
/// as -inf (0 for a row of NaN or -inf only). The maximum is taken in 16
/// independent lanes, which the compiler vectorizes (a running index is a
/// dependent chain: 8× slower on a 128k-vocabulary row), then found.
pub fn argmax(row: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            // NaN never wins a `>`.
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        // Only -inf and NaN, all equal: the first.
        return 0;
    }
    row.iter().position(|&x| x == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_on_the_softmax_range() {
        for i in 0..=20_000 {
            let x = -(i as f32) * 0.005;
            let (got, want) = (fast_exp(x), x.exp());
            assert!(
                (got - want).abs() <= 4e-6 * want + 1e-30,
                "exp({x}): {got} vs {want}"
            );
        }
        assert_eq!(fast_exp(f32::NEG_INFINITY), fast_exp(-87.0));
        assert!(fast_exp(-200.0) < 1e-37);
    }

    #[test]
    fn nearest_rounds_ties_to_even() {
        for i in -300_000..=300_000 {
            let z = i as f32 * 0.000_5;
            assert_eq!(nearest(z), z.round_ties_even(), "{z}");
        }
        for z in [-0.5f32, -1.5, -2.5, 0.5, 125.5, -125.5, 4_194_303.5] {
            assert_eq!(nearest(z), z.round_ties_even(), "{z}");
        }
    }

    #[test]
    fn silu_matches_the_plain_formula() {
        for i in -40_000..=40_000 {
            let x = i as f32 * 0.005;
            let want = x as f64 / (1.0 + (-x as f64).exp());
            let got = silu(x) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * want.abs() + 1e-30,
                "silu({x}): {got} vs {want}"
            );
        }
        assert!(silu(-1000.0) <= 0.0 && silu(-1000.0) > -1e-30);
        assert_eq!(silu(1000.0), 1000.0);
    }

    #[test]
    fn add_rms_norm_updates_the_residual_and_normalizes_each_row() {
        let x = [1.0, 1.0, -2.0, 0.0];
        let mut residual = [1.0, 3.0, 2.0, 2.0];
        let weight = [1.0, 0.5];
        let mut out = [0.0; 4];
        add_rms_norm(Some(&x), &mut residual, &weight, 0.0, &mut out);
        assert_eq!(residual, [2.0, 4.0, 0.0, 2.0]);
        // Row 0: rms = sqrt((4 + 16) / 2) = sqrt(10).
        let r = 10f32.sqrt();
        let want = [2.0 / r, 4.0 / r * 0.5, 0.0, 2.0 / 2f32.sqrt() * 0.5];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
        // Without x it is a plain RMSNorm and leaves the residual alone.
        let before = residual;
        add_rms_norm(None, &mut residual, &weight, 0.0, &mut out);
        assert_eq!(residual, before);
    }

    #[test]
    fn silu_and_mul_gates_the_up_projection() {
        let gate_up = [0.0, 2.0, 3.0, 5.0];
        let mut out = [0.0; 2];
        silu_and_mul(&gate_up, 2, &mut out);
        assert_eq!(out[0], 0.0);
        let silu2 = 2.0 / (1.0 + (-2f32).exp());
        assert!((out[1] - silu2 * 5.0).abs() < 1e-6);
    }

    #[test]
    fn rotation_turns_each_pair_by_its_angle() {
        // One position, head_dim 4: pair angles 90° and 0°.
        let cos = [0.0, 1.0];
        let sin = [1.0, 0.0];
        let half = Rotation {
            cos: &cos,
            sin: &sin,
            style: RopeStyle::Half,
        };
        // Half pairs (0, 2) and (1, 3).
        let mut x = [1.0, 2.0, 3.0, 4.0];
        half.apply(&mut x, 0);
        assert_eq!(x, [-3.0, 2.0, 1.0, 4.0]);
        // Interleaved pairs (0, 1) and (2, 3).
        let mut y = [1.0, 2.0, 3.0, 4.0];
        Rotation {
            style: RopeStyle::Interleaved,
            ..half
        }
        .apply(&mut y, 0);
        assert_eq!(y, [-2.0, 1.0, 3.0, 4.0]);
    }

    #[test]
    fn attention_to_one_position_returns_its_value_and_groups_share_kv_heads() {
        // Identity rotation; 2 query heads share 1 KV head; one cached token
        // in block 2 (slot 32); a second sequence's table points elsewhere.
        let (cos, sin) = (vec![1.0; 2], vec![0.0; 2]);
        let rope = Rotation {
            cos: &cos,
            sin: &sin,
            style: RopeStyle::Half,
        };
        let heads = Heads {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
        };
        let slots = 3 * BLOCK_SIZE;
        let (mut kc, mut vc) = (vec![0.0; slots * 4], vec![0.0; slots * 4]);
        let k = [1.0, 0.0, 0.0, 0.0, 9.0];
        let v = [0.5, -1.0, 2.0, 3.0, 9.0];
        // Rows 5 apart: the fifth column is another projection's, never read.
        write_kv(
            &k,
            5,
            &v,
            5,
            &[0],
            &[32],
            rope,
            Heads {
                num_heads: 1,
                ..heads
            },
            &mut kc,
            &mut vc,
        );
        assert_eq!(&vc[128..132], &v[..4]);
        let q = [0.3, 0.1, 0.0, 0.0, 7.0, 7.0, 7.0, 7.0];
        let mut out = vec![0.0; 8];
        paged_attention(
            &q,
            8,
            &kc,
            &vc,
            &[0],
            &[1],
            &[0, 1, 2, 0],
            2,
            rope,
            heads,
            &mut out,
        );
        assert_eq!(&out[..4], &v[..4]);
        assert_eq!(&out[4..], &v[..4]);
    }
}
