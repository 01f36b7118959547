//! Serving benchmark for any OpenAI-compatible server (strata, llama.cpp's
//! llama-server, vLLM, ...), driven through streamed `/v1/completions`.
//!
//! For each target and each concurrency level it sends a batch of requests
//! with at most that many in flight (closed loop) and reports aggregate
//! output tok/s, per-stream decode tok/s, TTFT and inter-token latency
//! percentiles and errors. A single-stream context sweep gives prefill and
//! decode tok/s at growing prompt lengths, and a 512-token prefill is always
//! measured. Without `--url` it launches the targets itself: `strata serve`
//! per layout and, with `--llama-server`, llama-server on the same GGUF with
//! the same threads (plus `llama-bench` when it sits next to it). It prints a
//! table per target and the first target's ratios against the others, and
//! can write JSON (`--out`) and an SVG plot (`--plot`, also of earlier JSON
//! files given with `--compare`).
//!
//! ```sh
//! # strata against llama.cpp on the demo model:
//! cargo run --release -p strata-benches --bin serve-bench -- \
//!     --strata target/release/strata --llama-server target/llama.cpp/bin/llama-server \
//!     --out bench.json --plot bench.svg
//! # servers already running (strata, vLLM):
//! serve-bench --url http://127.0.0.1:8000=strata --url http://host:8000=vllm --context ''
//! # only redraw earlier results:
//! serve-bench --plot-only --compare before.json --compare after.json --plot cmp.svg
//! ```

#[path = "serve/load.rs"]
mod load;
#[path = "serve/report.rs"]
mod report;
mod shared;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use shared::free_port;

use load::{Driver, Prompts};
use report::{LlamaBench, Run};

/// Serving benchmark for OpenAI-compatible servers: throughput, TTFT and
/// inter-token latency per concurrency level, prefill and decode per context.
#[derive(Parser)]
struct Args {
    /// A running server to measure, `URL` or `URL=LABEL`; repeatable. With
    /// none, serve-bench launches strata (and llama-server) itself.
    #[arg(long = "url", value_name = "URL[=LABEL]")]
    urls: Vec<String>,
    /// The strata binary to launch.
    #[arg(long, default_value = "target/release/strata")]
    strata: String,
    /// strata layouts to launch, comma-separated (empty: none): `one` (one
    /// process), `ppN` (N processes, one stage each), `tpN-threads` (N ranks
    /// as threads of one process), `tpN` (N processes, one rank each).
    /// Processes split the threads between them.
    #[arg(long, default_value = "one")]
    layouts: String,
    /// Also launch llama.cpp's llama-server on the same GGUF.
    #[arg(long)]
    llama_server: Option<String>,
    /// The GGUF to serve (default: strata's demo model).
    #[arg(long)]
    model: Option<String>,
    /// The `model` sent in requests (default: the first of GET /v1/models).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Threads of each launched server.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Concurrency levels, comma-separated.
    #[arg(long, default_value = "1,4,16,64", value_parser = numbers)]
    concurrency: Numbers,
    /// Tokens of each random prompt.
    #[arg(long, default_value_t = 32)]
    input_len: usize,
    /// Tokens generated per request (EOS ignored, unless --stop-at-eos).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Let the concurrency levels' requests end at EOS (at most
    /// --output-len tokens each), for --prompts whose answers have a natural
    /// end, such as edit tasks: tokens forced past it are not grounded in
    /// the prompt. Throughput counts the tokens generated.
    #[arg(long)]
    stop_at_eos: bool,
    /// JSONL prompts (`{"prompt": ...}` or `{"text": ...}` lines), used in
    /// turn instead of random ones.
    #[arg(long)]
    prompts: Option<String>,
    /// Requests per concurrency level (default: max(2 x concurrency, 8)).
    #[arg(long)]
    requests: Option<usize>,
    /// Prompt lengths of the single-stream context sweep (empty: skip).
    #[arg(long, default_value = "512,2048,4096,8000", value_parser = numbers)]
    context: Numbers,
    /// Write the results as JSON.
    #[arg(long)]
    out: Option<String>,
    /// Draw tok/s and ITL against concurrency as SVG.
    #[arg(long)]
    plot: Option<String>,
    /// Earlier --out files to draw along in --plot; repeatable.
    #[arg(long)]
    compare: Vec<String>,
    /// Measure nothing: only draw the --compare files.
    #[arg(long)]
    plot_only: bool,
}

/// A comma-separated list of numbers; an empty string is an empty list.
#[derive(Clone)]
struct Numbers(Vec<usize>);

fn numbers(s: &str) -> Result<Numbers, String> {
    let parts = s.split(',').map(str::trim).filter(|p| !p.is_empty());
    let parsed = parts.map(|p| p.parse().map_err(|e| format!("`{p}`: {e}")));
    parsed.collect::<Result<_, _>>().map(Numbers)
}

/// A launched server: killed, with its workers, when dropped.
struct Server {
    label: String,
    child: Child,
    /// Worker nodes of a distributed layout.
    workers: Vec<Child>,
    base: String,
    /// Where the leader's stderr goes, to read when it fails.
    log: String,
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
    fn start(label: &str, leader: Command, workers: Vec<Command>, port: u16) -> Result<Server> {
        let log = std::env::temp_dir().join(format!("serve-bench-{port}.log"));
        let spawn = |mut c: Command, stderr: Stdio| {
            c.stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("starting {label}"))
        };
        let child = spawn(leader, std::fs::File::create(&log)?.into())?;
        let mut server = Server {
            label: label.to_string(),
            child,
            workers: Vec::new(),
            base: format!("http://127.0.0.1:{port}"),
            log: log.display().to_string(),
        };
        for w in workers {
            server.workers.push(spawn(w, Stdio::null())?);
        }
        Ok(server)
    }

    /// Fails once the leader has exited, pointing at its log.
    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited ({status}); its log: {}", self.label, self.log),
            None => Ok(()),
        }
    }

    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
        let kb: f64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb / 1024.0)
    }
}

/// Polls until GET /health answers 200 (llama-server) or GET /v1/models
/// succeeds (any OpenAI server), while `alive` says the server still runs.
async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let ok = |r: reqwest::Result<reqwest::Response>| r.is_ok_and(|r| r.status().is_success());
    for attempt in 0.. {
        alive()?;
        if ok(client.get(format!("{base}/health")).send().await)
            || ok(client.get(format!("{base}/v1/models")).send().await)
        {
            return Ok(());
        }
        if attempt == 0 {
            eprintln!("waiting for {base} to answer ...");
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{base} did not come up within 10 minutes")
}

/// The model to name in requests: --served-model-name or the server's first.
async fn model_name(client: &reqwest::Client, base: &str, args: &Args) -> Result<String> {
    if let Some(name) = &args.served_model_name {
        return Ok(name.clone());
    }
    let response = client.get(format!("{base}/v1/models")).send().await?;
    let models: Value = response.error_for_status()?.json().await?;
    let id = models["data"][0]["id"].as_str().map(String::from);
    id.with_context(|| format!("{base}/v1/models lists no model: {models}"))
}

fn requests_at(args: &Args, concurrency: usize) -> usize {
    args.requests.unwrap_or((2 * concurrency).max(8))
}

/// Runs every measurement against one ready server.
async fn measure(
    client: &reqwest::Client,
    base: &str,
    label: &str,
    args: &Args,
    prompts: &Prompts,
) -> Result<Run> {
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut driver = Driver {
        client: client.clone(),
        base: base.to_string(),
        model: model_name(client, base, args).await?,
        prompts,
        progress: progress_bar(label, args)?,
        next_prompt: 0,
        stop_at_eos: args.stop_at_eos,
    };
    driver.warm_up().await?;
    let mut levels = Vec::new();
    for &c in &args.concurrency.0 {
        levels.push(driver.level(c, requests_at(args, c), args.output_len).await);
    }
    let mut context = Vec::new();
    for &tokens in &args.context.0 {
        context.push(driver.context_point(tokens).await);
    }
    let prefill_512 = match context.iter().find(|p| p.requested_tokens == 512) {
        Some(p) => p.prefill_tok_s,
        None => driver.prefill_512().await,
    };
    driver.progress.finish_and_clear();
    Ok(Run {
        label: label.to_string(),
        url: base.to_string(),
        model: driver.model,
        threads: None,
        started_unix,
        levels,
        context,
        prefill_512: prefill_512.is_finite().then_some(prefill_512),
        llama_bench: None,
        peak_rss_mib: None,
        stop_at_eos: args.stop_at_eos,
    })
}

/// One bar per target, over all the requests it will be sent.
fn progress_bar(label: &str, args: &Args) -> Result<ProgressBar> {
    let levels: usize = args
        .concurrency
        .0
        .iter()
        .map(|&c| requests_at(args, c))
        .sum();
    let prefill_512 = if args.context.0.contains(&512) { 0 } else { 3 };
    let total = levels + 2 * args.context.0.len() + prefill_512;
    let template = "{prefix:>14} [{bar:30}] {pos}/{len} requests, {msg} ({elapsed})";
    let style = ProgressStyle::with_template(template)?.progress_chars("=> ");
    Ok(ProgressBar::new(total as u64)
        .with_style(style)
        .with_prefix(label.to_string()))
}

/// Measures `server` once it is up, then stops it (it is dropped here).
async fn measure_launched(mut server: Server, args: &Args, prompts: &Prompts) -> Result<Run> {
    let client = http_client()?;
    let base = server.base.clone();
    wait_ready(&client, &base, || server.check_alive()).await?;
    let mut run = measure(&client, &base, &server.label.clone(), args, prompts).await?;
    run.threads = Some(args.threads);
    run.peak_rss_mib = server.peak_rss_mib();
    print_activation_bytes(&client, &base).await;
    Ok(run)
}

fn http_client() -> Result<reqwest::Client> {
    // A server that stops sending fails the request instead of hanging the run;
    // queued requests at high concurrency may wait long for their first byte.
    let builder = reqwest::Client::builder().read_timeout(Duration::from_secs(600));
    Ok(builder.build()?)
}

/// strata's distributed layouts: bytes of activations per computed token
/// sent across the first stage boundary.
async fn print_activation_bytes(client: &reqwest::Client, base: &str) {
    let response = client.get(format!("{base}/metrics")).send().await;
    let text = match response {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return,
    };
    let metric = |name: &str| {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        line.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
    };
    let bytes = metric("strata_activation_bytes_sent_total");
    if bytes > 0.0 {
        let per_token = bytes / metric("strata_computed_tokens_total");
        println!("activations: {per_token:.0} bytes per computed token at the first stage cut");
    }
}

/// `strata serve` on `model` for one layout: the leader's command and the workers'.
type Commands = (Command, Vec<Command>);
fn strata_layout(layout: &str, model: &str, port: u16, args: &Args) -> Result<Commands> {
    let (procs, extra): (usize, Vec<String>) = if layout == "one" {
        (1, vec![])
    } else if let Some(n) = layout.strip_prefix("pp") {
        let n: usize = n.parse().context("ppN")?;
        (n, vec!["--pipeline-parallel-size".into(), n.to_string()])
    } else if let Some(n) = layout
        .strip_suffix("-threads")
        .and_then(|n| n.strip_prefix("tp"))
    {
        let n: usize = n.parse().context("tpN-threads")?;
        (1, vec!["--tensor-parallel-size".into(), n.to_string()])
    } else if let Some(n) = layout.strip_prefix("tp") {
        let n: usize = n.parse().context("tpN")?;
        let tp = format!("--tensor-parallel-size {n} --pipeline-parallel-size 1");
        (n, tp.split(' ').map(String::from).collect())
    } else {
        bail!("unknown layout `{layout}` (one, ppN, tpN, tpN-threads)");
    };
    let threads = (args.threads / procs).max(1).to_string();
    let cluster_port = format!("127.0.0.1:{}", free_port());
    let node = |rank: usize| {
        let mut cmd = Command::new(&args.strata);
        // No prefix caching: every prompt is new anyway, and peers have none by default.
        cmd.args(["serve", "--model", model, "--host", "127.0.0.1"])
            .args(["--threads", &threads, "--enable-prefix-caching", "false"])
            .args(&extra);
        if procs > 1 {
            let cluster =
                format!("--nnodes {procs} --node-rank {rank} --leader-addr {cluster_port}");
            cmd.args(cluster.split(' '));
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

/// llama-server with one slot per stream of the highest level. With
/// --kv-unified all slots share one context, sized for every stream at once
/// and for the longest context-sweep prompt.
fn llama_server_command(bin: &str, model: &str, port: u16, args: &Args) -> Command {
    let max_c = args.concurrency.0.iter().copied().max().unwrap_or(1);
    let streams_need = max_c * (args.input_len + args.output_len + 64);
    let longest_prompt = args.context.0.iter().max().copied().unwrap_or(0);
    let sweep_need = longest_prompt + load::CONTEXT_OUTPUT_TOKENS + 256;
    let ctx = streams_need.max(sweep_need).max(512).next_multiple_of(1024);
    let threads = args.threads;
    let mut cmd = Command::new(bin);
    cmd.args(["-m", model]);
    let flags = format!("--host 127.0.0.1 --port {port} -t {threads} -tb {threads}");
    cmd.args(flags.split(' '));
    cmd.args(format!("-np {max_c} -c {ctx} --kv-unified").split(' '));
    cmd
}

/// `llama-bench` beside the llama-server binary, if there is one: pp512 and tg128.
async fn llama_bench(server_bin: &str, model: &str, threads: usize) -> Result<Option<LlamaBench>> {
    let bin = Path::new(server_bin).with_file_name("llama-bench");
    if !bin.exists() {
        return Ok(None);
    }
    eprintln!("running {} ...", bin.display());
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(["-m", model]).stderr(Stdio::null());
    cmd.args(format!("-t {threads} -p 512 -n 128 -o json").split(' '));
    let out = cmd.output().await?;
    ensure!(
        out.status.success(),
        "{} failed ({})",
        bin.display(),
        out.status
    );
    let tests: Vec<Value> = serde_json::from_slice(&out.stdout).context("llama-bench's JSON")?;
    let rate = |prompt: u64, gen: u64| {
        let test = tests
            .iter()
            .find(|t| t["n_prompt"] == prompt && t["n_gen"] == gen);
        test.and_then(|t| t["avg_ts"].as_f64()).unwrap_or(f64::NAN)
    };
    let (pp512, tg128) = (rate(512, 0), rate(0, 128));
    Ok(Some(LlamaBench { pp512, tg128 }))
}

async fn bench_strata(layout: &str, model: &str, args: &Args, prompts: &Prompts) -> Result<Run> {
    let label = strata_label(layout);
    let port = free_port();
    let (leader, workers) = strata_layout(layout, model, port, args)?;
    measure_launched(Server::start(&label, leader, workers, port)?, args, prompts).await
}

async fn bench_llama_server(bin: &str, model: &str, args: &Args, prompts: &Prompts) -> Result<Run> {
    let port = free_port();
    let command = llama_server_command(bin, model, port, args);
    let server = Server::start("llama-server", command, Vec::new(), port)?;
    let mut run = measure_launched(server, args, prompts).await?;
    // The server has stopped by now: llama-bench gets the cores to itself.
    match llama_bench(bin, model, args.threads).await {
        Ok(bench) => run.llama_bench = bench,
        Err(e) => eprintln!("llama-bench: {e:#}"),
    }
    Ok(run)
}

fn strata_label(layout: &str) -> String {
    match layout {
        "one" => "strata".to_string(),
        _ => format!("strata {layout}"),
    }
}

/// `URL=LABEL` or `URL`; a trailing `/v1` (an OpenAI client's base URL) is dropped.
fn url_and_label(spec: &str) -> (String, String) {
    let (url, label) = match spec.rsplit_once('=') {
        Some((url, label)) if !label.contains('/') => (url, label),
        _ => (spec, spec.split("://").last().unwrap_or(spec)),
    };
    let base = url.trim_end_matches('/').trim_end_matches("/v1");
    (base.to_string(), label.trim_end_matches('/').to_string())
}

/// Measures the --url servers, or launches and measures strata and llama-server.
/// A target that fails is reported and skipped.
async fn measure_all(args: &Args, prompts: &Prompts) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    let mut keep = |label: &str, run: Result<Run>| match run {
        Ok(run) => {
            report::print_run(&run);
            runs.push(run);
        }
        Err(e) => eprintln!("{label}: {e:#}"),
    };
    if !args.urls.is_empty() {
        let client = http_client()?;
        for spec in &args.urls {
            let (base, label) = url_and_label(spec);
            let run = async {
                wait_ready(&client, &base, || Ok(())).await?;
                measure(&client, &base, &label, args, prompts).await
            };
            keep(&label, run.await);
        }
        return Ok(runs);
    }
    let model = shared::model_or_demo(&args.strata, args.model.as_deref())?;
    println!("model {model}, {} threads per server", args.threads);
    for layout in args
        .layouts
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let run = bench_strata(layout, &model, args, prompts).await;
        keep(&strata_label(layout), run);
    }
    if let Some(bin) = &args.llama_server {
        let run = bench_llama_server(bin, &model, args, prompts).await;
        keep("llama-server", run);
    }
    Ok(runs)
}

async fn run(args: Args) -> Result<()> {
    let positive = args.concurrency.0.iter().all(|&c| c > 0);
    ensure!(positive, "--concurrency levels must be positive");
    ensure!(
        !args.plot_only || args.plot.is_some(),
        "--plot-only needs --plot"
    );
    let prompts = match &args.prompts {
        Some(path) => Prompts::from_jsonl(path)?,
        None => Prompts::Random {
            tokens: args.input_len,
        },
    };
    let mut runs = Vec::new();
    if !args.plot_only {
        runs = measure_all(&args, &prompts).await?;
        report::print_ratios(&runs);
        if let Some(path) = &args.out {
            report::write_json(path, &runs)?;
            println!("wrote {path}");
        }
    }
    if let Some(path) = &args.plot {
        report::load_compare(&args.compare, &mut runs)?;
        report::plot(path, &runs)?;
        println!("wrote {path}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // On Ctrl-C the run is dropped, and with it the launched servers (Server::drop).
    tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}
