//! Loading a Hugging Face folder written by transformers
//! (tests/fixtures/tiny/llama-chat): eos ids and sampling defaults.

use std::path::PathBuf;

use strata_engine::{load_engine, GenerationDefaults, LoadOptions};

#[test]
fn generation_config_supplies_defaults_and_eos() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/llama-chat");
    let (engine, info) = load_engine(&LoadOptions {
        model: dir,
        max_model_len: None,
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        kv_cache_bytes: 16 << 20,
        gpu_memory_utilization: None,
        device: strata_model::DeviceRequest::Cpu,
        dtype: None,
        kv_cache_dtype: None,
        enable_prefix_caching: true,
        max_pending_requests: 8,
        recovery_timeout: std::time::Duration::from_secs(120),
        pipeline_parallel_size: 1,
        tensor_parallel_size: 1,
        cluster: None,
        speculative: None,
    })
    .unwrap();
    assert_eq!(
        info.defaults,
        GenerationDefaults {
            temperature: Some(0.6),
            top_p: Some(0.85),
            top_k: Some(17),
            min_p: None,
            repetition_penalty: Some(1.1),
        }
    );
    assert_eq!(engine.tokenizer().eos_token_ids, vec![2]);
    assert_eq!(info.config.vocab_size, 311);
    // The model's own context (512) fits the 16 MiB cache, so it is the limit.
    assert_eq!(info.max_model_len, 512);
}
