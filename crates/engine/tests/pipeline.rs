//! Parallel stages in one process, through the engine: the demo model cut
//! into three pipeline stages gives exactly what the whole model gives, and
//! two tensor-parallel ranks (threads) of an f32 model give what one rank
//! gives, for concurrent requests mixing prefill chunks and decodes.

use strata_engine::{
    ensure_demo_model, load_engine, Constraint, EngineHandle, GenerateRequest, JsonStyle,
    LoadOptions, StructuredOutputs,
};
use strata_types::SamplingParams;

fn engine(
    model: std::path::PathBuf,
    pipeline_parallel_size: usize,
    tensor_parallel_size: usize,
) -> EngineHandle {
    let opts = LoadOptions {
        model,
        max_model_len: Some(512),
        max_num_seqs: 8,
        // Small steps, so long prompts are prefilled in chunks beside decodes.
        max_num_batched_tokens: 24,
        kv_cache_bytes: 64 << 20,
        gpu_memory_utilization: None,
        device: strata_model::DeviceRequest::Cpu,
        dtype: None,
        kv_cache_dtype: None,
        enable_prefix_caching: true,
        max_pending_requests: 16,
        recovery_timeout: std::time::Duration::from_secs(120),
        pipeline_parallel_size,
        tensor_parallel_size,
        cluster: None,
        speculative: None,
    };
    load_engine(&opts).unwrap().0
}

/// Token ids and sampled-token logprobs of each prompt, run concurrently;
/// the odd ones follow `constraint` when one is given.
fn run(
    e: &EngineHandle,
    prompts: &[Vec<u32>],
    temperature: f32,
    constraint: Option<&Constraint>,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let so = StructuredOutputs::new(e.shared_tokenizer(), JsonStyle::default());
    let streams: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = SamplingParams {
                temperature,
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
                guide: constraint
                    .filter(|_| i % 2 == 1)
                    .map(|c| so.compile(c, JsonStyle::default()).unwrap()),
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
    let whole = engine(ensure_demo_model().unwrap(), 1, 1);
    let prompts: Vec<Vec<u32>> = [
        "Tell me about the sea.",
        "Count: 1, 2, 3,",
        "The recipe for bread is",
    ]
    .iter()
    .map(|t| whole.tokenizer().encode(&t.repeat(6), false).unwrap())
    .collect();
    let want = run(&whole, &prompts, 0.8, None);
    let staged_engine = engine(ensure_demo_model().unwrap(), 3, 1);
    let staged = run(&staged_engine, &prompts, 0.8, None);
    assert_eq!(staged, want);
    assert!(want
        .iter()
        .all(|(ids, lps)| ids.len() == 20 && lps.len() == 20));
    // The last stage applies the token masks: constrained requests beside
    // free ones sample the same as on the whole model.
    let words = Constraint::Regex("[a-z]+( [a-z]+){2,5}\\.".into());
    let want = run(&whole, &prompts, 0.8, Some(&words));
    assert_eq!(run(&staged_engine, &prompts, 0.8, Some(&words)), want);
    let text = whole.tokenizer().decode(&want[1].0, false).unwrap();
    // Words of letters, at most six (max_tokens may cut the last short).
    let words_only = text.trim_end_matches('.').split(' ');
    let ok = words_only.clone().count() <= 6
        && words_only
            .into_iter()
            .all(|w| w.bytes().all(|b| b.is_ascii_lowercase()));
    assert!(ok, "{text:?}");
}

#[test]
fn more_stages_than_layers_is_refused() {
    let opts = LoadOptions {
        model: ensure_demo_model().unwrap(),
        max_model_len: Some(64),
        max_num_seqs: 1,
        max_num_batched_tokens: 16,
        kv_cache_bytes: 8 << 20,
        gpu_memory_utilization: None,
        device: strata_model::DeviceRequest::Cpu,
        dtype: None,
        kv_cache_dtype: None,
        enable_prefix_caching: false,
        max_pending_requests: 1,
        recovery_timeout: std::time::Duration::from_secs(120),
        pipeline_parallel_size: 31,
        tensor_parallel_size: 1,
        cluster: None,
        speculative: None,
    };
    let e = load_engine(&opts).err().unwrap().to_string();
    assert!(e.contains("between 1 and the model's 30 layers"), "{e}");
}

#[test]
fn two_tensor_parallel_ranks_serve_like_one() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny/llama-chat");
    let one = engine(dir.clone(), 1, 1);
    let prompts: Vec<Vec<u32>> = ["Hello there! ", "The quick brown fox ", "Once upon a time "]
        .iter()
        .map(|t| one.tokenizer().encode(&t.repeat(4), false).unwrap())
        .collect();
    let choice = Constraint::Choice(vec!["yes".into(), "no".into(), "maybe so".into()]);
    let want = run(&one, &prompts, 0.0, Some(&choice));
    for (tp, pp) in [(2, 1), (2, 3)] {
        let got = run(&engine(dir.clone(), pp, tp), &prompts, 0.0, Some(&choice));
        for ((gi, gl), (wi, wl)) in got.iter().zip(&want) {
            assert_eq!(gi, wi, "TP={tp} PP={pp}: greedy tokens");
            for (a, b) in gl.iter().zip(wl) {
                // Relative: the ranks' partial sums round differently.
                assert!(
                    (a - b).abs() < 1e-4 * b.abs().max(1.0),
                    "TP={tp} PP={pp}: logprob {a} vs {b}"
                );
            }
        }
    }
}
