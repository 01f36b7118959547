//! Starts the real `strata` binary on a free port and talks to it over HTTP.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn demo_model() -> String {
    strata_engine::ensure_demo_model()
        .expect("the demo model can be fetched")
        .to_string_lossy()
        .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// The demo model with `args` added; returns once `/health` says 200.
    pub async fn start(args: &[&str]) -> Server {
        Self::start_model(&demo_model(), args).await
    }

    /// Any model path with `args` added.
    pub async fn start_model(model: &str, args: &[&str]) -> Server {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.args([
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args(["--threads", "2", "--served-model-name", "demo"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawning strata");
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = server.client.get(server.url("/health")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(
                Instant::now() < deadline,
                "strata did not become healthy within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns (status, body as JSON).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Starts a streamed chat completion and returns its unread body, so a
    /// test can hold the request open or walk away from it.
    pub async fn open_stream(
        &self,
        body: &Value,
    ) -> impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> {
        let r = self
            .client
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes_stream()
    }

    /// POSTs a streaming request and parses the SSE events with a real SSE
    /// parser; returns each event's data.
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        use eventsource_stream::Eventsource;
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let mut events = r.bytes_stream().eventsource();
        let mut out = Vec::new();
        while let Some(e) = events.next().await {
            out.push(e.expect("well-formed SSE").data);
        }
        out
    }

    /// Reads one Prometheus metric.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing"))
            .parse()
            .unwrap()
    }

    /// Polls `/metrics` until `name` equals `want` (30 s at most).
    pub async fn wait_metric(&self, name: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.metric(name).await;
            if v == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} stayed {v}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A greedy chat completion's text.
    pub async fn greedy_chat(&self, content: &str, max_tokens: usize) -> String {
        let (s, v) = self
            .post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// Prompts that differ from the first token on.
pub fn prompts(n: usize) -> Vec<String> {
    let topics = [
        "the sea",
        "a mountain",
        "bread",
        "the moon",
        "a violin",
        "winter",
        "a river",
        "coffee",
        "a library",
        "the desert",
        "a garden",
        "trains",
        "rain",
        "a lighthouse",
        "chess",
        "autumn",
        "bees",
        "a clock",
    ];
    (0..n)
        .map(|i| format!("Write one sentence about {}.", topics[i % topics.len()]))
        .collect()
}
