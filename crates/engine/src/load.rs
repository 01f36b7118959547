//! From a path on disk to a running engine: weights, config, tokenizer,
//! generation defaults, KV cache sizing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde_json::Value as Json;
use strata_model::{DeviceRequest, Placement, WeightFormat, Weights};
use strata_sched::SpeculativeConfig;
use strata_types::plan::{check_layout, Footprint, Machines};
use strata_types::{ClusterLayout, ModelConfig, TokenId, BLOCK_SIZE};
use strata_worker::{DraftSpec, KvBudget, LoadSpec, NodeConfig, NodeRuntime, StartSpec};

use crate::cluster::{Cluster, ClusterOptions, NodeSetup};
use crate::engine::{start_engine, EngineConfig, EngineHandle};
use crate::error::{EngineError, Result};
use crate::executor::PipelineExecutor;
use crate::tokenizer::{read_json, Tokenizer};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A Hugging Face folder or a `.gguf` file.
    pub model: PathBuf,
    /// `None`: the model's own limit, capped by what the KV cache holds.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Bytes for the KV cache (each node's, for its own layers).
    pub kv_cache_bytes: u64,
    /// On a GPU, size the KV cache by vLLM's `--gpu-memory-utilization`
    /// instead of `kv_cache_bytes` (ignored on the CPU).
    pub gpu_memory_utilization: Option<f64>,
    /// `--device`: where this process computes.
    pub device: DeviceRequest,
    /// `--dtype`: `None` for the device's default (f32 on CPU, bf16 on GPU).
    pub dtype: Option<DType>,
    /// `--kv-cache-dtype`: `None` for `auto` (see [`kv_cache_dtype`]).
    pub kv_cache_dtype: Option<DType>,
    pub enable_prefix_caching: bool,
    pub max_pending_requests: usize,
    /// Pipeline stages to cut the model into.
    pub pipeline_parallel_size: usize,
    /// Tensor-parallel ranks per stage.
    pub tensor_parallel_size: usize,
    /// How long requests wait for a lost node before they end with an error.
    pub recovery_timeout: Duration,
    /// `None`: every stage runs in this process. Otherwise this process is
    /// the leader (node 0) of a cluster and the stages are spread over it.
    pub cluster: Option<ClusterOptions>,
    /// `--speculative-config`: draft tokens for decodes, verified in one pass.
    pub speculative: Option<SpeculativeConfig>,
}

/// Sampling defaults from `generation_config.json`, used when a request
/// leaves a field out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// What was loaded, for the server and the logs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub format: WeightFormat,
    pub config: ModelConfig,
    pub defaults: GenerationDefaults,
    pub max_model_len: usize,
    pub num_blocks: usize,
    pub weight_bytes: u64,
}

/// Loads the model and starts the engine thread.
pub fn load_engine(opts: &LoadOptions) -> Result<(EngineHandle, ModelInfo)> {
    let started = Instant::now();
    if opts.max_num_seqs == 0 || opts.max_num_batched_tokens == 0 || opts.max_pending_requests == 0
    {
        return Err(EngineError::Model(
            "max_num_seqs, max_num_batched_tokens and max_pending_requests must be at least 1"
                .into(),
        ));
    }
    let path = &opts.model;
    if !path.exists() {
        return Err(EngineError::Model(format!(
            "model path {} does not exist",
            path.display()
        )));
    }
    let weights = Weights::open(path, &Device::Cpu)?;
    let arch = weights.architecture()?;
    let config = arch.config().clone();
    let (tokenizer, defaults) = match weights.gguf_metadata() {
        Some(md) => (Tokenizer::from_gguf(md)?, GenerationDefaults::default()),
        None => {
            let dir = weights.folder();
            let raw = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
            let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
            let mut eos = token_ids(&raw["eos_token_id"]);
            eos.extend(token_ids(&gen["eos_token_id"]));
            (Tokenizer::from_hf_dir(dir, &eos)?, defaults_from(&gen))
        }
    };
    if tokenizer.vocab_size() > config.vocab_size {
        tracing::warn!(
            "the tokenizer has {} tokens but the model only {}",
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    let (pp, tp) = (opts.pipeline_parallel_size, opts.tensor_parallel_size);
    let nnodes = opts.cluster.as_ref().map_or(1, |c| c.nnodes);
    let layout = ClusterLayout::new(
        nnodes,
        pp,
        tp,
        config.num_layers,
        config.head_cost_in_layers,
    )
    .map_err(EngineError::Model)?;
    config
        .check_tensor_parallel(tp)
        .map_err(EngineError::Model)?;
    tracing::info!(
        "loading {} ({:?}, {}): {} layers, hidden {}, {} heads, KV {:?}, vocab {}",
        path.display(),
        weights.format(),
        config.architecture,
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.kv,
        config.vocab_size
    );
    // Progress over what this node loads: each layer of each local rank.
    let slots = &layout.nodes[0].slots;
    let local_ranks: usize = slots.iter().map(|s| s.tp_rank_count).sum();
    let placement = Placement::resolve(opts.device, opts.dtype, local_ranks)?;
    tracing::info!("computing on {}", placement.describe());
    let kv_dtype = kv_cache_dtype(opts.kv_cache_dtype, &placement)?;
    if local_ranks <= placement.devices().len() {
        // (Ranks that share a GPU are sized after loading, by what is left.)
        check_fits(opts, &placement, &weights, &config, nnodes)?;
    }
    let budget = match opts.gpu_memory_utilization {
        Some(fraction) if !placement.is_cpu() => KvBudget::DeviceFraction {
            fraction,
            max_batch_tokens: opts.max_num_batched_tokens,
        },
        _ => KvBudget::Bytes(opts.kv_cache_bytes),
    };
    let draft = draft_spec(opts.speculative.as_ref(), config.vocab_size)?;
    // A byte budget is checked before loading, so a bad one fails fast:
    // every node gets the same budget for its own layers, and the engine
    // schedules over the fewest blocks any node holds.
    let dtype_bytes = kv_dtype.size_in_bytes();
    let bytes_per_block = layout
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let draft_bytes = match &draft {
                Some((_, c)) if i == layout.result_node() => {
                    strata_model::KvCache::bytes_per_block(
                        c.num_layers,
                        c.kv.per_rank(1),
                        dtype_bytes,
                    )
                }
                _ => 0,
            };
            n.slots
                .iter()
                .map(|s| {
                    s.tp_rank_count
                        * strata_model::KvCache::bytes_per_block(
                            s.layers.len(),
                            config.kv.per_rank(tp),
                            dtype_bytes,
                        )
                })
                .sum::<usize>()
                + draft_bytes
        })
        .max()
        .expect("at least one node");
    let draft = draft.map(|(spec, _)| spec);
    if let KvBudget::Bytes(bytes) = budget {
        let capacity = (bytes / bytes_per_block as u64) as usize * BLOCK_SIZE;
        check_max_model_len(opts.max_model_len, capacity, bytes_per_block, bytes)?;
    }
    // The rope tables cover the longest sequence this run may allow.
    let rope_len = match budget {
        KvBudget::Bytes(bytes) => {
            let capacity = (bytes / bytes_per_block as u64) as usize * BLOCK_SIZE;
            opts.max_model_len
                .unwrap_or(config.max_position_embeddings.min(capacity))
        }
        KvBudget::DeviceFraction { .. } => {
            opts.max_model_len.unwrap_or(config.max_position_embeddings)
        }
    };
    let weights = Arc::new(weights);
    let (executor, num_blocks) = match &opts.cluster {
        None => {
            let local = NodeRuntime::spawn(NodeConfig {
                rank: 0,
                weights: weights.clone(),
                model: arch.clone(),
                device: opts.device,
                token: String::new(),
                timeout: Duration::from_secs(60),
                data: None,
                comm: None,
            });
            let spec = LoadSpec {
                slots: layout.nodes[0].slots.clone(),
                budget,
                max_model_len: rope_len,
                dtype: placement.dtype(),
                kv_dtype,
                nccl_id: None,
                draft,
            };
            let num_blocks = local
                .load(spec)
                .wait_blocking()
                .map_err(|e| EngineError::Model(e.to_string()))?
                .num_blocks;
            check_max_model_len(
                opts.max_model_len,
                num_blocks * BLOCK_SIZE,
                bytes_per_block,
                (num_blocks * bytes_per_block) as u64,
            )?;
            let run = local
                .start(StartSpec {
                    num_blocks,
                    next: None,
                    has_previous: false,
                    ring: Vec::new(),
                })
                .wait_blocking()
                .map_err(|e| EngineError::Model(e.to_string()))?;
            (PipelineExecutor::local(local, run), num_blocks)
        }
        Some(cluster) => {
            let (cluster, local, remotes, run) = Cluster::form(
                cluster,
                &layout,
                weights.clone(),
                NodeSetup {
                    budget,
                    placement: &placement,
                    kv_dtype,
                    device: opts.device,
                    max_model_len: rope_len,
                    draft,
                },
            )?;
            let num_blocks = cluster.num_blocks();
            check_max_model_len(
                opts.max_model_len,
                num_blocks * BLOCK_SIZE,
                bytes_per_block,
                (num_blocks * bytes_per_block) as u64,
            )?;
            (
                PipelineExecutor::cluster(
                    cluster,
                    local,
                    remotes,
                    run,
                    layout.result_node(),
                    layout.pipeline_depth(),
                ),
                num_blocks,
            )
        }
    };
    let capacity = num_blocks * BLOCK_SIZE;
    let max_model_len = match opts.max_model_len {
        Some(n) => n,
        None if config.max_position_embeddings > capacity => {
            tracing::warn!(
                "the KV cache holds {capacity} tokens, less than the model's context of {}; \
                 serving with --max-model-len {capacity} (give the cache more memory for more)",
                config.max_position_embeddings
            );
            capacity
        }
        None => config.max_position_embeddings,
    };
    let weight_bytes = weights.bytes_read();
    tracing::info!(
        "model loaded in {:.1}s ({:.1} MiB of weights); KV cache: {num_blocks} blocks of {BLOCK_SIZE} tokens \
         = {capacity} tokens ({:.1} MiB on the largest node); max model length {max_model_len}",
        started.elapsed().as_secs_f32(),
        weight_bytes as f64 / (1 << 20) as f64,
        (num_blocks * bytes_per_block) as f64 / (1 << 20) as f64
    );
    let engine_cfg = EngineConfig {
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        max_model_len,
        num_blocks,
        enable_prefix_caching: opts.enable_prefix_caching,
        max_pending_requests: opts.max_pending_requests,
        recovery_timeout: opts.recovery_timeout,
        speculative: opts.speculative.clone(),
    };
    let handle = start_engine(
        engine_cfg,
        Box::new(executor),
        Arc::new(tokenizer),
        config.vocab_size,
    );
    Ok((
        handle,
        ModelInfo {
            path: path.clone(),
            format: weights.format(),
            config,
            defaults,
            max_model_len,
            num_blocks,
            weight_bytes,
        },
    ))
}

/// The draft model to load, and its config, when `--speculative-config`
/// names one: it must exist and share the model's vocabulary.
fn draft_spec(
    spec: Option<&SpeculativeConfig>,
    vocab_size: usize,
) -> Result<Option<(DraftSpec, ModelConfig)>> {
    let Some((c, path)) = spec.and_then(|c| Some((c, c.draft_model()?))) else {
        return Ok(None);
    };
    let bad = |why: String| {
        EngineError::Model(format!(
            "--speculative-config: draft model {}: {why}",
            path.display()
        ))
    };
    if !path.exists() {
        return Err(bad("does not exist".into()));
    }
    let weights = Weights::open(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let config = weights
        .architecture()
        .map_err(|e| bad(e.to_string()))?
        .config()
        .clone();
    if config.vocab_size != vocab_size {
        return Err(bad(format!(
            "its vocabulary has {} tokens, the model's {vocab_size}; a draft model must \
             share the model's tokenizer",
            config.vocab_size
        )));
    }
    tracing::info!(
        "speculative decoding: {} drafts a step from {} ({} layers, hidden {})",
        c.num_speculative_tokens,
        path.display(),
        config.num_layers,
        config.hidden_size
    );
    let spec = DraftSpec {
        model: path.clone(),
        num_speculative_tokens: c.num_speculative_tokens,
        disable_by_batch_size: c.disable_by_batch_size,
    };
    Ok(Some((spec, config)))
}

/// On GPUs, the arithmetic of `strata plan` with this run's layout, before
/// anything is loaded: refuses, saying what is short, when the weights, the
/// activation reserve and one sequence's KV cannot fit.
fn check_fits(
    opts: &LoadOptions,
    placement: &Placement,
    weights: &Weights,
    config: &ModelConfig,
    nnodes: usize,
) -> Result<()> {
    let (Some(fraction), Some((_, total))) = (opts.gpu_memory_utilization, placement.memory(0)?)
    else {
        return Ok(());
    };
    let dtype_bytes = placement.dtype().size_in_bytes();
    let footprint = Footprint::from_config(
        &opts.model.display().to_string(),
        config,
        weights.dense_bytes(dtype_bytes),
        strata_model::dtype_name(placement.dtype()),
        dtype_bytes,
    );
    let machines = Machines {
        nodes: nnodes,
        gpus_per_node: placement.devices().len(),
        gpu_memory: total,
        utilization: fraction,
        max_batch_tokens: opts.max_num_batched_tokens,
    };
    // Without --max-model-len the context is capped by the cache, so one
    // step's worth of tokens must fit.
    let need = opts.max_model_len.unwrap_or(
        config
            .max_position_embeddings
            .min(opts.max_num_batched_tokens),
    );
    check_layout(
        &footprint,
        &machines,
        opts.tensor_parallel_size,
        opts.pipeline_parallel_size,
        need,
    )
    .map(|_| ())
    .map_err(EngineError::Model)
}

/// What the KV cache holds. `auto` (`None`) is bf16 on the CPU, where
/// decode attention is bound by the bytes it reads (llama.cpp keeps f16
/// there), and the activation dtype on a GPU, whose kernels read that.
/// fp8 (e4m3) is the CPU's alone: the GPU kernels read the activation dtype.
fn kv_cache_dtype(requested: Option<DType>, placement: &Placement) -> Result<DType> {
    let bad = |msg: String| Err(EngineError::Model(format!("--kv-cache-dtype: {msg}")));
    match requested {
        None if placement.is_cpu() => Ok(DType::BF16),
        None => Ok(placement.dtype()),
        Some(d @ (DType::F32 | DType::BF16 | DType::F8E4M3)) if placement.is_cpu() => Ok(d),
        Some(d) if placement.is_cpu() => bad(format!(
            "{} is not kept on the CPU: use bfloat16, float32 or fp8",
            strata_model::dtype_name(d)
        )),
        Some(DType::F8E4M3) => bad(format!(
            "fp8 caches are kept on the CPU only; on a GPU the cache is kept in the \
             activation dtype ({})",
            strata_model::dtype_name(placement.dtype())
        )),
        Some(d) if d == placement.dtype() => Ok(d),
        Some(d) => bad(format!(
            "on a GPU the cache is kept in the activation dtype ({}), not {}",
            strata_model::dtype_name(placement.dtype()),
            strata_model::dtype_name(d)
        )),
    }
}

/// Refuses a `--max-model-len` the KV cache cannot hold, and a cache that
/// holds no block.
fn check_max_model_len(
    max_model_len: Option<usize>,
    capacity: usize,
    bytes_per_block: usize,
    cache_bytes: u64,
) -> Result<()> {
    if capacity == 0 {
        return Err(EngineError::Model(format!(
            "the KV cache budget of {cache_bytes} bytes holds no block ({bytes_per_block} bytes each); \
             give it more with --kv-cache-memory or --gpu-memory-utilization"
        )));
    }
    match max_model_len {
        Some(n) if n > capacity => Err(EngineError::Model(format!(
            "--max-model-len {n} needs {} bytes of KV cache but the budget gives {cache_bytes} ({capacity} tokens)",
            n.div_ceil(BLOCK_SIZE) * bytes_per_block,
        ))),
        _ => Ok(()),
    }
}

fn token_ids(v: &Json) -> Vec<TokenId> {
    match v {
        Json::Number(n) => n.as_u64().map(|x| vec![x as TokenId]).unwrap_or_default(),
        Json::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as TokenId))
            .collect(),
        _ => Vec::new(),
    }
}

fn defaults_from(gen: &Json) -> GenerationDefaults {
    let f = |k: &str| gen[k].as_f64().map(|x| x as f32);
    GenerationDefaults {
        temperature: f("temperature"),
        top_p: f("top_p"),
        top_k: gen["top_k"].as_u64().map(|x| x as usize),
        min_p: f("min_p"),
        repetition_penalty: f("repetition_penalty"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_model::DeviceRequest;

    #[test]
    fn the_kv_cache_is_bf16_on_the_cpu_unless_asked_otherwise() {
        let cpu = Placement::resolve(DeviceRequest::Cpu, None, 1).unwrap();
        assert_eq!(kv_cache_dtype(None, &cpu).unwrap(), DType::BF16);
        assert_eq!(kv_cache_dtype(Some(DType::F32), &cpu).unwrap(), DType::F32);
        assert_eq!(
            kv_cache_dtype(Some(DType::BF16), &cpu).unwrap(),
            DType::BF16
        );
        assert_eq!(
            kv_cache_dtype(Some(DType::F8E4M3), &cpu).unwrap(),
            DType::F8E4M3
        );
        let err = kv_cache_dtype(Some(DType::F16), &cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("use bfloat16, float32 or fp8"), "{err}");
    }
}
