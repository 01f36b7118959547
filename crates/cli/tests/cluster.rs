//! Clusters of real `strata` processes on 127.0.0.1: pipeline and tensor
//! parallelism across processes give what one process gives, nodes may start
//! in any order, and a node with the wrong model or token is refused.

mod common;

use common::{cluster_args, cluster_port, demo_model, prompts, Cluster, Node, Server};
use futures::future::join_all;
use serde_json::{json, Value};

fn tiny() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny/llama-chat"
    )
    .to_string()
}

/// The flags of a PP x TP layout with a KV budget per node.
fn sizes(pp: usize, tp: usize, kv: &str) -> Vec<String> {
    let flags = [
        "--pipeline-parallel-size",
        &pp.to_string(),
        "--tensor-parallel-size",
        &tp.to_string(),
        "--kv-cache-memory",
        kv,
    ];
    flags.iter().map(|f| f.to_string()).collect()
}

/// Greedy completions of several prompts at once, with top-5 logprobs;
/// every other one follows a regex (its token masks travel to whichever
/// node samples).
async fn completions(server: &Server, prompts: &[&str], max_tokens: usize) -> Vec<Value> {
    join_all(prompts.iter().enumerate().map(|(i, p)| async move {
        let mut body = json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5, "ignore_eos": true});
        if i % 2 == 1 {
            body["structured_outputs"] = json!({"regex": "[a-z]{1,6}( [a-z]{1,6})*"});
        }
        let (s, v) = server.post("/v1/completions", &body).await;
        assert_eq!(s, 200, "{v}");
        v["choices"][0]["logprobs"].clone()
    }))
    .await
}

fn assert_same_tokens_and_logprobs(want: &[Value], got: &[Value], what: &str) {
    for (w, g) in want.iter().zip(got) {
        assert_eq!(w["tokens"], g["tokens"], "{what}: tokens differ");
        let (wt, gt) = (
            w["top_logprobs"].as_array().unwrap(),
            g["top_logprobs"].as_array().unwrap(),
        );
        for (wstep, gstep) in wt.iter().zip(gt) {
            for (tok, lp) in wstep.as_object().unwrap() {
                let other = gstep[tok]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{what}: {tok} left the top 5"));
                let diff = (lp.as_f64().unwrap() - other).abs();
                assert!(diff <= 1e-4, "{what}: logprob of {tok} differs by {diff}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_across_processes_equals_one_process() {
    across_processes_equals_one_process(&tiny()).await;
}

/// DeepSeek-V3's latent cache and experts split the same ways: heads and
/// experts over TP ranks (threads or processes), layers over stages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_deepseek_across_processes_equals_one_process() {
    across_processes_equals_one_process(&tiny().replace("llama-chat", "deepseek-chat")).await;
}

async fn across_processes_equals_one_process(model: &str) {
    let prompts = ["hello world", "the quick brown fox", "a b c d e f", "zebra"];
    let one = Server::start_model(model, &["--kv-cache-memory", "4MiB"]).await;
    let want = completions(&one, &prompts, 8).await;
    drop(one);
    for (what, nnodes, pp, tp) in [
        ("PP=2 in two processes", 2, 2, 1),
        ("TP=2 in two processes", 2, 1, 2),
        ("PP=2 x TP=2 in four processes", 4, 2, 2),
        ("PP=2 x TP=2 threads in two processes", 2, 2, 2),
    ] {
        let cluster = Cluster::start(model, nnodes, &sizes(pp, tp, "4MiB")).await;
        let got = completions(&cluster.leader, &prompts, 8).await;
        assert_same_tokens_and_logprobs(&want, &got, what);
    }
}

/// An fp8 KV cache reaches every node (the load request carries what the
/// cache holds): four processes give one process's tokens and logprobs,
/// where a node keeping another type would round its keys differently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fp8_kv_cache_across_processes_equals_one_process() {
    let prompts = ["hello world", "the quick brown fox", "a b c d e f", "zebra"];
    let fp8 = ["--kv-cache-dtype", "fp8"];
    let one = Server::start_model(
        &tiny(),
        &[&["--kv-cache-memory", "4MiB"][..], &fp8].concat(),
    )
    .await;
    let want = completions(&one, &prompts, 8).await;
    drop(one);
    let mut args = sizes(2, 2, "4MiB");
    args.extend(fp8.map(String::from));
    let cluster = Cluster::start(&tiny(), 4, &args).await;
    let got = completions(&cluster.leader, &prompts, 8).await;
    assert_same_tokens_and_logprobs(&want, &got, "fp8 cache, PP=2 x TP=2 in four processes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_model_across_processes_gives_the_same_tokens() {
    let model = demo_model();
    let prompts = prompts(3);
    async fn greedy(server: &Server, prompts: &[String]) -> Vec<String> {
        join_all(prompts.iter().map(|p| server.greedy_chat(p, 16))).await
    }
    let one = Server::start_model(&model, &["--kv-cache-memory", "64MiB"]).await;
    let want = greedy(&one, &prompts).await;
    drop(one);
    for (what, nnodes, pp, tp) in [
        ("PP=2 in two processes", 2, 2, 1),
        ("PP=3 in three processes", 3, 3, 1),
    ] {
        let cluster = Cluster::start(&model, nnodes, &sizes(pp, tp, "64MiB")).await;
        assert_eq!(greedy(&cluster.leader, &prompts).await, want, "{what}");
    }
    // A draft model: the leader sends its path, and the worker that runs
    // the last stage loads it and proposes. The demo model drafting for
    // itself is right every time.
    let mut args = sizes(2, 1, "64MiB");
    args.extend([
        "--speculative-config".to_string(),
        format!(r#"{{"model": {model:?}, "num_speculative_tokens": 3}}"#),
    ]);
    let cluster = Cluster::start(&model, 2, &args).await;
    assert_eq!(
        greedy(&cluster.leader, &prompts).await,
        want,
        "a draft model"
    );
    let (_, models) = cluster.leader.get("/v1/models").await;
    let metric = |what: &str| {
        format!(
            "vllm:spec_decode_num_{what}_tokens_total{{model_name={}}}",
            models["data"][0]["id"]
        )
    };
    let drafted = cluster.leader.metric(&metric("draft")).await;
    assert!(drafted > 0);
    assert_eq!(cluster.leader.metric(&metric("accepted")).await, drafted);
    drop(cluster);
    // Tensor parallelism on quantized weights cannot equal one rank bit for
    // bit (each rank quantizes its own activations, and partial sums round
    // differently), so ranks as processes must equal ranks as threads. (The
    // model's 3 KV heads rule out TP=2.)
    let tp3 = ["--tensor-parallel-size", "3", "--kv-cache-memory", "64MiB"];
    let threads = Server::start_model(&model, &tp3).await;
    let want = greedy(&threads, &prompts).await;
    drop(threads);
    let mut args = tp3.to_vec();
    args.extend(["--pipeline-parallel-size", "1"]);
    let cluster = Cluster::start(&model, 3, &args).await;
    assert_eq!(
        greedy(&cluster.leader, &prompts).await,
        want,
        "TP=3 in three processes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_may_start_before_the_leader() {
    let model = tiny();
    let port = cluster_port();
    let worker = Node::spawn(&model, &cluster_args(2, 1, port, &[]));
    // The worker is up and trying to join before the leader exists.
    worker.wait_log("joining the leader").await;
    let args = cluster_args(2, 0, port, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let leader = Server::start_model(&model, &args).await;
    let (s, v) = leader
        .post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 4}))
        .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_the_missing_node_until_the_last_one_joins() {
    let model = tiny();
    let port = cluster_port();
    let args = cluster_args(3, 0, port, &["--pipeline-parallel-size", "3"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let leader = Server::spawn(&model, &args);
    // Leader first: both workers are missing.
    let body = leader
        .wait_health(|s, b| s == 503 && b.to_string().contains("node 1: not joined"))
        .await;
    assert!(body.to_string().contains("node 2: not joined"), "{body}");
    let (s, v) = leader
        .post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 4}))
        .await;
    assert_eq!(s, 503, "{v}");
    let _w1 = Node::spawn(
        &model,
        &cluster_args(3, 1, port, &["--pipeline-parallel-size", "3"]),
    );
    // Node 1 joined; node 2 is late and still named.
    let body = leader
        .wait_health(|s, b| s == 503 && !b.to_string().contains("node 1: not joined"))
        .await;
    assert!(
        body["missing"].to_string().contains("node 2: not joined"),
        "{body}"
    );
    let _w2 = Node::spawn(
        &model,
        &cluster_args(3, 2, port, &["--pipeline-parallel-size", "3"]),
    );
    leader.wait_healthy().await;
    let (s, v) = leader
        .post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 4}))
        .await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_model_is_refused() {
    let port = cluster_port();
    let args = cluster_args(2, 0, port, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let leader = Server::spawn(&tiny(), &args);
    let other = tiny().replace("llama-chat", "llama-gqa");
    // A refused worker stays ready and retries (a new leader may take it:
    // a rolling update replaces workers first) until its --cluster-timeout,
    // then exits with the reason.
    let probe = cluster_port().to_string();
    let mut worker = Node::spawn(
        &other,
        &cluster_args(2, 1, port, &["--cluster-timeout", "10", "--port", &probe]),
    );
    let health = format!("http://127.0.0.1:{probe}/health");
    let body = loop {
        if let Ok(r) = reqwest::get(&health).await {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if body["refused"].is_string() {
                assert_eq!(status, 200, "{body}");
                break body;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        body["refused"]
            .as_str()
            .unwrap()
            .contains("opened a different model"),
        "{body}"
    );
    let (ok, log) = worker.wait_exit().await;
    assert!(!ok, "the worker should fail:\n{log}");
    assert!(log.contains("opened a different model"), "{log}");
    // The leader keeps waiting for a proper node 1, and says why it refused
    // the last one.
    let body = leader.wait_health(|s, _| s == 503).await;
    let missing = body["missing"].to_string();
    assert!(missing.contains("node 1: not joined"), "{body}");
    assert!(
        missing.contains("refused: node 1 opened a different model"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cluster_token_is_refused() {
    let model = tiny();
    let port = cluster_port();
    let args = cluster_args(2, 0, port, &["--cluster-token", "s3cret"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let leader = Server::spawn(&model, &args);
    let mut intruder = Node::spawn(
        &model,
        &cluster_args(
            2,
            1,
            port,
            &["--cluster-token", "guess", "--cluster-timeout", "3"],
        ),
    );
    let (ok, log) = intruder.wait_exit().await;
    assert!(!ok, "{log}");
    assert!(log.contains("cluster token"), "{log}");
    let mut no_token = Node::spawn(
        &model,
        &cluster_args(2, 1, port, &["--cluster-timeout", "3"]),
    );
    let (ok, log) = no_token.wait_exit().await;
    assert!(!ok && log.contains("cluster token"), "{log}");
    // The right token gets in.
    let _w = Node::spawn(
        &model,
        &cluster_args(2, 1, port, &["--cluster-token", "s3cret"]),
    );
    leader.wait_healthy().await;
}

/// Tensor sizes from a safetensors header: name -> bytes.
fn tensor_bytes(file: &str) -> std::collections::HashMap<String, u64> {
    let data = std::fs::read(file).unwrap();
    let len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&data[8..8 + len]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            (k.clone(), o[1].as_u64().unwrap() - o[0].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_process_reads_only_its_share_of_the_checkpoint() {
    // PP=3 x TP=2 in six processes: every node holds one layer's half.
    let model = tiny();
    let bytes = tensor_bytes(&format!("{model}/model.safetensors"));
    let layers: u64 = bytes
        .iter()
        .filter(|(k, _)| k.contains(".layers."))
        .map(|(_, v)| v)
        .sum();
    let (embed, head, norm) = (
        bytes["model.embed_tokens.weight"],
        bytes["lm_head.weight"],
        bytes["model.norm.weight"],
    );
    let cluster = Cluster::start(&model, 6, &sizes(3, 2, "4MiB")).await;
    for node in 0..6u64 {
        let read = cluster
            .leader
            .metric(&format!("strata_node_weight_bytes{{node=\"{node}\"}}"))
            .await;
        let stage = node / 2;
        let own = match stage {
            0 => embed / 2,
            2 => head / 2 + norm,
            _ => 0,
        };
        let limit = ((layers / 6 + own) as f64 * 1.05) as u64;
        assert!(
            read > 0 && read <= limit,
            "node {node} read {read} bytes, its share is {limit}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_outlives_its_leader_and_gives_up_after_the_cluster_timeout() {
    let Cluster {
        leader,
        mut workers,
    } = Cluster::start(
        &tiny(),
        2,
        &["--kv-cache-memory", "4MiB", "--cluster-timeout", "3"],
    )
    .await;
    drop(leader);
    // It waits for a leader to take it again (a restarted one would), then
    // gives up, saying why.
    let (ok, log) = workers[0].wait_exit().await;
    assert!(!ok);
    assert!(log.contains("joins again"), "{log}");
    assert!(log.contains("gave up after"), "{log}");
}
