//! Pipeline stages in one process: the demo model cut into three stages,
//! handing hidden states down, gives exactly what the whole model gives, for
//! concurrent requests mixing prefill chunks and decodes.

use strata_engine::{ensure_demo_model, load_engine, EngineHandle, GenerateRequest, LoadOptions};
use strata_types::SamplingParams;

fn engine(pipeline_parallel_size: usize) -> EngineHandle {
    let opts = LoadOptions {
        model: ensure_demo_model().unwrap(),
        max_model_len: Some(512),
        max_num_seqs: 8,
        // Small steps, so long prompts are prefilled in chunks beside decodes.
        max_num_batched_tokens: 24,
        kv_cache_bytes: 64 << 20,
        enable_prefix_caching: true,
        max_pending_requests: 16,
        pipeline_parallel_size,
    };
    load_engine(&opts).unwrap().0
}

/// Token ids and sampled-token logprobs of each prompt, run concurrently.
fn run(e: &EngineHandle, prompts: &[Vec<u32>]) -> Vec<(Vec<u32>, Vec<f32>)> {
    let streams: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = SamplingParams {
                temperature: 0.8,
                seed: i as u64,
                logprobs: Some(0),
                ..SamplingParams::default()
            };
            e.generate(GenerateRequest {
                prompt_token_ids: p.clone(),
                sampling,
                max_tokens: Some(20),
                stop: vec![],
                stop_token_ids: vec![],
                ignore_eos: true,
                skip_special_tokens: true,
            })
            .unwrap()
            .1
        })
        .collect();
    streams
        .into_iter()
        .map(|mut rx| {
            let (mut ids, mut lps) = (Vec::new(), Vec::new());
            while let Some(o) = rx.blocking_recv() {
                let o = o.unwrap();
                ids.extend(&o.token_ids);
                lps.extend(o.logprobs.iter().map(|l| l.logprob));
                if o.finish.is_some() {
                    break;
                }
            }
            (ids, lps)
        })
        .collect()
}

#[test]
fn three_stages_equal_the_whole_model() {
    let whole = engine(1);
    let prompts: Vec<Vec<u32>> = [
        "Tell me about the sea.",
        "Count: 1, 2, 3,",
        "The recipe for bread is",
    ]
    .iter()
    .map(|t| whole.tokenizer().encode(&t.repeat(6), false).unwrap())
    .collect();
    let want = run(&whole, &prompts);
    let staged = run(&engine(3), &prompts);
    assert_eq!(staged, want);
    assert!(want
        .iter()
        .all(|(ids, lps)| ids.len() == 20 && lps.len() == 20));
}

#[test]
fn more_stages_than_layers_is_refused() {
    let opts = LoadOptions {
        model: ensure_demo_model().unwrap(),
        max_model_len: Some(64),
        max_num_seqs: 1,
        max_num_batched_tokens: 16,
        kv_cache_bytes: 8 << 20,
        enable_prefix_caching: false,
        max_pending_requests: 1,
        pipeline_parallel_size: 31,
    };
    let e = load_engine(&opts).err().unwrap().to_string();
    assert!(e.contains("between 1 and the model's 30 layers"), "{e}");
}
