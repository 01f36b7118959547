//! Recovery figures: what a lost worker costs, phase by phase, and a soak
//! that kills a worker under load and checks that no request and no token
//! is lost. Every process runs on this machine (127.0.0.1).
//!
//! ```sh
//! cargo build --release -p strata-cli -p strata-benches
//! target/release/recovery-bench --strata target/release/strata
//! ```
//!
//! Recovery (PP=2, the worker runs the last stage): streams run, the worker
//! is SIGKILLed and started again, and the clock reads, from the leader's
//! `/health` and log and the clients' streams:
//! - detect: the kill to `/health` non-200;
//! - join: the new process's start to the leader's "joined" (it opens the
//!   model and finds the leader);
//! - load: to "loaded its stages" (the new process reads its share);
//! - restart: to "the cluster is back" (every node restarted);
//! - recompute: to a new token on every stream (the running requests'
//!   prompts and tokens so far computed again).
//!
//! Soak: `--soak-streams` clients each send their own request over and
//! over for `--soak-minutes`, on one process and on PP=2 with the worker
//! killed and started again twice (`--soak one,pp2`; the two may run as
//! two bench processes at once); every answer must equal the one an undisturbed
//! server gave, and the leader's RSS at the end is compared with its RSS
//! after the first minute.

mod shared;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use shared::free_port;

#[derive(Parser)]
struct Args {
    /// The strata binary.
    #[arg(long, default_value = "target/release/strata")]
    strata: String,
    /// The model to serve (default: strata's demo model).
    #[arg(long)]
    model: Option<String>,
    /// Threads per process.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Kill-and-restart rounds for the recovery figures.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Streams running through each recovery round.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    #[arg(long, default_value_t = 10.0)]
    soak_minutes: f64,
    #[arg(long, default_value_t = 64)]
    soak_streams: usize,
    /// Tokens per soak request.
    #[arg(long, default_value_t = 48)]
    soak_tokens: usize,
    /// Which soaks to run, comma-separated: `one` (one process), `pp2`
    /// (a leader and a worker, killed twice), or `none`.
    #[arg(long, default_value = "one,pp2", value_delimiter = ',')]
    soak: Vec<String>,
}

/// A strata process whose stderr goes to a file; killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(strata: &str, args: &[String], name: &str) -> Result<Proc> {
        // A file per process: a restarted worker must not share (and, when
        // the old handle drops, lose) its predecessor's log.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "strata-recovery-bench-{}-{name}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let child = Command::new(strata)
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("spawning {strata}"))?;
        Ok(Proc { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory now, in MiB.
    fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One process, or a leader and one worker (PP=2).
struct Server {
    leader: Proc,
    worker: Option<Proc>,
    worker_args: Vec<String>,
    strata: String,
    base: String,
    client: reqwest::Client,
}

impl Server {
    async fn start(args: &Args, model: &str, pp2: bool) -> Result<Server> {
        let port = free_port();
        let mut common: Vec<String> = [
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--threads",
            &args.threads.to_string(),
            "--kv-cache-memory",
            "512MiB",
            "--max-num-seqs",
            &args.soak_streams.max(args.streams).to_string(),
        ]
        .map(String::from)
        .to_vec();
        let mut worker_args = Vec::new();
        if pp2 {
            let cluster = format!("127.0.0.1:{}", free_port());
            common.extend(["--nnodes", "2", "--leader-addr", &cluster].map(String::from));
            worker_args = common.clone();
            worker_args.extend(["--node-rank", "1", "--port", "0"].map(String::from));
            common.extend(["--node-rank", "0"].map(String::from));
        }
        common.extend(["--port".to_string(), port.to_string()]);
        let leader = Proc::spawn(&args.strata, &common, "leader")?;
        let mut s = Server {
            leader,
            worker: None,
            worker_args,
            strata: args.strata.clone(),
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        if pp2 {
            s.start_worker()?;
        }
        s.wait_health(|s| s == 200, Duration::from_secs(300))
            .await?;
        Ok(s)
    }

    fn start_worker(&mut self) -> Result<()> {
        self.worker = Some(Proc::spawn(&self.strata, &self.worker_args, "worker")?);
        Ok(())
    }

    async fn health(&self) -> u16 {
        match self
            .client
            .get(format!("{}/health", self.base))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Polls `/health` every 5 ms until `ok(status)`.
    async fn wait_health(&self, ok: impl Fn(u16) -> bool, limit: Duration) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if ok(self.health().await) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("/health: no change within {limit:?}\n{}", self.leader.log());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Polls the leader's log every 5 ms until it holds `needle` more than
    /// `before` times.
    async fn wait_log(&self, needle: &str, before: usize) -> Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.leader.log().matches(needle).count() <= before {
            if Instant::now() > deadline {
                bail!("`{needle}` never logged:\n{}", self.leader.log());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Instant::now())
    }

    fn count(&self, needle: &str) -> usize {
        self.leader.log().matches(needle).count()
    }
}

/// Request `i`: greedy, or seeded sampling for odd `i`; its own prompt.
fn body(i: usize, max_tokens: usize) -> Value {
    const WORDS: &[&str] = &[
        "river", "stone", "window", "garden", "silver", "quiet", "market", "cloud", "letter",
        "bridge", "orange", "forest", "candle", "harbor", "winter", "paper",
    ];
    let prompt: Vec<&str> = (0..12)
        .map(|k| WORDS[(i * 7 + k * (i % 5 + 1)) % WORDS.len()])
        .collect();
    let mut b = json!({
        "prompt": format!("Story {i}: {}", prompt.join(" ")),
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "temperature": 0,
    });
    if i % 2 == 1 {
        b["temperature"] = json!(0.8);
        b["seed"] = json!(1000 + i);
    }
    b
}

/// Streams one completion to its end; `on_token` hears each token. An
/// error event is an error.
async fn stream(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
    mut on_token: impl FnMut(),
) -> Result<String> {
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("status {}: {}", r.status(), r.text().await?);
    }
    let mut events = r.bytes_stream().eventsource();
    let mut text = String::new();
    let mut done = false;
    while let Some(e) = events.next().await {
        let data = e?.data;
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data)?;
        if let Some(m) = v["error"]["message"].as_str() {
            bail!("error event: {m}");
        }
        if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
            on_token();
        }
    }
    ensure!(done, "the stream ended without [DONE]");
    Ok(text)
}

/// Each body's text from an undisturbed server, all at once.
async fn references(s: &Server, bodies: &[Value]) -> Result<Vec<String>> {
    futures::future::try_join_all(bodies.iter().map(|b| stream(&s.client, &s.base, b, || {}))).await
}

struct Phases {
    detect: f64,
    join: f64,
    load: f64,
    restart: f64,
    recompute: f64,
}

/// One kill-and-restart of the worker while `args.streams` streams run.
async fn recovery_round(s: &mut Server, args: &Args, round: usize) -> Result<Phases> {
    let bodies: Vec<Value> = (0..args.streams).map(|i| body(i + round, 256)).collect();
    let want = references(s, &bodies).await?;
    let (joined, loaded, back) = (
        s.count("node 1 joined from"),
        s.count("node 1 loaded its stages"),
        s.count("the cluster is back"),
    );
    let tokens = Arc::new(AtomicUsize::new(0));
    // Per stream: when its latest token came.
    let last: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; bodies.len()]));
    let running: Vec<_> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (client, base, b) = (s.client.clone(), s.base.clone(), b.clone());
            let (tokens, last) = (tokens.clone(), last.clone());
            tokio::spawn(async move {
                stream(&client, &base, &b, || {
                    tokens.fetch_add(1, Ordering::Relaxed);
                    last.lock().unwrap()[i] = Some(Instant::now());
                })
                .await
            })
        })
        .collect();
    while tokens.load(Ordering::Relaxed) < bodies.len() * 16 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = Instant::now();
    s.worker.as_mut().expect("PP=2").kill();
    let detected = s.wait_health(|h| h != 200, Duration::from_secs(30)).await?;
    let spawned = Instant::now();
    s.start_worker()?;
    let t_join = s.wait_log("node 1 joined from", joined).await?;
    let t_load = s.wait_log("node 1 loaded its stages", loaded).await?;
    let t_back = s.wait_log("the cluster is back", back).await?;
    // Every stream has a token from after the restart.
    let moving = loop {
        let now = Instant::now();
        if last
            .lock()
            .unwrap()
            .iter()
            .all(|t| t.is_some_and(|t| t > t_back))
        {
            break now;
        }
        ensure!(
            now - t_back < Duration::from_secs(120),
            "a stream did not move again"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    for (i, (r, w)) in running.into_iter().zip(&want).enumerate() {
        let got = r.await??;
        ensure!(&got == w, "stream {i} differs after the recovery");
    }
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    Ok(Phases {
        detect: ms(killed, detected),
        join: ms(spawned, t_join),
        load: ms(t_join, t_load),
        restart: ms(t_load, t_back),
        recompute: ms(t_back, moving),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn recovery_figures(args: &Args, model: &str) -> Result<()> {
    let mut s = Server::start(args, model, true).await?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let p = recovery_round(&mut s, args, round).await?;
        println!(
            "round {round}: detect {:.0} ms, join {:.0} ms, load {:.0} ms, restart {:.0} ms, \
             recompute {:.0} ms; {:.0} ms from the new process to every stream moving",
            p.detect,
            p.join,
            p.load,
            p.restart,
            p.recompute,
            p.join + p.load + p.restart + p.recompute
        );
        rounds.push(p);
    }
    let m = |f: fn(&Phases) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "median of {} rounds ({} streams each, all identical to an undisturbed run): \
         detect {:.0} ms | join {:.0} ms | load {:.0} ms | restart {:.0} ms | recompute {:.0} ms | \
         new process to streams moving {:.0} ms",
        rounds.len(),
        args.streams,
        m(|p| p.detect),
        m(|p| p.join),
        m(|p| p.load),
        m(|p| p.restart),
        m(|p| p.recompute),
        m(|p| p.join + p.load + p.restart + p.recompute),
    );
    Ok(())
}

/// What a soak counted.
#[derive(Default)]
struct Soak {
    requests: AtomicU64,
    tokens: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
}

async fn soak(args: &Args, model: &str, pp2: bool) -> Result<()> {
    let name = if pp2 { "PP=2" } else { "one process" };
    let mut s = Server::start(args, model, pp2).await?;
    let bodies: Vec<Value> = (0..args.soak_streams)
        .map(|i| body(i, args.soak_tokens))
        .collect();
    let want = Arc::new(references(&s, &bodies).await?);
    let counts = Arc::new(Soak::default());
    let duration = Duration::from_secs_f64(args.soak_minutes * 60.0);
    let start = Instant::now();
    let end = start + duration;
    let clients: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let (client, base) = (s.client.clone(), s.base.clone());
            let (want, counts) = (want.clone(), counts.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let got = stream(&client, &base, &b, || {
                        counts.tokens.fetch_add(1, Ordering::Relaxed);
                    })
                    .await;
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    match got {
                        Ok(t) if t == want[i] => {}
                        Ok(_) => {
                            counts.mismatches.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if counts.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("{name}: first error: {e:#}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let minute = start + Duration::from_secs(60).min(duration / 2);
    tokio::time::sleep_until(minute.into()).await;
    let rss_first = s.leader.rss_mib();
    let mut kills = Vec::new();
    if pp2 {
        for k in 1..=2u32 {
            tokio::time::sleep_until((start + duration * k / 3).into()).await;
            let killed = Instant::now();
            s.worker.as_mut().expect("PP=2").kill();
            s.wait_health(|h| h != 200, Duration::from_secs(30)).await?;
            s.start_worker()?;
            s.wait_health(|h| h == 200, Duration::from_secs(120))
                .await?;
            kills.push(killed.elapsed().as_secs_f64());
        }
    }
    for c in clients {
        c.await?;
    }
    let rss_end = s.leader.rss_mib();
    let secs = start.elapsed().as_secs_f64();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "soak, {name}: {} streams for {:.1} min: {} requests, {} tokens ({:.1} tok/s), \
         {} errors, {} answers unlike the undisturbed run; {} kill(s), each back after {:?} s; \
         leader RSS {:.0} MiB after the first minute, {:.0} MiB at the end ({:+.1}%)",
        args.soak_streams,
        secs / 60.0,
        load(&counts.requests),
        load(&counts.tokens),
        load(&counts.tokens) as f64 / secs,
        load(&counts.errors),
        load(&counts.mismatches),
        kills.len(),
        kills.iter().map(|k| format!("{k:.1}")).collect::<Vec<_>>(),
        rss_first,
        rss_end,
        (rss_end / rss_first - 1.0) * 100.0
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let model = shared::model_or_demo(&args.strata, args.model.as_deref())?;
    println!("model {model}, {} thread(s) per process", args.threads);
    if args.rounds > 0 {
        recovery_figures(&args, &model).await?;
    }
    for layout in &args.soak {
        match layout.as_str() {
            "one" => soak(&args, &model, false).await?,
            "pp2" => soak(&args, &model, true).await?,
            "none" => {}
            other => bail!("--soak: unknown layout {other} (one, pp2 or none)"),
        }
    }
    Ok(())
}
