//! Engine properties seen through the API: batch invariance, prefix caching,
//! preemption.

mod common;

use common::{prompts, Server};
use serde_json::json;

#[tokio::test]
async fn concurrent_greedy_requests_equal_each_request_alone() {
    let s = Server::start(&[]).await;
    let ps = prompts(16);
    let mut alone = Vec::new();
    for p in &ps {
        alone.push(s.greedy_chat(p, 24).await);
    }
    let together = futures::future::join_all(ps.iter().map(|p| s.greedy_chat(p, 24))).await;
    assert_eq!(together, alone);
    // They really shared steps: fewer steps than tokens generated.
    assert!(
        s.metric("strata_steps_total").await < s.metric("strata_generation_tokens_total").await
    );
}

#[tokio::test]
async fn a_shared_prefix_is_computed_once() {
    let s = Server::start(&[]).await;
    let system = "You are a meticulous assistant. ".repeat(40);
    let body = |q: &str| {
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
               "temperature": 0, "max_tokens": 8, "ignore_eos": true})
    };
    let (_, a) = s.post("/v1/chat/completions", &body("What is 2+2?")).await;
    let prompt_a = a["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_a > 150);
    let computed_before = s.metric("strata_computed_tokens_total").await;
    let hits_before = s.metric("strata_prefix_cache_hit_tokens_total").await;
    let (_, b) = s.post("/v1/chat/completions", &body("Name a fruit.")).await;
    let prompt_b = b["usage"]["prompt_tokens"].as_u64().unwrap();
    let hits = s.metric("strata_prefix_cache_hit_tokens_total").await - hits_before;
    let computed = s.metric("strata_computed_tokens_total").await - computed_before;
    assert!(
        hits >= 144,
        "the shared system prompt should hit the cache, got {hits}"
    );
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], hits);
    // Only the new prompt tokens and the decodes were computed (the last
    // decode's token is sampled, never fed back).
    assert_eq!(computed, prompt_b - hits + 8 - 1);
    // Same output as a server that caches nothing.
    let cold = Server::start(&["--enable-prefix-caching", "false"]).await;
    let (_, b_cold) = cold
        .post("/v1/chat/completions", &body("Name a fruit."))
        .await;
    assert_eq!(b["choices"][0]["message"], b_cold["choices"][0]["message"]);
    assert_eq!(cold.metric("strata_prefix_cache_hit_tokens_total").await, 0);
}

#[tokio::test]
async fn requests_preempted_for_lack_of_blocks_finish_with_the_same_output() {
    // 4 MiB holds 11 blocks (176 tokens) of this model's bf16 KV; four
    // requests of ~100 tokens each cannot all stay resident.
    let small = Server::start(&["--kv-cache-memory", "4MiB", "--max-model-len", "160"]).await;
    let ps = prompts(4);
    let tight = run_all(&small, &ps).await;
    assert!(
        small.metric("strata_preemptions_total").await > 0,
        "the budget was meant to force preemption"
    );
    let ample = Server::start(&[]).await;
    let roomy = run_all(&ample, &ps).await;
    assert_eq!(tight, roomy);
}

/// Runs greedy chats concurrently and returns their texts in prompt order.
async fn run_all(s: &Server, ps: &[String]) -> Vec<String> {
    futures::future::join_all(ps.iter().map(|p| async move {
        let body = json!({"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 64, "ignore_eos": true});
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 200, "{v}");
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    }))
    .await
}

/// DeepSeek's latent cache under the scheduler's block machinery: a shared
/// prefix is served from cached latent blocks, and requests preempted for
/// lack of blocks finish as they would with room, both with the output of a
/// server that caches nothing.
#[tokio::test]
async fn a_latent_cache_serves_prefix_hits_and_preemption_unchanged() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny/deepseek-chat"
    );
    let system = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let body = |q: &str| {
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
               "temperature": 0, "max_tokens": 8, "ignore_eos": true})
    };
    let s = Server::start_model(model, &[]).await;
    let (_, _) = s.post("/v1/chat/completions", &body("Hi there")).await;
    let hits_before = s.metric("strata_prefix_cache_hit_tokens_total").await;
    let (_, warm) = s.post("/v1/chat/completions", &body("How are you?")).await;
    let hits = s.metric("strata_prefix_cache_hit_tokens_total").await - hits_before;
    assert!(
        hits >= 32,
        "the shared system prompt should hit the cache, got {hits}"
    );
    let cold = Server::start_model(model, &["--enable-prefix-caching", "false"]).await;
    let (_, want) = cold
        .post("/v1/chat/completions", &body("How are you?"))
        .await;
    assert_eq!(warm["choices"][0]["message"], want["choices"][0]["message"]);

    // 3 layers x (32 + 16) values x 2 bytes (bf16) x 16 tokens = 4.5 KiB a
    // block: 60 KiB holds 13 blocks, fewer than four requests of ~100 tokens need.
    let small = Server::start_model(
        model,
        &["--kv-cache-memory", "60KiB", "--max-model-len", "160"],
    )
    .await;
    let ps: Vec<String> = (0..4)
        .map(|i| format!("Tell me about the cat number {i}."))
        .collect();
    let tight = run_all(&small, &ps).await;
    assert!(
        small.metric("strata_preemptions_total").await > 0,
        "the budget was meant to force preemption"
    );
    assert_eq!(tight, run_all(&cold, &ps).await);
}
