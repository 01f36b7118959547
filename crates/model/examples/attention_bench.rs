//! Times the CPU paged attention of one layer at a few context lengths:
//! a decode (one token), a speculative verify step (5 tokens) and a
//! prefill chunk (512 tokens) at the end of the context. SmolLM2-135M's
//! heads (9 query heads, 3 KV heads of 64) over a bf16 cache (`KV=fp8`:
//! an fp8 one).
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p strata-model --example attention_bench [CONTEXTS]
//!
//! CONTEXTS: comma-separated positions (default 1024,4096,8192).
//!
//! With `STREAMS=N`, a decode step of N sequences instead, each at every
//! context, over 30 layers' caches (SmolLM2's count) with the sequences'
//! blocks interleaved: the cache then exceeds the CPU's, as in a server,
//! and the time is per layer.

use std::time::{Duration, Instant};

use half::bf16;
use strata_model::{
    paged_attention, write_kv, Fp8, Heads, KvElem, LayerKv, Plane, Rope, RopeConfig,
};
use strata_types::{RopeStyle, BLOCK_SIZE};

fn main() {
    let contexts: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "1024,4096,8192".into())
        .split(',')
        .map(|c| c.trim().parse().expect("a context length"))
        .collect();
    let heads = Heads {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let d = heads.head_dim;
    let max = contexts.iter().copied().max().unwrap_or(0);
    let rope = Rope::new(
        &RopeConfig {
            dim: d,
            theta: 100_000.0,
            scaling: None,
            style: RopeStyle::Half,
        },
        None,
        max + 1,
    );
    // A reproducible, unremarkable fill.
    let val = |i: usize| ((i * 2_654_435_761 % 1_000_003) as f32 / 1_000_003.0 - 0.5) * 2.0;
    if let Ok(streams) = std::env::var("STREAMS") {
        let streams: usize = streams.parse().expect("STREAMS: a count");
        return many_streams(streams, &contexts, heads, &rope, val);
    }
    let blocks = max.div_ceil(BLOCK_SIZE);
    let row = heads.num_kv_heads * d;
    let zero = |_| 0.0;
    let mut cache = LayerKv {
        k: plane(blocks * BLOCK_SIZE * row, zero),
        v: plane(blocks * BLOCK_SIZE * row, zero),
    };
    // Blocks in reverse order, as a long-running cache scatters them.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let positions: Vec<u32> = (0..max as u32).collect();
    let slots: Vec<u32> = positions
        .iter()
        .map(|&p| table[p as usize / BLOCK_SIZE] * BLOCK_SIZE as u32 + p % BLOCK_SIZE as u32)
        .collect();
    let k: Vec<f32> = (0..max * row).map(val).collect();
    let v: Vec<f32> = (0..max * row).map(|i| val(i + 7)).collect();
    write_kv(&mut cache, &k, &v, &positions, &slots, &rope, heads);

    println!("context  queries   ms/layer (best of the runs)");
    // On one of rayon's workers, as the server runs a step.
    rayon::scope(|_| {
        for &context in &contexts {
            for queries in [1, 5, 512] {
                if queries > context {
                    continue;
                }
                let qpos: Vec<u32> = (context - queries..context).map(|p| p as u32).collect();
                let q: Vec<f32> = (0..queries * heads.num_heads * d)
                    .map(|i| val(i + 13))
                    .collect();
                let seq = vec![0u32; queries];
                let mut out = vec![0f32; q.len()];
                let tables = [&table[..]];
                let mut run = || {
                    let t = Instant::now();
                    paged_attention(&q, &cache, &qpos, &seq, &tables, &rope, heads, &mut out);
                    t.elapsed()
                };
                run(); // warm up
                let reps = (2_000_000 / (context * queries)).clamp(3, 200);
                let best = (0..reps).map(|_| run()).min().unwrap_or(Duration::ZERO);
                println!(
                    "{context:>7}  {queries:>7}   {:>8.3}",
                    best.as_secs_f64() * 1e3
                );
            }
        }
    });
}

/// A decode step of `streams` sequences at each context over 30 layers.
fn many_streams(
    streams: usize,
    contexts: &[usize],
    heads: Heads,
    rope: &Rope,
    val: impl Fn(usize) -> f32,
) {
    const LAYERS: usize = 30;
    let d = heads.head_dim;
    let row = heads.num_kv_heads * d;
    println!("streams  context   ms/layer (best of the runs, {LAYERS} layers' caches)");
    for &context in contexts {
        let per_seq = context.div_ceil(BLOCK_SIZE);
        let blocks = per_seq * streams;
        // Sequence s holds blocks s, s + streams, s + 2·streams, ...
        let tables: Vec<Vec<u32>> = (0..streams)
            .map(|s| (0..per_seq).map(|b| (b * streams + s) as u32).collect())
            .collect();
        let caches: Vec<LayerKv> = (0..LAYERS)
            .map(|l| {
                let fill = |off: usize| plane(blocks * BLOCK_SIZE * row, |i| val(i + off + l));
                LayerKv {
                    k: fill(0),
                    v: fill(7),
                }
            })
            .collect();
        let positions = vec![context as u32 - 1; streams];
        let seqs: Vec<u32> = (0..streams as u32).collect();
        let table_refs: Vec<&[u32]> = tables.iter().map(Vec::as_slice).collect();
        let q: Vec<f32> = (0..streams * heads.num_heads * d)
            .map(|i| val(i + 13))
            .collect();
        let mut out = vec![0f32; q.len()];
        let mut run = || {
            let t = Instant::now();
            for cache in &caches {
                paged_attention(
                    &q,
                    cache,
                    &positions,
                    &seqs,
                    &table_refs,
                    rope,
                    heads,
                    &mut out,
                );
            }
            t.elapsed() / LAYERS as u32
        };
        run();
        let best = (0..5).map(|_| run()).min().unwrap_or(Duration::ZERO);
        println!(
            "{streams:>7}  {context:>7}   {:>8.3}",
            best.as_secs_f64() * 1e3
        );
    }
}

/// A plane of `n` values `f(i)`, in bf16, or in fp8 with `KV=fp8`.
fn plane(n: usize, f: impl Fn(usize) -> f32) -> Plane {
    if std::env::var("KV").is_ok_and(|kv| kv == "fp8") {
        Plane::Fp8((0..n).map(|i| Fp8::put(f(i))).collect())
    } else {
        Plane::Bf16((0..n).map(|i| bf16::from_f32(f(i))).collect())
    }
}
