//! The StatefulSet in containers: the image built from deploy/Dockerfile on
//! a locally made base, started as a two-pod cluster on a private Docker
//! network with StatefulSet hostnames (`strata-0`, `strata-1`) and the DNS
//! names the headless Service gives them. Each pod gets only what
//! deploy/kubernetes/statefulset.yaml passes (its args, POD_INDEX, the
//! token), so ranks find their roles from their identity alone. Then chat
//! completions, a rolling update (each worker replaced under the running
//! leader, which recovers with the new process), and `docker stop`
//! (SIGTERM): every pod exits 0.
//!
//! Needs Docker and root (deploy/make-base-image.sh runs debootstrap), as
//! in CI; elsewhere it says it skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::is_root;
use futures::future::join_all;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn docker_works() -> bool {
    Command::new("docker")
        .args(["info"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Removes what the test made, however it ends.
struct Cleanup {
    containers: Vec<String>,
    network: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// The CPU image: this test build's binary (debug info stripped), packaged
/// by deploy/Dockerfile with both stages on the local base.
fn build_image(tag: &str, context: &Path) {
    let base = Command::new(repo().join("deploy/make-base-image.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/make-base-image.sh");
    assert!(base.status.success(), "making the base image failed");
    let base = String::from_utf8_lossy(&base.stdout).trim().to_string();
    std::fs::create_dir_all(context).unwrap();
    let strip = Command::new("objcopy")
        .args(["--strip-debug", env!("CARGO_BIN_EXE_strata")])
        .arg(context.join("strata"))
        .status()
        .expect("running objcopy");
    assert!(strip.success());
    let dockerfile = repo().join("deploy/Dockerfile");
    docker(&[
        "build",
        "-q",
        "-f",
        dockerfile.to_str().unwrap(),
        "--build-arg",
        &format!("BUILDER_IMAGE={base}"),
        "--build-arg",
        &format!("RUNTIME_IMAGE={base}"),
        "--build-arg",
        "PREBUILT=strata",
        "-t",
        tag,
        context.to_str().unwrap(),
    ]);
    // The build stage's image, left behind by the classic builder.
    docker(&[
        "image",
        "prune",
        "-f",
        "--filter",
        "label=org.strata.stage=build",
    ]);
    let _ = std::fs::remove_dir_all(context);
}

/// The StatefulSet's container args, with the model and the tensor
/// parallelism (8 GPUs per pod there) fitted to the demo model on a CPU.
fn manifest_args(model_file: &str) -> (Vec<String>, usize, String) {
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/statefulset.yaml")).unwrap();
    let sts = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .find(|d: &serde_yaml::Value| d["kind"] == "StatefulSet")
        .expect("a StatefulSet");
    let name = sts["metadata"]["name"].as_str().unwrap().to_string();
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    let args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .map(|a| {
            if a.starts_with("--model=") {
                format!("--model=/models/{model_file}")
            } else if a.starts_with("--tensor-parallel-size=") {
                "--tensor-parallel-size=1".into()
            } else {
                a
            }
        })
        .chain(["--threads=1".to_string(), "--kv-cache-memory=256MiB".into()])
        .collect();
    (args, replicas, name)
}

async fn get(client: &reqwest::Client, url: &str) -> Option<(u16, Value)> {
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

async fn wait_ok(client: &reqwest::Client, url: &str, logs_of: &[String]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((200, body)) = get(client, url).await {
            return body;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs_of
                .iter()
                .map(|c| {
                    let out = Command::new("docker").args(["logs", c]).output().unwrap();
                    format!("{c}:\n{}", String::from_utf8_lossy(&out.stderr))
                })
                .collect();
            panic!("{url} never said 200\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    let r = client.get(format!("{base}/metrics")).send().await.unwrap();
    r.text().await.unwrap()
}

/// The leader's `strata_generation_tokens_total`.
async fn generated_tokens(client: &reqwest::Client, base: String) -> f64 {
    metrics_text(client, &base)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("strata_generation_tokens_total "))
        .expect("the metric is exported")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_of_images_forms_a_cluster_from_pod_identity_alone() {
    if !docker_works() || !is_root() {
        eprintln!("skipped: needs a Docker engine and root (as in CI)");
        return;
    }
    let model = PathBuf::from(common::demo_model());
    let model_dir = model.parent().unwrap().to_str().unwrap().to_string();
    let model_file = model.file_name().unwrap().to_str().unwrap().to_string();
    let (args, replicas, set) = manifest_args(&model_file);
    let headless = args
        .iter()
        .find_map(|a| a.strip_prefix("--headless-service="))
        .expect("the manifest names its headless Service")
        .to_string();
    let id = std::process::id();
    let mut cleanup = Cleanup {
        containers: vec![],
        network: format!("strata-test-{id}"),
        image: format!("strata-test:{id}"),
    };
    build_image(
        &cleanup.image,
        &std::env::temp_dir().join(format!("strata-image-{id}")),
    );
    docker(&["network", "create", &cleanup.network]);

    let token = format!("token-{id}");
    let containers: Vec<String> = (0..replicas)
        .map(|i| format!("strata-test-{id}-{i}"))
        .collect();
    cleanup.containers = containers.clone();
    // Starts pod `i` as the StatefulSet would: its name as hostname, its
    // headless-Service DNS name, the model volume, the manifest's env.
    let start_pod = |i: usize| {
        let pod = format!("{set}-{i}");
        let mut run: Vec<String> = [
            "run",
            "-d",
            "--name",
            &containers[i],
            "--hostname",
            &pod,
            "--network",
            &cleanup.network,
            "--network-alias",
            &format!("{pod}.{headless}"),
            "-v",
            &format!("{model_dir}:/models:ro"),
            "-e",
            &format!("POD_INDEX={i}"),
            "-e",
            &format!("STRATA_CLUSTER_TOKEN={token}"),
            &cleanup.image,
        ]
        .map(String::from)
        .to_vec();
        run.extend(args.iter().cloned());
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        docker(&run);
    };
    let port = args
        .iter()
        .find_map(|a| a.strip_prefix("--port="))
        .expect("the manifest sets --port")
        .to_string();
    // A pod's URL (its address changes when it is replaced).
    let url = |i: usize| {
        let ip = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &containers[i],
        ]);
        format!("http://{ip}:{port}")
    };
    let served = args
        .iter()
        .find_map(|a| a.strip_prefix("--served-model-name="))
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();
    let chat_of = |leader: String, question: &'static str, max_tokens: usize| {
        let client = client.clone();
        let served = served.clone();
        async move {
            let r = client
                .post(format!("{leader}/v1/chat/completions"))
                .json(&json!({
                    "model": served,
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": true,
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{v}");
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };

    for i in 0..replicas {
        start_pod(i);
    }
    // The leader is ready only with the whole cluster; the worker is ready
    // and says it joined.
    wait_ok(&client, &format!("{}/health", url(0)), &containers).await;
    for i in 1..replicas {
        let body = wait_ok(&client, &format!("{}/health", url(i)), &containers).await;
        assert_eq!(body["phase"], "joined", "{body}");
        let (s, live) = get(&client, &format!("{}/livez", url(i))).await.unwrap();
        assert_eq!(s, 200, "{live}");
    }
    let chat = |leader: String, question: &'static str| chat_of(leader, question, 12);
    let before = chat(url(0), "What is the capital of France?").await;
    assert!(!before.is_empty());
    chat(url(0), "Say hi.").await;
    // The manifest asks for JSON logs.
    let logs = Command::new("docker")
        .args(["logs", &containers[0]])
        .output()
        .unwrap();
    let first = String::from_utf8_lossy(&logs.stderr)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let line: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first}: {e}"));
    assert!(line["message"].is_string(), "{line}");

    // A worker pod killed under load and started again, as the kubelet
    // restarts a container: every request in flight completes, with the
    // text an undisturbed run gives.
    let questions = [
        "Name three colours.",
        "Count to ten.",
        "What is a cat?",
        "Describe the sea.",
    ];
    let all_chats = || join_all(questions.map(|q| chat_of(url(0), q, 48)));
    let undisturbed = all_chats().await;
    let generated = || generated_tokens(&client, url(0));
    let under_way = generated().await + 16.0;
    let running = tokio::spawn(all_chats());
    while !running.is_finished() && generated().await < under_way {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    docker(&["kill", &containers[1]]);
    docker(&["wait", &containers[1]]);
    docker(&["start", &containers[1]]);
    assert_eq!(running.await.unwrap(), undisturbed);
    let metrics = metrics_text(&client, &url(0)).await;
    assert!(
        metrics.contains("strata_recoveries_total 1"),
        "the kill did not land while the requests ran:\n{metrics}"
    );

    // A rolling update, as the StatefulSet controller runs it: the highest
    // ordinal first, and each replaced pod must be ready before the next
    // is replaced. The new workers must come up ready without a leader
    // that takes them, or the update would stop at the first one.
    for i in (1..replicas).rev() {
        docker(&["rm", "-f", &containers[i]]);
        start_pod(i);
        let body = wait_ok(&client, &format!("{}/health", url(i)), &containers).await;
        assert!(
            body["phase"] == "joining" || body["phase"] == "joined",
            "{body}"
        );
    }
    // Pod 0 last: SIGTERM, a clean exit, a new leader that takes the
    // workers (they join again once the old one falls silent) and serves.
    docker(&["stop", "-t", "60", &containers[0]]);
    assert_eq!(
        docker(&["wait", &containers[0]]),
        "0",
        "the old leader did not exit cleanly"
    );
    docker(&["rm", &containers[0]]);
    start_pod(0);
    wait_ok(&client, &format!("{}/health", url(0)), &containers).await;
    let after = chat(url(0), "What is the capital of France?").await;
    assert_eq!(after, before, "greedy output changed across the update");

    // SIGTERM: the leader drains and exits 0; the workers (which would wait
    // for a next leader) exit 0 too.
    for c in &containers {
        docker(&["stop", "-t", "60", c]);
    }
    for c in &containers {
        assert_eq!(docker(&["wait", c]), "0", "{c} did not exit cleanly");
    }
}
