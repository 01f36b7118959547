//! `strata plan`: will a model fit on these machines, and how is it laid
//! out? The same arithmetic (`strata_types::plan`) runs before `strata
//! serve` loads anything on GPUs.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use strata_model::Weights;
use strata_types::plan::{self, Footprint, Machines, GIB};

#[derive(Args)]
pub struct PlanArgs {
    /// A preset (llama-3.3-70b-instruct, deepseek-r1-0528, deepseek-v3-0324,
    /// smollm2-135m-instruct) or a Hugging Face folder / GGUF file.
    #[arg(long)]
    model: String,
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    #[arg(long)]
    gpus_per_node: usize,
    /// Memory of one GPU, e.g. 80GiB.
    #[arg(long, value_parser = crate::parse_size)]
    gpu_memory: u64,
    /// Default: the model's context length.
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
}

/// A preset, or a checkpoint's footprint served in bf16 (FP8 as stored).
pub fn footprint(model: &str) -> Result<Footprint> {
    if let Some(p) = plan::preset(model) {
        return Ok(p);
    }
    let path = Path::new(model);
    if !path.exists() {
        let names: Vec<_> = plan::presets().into_iter().map(|p| p.name).collect();
        bail!(
            "`{model}` is neither a preset ({}) nor a model path",
            names.join(", ")
        );
    }
    let w = Weights::open(path, &Device::Cpu)?;
    let name = path
        .file_stem()
        .map_or(model.into(), |s| s.to_string_lossy().to_string());
    // FP8 weights are served as stored (a byte each, and their scales);
    // everything else in bf16.
    let dtype = if w.has_fp8() { "fp8" } else { "bf16" };
    Ok(Footprint::from_config(
        &name,
        w.architecture()?.config(),
        w.dense_bytes(2),
        dtype,
        2,
    ))
}

pub fn run(a: PlanArgs) -> Result<()> {
    let m = footprint(&a.model)?;
    let k = Machines {
        nodes: a.nodes,
        gpus_per_node: a.gpus_per_node,
        gpu_memory: a.gpu_memory,
        utilization: a.gpu_memory_utilization,
        max_batch_tokens: a.max_num_batched_tokens,
    };
    let gib = |b: u64| b as f64 / GIB;
    println!(
        "model: {} ({}, {} layers, hidden {}, {} heads / {}, {}, {:.1} GiB of weights, {} KV bytes per token)",
        m.name,
        m.architecture,
        m.num_layers,
        m.hidden_size,
        m.num_heads,
        m.num_kv_heads.map_or("MLA".into(), |h| format!("{h} KV heads")),
        m.dtype,
        gib(m.weight_bytes),
        m.kv_bytes_per_token
    );
    println!(
        "machines: {} node(s) × {} GPU(s) × {:.0} GiB, --gpu-memory-utilization {}",
        k.nodes,
        k.gpus_per_node,
        gib(k.gpu_memory),
        k.utilization
    );
    let kaito = plan::kaito_nodes(
        &m,
        k.gpus_per_node,
        k.gpu_memory,
        a.max_model_len.unwrap_or(2048),
    );
    let p = plan::plan(&m, &k, a.max_model_len).map_err(anyhow::Error::msg);
    if let Ok(p) = &p {
        println!(
            "layout: --tensor-parallel-size {} --pipeline-parallel-size {} on {} node(s){}",
            p.tensor_parallel,
            p.pipeline_parallel,
            p.nodes_needed,
            if p.nodes_needed < k.nodes {
                format!(" (of the {} given: the model fits on fewer)", k.nodes)
            } else {
                String::new()
            }
        );
        println!(
            "per GPU: weights {:.1} GiB, activation reserve {:.1} GiB, KV cache {:.1} GiB",
            gib(p.weight_bytes_per_gpu),
            gib(p.reserve_bytes_per_gpu),
            gib(p.kv_bytes_per_gpu)
        );
        println!(
            "KV cache: {} tokens; --max-model-len {}: {} sequence(s) of that length at once",
            p.kv_tokens, p.max_model_len, p.max_full_sequences
        );
    }
    match kaito {
        Ok(n) => println!(
            "KAITO's estimator: {n} node(s) (0.84 utilization, max-model-len {})",
            a.max_model_len.unwrap_or(2048)
        ),
        Err(e) => println!("KAITO's estimator: {e}"),
    }
    p.map(|_| ())
}
