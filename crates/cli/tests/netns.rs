//! A cluster whose nodes live in separate network namespaces, each with its
//! own address, so nothing can lean on loopback: the worker must find its
//! own address on the route to the leader, and the leader reach it there.
//! Needs root (CI runs as root) and `ip` from iproute2.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{is_root, Node};
use serde_json::{json, Value};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces: the leader's (`a`), reachable from here over one veth
/// pair, and the worker's (`b`), reachable only from `a` over another.
struct Namespaces {
    a: String,
    b: String,
    host_link: String,
}

impl Namespaces {
    fn create(id: u32) -> Namespaces {
        let (a, b) = (format!("strata{id}a"), format!("strata{id}b"));
        let host_link = format!("sth{id}");
        // Leftovers from a crashed run would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &a]).status();
        let _ = Command::new("ip").args(["netns", "del", &b]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &host_link])
            .status();
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        for ns in [&a, &b] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // Host <-> a: 10.231.<id>.1 / .2
        let peer = format!("sta{id}");
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &a]);
        ip(&[
            "addr",
            "add",
            &format!("10.231.{id}.1/24"),
            "dev",
            &host_link,
        ]);
        ip(&["link", "set", &host_link, "up"]);
        ip(&[
            "-n",
            &a,
            "addr",
            "add",
            &format!("10.231.{id}.2/24"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &a, "link", "set", &peer, "up"]);
        // a <-> b: 10.232.<id>.1 / .2
        let (la, lb) = (format!("stab{id}"), format!("stba{id}"));
        ip(&[
            "-n", &a, "link", "add", &la, "type", "veth", "peer", "name", &lb,
        ]);
        ip(&["-n", &a, "link", "set", &lb, "netns", &b]);
        ip(&[
            "-n",
            &a,
            "addr",
            "add",
            &format!("10.232.{id}.1/24"),
            "dev",
            &la,
        ]);
        ip(&["-n", &a, "link", "set", &la, "up"]);
        ip(&[
            "-n",
            &b,
            "addr",
            "add",
            &format!("10.232.{id}.2/24"),
            "dev",
            &lb,
        ]);
        ip(&["-n", &b, "link", "set", &lb, "up"]);
        Namespaces { a, b, host_link }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of each veth pair, and the pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_in_separate_network_namespaces_serve_together() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny/llama-chat"
    );
    let id = std::process::id() % 250;
    let ns = Namespaces::create(id);
    let leader_addr = format!("10.232.{id}.1:29500");
    let shared = |rank: &str| -> Vec<String> {
        [
            "--host",
            "0.0.0.0",
            "--nnodes",
            "2",
            "--node-rank",
            rank,
            "--leader-addr",
            &leader_addr,
            "--pipeline-parallel-size",
            "2",
            "--cluster-token",
            "netns-secret",
            "--kv-cache-memory",
            "4MiB",
            "--port",
            "8000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let leader = Node::spawn_in(&["ip", "netns", "exec", &ns.a], model, &shared("0"));
    let worker = Node::spawn_in(&["ip", "netns", "exec", &ns.b], model, &shared("1"));
    let base = format!("http://10.231.{id}.2:8000");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = client
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never became healthy\nleader:\n{}\nworker:\n{}",
            leader.log(),
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The worker found and announced its own address, not loopback.
    assert!(
        worker.log().contains(&format!("10.232.{id}.2")),
        "{}",
        worker.log()
    );
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "hello world", "max_tokens": 6, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
}
