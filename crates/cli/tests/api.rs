//! The OpenAI API of the real binary: every endpoint, streaming framing,
//! usage, bad input, disconnects.

mod common;

use common::Server;
use futures::StreamExt;
use serde_json::{json, Value};

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"model": "demo", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

#[tokio::test]
async fn models_health_version_tokenize_detokenize() {
    let s = Server::start(&[]).await;
    let (st, v) = s.get("/v1/models").await;
    assert_eq!(st, 200);
    assert_eq!(v["data"][0]["id"], "demo");
    assert_eq!(v["object"], "list");
    assert_eq!(s.get("/health").await.0, 200);
    let (st, v) = s.get("/version").await;
    assert_eq!(st, 200);
    assert!(v["version"].as_str().unwrap().contains('.'));

    let (st, v) = s.post("/tokenize", &json!({"prompt": "Hello world"})).await;
    assert_eq!(st, 200);
    let ids = v["tokens"].clone();
    assert_eq!(
        v["count"].as_u64().unwrap() as usize,
        ids.as_array().unwrap().len()
    );
    let (st, v) = s.post("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(st, 200);
    assert_eq!(v["prompt"], "Hello world");
    let (st, v) = s
        .post(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(st, 200);
    assert!(
        v["count"].as_u64().unwrap() > 5,
        "the chat template adds tokens: {v}"
    );
}

#[tokio::test]
async fn chat_completion_reports_usage_that_matches_the_tokenizer() {
    let s = Server::start(&[]).await;
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            &chat(
                "Name a colour.",
                json!({"max_tokens": 5, "ignore_eos": true}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (_, t) = s
        .post(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "Name a colour."}]}),
        )
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], t["count"]);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], t["count"].as_u64().unwrap() + 5);
}

#[tokio::test]
async fn chat_streaming_follows_openai_framing() {
    let s = Server::start(&[]).await;
    let body = chat("Tell me about cats.", json!({"max_tokens": 16}));
    let (_, whole) = s.post("/v1/chat/completions", &body).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &sbody).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(
        usage["choices"].as_array().unwrap().len(),
        0,
        "the usage chunk has no choices"
    );
    // Token counts match the non-streamed call (which warmed the prefix cache).
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][k], whole["usage"][k], "{k}");
    }
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| {
            !c["choices"].as_array().unwrap().is_empty()
                && !c["choices"][0]["finish_reason"].is_null()
        })
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(
        finish[0]["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // With n = 2 the usage chunk comes once, after both choices finished.
    let mut nbody = sbody.clone();
    nbody["n"] = json!(2);
    nbody["temperature"] = json!(1.0);
    nbody["ignore_eos"] = json!(true);
    let events = s.stream("/v1/chat/completions", &nbody).await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let finishes: Vec<usize> = (0..chunks.len())
        .filter(|&i| {
            let c = &chunks[i]["choices"];
            !c.as_array().unwrap().is_empty() && !c[0]["finish_reason"].is_null()
        })
        .collect();
    let usages: Vec<usize> = (0..chunks.len())
        .filter(|&i| !chunks[i]["usage"].is_null())
        .collect();
    assert_eq!(finishes.len(), 2);
    assert_eq!(usages, vec![chunks.len() - 1], "one usage chunk, last");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 32);
    // Without include_usage, no chunk carries usage.
    sbody.as_object_mut().unwrap().remove("stream_options");
    let events = s.stream("/v1/chat/completions", &sbody).await;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c.get("usage").is_none());
    }
}

#[tokio::test]
async fn completions_with_logprobs_streamed_and_not() {
    let s = Server::start(&[]).await;
    let body = json!({"model": "demo", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3});
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let c = &v["choices"][0];
    let lp = &c["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    for (tok, top) in lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["top_logprobs"].as_array().unwrap())
    {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert!(
            top.contains_key(tok.as_str().unwrap()),
            "{tok} not in {top:?}"
        );
    }
    assert_eq!(
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        c["text"].as_str().unwrap()
    );

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = s.stream("/v1/completions", &sb).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, c["text"].as_str().unwrap());
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        c["finish_reason"]
    );
}

#[tokio::test]
async fn stop_strings_cut_the_text_before_them() {
    let s = Server::start(&[]).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "ignore_eos": true});
    let (_, v) = s.post("/v1/completions", &body).await;
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string that spans the middle of the output (likely across tokens).
    let mid = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[mid..].chars().take(4).collect();
    let cut = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut b = body.clone();
        b["stop"] = json!([stop.clone(), "never-appears"]);
        let (text, reason) = if stream {
            b["stream"] = json!(true);
            let ev = s.stream("/v1/completions", &b).await;
            let chunks: Vec<Value> = ev[..ev.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            (
                chunks
                    .iter()
                    .map(|c| c["choices"][0]["text"].as_str().unwrap())
                    .collect::<String>(),
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let (_, v) = s.post("/v1/completions", &b).await;
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, cut, "stream={stream} stop={stop:?}");
        assert_eq!(reason, "stop");
    }
}

#[tokio::test]
async fn seeds_repeat_and_n_gives_distinct_choices() {
    let s = Server::start(&[]).await;
    let body = chat(
        "Invent a name for a cat.",
        json!({"temperature": 1.0, "seed": 1234, "max_tokens": 12, "n": 3}),
    );
    let (st, a) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{a}");
    let (_, b) = s.post("/v1/chat/completions", &body).await;
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same choices");
    let mut distinct = texts(&a);
    distinct.dedup();
    assert!(
        distinct.len() > 1,
        "n choices should not all be equal: {distinct:?}"
    );
    // The prompt is counted once however many choices.
    let (_, one) = s
        .post(
            "/v1/chat/completions",
            &chat("Invent a name for a cat.", json!({"max_tokens": 1})),
        )
        .await;
    assert_eq!(a["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
}

#[tokio::test]
async fn bad_input_gets_openai_errors_naming_the_parameter() {
    let s = Server::start(&[]).await;
    let cases = [
        (
            chat("x", json!({"temperature": 3})),
            400,
            Some("temperature"),
        ),
        (
            chat("x", json!({"temperature": "hot"})),
            400,
            Some("temperature"),
        ),
        (chat("x", json!({"top_p": 0})), 400, Some("top_p")),
        (chat("x", json!({"top_k": -2})), 400, Some("top_k")),
        (chat("x", json!({"min_p": 1.5})), 400, Some("min_p")),
        (
            chat("x", json!({"presence_penalty": 5})),
            400,
            Some("presence_penalty"),
        ),
        (
            chat("x", json!({"frequency_penalty": -3})),
            400,
            Some("frequency_penalty"),
        ),
        (
            chat("x", json!({"repetition_penalty": 0})),
            400,
            Some("repetition_penalty"),
        ),
        (chat("x", json!({"max_tokens": 0})), 400, Some("max_tokens")),
        (
            chat("x", json!({"max_tokens": 1.5})),
            400,
            Some("max_tokens"),
        ),
        (chat("x", json!({"n": 0})), 400, Some("n")),
        (
            chat("x", json!({"top_logprobs": 3})),
            400,
            Some("top_logprobs"),
        ),
        (
            chat("x", json!({"logprobs": true, "top_logprobs": 50})),
            400,
            Some("top_logprobs"),
        ),
        (chat("x", json!({"stop": 5})), 400, Some("stop")),
        (chat("x", json!({"seed": "abc"})), 400, Some("seed")),
        (
            chat("x", json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
        ),
        (json!({"messages": []}), 400, Some("messages")),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages"),
        ),
        (json!({"messages": "hi"}), 400, Some("messages")),
        (json!({"temperature": 0}), 400, None),
        (chat("x", json!({"model": "gpt-17"})), 404, Some("model")),
        (
            chat("x", json!({"max_tokens": 100000})),
            400,
            Some("max_tokens"),
        ),
    ];
    for (body, status, param) in cases {
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, status, "{body} -> {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e.get("type").is_some() && e.get("code").is_some(), "{v}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body} -> {v}");
        }
    }
    let completion_cases = [
        (json!({"prompt": "x", "logprobs": 99}), Some("logprobs")),
        (json!({"prompt": "x", "suffix": "y"}), Some("suffix")),
        (json!({"prompt": []}), Some("prompt")),
        (json!({"prompt": [999999]}), Some("prompt")),
        (json!({"prompt": 3}), Some("prompt")),
    ];
    for (body, param) in completion_cases {
        let (st, v) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param.unwrap(), "{body} -> {v}");
    }
    // Not JSON at all.
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .body("{nope")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("JSON"));
    // Too large.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(17 << 20));
    // Its own client: the server closes a connection whose body it refused.
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .body(big)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // The server still serves after all that.
    assert!(!s.greedy_chat("Hi", 3).await.is_empty());
}

#[tokio::test]
async fn an_api_key_guards_v1_but_not_health() {
    let s = Server::start(&["--api-key", "sekret"]).await;
    let (st, v) = s.post("/v1/chat/completions", &chat("x", json!({}))).await;
    assert_eq!(st, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = s
        .client
        .get(s.url("/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(s.url("/v1/models"))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.get("/health").await.0, 200);
}

#[tokio::test]
async fn a_full_queue_answers_429_and_recovers() {
    let s = Server::start(&["--max-pending-requests", "1"]).await;
    // Hold the only slot with a long streamed request.
    let long = chat(
        "Count to one thousand.",
        json!({"max_tokens": 400, "ignore_eos": true, "stream": true}),
    );
    let mut body = s.open_stream(&long).await;
    body.next().await.unwrap().unwrap();
    let (st, v) = s.post("/v1/chat/completions", &chat("x", json!({}))).await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["code"], "overloaded");
    drop(body);
    s.wait_metric("strata_num_requests_pending", 0).await;
    assert!(!s.greedy_chat("Hi", 3).await.is_empty());
}

#[tokio::test]
async fn a_disconnected_client_frees_its_blocks() {
    let s = Server::start(&[]).await;
    let total = s.metric("strata_kv_cache_blocks").await;
    let long = chat(
        "Write a long story.",
        json!({"max_tokens": 2000, "ignore_eos": true, "stream": true}),
    );
    let mut body = s.open_stream(&long).await;
    body.next().await.unwrap().unwrap();
    body.next().await.unwrap().unwrap();
    assert_eq!(s.metric("strata_num_requests_running").await, 1);
    assert!(s.metric("strata_kv_cache_free_blocks").await < total);
    drop(body);
    s.wait_metric("strata_num_requests_running", 0).await;
    s.wait_metric("strata_kv_cache_free_blocks", total).await;
    let generated = s.metric("strata_generation_tokens_total").await;
    assert!(
        generated < 2000,
        "the request was aborted, not run to the end ({generated} tokens)"
    );
}

/// Each chat request with `extra` is a 400 naming `field`.
async fn assert_chat_400s(s: &Server, cases: &[(Value, &str)]) {
    for (extra, field) in cases {
        let (st, v) = s
            .post("/v1/chat/completions", &chat("Hi", extra.clone()))
            .await;
        assert_eq!(st, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], *field, "{extra}: {v}");
    }
}

/// The token texts of a greedy completion (from its logprobs).
async fn greedy_tokens(s: &Server, extra: Value) -> Vec<String> {
    let mut body = json!({"model": "demo", "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0, "logprobs": 0, "ignore_eos": true});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (st, v) = s.post("/v1/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
    tokens
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

async fn token_id(s: &Server, text: &str) -> u64 {
    let (_, v) = s
        .post(
            "/tokenize",
            &json!({"prompt": text, "add_special_tokens": false}),
        )
        .await;
    assert_eq!(v["count"], 1, "`{text}` is one token: {v}");
    v["tokens"][0].as_u64().unwrap()
}

#[tokio::test]
async fn logit_bias_and_token_rules_steer_every_step() {
    let s = Server::start(&[]).await;
    let plain = greedy_tokens(&s, json!({})).await;
    // +100 makes a token the greedy choice at every step.
    let bang = token_id(&s, "!").await;
    let forced = greedy_tokens(&s, json!({"logit_bias": {bang.to_string(): 100}})).await;
    assert!(forced.iter().all(|t| t == "!"), "{forced:?}");
    // -100 keeps the first greedy token out of the whole output.
    let first = token_id(&s, &plain[0]).await;
    let banned = greedy_tokens(&s, json!({"logit_bias": {first.to_string(): -100}})).await;
    assert!(!banned.contains(&plain[0]), "{:?} in {banned:?}", plain[0]);
    // allowed_token_ids: nothing outside the set.
    let (a, b) = (token_id(&s, " Paris").await, token_id(&s, ".").await);
    let only = greedy_tokens(&s, json!({"allowed_token_ids": [a, b]})).await;
    assert!(only.iter().all(|t| t == " Paris" || t == "."), "{only:?}");
    // bad_words: the word never appears.
    let clean = greedy_tokens(&s, json!({"bad_words": [plain[0].trim()]})).await;
    assert!(!clean.contains(&plain[0]), "{clean:?}");
}

#[tokio::test]
async fn structured_outputs_follow_their_constraint_and_bad_ones_are_400s() {
    let s = Server::start(&[]).await;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"], "additionalProperties": false});
    let body = chat(
        "Where is the Eiffel tower? Answer in JSON.",
        json!({"max_tokens": 60, "n": 2, "temperature": 0.8, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}}),
    );
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    for c in v["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["city"], "{text}");
        assert!(out["city"].as_str().unwrap().chars().count() <= 20);
        assert_eq!(c["finish_reason"], "stop");
    }
    // A generation cut by max_tokens says so.
    let long = json!({"type": "array", "items": {"type": "integer"}, "minItems": 50});
    let body = chat(
        "Count.",
        json!({"max_tokens": 5, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": long}}}),
    );
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let cases = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}),
            "response_format",
        ),
        (json!({"guided_regex": "[a-"}), "guided_regex"),
        (
            json!({"guided_grammar": "start: nowhere"}),
            "guided_grammar",
        ),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": "a"}, "guided_regex": "b"}),
            "guided_regex",
        ),
        (json!({"logit_bias": {"1": 100.5}}), "logit_bias"),
        (json!({"logit_bias": {"x1": 1}}), "logit_bias"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"allowed_token_ids": []}), "allowed_token_ids"),
        (json!({"min_tokens": 50}), "min_tokens"),
    ];
    assert_chat_400s(&s, &cases).await;
}

/// The demo model does not think, so a regex makes it write a
/// `<think>…</think>` block; the reasoning parser must split it off, whole
/// and streamed alike.
#[tokio::test]
async fn the_reasoning_parser_splits_thinking_from_the_answer() {
    let s = Server::start(&["--reasoning-parser", "deepseek_r1"]).await;
    let body = chat(
        "Think, then answer.",
        json!({"max_tokens": 60, "structured_outputs": {"regex": "<think>[a-z ]{3,30}</think>[A-Z][a-z]{1,10}"}}),
    );
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let m = &v["choices"][0]["message"];
    let (reasoning, content) = (
        m["reasoning_content"].as_str().unwrap(),
        m["content"].as_str().unwrap(),
    );
    assert!(
        reasoning.len() >= 3
            && reasoning
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b' '),
        "{m}"
    );
    assert!(
        content.starts_with(|c: char| c.is_ascii_uppercase()) && !content.contains('<'),
        "{m}"
    );

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &sb).await;
    let (mut r, mut c) = (String::new(), String::new());
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        let d = &chunk["choices"][0]["delta"];
        r += d["reasoning_content"].as_str().unwrap_or("");
        c += d["content"].as_str().unwrap_or("");
    }
    assert_eq!((r.as_str(), c.as_str()), (reasoning, content));
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["city", "unit"],
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone.",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["tz"],
                "properties": {"tz": {"type": "string", "maxLength": 20}}}}}
    ])
}

/// Checks a call against `weather_tools`' parameters.
fn assert_valid_call(call: &Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{call}"
    );
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    match call["function"]["name"].as_str().unwrap() {
        "get_weather" => {
            assert!(
                args["city"].as_str().unwrap().chars().count() <= 20,
                "{call}"
            );
            assert!(
                ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
                "{call}"
            );
        }
        "get_time" => assert!(args["tz"].is_string(), "{call}"),
        other => panic!("unknown tool {other}"),
    }
}

/// Joins a stream's tool-call deltas into calls, by index.
fn streamed_calls(events: &[String]) -> (Vec<Value>, String) {
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = String::new();
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        let c = &chunk["choices"][0];
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push(json!({"id": d["id"], "type": d["type"],
                    "function": {"name": d["function"]["name"], "arguments": ""}}));
            }
            let args = calls[i]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_string()
                + d["function"]["arguments"].as_str().unwrap_or("");
            calls[i]["function"]["arguments"] = json!(args);
        }
    }
    (calls, finish)
}

#[tokio::test]
async fn named_and_required_tool_choices_give_valid_calls_whole_and_streamed() {
    let s = Server::start(&[]).await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    for (choice, content) in [
        (named, "What is the weather in Paris?"),
        (
            json!("required"),
            "What is the weather in Oslo, and the time in Tokyo?",
        ),
    ] {
        let body = chat(
            content,
            json!({"tools": weather_tools(), "tool_choice": choice, "max_tokens": 120}),
        );
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null(), "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        calls.iter().for_each(assert_valid_call);
        if choice.is_object() {
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0]["function"]["name"], "get_weather");
        }

        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let (streamed, finish) = streamed_calls(&s.stream("/v1/chat/completions", &sb).await);
        assert_eq!(finish, "tool_calls");
        // Greedy: the same calls, ids aside.
        assert_eq!(streamed.len(), calls.len());
        for (a, b) in streamed.iter().zip(calls) {
            assert_eq!(a["function"], b["function"]);
            assert_valid_call(a);
        }
    }
    // Without parallel calls, `required` gives exactly one.
    let body = chat(
        "Weather in Oslo and Rome?",
        json!({"tools": weather_tools(), "tool_choice": "required", "parallel_tool_calls": false, "max_tokens": 120}),
    );
    let (_, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{v}"
    );
    // `none`: text, with the tools still accepted.
    let body = chat(
        "Hi!",
        json!({"tools": weather_tools(), "tool_choice": "none"}),
    );
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"].is_string()
            && v["choices"][0]["message"]["tool_calls"].is_null()
    );
    // A conversation with a call and its result renders and continues.
    let history = json!({"model": "demo", "max_tokens": 8, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 4}"}],
        "tools": weather_tools(), "tool_choice": "none"});
    let (st, v) = s.post("/v1/chat/completions", &history).await;
    assert_eq!(st, 200, "{v}");

    let cases = [
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (json!({"tools": weather_tools()}), "tool_choice"),
        (
            json!({"tools": [{"type": "function"}], "tool_choice": "required"}),
            "tools",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
    ];
    assert_chat_400s(&s, &cases).await;
}

/// `auto` reads calls in the model family's format: a regex makes the demo
/// model write one in Hermes' (Qwen's), and the parser turns it into
/// `tool_calls`, whole and streamed, with the text before it as content.
#[tokio::test]
async fn auto_tool_choice_parses_the_models_own_call_format() {
    let (ok, log) = common::run_strata(&["serve", "--enable-auto-tool-choice"]);
    assert!(!ok && log.contains("--tool-call-parser"), "{log}");

    let s = Server::start(&["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]).await;
    let call = r#"Checking\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "[A-Z]{3}"\}\}\n</tool_call>"#;
    let body = chat(
        "What time is it in Tokyo?",
        json!({"tools": weather_tools(), "max_tokens": 60, "structured_outputs": {"regex": call}}),
    );
    let (st, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert_eq!(c["message"]["content"], "Checking.\n");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_valid_call(&calls[0]);

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &sb).await;
    let (streamed, finish) = streamed_calls(&events);
    assert_eq!(finish, "tool_calls");
    assert_eq!(streamed[0]["function"], calls[0]["function"]);
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "Checking.\n");
    // Plain text stays text.
    let (_, v) = s
        .post(
            "/v1/chat/completions",
            &chat("Hi!", json!({"tools": weather_tools()})),
        )
        .await;
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
}
