//! A cluster of real processes loses a node and no request: a worker killed
//! mid-generation and started again, a worker that never comes back (past
//! `--recovery-timeout`), and a leader restarted under its running workers.

mod common;

use common::{
    cluster_args, cluster_port, demo_model, eight_streams, stream_completion, Node, Server,
};
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

/// Runs `bodies` undisturbed, then again with node `victim` killed once
/// every stream is under way and started again: each stream must end as in
/// the first run, `/health` must name the lost node meanwhile, and the
/// leader must stay quiet through it (a line per change, not per step).
async fn survives_a_killed_node(c: &mut Cluster, victim: usize, bodies: &[Value]) {
    let want = c.leader.run_streams(bodies).await;
    assert!(want.iter().all(|s| s.error.is_none() && s.done), "{want:?}");
    let vllm = |name: &str| format!("vllm:{name}{{model_name=\"demo\"}}");
    let prompt_tokens = c.leader.metric(&vllm("prompt_tokens_total")).await;
    let running = c.leader.spawn_streams_under_way(bodies).await;
    let lines_before = c.leader.log().lines().count();
    c.workers[victim - 1].kill();
    let health = c.leader.wait_health(|s, _| s != 200).await;
    assert!(
        health["missing"][0]
            .as_str()
            .unwrap()
            .starts_with(&format!("node {victim}: lost")),
        "{health}"
    );
    let up = format!("strata_node_up{{node=\"{victim}\"}}");
    assert_eq!(c.leader.metric(&up).await, 0);
    c.workers[victim - 1] = c.spawn_worker(victim);
    c.leader.wait_healthy().await;
    c.leader.assert_resumed(running, &want).await;
    let log = c.leader.log();
    let during = log.lines().count() - lines_before;
    assert!(
        during < 100,
        "the leader logged {during} lines through the recovery:\n{log}"
    );
    assert!(c.leader.metric("strata_tokens_recomputed_total").await > 0);
    assert_eq!(c.leader.metric(&up).await, 1);
    // vLLM's counters count what clients sent and got, once: a recomputed
    // token is not generated twice, nor a replayed prompt received twice.
    let max_tokens: u64 = bodies
        .iter()
        .map(|b| b["max_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        c.leader.metric(&vllm("generation_tokens_total")).await,
        2 * max_tokens
    );
    assert_eq!(
        c.leader.metric(&vllm("prompt_tokens_total")).await,
        2 * prompt_tokens
    );
    let successes = "vllm:request_success_total{model_name=\"demo\",finished_reason=\"length\"}";
    assert_eq!(c.leader.metric(successes).await, 2 * bodies.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_started_again_costs_no_request_and_no_token() {
    // PP=2 on the demo model: the worker runs the last stage, the one that
    // samples.
    let mut c = Cluster::start(&demo_model(), 2, &["--kv-cache-memory", "64MiB"]).await;
    survives_a_killed_node(&mut c, 1, &eight_streams(40)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_middle_stage_started_again_costs_no_request() {
    let mut c = Cluster::start(&tiny(), 3, &["--kv-cache-memory", "4MiB"]).await;
    survives_a_killed_node(&mut c, 1, &eight_streams(200)).await;
}

/// One stage of the tiny model, its two tensor-parallel ranks in two
/// processes.
async fn one_stage_across_two_processes() -> Cluster {
    Cluster::start(
        &tiny(),
        2,
        &[
            "--pipeline-parallel-size",
            "1",
            "--tensor-parallel-size",
            "2",
            "--kv-cache-memory",
            "4MiB",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_tensor_parallel_rank_rejoins_its_stage_without_a_reload() {
    // One stage, its two ranks in two processes: the leader's rank keeps
    // its weights and reconnects the ring to the new process.
    let mut c = one_stage_across_two_processes().await;
    survives_a_killed_node(&mut c, 1, &eight_streams(200)).await;
    let log = c.leader.log();
    assert_eq!(
        log.matches("node 0: loaded layers").count(),
        1,
        "the surviving rank reloaded:\n{log}"
    );
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
    let streamed = tokio::spawn(stream_completion(
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

/// What becomes of a frozen node once the leader has lost it.
enum Then {
    /// SIGCONT: the same process answers again.
    Continue,
    /// A new process takes its rank; the frozen one stays frozen, holding
    /// its connections open, so no peer can learn from a closed socket.
    Replace,
}

/// Runs `bodies` undisturbed, then again with node `victim` frozen
/// (SIGSTOP) until the leader has lost it by its heartbeats, then `then`:
/// every stream must end as in the first run.
async fn survives_a_hung_node(c: &mut Cluster, victim: usize, then: Then, bodies: &[Value]) {
    let want = c.leader.run_streams(bodies).await;
    let running = c.leader.spawn_streams_under_way(bodies).await;
    // Frozen, it answers nothing; whoever waits on it must not wait forever.
    c.workers[victim - 1].signal(libc::SIGSTOP);
    let health = c.leader.wait_health(|s, _| s != 200).await;
    assert!(
        health["missing"][0]
            .as_str()
            .unwrap()
            .contains("no heartbeat"),
        "{health}"
    );
    let _frozen = match then {
        Then::Continue => {
            c.workers[victim - 1].signal(libc::SIGCONT);
            None
        }
        Then::Replace => {
            let new = c.spawn_worker(victim);
            Some(std::mem::replace(&mut c.workers[victim - 1], new))
        }
    };
    c.leader.wait_healthy().await;
    c.leader.assert_resumed(running, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_middle_stage_is_lost_by_its_heartbeats_and_recovers_when_it_continues() {
    let mut c = Cluster::start(&tiny(), 3, &["--kv-cache-memory", "4MiB"]).await;
    survives_a_hung_node(&mut c, 1, Then::Continue, &eight_streams(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_tensor_parallel_rank_replaced_by_a_new_process_does_not_hold_its_peer() {
    // The leader's rank waits in an all-reduce for the frozen one, whose
    // sockets stay open: losing it must end that wait, or the leader could
    // never start the ring again with the new process.
    let mut c = one_stage_across_two_processes().await;
    survives_a_hung_node(&mut c, 1, Then::Replace, &eight_streams(200)).await;
}
