//! Speculative decoding with n-gram drafts and with a draft model, through
//! the engine on the real demo model: greedy and seeded sampling give
//! exactly the tokens (and logprobs) decoding one token at a time gives,
//! with prefix caching, preemption, pipeline stages and structured outputs
//! beside them, while the drafts are in fact accepted.

use strata_engine::{
    ensure_demo_model, load_engine, Constraint, EngineHandle, GenerateRequest, JsonStyle,
    LoadOptions, SpeculativeConfig, StructuredOutputs,
};
use strata_types::SamplingParams;

fn engine(
    speculative: Option<&str>,
    pipeline_parallel_size: usize,
    kv_cache_bytes: u64,
) -> EngineHandle {
    load_engine(&options(
        speculative,
        pipeline_parallel_size,
        kv_cache_bytes,
    ))
    .unwrap()
    .0
}

fn options(
    speculative: Option<&str>,
    pipeline_parallel_size: usize,
    kv_cache_bytes: u64,
) -> LoadOptions {
    LoadOptions {
        model: ensure_demo_model().unwrap(),
        max_model_len: Some(128),
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        kv_cache_bytes,
        gpu_memory_utilization: None,
        device: strata_model::DeviceRequest::Cpu,
        dtype: None,
        kv_cache_dtype: None,
        enable_prefix_caching: true,
        max_pending_requests: 16,
        recovery_timeout: std::time::Duration::from_secs(120),
        pipeline_parallel_size,
        tensor_parallel_size: 1,
        cluster: None,
        speculative: speculative.map(|s| SpeculativeConfig::from_json(s).unwrap()),
    }
}

/// Prompts whose continuation repeats what they hold, as when a model
/// copies or edits its input.
fn prompts(e: &EngineHandle) -> Vec<Vec<u32>> {
    [
        "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the log. The cat",
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef add(a, b):\n",
        "Monday, Tuesday, Wednesday. Monday, Tuesday, Wednesday. Monday,",
    ]
    .iter()
    .map(|t| e.tokenizer().encode(t, false).unwrap())
    .collect()
}

/// Token ids and logprobs of each prompt, run concurrently; with a
/// constraint, the second request follows it.
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
                seed: 11 + i as u64,
                logprobs: Some(1),
                ..SamplingParams::default()
            };
            e.generate(GenerateRequest {
                prompt_token_ids: p.clone(),
                sampling,
                max_tokens: Some(40),
                stop: vec![],
                stop_token_ids: vec![],
                ignore_eos: true,
                skip_special_tokens: true,
                guide: constraint
                    .filter(|_| i == 1)
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

const NGRAM: &str = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#;

/// Forward passes (steps) a lone greedy request takes.
fn steps_alone(e: &EngineHandle, prompt: &[u32]) -> (Vec<u32>, u64) {
    let before = e.stats().sched.steps;
    let out = run(e, &[prompt.to_vec()], 0.0, None).remove(0).0;
    (out, e.stats().sched.steps - before)
}

#[test]
fn ngram_drafts_change_no_token_greedy_or_sampled() {
    let plain = engine(None, 1, 64 << 20);
    let ps = prompts(&plain);
    let greedy = run(&plain, &ps, 0.0, None);
    let sampled = run(&plain, &ps, 0.8, None);
    assert!(greedy
        .iter()
        .all(|(ids, lps)| ids.len() == 40 && lps.len() == 40));
    let (alone, plain_steps) = steps_alone(&plain, &ps[2]);
    drop(plain);

    let spec = engine(Some(NGRAM), 1, 64 << 20);
    assert_eq!(run(&spec, &ps, 0.0, None), greedy);
    let st = spec.stats().sched;
    assert!(st.spec_accepted_tokens > 0 && st.spec_draft_tokens > st.spec_accepted_tokens);
    assert_eq!(
        st.spec_accepted_per_pos.iter().sum::<u64>(),
        st.spec_accepted_tokens,
        "{st:?}"
    );
    // Seeded sampling keeps its draws: the same tokens, not just the same
    // distribution.
    assert_eq!(run(&spec, &ps, 0.8, None), sampled);
    // Text that repeats itself is what n-grams draft well: each accepted
    // draft is a forward pass saved.
    let (out, spec_steps) = steps_alone(&spec, &ps[2]);
    assert_eq!(out, alone);
    assert!(
        spec_steps * 2 < plain_steps,
        "{spec_steps} steps with drafts, {plain_steps} without"
    );
    // The same prompts again come from the prefix cache.
    let hits = spec.stats().sched.prefix_cache_hit_tokens;
    assert_eq!(run(&spec, &ps, 0.0, None), greedy);
    assert!(spec.stats().sched.prefix_cache_hit_tokens > hits);

    // A structured output beside speculating requests samples alone.
    let words = Constraint::Regex("[a-z]+( [a-z]+){2,5}\\.".into());
    drop(spec);
    let plain = engine(None, 1, 64 << 20);
    let want = run(&plain, &ps, 0.0, Some(&words));
    drop(plain);
    let spec = engine(Some(NGRAM), 1, 64 << 20);
    assert_eq!(run(&spec, &ps, 0.0, Some(&words)), want);
}

#[test]
fn ngram_drafts_survive_preemption_and_pipeline_stages() {
    let plain = engine(None, 1, 64 << 20);
    let ps = prompts(&plain);
    let greedy = run(&plain, &ps, 0.0, None);
    drop(plain);
    // Three stages: the first embeds the drafts, the last verifies them.
    let staged = engine(Some(NGRAM), 3, 64 << 20);
    assert_eq!(run(&staged, &ps, 0.0, None), greedy);
    assert!(staged.stats().sched.spec_accepted_tokens > 0);
    drop(staged);
    // A cache of 8 blocks (128 tokens) holds one request at a time.
    let per_token = 30 * 2 * 3 * 64 * 2;
    let small = engine(Some(NGRAM), 1, 8 * 16 * per_token);
    assert_eq!(small.config().num_blocks, 8);
    assert_eq!(run(&small, &ps, 0.0, None), greedy);
    let st = small.stats().sched;
    assert!(st.preemptions > 0 && st.spec_accepted_tokens > 0, "{st:?}");
}

/// The demo model drafting for itself: its greedy proposals are the very
/// tokens the model picks (the kernels give a token the same logits in any
/// batch), so a greedy run accepts every draft.
fn self_draft(k: usize) -> String {
    format!(
        r#"{{"model": {:?}, "num_speculative_tokens": {k}}}"#,
        ensure_demo_model().unwrap()
    )
}

#[test]
fn a_draft_model_changes_no_token_and_drafting_for_itself_is_always_right() {
    let plain = engine(None, 1, 64 << 20);
    let ps = prompts(&plain);
    let greedy = run(&plain, &ps, 0.0, None);
    let sampled = run(&plain, &ps, 0.8, None);
    let (alone, plain_steps) = steps_alone(&plain, &ps[1]);
    let words = Constraint::Regex("[a-z]+( [a-z]+){2,5}\\.".into());
    let constrained = run(&plain, &ps, 0.0, Some(&words));
    drop(plain);

    let spec = engine(Some(&self_draft(4)), 1, 64 << 20);
    assert_eq!(run(&spec, &ps, 0.0, None), greedy);
    let st = spec.stats().sched;
    assert!(st.spec_draft_tokens > 0);
    assert_eq!(st.spec_accepted_tokens, st.spec_draft_tokens, "{st:?}");
    // Each step verifies up to 4 drafts and adds one token of its own.
    let (out, spec_steps) = steps_alone(&spec, &ps[1]);
    assert_eq!(out, alone);
    assert!(
        spec_steps * 3 < plain_steps,
        "{spec_steps} steps with drafts, {plain_steps} without"
    );
    // Sampled tokens keep their seeded draws; greedy drafts are then
    // sometimes wrong, and rejected.
    let before = spec.stats().sched;
    assert_eq!(run(&spec, &ps, 0.8, None), sampled);
    let st = spec.stats().sched;
    assert!(
        st.spec_accepted_tokens - before.spec_accepted_tokens
            < st.spec_draft_tokens - before.spec_draft_tokens
    );
    // The prefix cache serves both models' KV for a rerun.
    let hits = st.prefix_cache_hit_tokens;
    let before = spec.stats().sched;
    assert_eq!(run(&spec, &ps, 0.0, None), greedy);
    let st = spec.stats().sched;
    assert!(st.prefix_cache_hit_tokens > hits);
    assert_eq!(
        st.spec_accepted_tokens - before.spec_accepted_tokens,
        st.spec_draft_tokens - before.spec_draft_tokens
    );
    // A structured output samples alone beside drafting requests.
    assert_eq!(run(&spec, &ps, 0.0, Some(&words)), constrained);
}

#[test]
fn a_draft_model_survives_preemption_and_pipeline_stages() {
    let plain = engine(None, 1, 64 << 20);
    let ps = prompts(&plain);
    let greedy = run(&plain, &ps, 0.0, None);
    drop(plain);
    // The last of three stages drafts.
    let staged = engine(Some(&self_draft(3)), 3, 64 << 20);
    assert_eq!(run(&staged, &ps, 0.0, None), greedy);
    let st = staged.stats().sched;
    assert!(st.spec_accepted_tokens > 0 && st.spec_accepted_tokens == st.spec_draft_tokens);
    drop(staged);
    // 8 blocks of both models' KV hold one request at a time.
    let per_token = 2 * 30 * 2 * 3 * 64 * 2;
    let small = engine(Some(&self_draft(4)), 1, 8 * 16 * per_token);
    assert_eq!(small.config().num_blocks, 8);
    assert_eq!(run(&small, &ps, 0.0, None), greedy);
    let st = small.stats().sched;
    assert!(st.preemptions > 0 && st.spec_accepted_tokens > 0, "{st:?}");
}

#[test]
fn a_draft_model_must_exist_and_share_the_vocabulary() {
    let opts = |draft: &str| {
        let json = format!(r#"{{"model": {draft:?}, "num_speculative_tokens": 2}}"#);
        options(Some(&json), 1, 64 << 20)
    };
    let tiny = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny/llama-chat"
    );
    for (draft, why) in [
        ("/nonexistent/draft.gguf", "does not exist"),
        (tiny, "a draft model must share the model's tokenizer"),
    ] {
        let err = load_engine(&opts(draft))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(why), "{draft}: {err}");
    }
}
