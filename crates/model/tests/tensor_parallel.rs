//! Tensor parallelism in one process: two ranks as threads (ThreadComm) give
//! transformers' logits, like one rank does.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use strata_comm::{Communicator, ThreadComm};
use strata_model::{KvCache, StageModel, Weights};

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(variant)
}

fn load(variant: &str, comm: Arc<dyn Communicator>) -> strata_model::Result<Box<dyn StageModel>> {
    let w = Weights::open(&fixture(variant), &Device::Cpu).unwrap();
    strata_model::load_whole(&w, comm, 512)
}

fn step(m: &dyn StageModel, kv: &mut KvCache, start: usize, tokens: &[u32]) -> Vec<f32> {
    m.forward_sequence(kv, &[0, 1], start, tokens, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

/// Two thread ranks of `variant` give transformers' logits and tokens;
/// returns the weight bytes each rank read and the whole checkpoint's.
fn two_ranks_match_transformers(variant: &str) -> (Vec<u64>, u64) {
    let r = candle_core::safetensors::load(
        fixture(variant).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prompt: Vec<u32> = r["prompt_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let greedy: Vec<u32> = r["greedy_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let prompt_logits: Vec<Vec<f32>> = r["prompt_logits"].to_vec2().unwrap();
    let decode_logits: Vec<Vec<f32>> = r["decode_logits"].to_vec2().unwrap();

    let (results, bytes): (Vec<Vec<Vec<f32>>>, Vec<u64>) = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadComm::group(2)
            .into_iter()
            .map(|c| {
                let (prompt, greedy) = (&prompt, &greedy);
                s.spawn(move || {
                    let w = Weights::open(&fixture(variant), &Device::Cpu).unwrap();
                    let m = strata_model::load_whole(&w, Arc::new(c), 512).unwrap();
                    let mut kv = m.new_kv_cache(2).unwrap();
                    let mut out = vec![step(&*m, &mut kv, 0, prompt)];
                    for (i, &t) in greedy[..8].iter().enumerate() {
                        out.push(step(&*m, &mut kv, prompt.len() + i, &[t]));
                    }
                    (out, w.bytes_read())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).unzip()
    });
    assert_eq!(
        results[0], results[1],
        "both ranks hold the gathered logits"
    );
    let want: Vec<&Vec<f32>> = std::iter::once(prompt_logits.last().unwrap())
        .chain(&decode_logits)
        .collect();
    for (i, (got, want)) in results[0].iter().zip(want).enumerate() {
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{variant} step {i}: max |diff| {diff}");
        assert_eq!(argmax(got), greedy[i], "{variant} greedy token {i}");
    }
    let whole = std::fs::metadata(fixture(variant).join("model.safetensors"))
        .unwrap()
        .len();
    (bytes, whole)
}

#[test]
fn two_thread_ranks_match_transformers() {
    two_ranks_match_transformers("llama-gqa");
}

/// MLA heads (2 of 4 each), routed experts (4 of 8), the dense MLP's and
/// the shared expert's intermediate dimensions all split; the latent
/// projections, norms and routers are whole on each rank (as in vLLM).
#[test]
fn two_thread_ranks_of_deepseek_match_transformers() {
    let (bytes, whole) = two_ranks_match_transformers("deepseek-v3");
    let w = Weights::open(&fixture("deepseek-v3"), &Device::Cpu).unwrap();
    let replicated: u64 = (0..3)
        .flat_map(|l| {
            [
                format!("model.layers.{l}.self_attn.q_a_proj.weight"),
                format!("model.layers.{l}.self_attn.kv_a_proj_with_mqa.weight"),
                format!("model.layers.{l}.mlp.gate.weight"),
            ]
        })
        .filter(|n| w.contains(n))
        .map(|n| 4 * w.shape(&n).unwrap().iter().product::<usize>() as u64)
        .sum();
    for (rank, b) in bytes.iter().enumerate() {
        assert!(
            (*b as f64) <= (whole - replicated) as f64 / 2.0 * 1.05 + replicated as f64,
            "rank {rank} read {b} of {whole} bytes ({replicated} replicated)"
        );
    }
}

/// Experts split across the ranks (4 of 8 each), heads too: each rank
/// reads its experts, its heads, and the replicated norms and router only.
#[test]
fn two_thread_ranks_of_a_mixture_of_experts_match_transformers() {
    let (bytes, whole) = two_ranks_match_transformers("qwen3-moe");
    for (rank, b) in bytes.iter().enumerate() {
        assert!(
            (*b as f64) <= whole as f64 / 2.0 * 1.05,
            "rank {rank} read {b} of {whole} bytes"
        );
    }
}

#[test]
fn a_tp_size_that_does_not_divide_the_kv_heads_is_refused() {
    // llama-tied has a single KV head.
    let e = load("llama-tied", Arc::new(ThreadComm::group(2).remove(0)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--tensor-parallel-size 2 must divide the model's 1 KV heads"),
        "{e}"
    );
}
