//! Starts the real `strata` binary on a free port and talks to it over HTTP.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

/// A tiny transformers-made model from `tests/fixtures/tiny`.
pub fn tiny_fixture(name: &str) -> String {
    format!(
        "{}/../../tests/fixtures/tiny/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Runs `strata args...` to its end: (succeeded, stdout and stderr).
pub fn run_strata(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the strata binary runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Whether the tests run as root (network namespaces and Docker need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    /// Where its stderr goes, when a test reads it.
    log: Option<std::path::PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let ended = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(log) = &self.log {
            show_log_if_failing(log, ended);
        }
    }
}

/// A failing test shows the end of each node's log and whether the node had
/// ended by itself (`ended`: its exit status), which is all there is to go
/// on when a cluster test fails once in many runs; a passing one deletes
/// the log.
fn show_log_if_failing(log: &std::path::Path, ended: Option<std::process::ExitStatus>) {
    if std::thread::panicking() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        eprintln!(
            "--- {} ({}), last {} lines ---\n{tail}",
            log.display(),
            ended.map_or("still running".to_string(), |s| format!("ended: {s}")),
            lines.len().min(80)
        );
    }
    let _ = std::fs::remove_file(log);
}

/// A fresh file for a process's stderr.
fn log_file() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("strata-node-{}-{n}.log", std::process::id()))
}

pub fn demo_model() -> String {
    strata_engine::ensure_demo_model()
        .expect("the demo model can be fetched")
        .to_string_lossy()
        .to_string()
}

/// A port free now, never handed out before in this test process, and
/// outside the kernel's ephemeral range: the servers bind it later, and in
/// between neither another `free_port` caller nor any process binding port
/// 0 (workers do, for their data plane and probes) can be given it.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_start.max(10_001));
    let mut given = GIVEN.lock().unwrap();
    // A different start per process, so concurrent test binaries rarely probe
    // the same ports.
    let mut x =
        (std::process::id() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) + given.len() as u64;
    loop {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = lo + ((x >> 33) % u64::from(hi - lo)) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

impl Server {
    /// The demo model with `args` added; returns once `/health` says 200.
    pub async fn start(args: &[&str]) -> Server {
        Self::start_model(&demo_model(), args).await
    }

    /// Any model path with `args` added.
    pub async fn start_model(model: &str, args: &[&str]) -> Server {
        let server = Self::spawn(model, args);
        server.wait_healthy().await;
        server
    }

    /// Starts the binary without waiting for it.
    pub fn spawn(model: &str, args: &[&str]) -> Server {
        Self::spawn_on(free_port(), model, args, None)
    }

    /// Starts the binary on `port` without waiting for it; its stderr goes to
    /// a file `log()` reads.
    pub fn spawn_logged(port: u16, model: &str, args: &[&str]) -> Server {
        Self::spawn_on(port, model, args, Some(log_file()))
    }

    /// Runs `strata serve --model model args...` under `prefix` (e.g. `ip
    /// netns exec <ns>`), reached from here at `base`; its stderr goes to a
    /// file `log()` reads.
    pub fn spawn_in(prefix: &[&str], base: &str, model: &str, args: &[String]) -> Server {
        let log = log_file();
        let child = command_in(prefix)
            .args(["serve", "--model", model, "--threads", "1"])
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning strata");
        Server {
            child,
            base: base.to_string(),
            client: reqwest::Client::new(),
            log: Some(log),
        }
    }

    fn spawn_on(port: u16, model: &str, args: &[&str], log: Option<std::path::PathBuf>) -> Server {
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
        .env("NO_COLOR", "1")
        .stdout(Stdio::null());
        match &log {
            Some(path) => cmd.stderr(std::fs::File::create(path).unwrap()),
            None => cmd.stderr(Stdio::inherit()),
        };
        let child = cmd.spawn().expect("spawning strata");
        Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            log,
        }
    }

    /// What it has logged so far (`spawn_logged` only).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGKILL, as a lost pod or host; waits for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until `/health` says 200 (120 s at most).
    pub async fn wait_healthy(&self) {
        self.wait_health(|s, _| s == 200).await;
    }

    /// Polls `/health` until `ok(status, body)` holds (120 s at most);
    /// returns the body that satisfied it.
    pub async fn wait_health(&self, ok: impl Fn(u16, &Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = self.client.get(self.url("/health")).send().await {
                let status = r.status().as_u16();
                let body = r.json().await.unwrap_or(Value::Null);
                if ok(status, &body) {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "/health did not reach the expected state within 120 s"
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

    /// Sends SIGTERM, as `docker stop` and Kubernetes do.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit (60 s at most); true when it succeeded.
    pub async fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads one Prometheus metric as a whole number.
    pub async fn metric(&self, name: &str) -> u64 {
        let v = self.metric_value(name).await;
        assert!(v.fract() == 0.0 && v >= 0.0, "{name} = {v}");
        v as u64
    }

    /// Reads one Prometheus metric; `name` may carry labels.
    pub async fn metric_value(&self, name: &str) -> f64 {
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

/// A worker node (or any strata process whose output a test reads): its
/// stderr goes to a file the test can wait on.
pub struct Node {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let ended = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        show_log_if_failing(&self.log, ended);
    }
}

impl Node {
    pub fn spawn(model: &str, args: &[String]) -> Node {
        // --port 0: a worker's probes on any free port, so nodes on one host
        // do not compete for 8000.
        let mut all = vec![
            "--host".to_string(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
        ];
        all.extend_from_slice(args);
        Self::spawn_in(&[], model, &all)
    }

    /// Runs `strata serve` under `prefix` (e.g. `ip netns exec <ns>`).
    pub fn spawn_in(prefix: &[&str], model: &str, args: &[String]) -> Node {
        let log = log_file();
        let file = std::fs::File::create(&log).unwrap();
        let child = command_in(prefix)
            .args(["serve", "--model", model, "--threads", "1"])
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawning strata");
        Node { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, as a lost pod or host; waits for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits until the log holds `needle` (60 s at most).
    pub async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "`{needle}` never appeared in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit (60 s at most); returns its success and log.
    pub async fn wait_exit(&mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the node did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The strata binary, run under `prefix` (a command and its arguments) if any.
fn command_in(prefix: &[&str]) -> Command {
    let bin = env!("CARGO_BIN_EXE_strata");
    match prefix {
        [] => Command::new(bin),
        [first, rest @ ..] => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
    }
}

/// A streamed completion, read to its end: the text, any error event's
/// message, and whether `[DONE]` closed it.
#[derive(Debug, PartialEq)]
pub struct Streamed {
    pub text: String,
    pub error: Option<String>,
    pub done: bool,
}

/// Streams one completion from `url` to its end.
pub async fn stream_completion(client: reqwest::Client, url: String, body: Value) -> Streamed {
    use eventsource_stream::Eventsource;
    let r = client.post(url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut events = r.bytes_stream().eventsource();
    let mut out = Streamed {
        text: String::new(),
        error: None,
        done: false,
    };
    while let Some(e) = events.next().await {
        let data = e.expect("well-formed SSE").data;
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        match v["error"]["message"].as_str() {
            Some(m) => out.error = Some(m.to_string()),
            None => out
                .text
                .push_str(v["choices"][0]["text"].as_str().unwrap_or("")),
        }
    }
    out
}

/// Eight streamed completions: four greedy, four sampled at temperature
/// 0.8 with fixed seeds (sampling is a function of the seed and the
/// position, so a recomputed request draws the same tokens).
pub fn eight_streams(max_tokens: usize) -> Vec<Value> {
    prompts(8)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = if i % 2 == 0 {
                json!({"temperature": 0})
            } else {
                json!({"temperature": 0.8, "seed": 1000 + i})
            };
            let mut body =
                json!({"prompt": p, "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
            body.as_object_mut()
                .unwrap()
                .extend(sampling.as_object().unwrap().clone());
            body
        })
        .collect()
}

impl Server {
    /// Starts streamed completions of `bodies` at once, on a task of their
    /// own; the handle gives them back when every one has ended.
    pub fn spawn_streams(&self, bodies: &[Value]) -> tokio::task::JoinHandle<Vec<Streamed>> {
        let (client, url) = (self.client.clone(), self.url("/v1/completions"));
        let bodies = bodies.to_vec();
        tokio::spawn(async move {
            futures::future::join_all(
                bodies
                    .into_iter()
                    .map(|b| stream_completion(client.clone(), url.clone(), b)),
            )
            .await
        })
    }

    /// Streams `bodies` at once to their ends.
    pub async fn run_streams(&self, bodies: &[Value]) -> Vec<Streamed> {
        self.spawn_streams(bodies).await.unwrap()
    }

    /// Starts `bodies` as `spawn_streams` does, and returns once they have
    /// had about eight tokens each: a failure injected then lands while
    /// every one is generating.
    pub async fn spawn_streams_under_way(
        &self,
        bodies: &[Value],
    ) -> tokio::task::JoinHandle<Vec<Streamed>> {
        let tokens = "strata_generation_tokens_total";
        let under_way = self.metric(tokens).await + 8 * bodies.len() as u64;
        let running = self.spawn_streams(bodies);
        while !running.is_finished() && self.metric(tokens).await < under_way {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running
    }

    /// Waits for streams that lived through a recovery and checks that
    /// each ended as in the undisturbed run `want`, and that the recovery
    /// (one) replayed requests.
    pub async fn assert_resumed(
        &self,
        running: tokio::task::JoinHandle<Vec<Streamed>>,
        want: &[Streamed],
    ) {
        let got = running.await.unwrap();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w, g, "stream {i} differs after the recovery");
        }
        assert_eq!(self.metric("strata_recoveries_total").await, 1);
        assert!(self.metric("strata_requests_replayed_total").await >= 1);
    }
}

/// A leader and its workers on 127.0.0.1.
pub struct Cluster {
    pub leader: Server,
    pub workers: Vec<Node>,
}

/// The flags every node of an `nnodes` cluster shares, plus `extra`.
pub fn cluster_args(nnodes: usize, rank: usize, cluster_port: u16, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--nnodes".to_string(),
        nnodes.to_string(),
        "--node-rank".into(),
        rank.to_string(),
        "--leader-addr".into(),
        format!("127.0.0.1:{cluster_port}"),
    ]
    .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

impl Cluster {
    /// Starts the leader, then every worker; returns once `/health` is 200.
    pub async fn start(model: &str, nnodes: usize, extra: &[impl AsRef<str>]) -> Cluster {
        let extra: Vec<&str> = extra.iter().map(AsRef::as_ref).collect();
        let extra = &extra[..];
        let port = free_port();
        let leader_args = cluster_args(nnodes, 0, port, extra);
        let leader_args: Vec<&str> = leader_args.iter().map(String::as_str).collect();
        let leader = Server::spawn(model, &leader_args);
        let workers = (1..nnodes)
            .map(|r| Node::spawn(model, &cluster_args(nnodes, r, port, extra)))
            .collect();
        let c = Cluster { leader, workers };
        c.leader.wait_healthy().await;
        c
    }
}

pub fn cluster_port() -> u16 {
    free_port()
}
