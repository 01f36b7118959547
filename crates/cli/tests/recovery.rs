//! A cluster of real processes loses a node and no request: a worker killed
//! mid-generation and started again, a worker that never comes back (past
//! `--recovery-timeout`), and a leader restarted under its running workers.

mod common;

use common::{cluster_args, cluster_port, demo_model, prompts, Node, Server};
use eventsource_stream::Eventsource;
use futures::future::join_all;
use futures::StreamExt;
use serde_json::{json, Value};

fn tiny() -> String {
    common::tiny_fixture("llama-chat")
}

/// A leader (its log kept) and its workers on 127.0.0.1, which can each
/// be started again with the same flags.
struct Cluster {
    leader: Server,
    workers: Vec<Node>,
    model: String,
    nnodes: usize,
    http_port: u16,
    cluster_port: u16,
    extra: Vec<String>,
}

impl Cluster {
    async fn start(model: &str, nnodes: usize, extra: &[&str]) -> Cluster {
        let (http_port, cluster_port) = (cluster_port(), cluster_port());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let leader = spawn_leader(model, nnodes, http_port, cluster_port, &extra);
        let mut c = Cluster {
            leader,
            workers: Vec::new(),
            model: model.to_string(),
            nnodes,
            http_port,
            cluster_port,
            extra,
        };
        c.workers = (1..nnodes).map(|r| c.spawn_worker(r)).collect();
        c.leader.wait_healthy().await;
        c
    }

    /// A new leader process with the first one's flags and ports.
    fn restart_leader(&mut self) {
        self.leader.kill();
        self.leader = spawn_leader(
            &self.model,
            self.nnodes,
            self.http_port,
            self.cluster_port,
            &self.extra,
        );
    }

    fn spawn_worker(&self, rank: usize) -> Node {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        Node::spawn(
            &self.model,
            &cluster_args(self.nnodes, rank, self.cluster_port, &extra),
        )
    }
}

fn spawn_leader(
    model: &str,
    nnodes: usize,
    http_port: u16,
    cluster_port: u16,
    extra: &[String],
) -> Server {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let args = cluster_args(nnodes, 0, cluster_port, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::spawn_logged(http_port, model, &args)
}

/// A streamed completion, read to its end: the text, any error event's
/// message, and whether `[DONE]` closed it.
#[derive(Debug, PartialEq)]
struct Streamed {
    text: String,
    error: Option<String>,
    done: bool,
}

async fn stream(client: reqwest::Client, url: String, body: Value) -> Streamed {
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

/// Eight streams: four greedy, four sampled at temperature 0.8 with fixed
/// seeds (sampling is a function of the seed and the position, so a
/// recomputed request draws the same tokens).
fn eight_streams(max_tokens: usize) -> Vec<Value> {
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

/// Starts the streams at once, on a task of their own; the handle gives
/// them back when every one has ended.
fn spawn_all(server: &Server, bodies: &[Value]) -> tokio::task::JoinHandle<Vec<Streamed>> {
    let (client, url) = (server.client.clone(), server.url("/v1/completions"));
    let bodies = bodies.to_vec();
    tokio::spawn(async move {
        join_all(
            bodies
                .into_iter()
                .map(|b| stream(client.clone(), url.clone(), b)),
        )
        .await
    })
}

async fn run_all(server: &Server, bodies: &[Value]) -> Vec<Streamed> {
    spawn_all(server, bodies).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_started_again_costs_no_request_and_no_token() {
    let mut c = Cluster::start(&demo_model(), 2, &["--kv-cache-memory", "64MiB"]).await;
    let bodies = eight_streams(40);
    let want = run_all(&c.leader, &bodies).await;
    assert!(want.iter().all(|s| s.error.is_none() && s.done));

    // The same eight again; the worker is killed while they run.
    let base = c.leader.metric("strata_generation_tokens_total").await;
    let running = spawn_all(&c.leader, &bodies);
    while c.leader.metric("strata_generation_tokens_total").await < base + 8 * 8 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let lines_before = c.leader.log().lines().count();
    c.workers[0].kill();
    let health = c.leader.wait_health(|s, _| s != 200).await;
    assert!(
        health["missing"][0]
            .as_str()
            .unwrap()
            .starts_with("node 1: lost"),
        "{health}"
    );
    assert_eq!(c.leader.metric("strata_node_up{node=\"1\"}").await, 0);
    c.workers[0] = c.spawn_worker(1);
    c.leader.wait_healthy().await;
    let got = running.await.unwrap();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, g, "stream {i} differs after the recovery");
    }
    let log = c.leader.log();
    let during = log.lines().count() - lines_before;
    assert!(
        during < 100,
        "the leader logged {during} lines through the recovery:\n{log}"
    );
    assert_eq!(c.leader.metric("strata_recoveries_total").await, 1);
    assert!(c.leader.metric("strata_requests_replayed_total").await >= 1);
    assert!(c.leader.metric("strata_tokens_recomputed_total").await > 0);
    assert_eq!(c.leader.metric("strata_node_up{node=\"1\"}").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_recovery_timeout_requests_end_with_an_error_and_the_cluster_recovers_later() {
    let mut c = Cluster::start(
        &tiny(),
        2,
        &["--kv-cache-memory", "4MiB", "--recovery-timeout", "3"],
    )
    .await;
    c.workers[0].kill();
    c.leader.wait_health(|s, _| s != 200).await;
    // Requests that arrive while the node is lost wait for it...
    let streamed = tokio::spawn(stream(
        c.leader.client.clone(),
        c.leader.url("/v1/completions"),
        json!({"prompt": "hello", "max_tokens": 8, "stream": true}),
    ));
    let (status, body) = c
        .leader
        .post(
            "/v1/completions",
            &json!({"prompt": "hello", "max_tokens": 8}),
        )
        .await;
    // ...and end when it outlasts the timeout: a 503, or an error event
    // and [DONE] on a stream.
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--recovery-timeout"),
        "{body}"
    );
    let s = streamed.await.unwrap();
    assert!(s.done, "{s:?}");
    assert!(s.error.unwrap().contains("node 1 was lost"));
    // New requests are refused at once until the node is back.
    let (status, _) = c
        .leader
        .post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 503);
    c.workers[0] = c.spawn_worker(1);
    c.leader.wait_healthy().await;
    let (status, body) = c
        .leader
        .post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_takes_back_its_running_workers() {
    let mut c = Cluster::start(&tiny(), 3, &["--kv-cache-memory", "4MiB"]).await;
    let greedy = json!({"prompt": "the quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (_, want) = c.leader.post("/v1/completions", &greedy).await;
    let pids: Vec<u32> = c.workers.iter().map(Node::pid).collect();
    c.restart_leader();
    c.leader.wait_healthy().await;
    for (w, pid) in c.workers.iter_mut().zip(pids) {
        assert!(w.is_running(), "{}", w.log());
        assert_eq!(w.pid(), pid);
        assert!(w.log().contains("joins again"), "{}", w.log());
    }
    let (status, got) = c.leader.post("/v1/completions", &greedy).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_middle_stage_is_lost_by_its_heartbeats_and_recovers_when_it_continues() {
    let c = Cluster::start(&tiny(), 3, &["--kv-cache-memory", "4MiB"]).await;
    let bodies = eight_streams(24);
    let want = run_all(&c.leader, &bodies).await;
    // Node 1 runs the middle stage; frozen, it answers nothing.
    c.workers[0].signal(libc::SIGSTOP);
    let running = spawn_all(&c.leader, &bodies);
    let health = c.leader.wait_health(|s, _| s != 200).await;
    assert!(
        health["missing"][0]
            .as_str()
            .unwrap()
            .contains("no heartbeat"),
        "{health}"
    );
    c.workers[0].signal(libc::SIGCONT);
    c.leader.wait_healthy().await;
    let got = running.await.unwrap();
    assert_eq!(got, want);
    assert_eq!(c.leader.metric("strata_recoveries_total").await, 1);
}
