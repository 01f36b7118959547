//! What structured outputs cost: N concurrent chat streams with a JSON
//! schema against the same N without one, on one strata server. Prints the
//! aggregate tok/s of each, their ratio, and the leader's mask time per
//! token (from `/metrics`).
//!
//! ```sh
//! cargo run --release -p strata-benches --bin structured-bench -- --strata target/release/strata
//! ```

mod shared;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use futures::future::join_all;
use serde_json::{json, Value};

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "target/release/strata")]
    strata: String,
    /// The model to serve (default: strata's demo model).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 16)]
    streams: usize,
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Rounds of each kind, alternating (the best of each is kept).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A schema whose output runs past `--tokens`: many short strings.
fn schema() -> Value {
    json!({"type": "object", "properties": {"items": {"type": "array",
        "items": {"type": "string", "maxLength": 24}, "minItems": 200}},
        "required": ["items"], "additionalProperties": false})
}

/// Completion tokens of `n` concurrent requests, and the wall time.
async fn round(
    client: &reqwest::Client,
    base: &str,
    args: &Args,
    constrained: bool,
) -> Result<(usize, f64)> {
    let start = Instant::now();
    let reqs = (0..args.streams).map(|i| {
        let mut body = json!({"messages": [{"role": "user", "content": format!("List {} things you like, as JSON.", 20 + i)}],
            "max_tokens": args.tokens, "temperature": 0.7, "seed": i, "ignore_eos": true});
        if constrained {
            body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "list", "schema": schema()}});
        }
        let url = format!("{base}/v1/chat/completions");
        async move {
            let v: Value = client.post(url).json(&body).send().await?.json().await?;
            match v["usage"]["completion_tokens"].as_u64() {
                Some(n) => Ok(n as usize),
                None => bail!("no usage in {v}"),
            }
        }
    });
    let tokens: usize = join_all(reqs).await.into_iter().sum::<Result<usize>>()?;
    Ok((tokens, start.elapsed().as_secs_f64()))
}

async fn metric(client: &reqwest::Client, base: &str, name: &str) -> Result<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{name} is not in /metrics"))
}

/// The server's mask count and mask seconds so far.
async fn mask_counters(client: &reqwest::Client, base: &str) -> Result<(f64, f64)> {
    Ok((
        metric(client, base, "strata_structured_output_masks_total").await?,
        metric(client, base, "strata_structured_output_mask_seconds_total").await?,
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let model = shared::model_or_demo(&args.strata, args.model.as_deref())?;
    let port = shared::free_port();
    let _server = Server(
        Command::new(&args.strata)
            .args(["serve", "--model", &model, "--port", &port.to_string()])
            .args([
                "--threads",
                &args.threads.to_string(),
                "--served-model-name",
                "demo",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !client
        .get(format!("{base}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("the server did not come up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Warm up both paths (the first constrained request indexes the vocabulary).
    round(
        &client,
        &base,
        &Args {
            streams: 2,
            tokens: 8,
            ..args.clone()
        },
        true,
    )
    .await?;
    round(
        &client,
        &base,
        &Args {
            streams: 2,
            tokens: 8,
            ..args.clone()
        },
        false,
    )
    .await?;
    let (mut free, mut guided) = (0f64, 0f64);
    let (mut masks, mut mask_s) = (0.0, 0.0);
    for _ in 0..args.rounds {
        let (t, s) = round(&client, &base, &args, false).await?;
        free = free.max(t as f64 / s);
        let (m0, s0) = mask_counters(&client, &base).await?;
        let (t, s) = round(&client, &base, &args, true).await?;
        guided = guided.max(t as f64 / s);
        let (m1, s1) = mask_counters(&client, &base).await?;
        masks += m1 - m0;
        mask_s += s1 - s0;
    }
    println!(
        "{} streams x {} tokens, {} threads, best of {} rounds:",
        args.streams, args.tokens, args.threads, args.rounds
    );
    println!("  without a schema: {free:.1} tok/s");
    println!("  with a JSON schema: {guided:.1} tok/s");
    println!("  ratio: {:.3}", guided / free);
    println!(
        "  mask time: {:.1} us per token ({masks} masks)",
        mask_s / masks.max(1.0) * 1e6
    );
    Ok(())
}
