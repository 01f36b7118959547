//! A cluster whose nodes live in separate network namespaces, each with its
//! own address, so nothing can lean on loopback: the worker must find its
//! own address on the route to the leader, and the leader reach it there.
//! The link between them can then be cut or slowed. Needs root (CI runs as
//! root) and `ip` and `tc` from iproute2.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{eight_streams, is_root, Node, Server};
use serde_json::json;

/// Runs `tool args...` (iproute2's `ip` or `tc`), which must succeed.
fn iproute2(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    iproute2("ip", args)
}

/// Two namespaces: the leader's (`a`), reachable from here over one veth
/// pair, and the worker's (`b`), reachable only from `a` over another.
struct Namespaces {
    id: u32,
    a: String,
    b: String,
    host_link: String,
}

impl Namespaces {
    fn create(id: u32) -> Namespaces {
        let (a, b) = (format!("strata{id}a"), format!("strata{id}b"));
        let host_link = format!("sth{id}");
        // Leftovers from a crashed run would make `add` fail.
        for args in [
            ["netns", "del", &a],
            ["netns", "del", &b],
            ["link", "del", &host_link],
        ] {
            let _ = Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        }
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
        Namespaces {
            id,
            a,
            b,
            host_link,
        }
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

/// A leader in namespace `a` and a worker in `b`: PP=2 on the tiny model.
/// (Fields drop in order: the processes before their namespaces.)
struct NetCluster {
    leader: Server,
    worker: Node,
    ns: Namespaces,
}

impl NetCluster {
    /// `None` when not root (namespaces need it).
    async fn start() -> Option<NetCluster> {
        if !is_root() {
            eprintln!("skipped: network namespaces need root (CI runs as root)");
            return None;
        }
        let model = common::tiny_fixture("llama-chat");
        // Distinct per test of this process (they run at once).
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = (std::process::id() % 80) * 3 + NEXT.fetch_add(1, Ordering::Relaxed) % 3;
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
        let leader = Server::spawn_in(
            &["ip", "netns", "exec", &ns.a],
            &format!("http://10.231.{id}.2:8000"),
            &model,
            &shared("0"),
        );
        let worker = Node::spawn_in(&["ip", "netns", "exec", &ns.b], &model, &shared("1"));
        leader.wait_healthy().await;
        Some(NetCluster { leader, worker, ns })
    }

    /// The leader's end of the link to the worker (in `a`), as `ip` names it.
    fn link(&self) -> String {
        format!("stab{}", self.ns.id)
    }

    /// Takes the link between the two nodes down or up.
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns.a, "link", "set", &self.link(), state]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_in_separate_network_namespaces_serve_together() {
    let Some(c) = NetCluster::start().await else {
        return;
    };
    // The worker found and announced its own address, not loopback.
    let own = format!("10.232.{}.2", c.ns.id);
    assert!(c.worker.log().contains(&own), "{}", c.worker.log());
    let (status, v) = c
        .leader
        .post(
            "/v1/completions",
            &json!({"prompt": "hello world", "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_is_lost_and_rejoins_when_the_link_heals() {
    let Some(c) = NetCluster::start().await else {
        return;
    };
    let bodies = eight_streams(200);
    let want = c.leader.run_streams(&bodies).await;
    let running = c.leader.spawn_streams_under_way(&bodies).await;
    c.set_link(false);
    // Nothing breaks on either side (no FIN, no RST crosses a link that is
    // down): the leader loses the worker by its heartbeats, the worker its
    // leader by the leader's silence.
    let health = c.leader.wait_health(|s, _| s != 200).await;
    assert!(
        health["missing"][0]
            .as_str()
            .unwrap()
            .contains("node 1: lost"),
        "{health}"
    );
    c.worker.wait_log("joins again").await;
    c.set_link(true);
    c.leader.wait_healthy().await;
    c.leader.assert_resumed(running, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_serves_the_same_text() {
    let Some(c) = NetCluster::start().await else {
        return;
    };
    let bodies = eight_streams(24);
    let want = c.leader.run_streams(&bodies).await;
    // A 2 Mbit/s link each way: every packet waits its turn behind the
    // activations and step messages before it. (netem's fixed delay is not
    // in every kernel, this machine's included; tbf is.)
    for (ns, dev) in [(&c.ns.a, c.link()), (&c.ns.b, format!("stba{}", c.ns.id))] {
        iproute2(
            "tc",
            &[
                "-n", ns, "qdisc", "add", "dev", &dev, "root", "tbf", "rate", "2mbit", "burst",
                "5kb", "limit", "256kb",
            ],
        );
    }
    let got = c.leader.run_streams(&bodies).await;
    assert_eq!(got, want);
    // Slow is not lost: no heartbeat went missing.
    assert_eq!(c.leader.metric("strata_recoveries_total").await, 0);
}
