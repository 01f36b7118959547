//! A Hugging Face model folder served end to end: safetensors weights,
//! tokenizer.json, the chat template and generation_config.json, all written
//! by transformers (tests/fixtures/tiny/llama-chat, see make_golden.py).

mod common;

use std::path::PathBuf;

use common::Server;
use serde_json::{json, Value};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/llama-chat")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

#[tokio::test]
async fn a_transformers_folder_serves_chat_like_transformers() {
    let r = reference();
    let s = Server::start_model(fixture().to_str().unwrap(), &[]).await;

    // The chat template renders and tokenizes as transformers did.
    let (_, t) = s
        .post("/tokenize", &json!({"messages": r["chat"]["messages"]}))
        .await;
    assert_eq!(t["tokens"], r["chat"]["ids"]);
    for case in r["texts"].as_array().unwrap() {
        let (_, t) = s.post("/tokenize", &json!({"prompt": case["text"]})).await;
        assert_eq!(t["tokens"], case["ids"], "{}", case["text"]);
        let (_, d) = s.post("/detokenize", &json!({"tokens": case["ids"]})).await;
        assert_eq!(d["prompt"], case["text"]);
    }

    // Greedy decoding stops at the model's eos (<|im_end|>, from the config
    // files) with transformers' tokens. The reference ran without the
    // repetition penalty that generation_config.json asks for.
    let body = json!({"messages": r["chat"]["messages"], "temperature": 0, "repetition_penalty": 1.0, "max_tokens": 9});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let (_, want) = s
        .post(
            "/detokenize",
            &json!({"tokens": r["greedy"]["until_eos_ids"]}),
        )
        .await;
    assert_eq!(v["choices"][0]["message"]["content"], want["prompt"]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let until_eos = r["greedy"]["until_eos_ids"].as_array().unwrap().len() as u64;
    assert_eq!(
        v["usage"]["completion_tokens"],
        until_eos + 1,
        "the eos token counts as generated"
    );

    // Streaming gives the same text, lone invalid byte included.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let text = streamed_content(&s, &sb).await;
    assert_eq!(text, want["prompt"].as_str().unwrap());
}

/// A DeepSeek-V3 folder (tests/fixtures/tiny/deepseek-chat, see
/// make_families.py): its chat template renders DeepSeek-R1's format, past
/// reasoning dropped and the answer opening `<think>`, as transformers
/// does; greedy decoding gives transformers' tokens through the latent cache.
#[tokio::test]
async fn a_deepseek_folder_serves_chat_like_transformers() {
    let dir = fixture().with_file_name("deepseek-chat");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let s = Server::start_model(dir.to_str().unwrap(), &[]).await;
    let (_, t) = s
        .post("/tokenize", &json!({"messages": r["chat"]["messages"]}))
        .await;
    assert_eq!(t["tokens"], r["chat"]["ids"]);

    let greedy = &r["greedy"]["ids"];
    let (_, want) = s
        .post(
            "/detokenize",
            &json!({"tokens": greedy.as_array().unwrap()[..8]}),
        )
        .await;
    let body = json!({"messages": r["chat"]["messages"], "temperature": 0, "max_tokens": 8, "ignore_eos": true});
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want["prompt"]);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let text = streamed_content(&s, &sb).await;
    assert_eq!(text, want["prompt"].as_str().unwrap());
}

/// The content a streamed chat completion's deltas add up to.
async fn streamed_content(s: &Server, body: &Value) -> String {
    let events = s.stream("/v1/chat/completions", body).await;
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}
