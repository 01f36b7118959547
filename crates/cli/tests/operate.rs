//! Running strata in production: vLLM's metric names on `/metrics`,
//! liveness, and a graceful shutdown on SIGTERM.

mod common;

use common::Server;
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_metric_names_count_what_the_requests_did() {
    let s = Server::start(&[]).await;
    let mut prompt_tokens = 0;
    for prompt in ["The capital of France is", "One, two, three,"] {
        let (status, v) = s
            .post(
                "/v1/completions",
                &json!({"prompt": prompt, "max_tokens": 5, "ignore_eos": true}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let m = |name: &str| format!("vllm:{name}{{model_name=\"demo\"}}");
    assert_eq!(s.metric(&m("prompt_tokens_total")).await, prompt_tokens);
    assert_eq!(s.metric(&m("generation_tokens_total")).await, 10);
    assert_eq!(
        s.metric(&m("generation_tokens_total")).await,
        s.metric("strata_generation_tokens_total").await
    );
    let success = |reason: &str| {
        format!("vllm:request_success_total{{model_name=\"demo\",finished_reason=\"{reason}\"}}")
    };
    assert_eq!(s.metric(&success("length")).await, 2);
    assert_eq!(s.metric(&success("stop")).await, 0);
    // One first token and four later ones per request; two endings.
    assert_eq!(s.metric(&m("time_to_first_token_seconds_count")).await, 2);
    assert_eq!(s.metric(&m("inter_token_latency_seconds_count")).await, 8);
    assert_eq!(s.metric(&m("time_per_output_token_seconds_count")).await, 8);
    assert_eq!(s.metric(&m("e2e_request_latency_seconds_count")).await, 2);
    for phase in ["queue", "prefill", "decode", "inference"] {
        let count = m(&format!("request_{phase}_time_seconds_count"));
        assert_eq!(s.metric(&count).await, 2, "{count}");
    }
    assert_eq!(
        s.metric(&m("request_prompt_tokens_sum")).await,
        prompt_tokens
    );
    assert_eq!(s.metric(&m("request_generation_tokens_sum")).await, 10);
    let all = "vllm:e2e_request_latency_seconds_bucket{model_name=\"demo\",le=\"+Inf\"}";
    assert_eq!(s.metric(all).await, 2);
    let e2e = s.metric_value(&m("e2e_request_latency_seconds_sum")).await;
    let ttft = s.metric_value(&m("time_to_first_token_seconds_sum")).await;
    assert!(e2e > ttft && ttft > 0.0, "e2e {e2e} s, ttft {ttft} s");
    // Nothing runs now; finished requests' blocks are free (or cached, which
    // counts as free).
    assert_eq!(s.metric(&m("num_requests_running")).await, 0);
    assert_eq!(s.metric_value(&m("kv_cache_usage_perc")).await, 0.0);
    let (status, live) = s.get("/livez").await;
    assert_eq!((status, live["status"].as_str()), (200, Some("alive")));
}

/// Reads an SSE body to its end; returns what it carried.
async fn read_all(
    mut body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> String {
    let mut text = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_requests_and_lets_those_in_flight_finish() {
    let mut s = Server::start(&["--shutdown-grace-period", "60"]).await;
    let chat = |max_tokens: usize| {
        json!({
            "messages": [{"role": "user", "content": "Count to a hundred."}],
            "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
        })
    };
    let mut body = Box::pin(s.open_stream(&chat(150)).await);
    // The first chunk: the request is running.
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    s.terminate();
    let health = s
        .wait_health(|status, b| status == 503 && b["status"] == "draining")
        .await;
    assert_eq!(health["status"], "draining");
    // While draining, new requests are refused with a reason.
    let (status, v) = s
        .post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "shutting_down", "{v}");
    // The one in flight runs to its end, then the server exits cleanly.
    let rest = read_all(body).await;
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(s.wait_exit().await, "the server exited with an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_what_outlasts_the_grace_period() {
    let mut s = Server::start(&["--shutdown-grace-period", "1"]).await;
    let long: Value = json!({
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 4000, "ignore_eos": true, "stream": true,
    });
    let mut body = Box::pin(s.open_stream(&long).await);
    body.next().await.unwrap().unwrap();
    s.terminate();
    // The process exits (cleanly) with the request unfinished.
    assert!(s.wait_exit().await, "the server exited with an error");
    let rest = read_all(body).await;
    assert!(!rest.contains("[DONE]"), "the request should have been cut");
}
