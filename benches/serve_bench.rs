//! Serving benchmark: starts each server on the same GGUF with the same
//! thread count, drives it through the OpenAI completions API, and prints
//! single-stream decode tok/s, 512-token prefill tok/s, aggregate tok/s of
//! concurrent streams, TTFT and inter-token latency percentiles, and the
//! server's peak RSS.
//!
//! ```sh
//! cargo run --release -p strata-benches --bin serve-bench -- \
//!     --strata target/release/strata --llama-cpp-python /opt/llamacpp/bin/python
//! ```

mod shared;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use shared::free_port;

#[derive(Parser)]
struct Args {
    /// The strata binary.
    #[arg(long, default_value = "target/release/strata")]
    strata: String,
    /// A python with `llama-cpp-python[server]` installed; leave out to skip llama.cpp.
    #[arg(long)]
    llama_cpp_python: Option<String>,
    /// The GGUF to serve (default: strata's demo model, fetched if needed).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 16)]
    streams: usize,
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// strata layouts to measure, comma-separated: `one` (one process),
    /// `ppN` (N processes, one stage each), `tpN-threads` (N ranks as threads
    /// of one process), `tpN` (N processes, one rank each). Processes split
    /// the threads between them.
    #[arg(long, default_value = "one")]
    layouts: String,
}

struct Server {
    name: String,
    child: Child,
    /// Worker nodes of a distributed layout.
    workers: Vec<Child>,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain([&mut self.child]) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

async fn wait_ready(client: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/v1/models")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{base} did not come up")
}

/// Text of roughly `n` tokens, different for every seed (no prompt cache hits).
fn filler(n: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "river", "stone", "window", "garden", "silver", "quiet", "market", "cloud", "letter",
        "bridge", "orange", "forest", "candle", "harbor", "winter", "paper", "engine", "valley",
        "thunder", "meadow",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// One streamed completion: (time to first token, inter-token gaps, tokens).
async fn stream_one(
    client: &reqwest::Client,
    base: &str,
    prompt: &str,
    max_tokens: usize,
) -> Result<(f64, Vec<f64>, usize)> {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true});
    let start = Instant::now();
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("status {}: {}", r.status(), r.text().await?);
    }
    let mut events = r.bytes_stream().eventsource();
    let mut last: Option<Instant> = None;
    let mut ttft = 0.0;
    let mut gaps = Vec::new();
    let mut tokens = 0;
    while let Some(e) = events.next().await {
        let e = e?;
        if e.data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&e.data)?;
        if v["choices"][0]["text"].as_str().is_none_or(str::is_empty) {
            continue;
        }
        let now = Instant::now();
        match last {
            None => ttft = (now - start).as_secs_f64(),
            Some(t) => gaps.push((now - t).as_secs_f64()),
        }
        last = Some(now);
        tokens += 1;
    }
    Ok((ttft, gaps, tokens))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Figures {
    decode: f64,
    prefill: f64,
    aggregate: f64,
    ttft: [f64; 3],
    itl: [f64; 3],
    rss: f64,
}

async fn measure(server: &Server, args: &Args) -> Result<Figures> {
    let client = reqwest::Client::new();
    let base = &server.base;
    wait_ready(&client, base).await?;
    // Warm-up.
    stream_one(&client, base, "Hello", 8).await?;

    // Single stream: decode rate after the first token, median of three runs.
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (_, gaps, _) = stream_one(&client, base, "Once upon a time", args.tokens).await?;
        rates.push(gaps.len() as f64 / gaps.iter().sum::<f64>());
    }
    let decode = pct(&mut rates, 0.5);

    // Prefill: one new prompt, one token out.
    let mut prefill = 0.0;
    for trial in 0..3 {
        let prompt = filler(args.prefill_tokens, 1000 + trial);
        let t = Instant::now();
        let v: Value = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": prompt, "max_tokens": 1, "temperature": 0}))
            .send()
            .await?
            .json()
            .await?;
        let n = v["usage"]["prompt_tokens"]
            .as_f64()
            .context("usage.prompt_tokens")?;
        prefill = f64::max(prefill, n / t.elapsed().as_secs_f64());
    }

    // Concurrent streams.
    let t = Instant::now();
    let runs = futures::future::join_all((0..args.streams).map(|i| {
        let client = client.clone();
        let prompt = format!("Story {i}: {}", filler(16, i as u64));
        async move { stream_one(&client, base, &prompt, args.tokens).await }
    }))
    .await;
    let wall = t.elapsed().as_secs_f64();
    let mut ttfts = Vec::new();
    let mut itls = Vec::new();
    let mut total = 0;
    for r in runs {
        let (ttft, gaps, n) = r?;
        ttfts.push(ttft);
        itls.extend(gaps);
        total += n;
    }
    Ok(Figures {
        decode,
        prefill,
        aggregate: total as f64 / wall,
        ttft: [
            pct(&mut ttfts, 0.5),
            pct(&mut ttfts, 0.9),
            pct(&mut ttfts, 0.99),
        ],
        itl: [
            pct(&mut itls, 0.5),
            pct(&mut itls, 0.9),
            pct(&mut itls, 0.99),
        ],
        rss: server.peak_rss_mib(),
    })
}

fn print(name: &str, f: &Figures, streams: usize) {
    println!(
        "{name:<10} decode {:>6.1} tok/s | prefill {:>6.1} tok/s | {streams} streams {:>6.1} tok/s | TTFT p50/p90/p99 {:.0}/{:.0}/{:.0} ms | ITL p50/p90/p99 {:.1}/{:.1}/{:.1} ms | peak RSS {:.0} MiB",
        f.decode, f.prefill, f.aggregate,
        f.ttft[0] * 1e3, f.ttft[1] * 1e3, f.ttft[2] * 1e3,
        f.itl[0] * 1e3, f.itl[1] * 1e3, f.itl[2] * 1e3,
        f.rss
    );
}

/// Starts one server (and its workers), measures it, prints its line, and stops it.
async fn bench_server(
    name: &str,
    mut cmd: Command,
    workers: Vec<Command>,
    port: u16,
    args: &Args,
) -> Result<Figures> {
    let mut spawn = |mut c: Command| {
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))
    };
    let child = spawn(std::mem::replace(&mut cmd, Command::new("true")))?;
    let workers = workers
        .into_iter()
        .map(&mut spawn)
        .collect::<Result<Vec<_>>>()?;
    let s = Server {
        name: name.to_string(),
        child,
        workers,
        base: format!("http://127.0.0.1:{port}"),
    };
    let f = measure(&s, args).await?;
    print(&s.name, &f, args.streams);
    if let Ok(text) = reqwest::get(format!("{}/metrics", s.base))
        .await?
        .text()
        .await
    {
        let metric = |n: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(n)?.strip_prefix(' ')?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let bytes = metric("strata_activation_bytes_sent_total");
        if bytes > 0.0 {
            println!(
                "{:>10} activations: {:.0} bytes per computed token at the first stage boundary",
                "",
                bytes / metric("strata_computed_tokens_total")
            );
        }
    }
    Ok(f)
}

/// `strata serve` on `model` for one layout: the leader's command and the workers'.
fn strata_layout(
    layout: &str,
    model: &str,
    port: u16,
    args: &Args,
) -> Result<(Command, Vec<Command>)> {
    let (procs, extra): (usize, Vec<String>) = if layout == "one" {
        (1, vec![])
    } else if let Some(n) = layout.strip_prefix("pp") {
        let n: usize = n.parse().context("ppN")?;
        (n, vec!["--pipeline-parallel-size".into(), n.to_string()])
    } else if let Some(n) = layout
        .strip_prefix("tp")
        .and_then(|n| n.strip_suffix("-threads"))
    {
        let n: usize = n.parse().context("tpN-threads")?;
        (1, vec!["--tensor-parallel-size".into(), n.to_string()])
    } else if let Some(n) = layout.strip_prefix("tp") {
        let n: usize = n.parse().context("tpN")?;
        let v = vec![
            "--tensor-parallel-size".to_string(),
            n.to_string(),
            "--pipeline-parallel-size".into(),
            "1".into(),
        ];
        (n, v)
    } else {
        bail!("unknown layout `{layout}` (one, ppN, tpN, tpN-threads)");
    };
    let threads = (args.threads / procs).max(1).to_string();
    let cluster_port = free_port().to_string();
    let node = |rank: usize| {
        let mut cmd = Command::new(&args.strata);
        cmd.args(["serve", "--model", model, "--host", "127.0.0.1"])
            .args(["--threads", &threads, "--enable-prefix-caching", "false"])
            .args(&extra);
        if procs > 1 {
            cmd.args([
                "--nnodes",
                &procs.to_string(),
                "--node-rank",
                &rank.to_string(),
            ])
            .args(["--leader-addr", &format!("127.0.0.1:{cluster_port}")]);
        }
        cmd
    };
    let mut leader = node(0);
    leader.args(["--port", &port.to_string()]);
    // Workers answer their probes on --port: any free one.
    let workers = (1..procs)
        .map(|r| {
            let mut w = node(r);
            w.args(["--port", "0"]);
            w
        })
        .collect();
    Ok((leader, workers))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let model = shared::model_or_demo(&args.strata, args.model.as_deref())?;
    println!(
        "model {model}, {} threads, {} concurrent streams of {} tokens, {}-token prefill",
        args.threads, args.streams, args.tokens, args.prefill_tokens
    );
    let mut results = Vec::new();
    for layout in args.layouts.split(',') {
        let port = free_port();
        let (leader, workers) = strata_layout(layout, &model, port, &args)?;
        let name = if layout == "one" {
            "strata".to_string()
        } else {
            format!("strata {layout}")
        };
        results.push((
            name.clone(),
            bench_server(&name, leader, workers, port, &args).await?,
        ));
    }
    if let Some(py) = &args.llama_cpp_python {
        let port = free_port();
        let mut cmd = Command::new(py);
        cmd.args([
            "-m",
            "llama_cpp.server",
            "--model",
            &model,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args([
            "--n_threads",
            &args.threads.to_string(),
            "--n_threads_batch",
            &args.threads.to_string(),
        ])
        .args(["--n_ctx", "4096"]);
        results.push((
            "llama.cpp".to_string(),
            bench_server("llama.cpp", cmd, Vec::new(), port, &args).await?,
        ));
    }
    // Every other server against the first.
    if let [(first, base), rest @ ..] = &results[..] {
        for (name, f) in rest {
            println!(
                "{name} / {first}: decode {:.2}x, prefill {:.2}x, {} streams {:.2}x",
                f.decode / base.decode,
                f.prefill / base.prefill,
                args.streams,
                f.aggregate / base.aggregate
            );
        }
    }
    Ok(())
}
