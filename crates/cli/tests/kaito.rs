//! `strata serve` started the way KAITO starts vLLM: its flags, and its
//! inference_config.yaml, whose `vllm:` section wins over the command line.

mod common;

use common::{tiny_fixture, Server};
use serde_json::json;

#[tokio::test]
async fn kaitos_command_line_and_config_file_start_a_server() {
    let model = tiny_fixture("llama-chat");
    let dir = std::env::temp_dir().join(format!("strata-kaito-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("inference_config.yaml");
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/templates/qwen2.5-tools.jinja");
    std::fs::write(
        &config,
        format!(
            "max_probe_steps: 6\nvllm:\n  cpu-offload-gb: 0\n  max-model-len: 1024\n  max_num_seqs: 4\n  mystery-knob: 1\n  \
             tool-call-parser: hermes\n  enable-auto-tool-choice: true\n  reasoning-parser: deepseek_r1\n  \
             structured-outputs-config:\n    disable_any_whitespace: true\n  chat-template: {}\n",
            template.display()
        ),
    )
    .unwrap();
    let config = format!("--kaito-config-file={}", config.display());
    let s = Server::start_model(
        &model,
        &[
            "--load_format=auto",
            "--config_format=auto",
            "--tokenizer_mode=auto",
            "--trust-remote-code",
            "--max-model-len=auto",
            "--distributed-executor-backend=ray",
            "--kv-cache-memory=16MiB",
            "--max-model-len=512",
            &config,
        ],
    )
    .await;
    let (status, models) = s.get("/v1/models").await;
    assert_eq!(status, 200, "{models}");
    // The file's 1024 wins over the command line's 512.
    assert_eq!(models["data"][0]["max_model_len"], 1024, "{models}");
    let (status, body) = s
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Hello", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The tool and template settings took effect: `auto` (the default with
    // tools) is allowed, and the prompt is the file's template's.
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let chat =
        json!({"messages": [{"role": "user", "content": "Hi"}], "tools": tools, "max_tokens": 2});
    let (status, body) = s.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{body}");
    let (_, toks) = s
        .post(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    let (_, text) = s
        .post("/detokenize", &json!({"tokens": toks["tokens"]}))
        .await;
    assert!(
        text["prompt"].as_str().unwrap().contains("You are Qwen"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
