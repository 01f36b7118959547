//! Attention over the paged KV cache, on the CPU.
//!
//! Rotary embeddings are applied here: to keys as they are written into the
//! cache, and to each query head as it is read, so no pass over the
//! activations is spent on them.

use rayon::prelude::*;
use strata_types::BLOCK_SIZE;

use crate::kv_cache::LayerKv;
use crate::rope::Rope;

/// Head geometry of one shard: `num_heads` query heads share `num_kv_heads`.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Writes each token's rotated key and its value into the cache slot given by
/// `slot_mapping` (`block * BLOCK_SIZE + offset`).
pub fn write_kv(
    cache: &mut LayerKv,
    k: &[f32],
    v: &[f32],
    positions: &[u32],
    slot_mapping: &[u32],
    rope: &Rope,
    heads: Heads,
) {
    let row = heads.num_kv_heads * heads.head_dim;
    for (t, (&pos, &slot)) in positions.iter().zip(slot_mapping).enumerate() {
        let dst = slot as usize * row;
        for g in 0..heads.num_kv_heads {
            let o = g * heads.head_dim;
            rope.apply(
                &k[t * row + o..t * row + o + heads.head_dim],
                pos as usize,
                &mut cache.k[dst + o..dst + o + heads.head_dim],
            );
        }
        cache.v[dst..dst + row].copy_from_slice(&v[t * row..(t + 1) * row]);
    }
}

/// Causal attention for a flattened batch. `q` is `[tokens, num_heads *
/// head_dim]` before rope; token `t` belongs to sequence `token_seq[t]` and
/// attends to positions `0..=positions[t]` of that sequence through its block
/// table. The KV of every token in the batch must already be written.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    cache: &LayerKv,
    positions: &[u32],
    token_seq: &[u32],
    block_tables: &[&[u32]],
    rope: &Rope,
    heads: Heads,
    out: &mut [f32],
) {
    let d = heads.head_dim;
    let group = heads.num_heads / heads.num_kv_heads;
    let kv_row = heads.num_kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(d)
        .enumerate()
        .with_min_len(4)
        .for_each_init(
            || vec![0.0f32; d],
            |qr, (i, acc)| {
                let (t, h) = (i / heads.num_heads, i % heads.num_heads);
                let pos = positions[t] as usize;
                let table = block_tables[token_seq[t] as usize];
                let g = h / group;
                rope.apply(&q[i * d..(i + 1) * d], pos, qr);
                qr.iter_mut().for_each(|x| *x *= scale);
                // One pass with a running max (online softmax): no score buffer.
                acc.fill(0.0);
                let mut max = f32::NEG_INFINITY;
                let mut sum = 0.0f32;
                for p in 0..=pos {
                    let slot = table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE;
                    let off = slot * kv_row + g * d;
                    let s = dot(qr, &cache.k[off..off + d]);
                    if s > max {
                        let c = (max - s).exp();
                        sum *= c;
                        acc.iter_mut().for_each(|a| *a *= c);
                        max = s;
                    }
                    let w = (s - max).exp();
                    sum += w;
                    for (a, v) in acc.iter_mut().zip(&cache.v[off..off + d]) {
                        *a += w * v;
                    }
                }
                let inv = 1.0 / sum;
                acc.iter_mut().for_each(|a| *a *= inv);
            },
        );
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes let the compiler vectorise the loop.
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::{ModelConfig, RopeStyle};

    fn rope(d: usize) -> Rope {
        let cfg = ModelConfig {
            architecture: "LlamaForCausalLM".into(),
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: d,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rope_style: RopeStyle::Half,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: false,
        };
        Rope::new(&cfg, None, 64)
    }

    /// Plain softmax attention over contiguous, already rotated K/V.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>]) -> Vec<f32> {
        let d = q.len();
        let s: Vec<f32> = k
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt())
            .collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..d)
            .map(|j| e.iter().zip(v).map(|(w, v)| w * v[j]).sum::<f32>() / z)
            .collect()
    }

    #[test]
    fn paged_attention_matches_dense_attention_across_scattered_blocks() {
        let d = 8;
        let heads = Heads {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: d,
        };
        let r = rope(d);
        let n = 20; // spans two blocks
        let table = [3u32, 1]; // deliberately out of order
        let mut cache = LayerKv {
            k: vec![0.0; 4 * BLOCK_SIZE * d],
            v: vec![0.0; 4 * BLOCK_SIZE * d],
        };
        let val = |t: usize, j: usize, s: f32| ((t * 31 + j * 7) as f32 * s).sin();
        let k: Vec<f32> = (0..n * d).map(|i| val(i / d, i % d, 0.37)).collect();
        let v: Vec<f32> = (0..n * d).map(|i| val(i / d, i % d, 0.11)).collect();
        let positions: Vec<u32> = (0..n as u32).collect();
        let slots: Vec<u32> = positions
            .iter()
            .map(|&p| table[p as usize / BLOCK_SIZE] * BLOCK_SIZE as u32 + p % BLOCK_SIZE as u32)
            .collect();
        write_kv(&mut cache, &k, &v, &positions, &slots, &r, heads);
        // Query the last two positions, both heads.
        let q: Vec<f32> = (0..2 * 2 * d).map(|i| val(i, 3, 0.53)).collect();
        let qpos = [18u32, 19];
        let mut out = vec![0.0; q.len()];
        paged_attention(&q, &cache, &qpos, &[0, 0], &[&table], &r, heads, &mut out);
        for (t, &p) in qpos.iter().enumerate() {
            let rk: Vec<Vec<f32>> = (0..=p as usize)
                .map(|i| {
                    let mut o = vec![0.0; d];
                    r.apply(&k[i * d..(i + 1) * d], i, &mut o);
                    o
                })
                .collect();
            let rv: Vec<Vec<f32>> = (0..=p as usize)
                .map(|i| v[i * d..(i + 1) * d].to_vec())
                .collect();
            for h in 0..2 {
                let qi = &q[(t * 2 + h) * d..(t * 2 + h + 1) * d];
                let mut rq = vec![0.0; d];
                r.apply(qi, p as usize, &mut rq);
                let want = reference(&rq, &rk, &rv);
                let got = &out[(t * 2 + h) * d..(t * 2 + h + 1) * d];
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
                }
            }
        }
    }
}
