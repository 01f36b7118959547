//! Will a model fit, and how should it be laid out? `strata plan` prints the
//! answer and `strata serve` refuses early with the same words.
//!
//! The layout is vLLM's and KAITO's: tensor parallelism over a node's GPUs,
//! one pipeline stage per node. Per GPU, the budget is `utilization ×
//! memory`; out of it come the GPU's share of the weights, a reserve for
//! one step's activations and the CUDA libraries, and the KV cache, which
//! must hold at least one sequence of `max_model_len` tokens. The fewest
//! nodes that satisfy this are used (KAITO's rule: fewer than given when the
//! model fits).
//!
//! [`kaito_nodes`] is KAITO's own estimator (its nodesestimator), kept to
//! compare with: it pads the weights by 2%, adds 2.3 GiB and 5% per GPU, and
//! reserves KV for `max_model_len` tokens spread over one node's GPUs.

use crate::{ModelConfig, BLOCK_SIZE};

pub const GIB: f64 = (1u64 << 30) as f64;

/// What the arithmetic needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    pub name: String,
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    /// KV heads; `None` for MLA (one latent per token, not split by TP).
    pub num_kv_heads: Option<usize>,
    pub vocab_size: usize,
    /// Bytes of weights as served.
    pub weight_bytes: u64,
    /// Bytes of KV cache one token takes over all layers.
    pub kv_bytes_per_token: u64,
    pub max_context: usize,
    /// The weights' dtype, for the report (`bf16`, `fp8`, `q4_1`, ...).
    pub dtype: String,
}

impl Footprint {
    /// A model from its config, its weight bytes and the KV dtype's size.
    pub fn from_config(
        name: &str,
        cfg: &ModelConfig,
        weight_bytes: u64,
        dtype: &str,
        kv_dtype_bytes: usize,
    ) -> Self {
        Self {
            name: name.into(),
            architecture: cfg.architecture.clone(),
            num_layers: cfg.num_layers,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.kv.num_kv_heads(),
            vocab_size: cfg.vocab_size,
            weight_bytes,
            kv_bytes_per_token: cfg.kv_bytes_per_token(cfg.num_layers, kv_dtype_bytes) as u64,
            max_context: cfg.max_position_embeddings,
            dtype: dtype.into(),
        }
    }

    /// The tensor-parallel size on a node of `gpus`: all of them, or the
    /// largest count that divides the KV heads.
    pub fn tensor_parallel(&self, gpus: usize) -> usize {
        match self.num_kv_heads {
            None => gpus.max(1),
            Some(h) => (1..=gpus.max(1)).rev().find(|t| h % t == 0).unwrap_or(1),
        }
    }

    /// Device memory one step's activations, the logits and the CUDA
    /// libraries' workspaces take on one GPU (as `Llama::activation_bytes`
    /// reserves when sizing the cache).
    pub fn reserve_bytes(&self, tp: usize, max_batch_tokens: usize) -> u64 {
        let per_token = 6 * self.hidden_size + 3 * self.intermediate_size / tp.max(1);
        let activations = 2 * max_batch_tokens * per_token * 2;
        let logits = 256 * self.vocab_size * 6;
        (activations + logits) as u64 + (1 << 30)
    }
}

/// The presets: KAITO's large models (its catalogue's figures) and the demo.
pub fn presets() -> Vec<Footprint> {
    let gib = |g: f64| (g * GIB) as u64;
    vec![
        Footprint {
            name: "llama-3.3-70b-instruct".into(),
            architecture: "LlamaForCausalLM".into(),
            num_layers: 80,
            hidden_size: 8192,
            intermediate_size: 28672,
            num_heads: 64,
            num_kv_heads: Some(8),
            vocab_size: 128256,
            weight_bytes: gib(131.42),
            kv_bytes_per_token: 327_680,
            max_context: 131_072,
            dtype: "bf16".into(),
        },
        deepseek("deepseek-r1-0528"),
        deepseek("deepseek-v3-0324"),
        Footprint {
            name: "smollm2-135m-instruct".into(),
            architecture: "LlamaForCausalLM".into(),
            num_layers: 30,
            hidden_size: 576,
            intermediate_size: 1536,
            num_heads: 9,
            num_kv_heads: Some(3),
            vocab_size: 49152,
            // bf16 safetensors; the demo's Q4_1 GGUF is smaller still.
            weight_bytes: 269_060_381,
            kv_bytes_per_token: 2 * 30 * 3 * 64 * 2,
            max_context: 8192,
            dtype: "bf16".into(),
        },
    ]
}

/// DeepSeek-V3 architecture (R1 and V3 share it): MLA keeps a 512 + 64
/// element latent per token and layer, 2 bytes each.
fn deepseek(name: &str) -> Footprint {
    Footprint {
        name: name.into(),
        architecture: "DeepseekV3ForCausalLM".into(),
        num_layers: 61,
        hidden_size: 7168,
        intermediate_size: 18432,
        num_heads: 128,
        num_kv_heads: None,
        vocab_size: 129280,
        weight_bytes: (641.30 * GIB) as u64,
        kv_bytes_per_token: 2 * (512 + 64) * 61,
        max_context: 163_840,
        dtype: "fp8".into(),
    }
}

/// A preset by name (case-insensitive; a Hugging Face id's last part works).
pub fn preset(name: &str) -> Option<Footprint> {
    let key = name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase();
    presets().into_iter().find(|p| p.name == key)
}

/// The machines on offer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Machines {
    pub nodes: usize,
    pub gpus_per_node: usize,
    /// Bytes of memory per GPU.
    pub gpu_memory: u64,
    /// `--gpu-memory-utilization`.
    pub utilization: f64,
    /// `--max-num-batched-tokens`, for the activation reserve.
    pub max_batch_tokens: usize,
}

/// A layout that fits.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub tensor_parallel: usize,
    pub pipeline_parallel: usize,
    pub nodes_needed: usize,
    pub weight_bytes_per_gpu: u64,
    pub reserve_bytes_per_gpu: u64,
    pub kv_bytes_per_gpu: u64,
    /// Tokens the KV cache holds (whole blocks).
    pub kv_tokens: usize,
    pub max_model_len: usize,
    /// Sequences of `max_model_len` tokens that fit at once.
    pub max_full_sequences: usize,
}

/// What one GPU holds with `pp` stages of `tp` ranks, each on its own GPU:
/// `(weights, reserve, KV budget, KV tokens)`.
fn per_gpu(m: &Footprint, k: &Machines, tp: usize, pp: usize) -> (u64, u64, i64, usize) {
    let weights = m.weight_bytes.div_ceil((tp * pp) as u64);
    let reserve = m.reserve_bytes(tp, k.max_batch_tokens);
    let budget = (k.utilization * k.gpu_memory as f64) as i64;
    let kv = budget - weights as i64 - reserve as i64;
    let tokens = if kv > 0 {
        (kv as f64 / kv_per_token(m, tp, pp)) as usize / BLOCK_SIZE * BLOCK_SIZE
    } else {
        0
    };
    (weights, reserve, kv, tokens)
}

/// KV bytes one token takes on one GPU: layers split by stages, heads by
/// TP ranks (an MLA latent is not split by TP).
fn kv_per_token(m: &Footprint, tp: usize, pp: usize) -> f64 {
    let split = if m.num_kv_heads.is_some() { tp } else { 1 };
    (m.kv_bytes_per_token as f64 / (pp * split) as f64).max(1.0)
}

/// Checks one layout: `pp` stages of `tp` ranks, a GPU each. The error says
/// what is short per GPU and by how much.
pub fn check_layout(
    m: &Footprint,
    k: &Machines,
    tp: usize,
    pp: usize,
    max_model_len: usize,
) -> Result<Plan, String> {
    if k.gpus_per_node == 0 || k.gpu_memory == 0 || tp == 0 || pp == 0 {
        return Err("a plan needs at least one GPU with some memory".into());
    }
    if !(k.utilization > 0.0 && k.utilization <= 1.0) {
        return Err(format!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            k.utilization
        ));
    }
    let (weights, reserve, kv, tokens) = per_gpu(m, k, tp, pp);
    if tokens >= max_model_len {
        return Ok(Plan {
            tensor_parallel: tp,
            pipeline_parallel: pp,
            nodes_needed: (tp * pp).div_ceil(k.gpus_per_node),
            weight_bytes_per_gpu: weights,
            reserve_bytes_per_gpu: reserve,
            kv_bytes_per_gpu: kv as u64,
            kv_tokens: tokens,
            max_model_len,
            max_full_sequences: tokens / max_model_len,
        });
    }
    let kv_needed = (max_model_len as f64 * kv_per_token(m, tp, pp)) as i64;
    let budget = k.utilization * k.gpu_memory as f64;
    Err(format!(
        "{} does not fit: per GPU (TP={tp}, PP={pp}, {:.0} GiB each) it needs {:.1} GiB of weights, \
         {:.1} GiB of activation reserve and {:.1} GiB of KV cache for one {max_model_len}-token sequence, \
         but --gpu-memory-utilization {} gives {:.1} GiB: {:.1} GiB short per GPU",
        m.name,
        k.gpu_memory as f64 / GIB,
        weights as f64 / GIB,
        reserve as f64 / GIB,
        kv_needed as f64 / GIB,
        k.utilization,
        budget / GIB,
        (kv_needed - kv) as f64 / GIB,
    ))
}

/// Lays `m` out on `k` with one stage per node and TP over each node's GPUs,
/// on as few nodes as fit; or says what is short and how many nodes would do.
pub fn plan(m: &Footprint, k: &Machines, max_model_len: Option<usize>) -> Result<Plan, String> {
    let max_model_len = max_model_len.unwrap_or(m.max_context);
    if k.nodes == 0 {
        return Err("a plan needs at least one node".into());
    }
    let tp = m.tensor_parallel(k.gpus_per_node);
    let max_nodes = k.nodes.min(m.num_layers);
    let mut last = Err(String::new());
    for nodes in 1..=max_nodes {
        last = check_layout(m, k, tp, nodes, max_model_len);
        if let Ok(mut p) = last {
            p.nodes_needed = nodes;
            return Ok(p);
        }
    }
    let enough =
        (max_nodes + 1..=m.num_layers).find(|&n| check_layout(m, k, tp, n, max_model_len).is_ok());
    Err(format!(
        "{} on {} node(s) of {} GPUs; {}",
        last.unwrap_err(),
        k.nodes,
        k.gpus_per_node,
        match enough {
            Some(n) => format!("{n} nodes would do"),
            None => "no number of such nodes would (lower --max-model-len)".into(),
        }
    ))
}

/// KAITO's node-count estimator (pkg/workspace/estimator/nodesestimator):
/// weights × 1.02 over GPUs each offering `0.84 × memory − 2.3 GiB − KV for
/// max_model_len over the node's GPUs`, divided by 1.05.
pub fn kaito_nodes(
    m: &Footprint,
    gpus_per_node: usize,
    gpu_memory: u64,
    max_model_len: usize,
) -> Result<usize, String> {
    let model = m.weight_bytes as f64 * 1.02;
    let avail = gpu_memory as f64 * 0.84;
    let kv = (max_model_len as f64 * m.kv_bytes_per_token as f64) / gpus_per_node as f64;
    let fixed = 2.3 * GIB + kv;
    if avail <= fixed {
        return Err("each GPU's memory is taken by the fixed reserve".into());
    }
    let per_gpu = (avail - fixed) / 1.05;
    let gpus = (model / per_gpu) as usize + 1;
    Ok(gpus.div_ceil(gpus_per_node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize, gpus: usize, gib: f64, util: f64) -> Machines {
        Machines {
            nodes: n,
            gpus_per_node: gpus,
            gpu_memory: (gib * GIB) as u64,
            utilization: util,
            max_batch_tokens: 2048,
        }
    }

    #[test]
    fn kaitos_estimator_answers_its_worked_cases() {
        let llama = preset("meta-llama/Llama-3.3-70B-Instruct").unwrap();
        assert_eq!(kaito_nodes(&llama, 2, 80 << 30, 2048), Ok(2));
        let r1 = preset("deepseek-r1-0528").unwrap();
        assert_eq!(kaito_nodes(&r1, 2, 94 << 30, 2048), Ok(5));
    }

    #[test]
    fn llama_70b_on_two_a100_nodes_needs_both() {
        let llama = preset("llama-3.3-70b-instruct").unwrap();
        // The model's whole context (strata's default): one node's two GPUs
        // hold the weights (65.7 GiB each) but not a 131072-token sequence.
        let p = plan(&llama, &nodes(2, 2, 80.0, 0.9), None).unwrap();
        assert_eq!(
            (p.tensor_parallel, p.pipeline_parallel, p.nodes_needed),
            (2, 2, 2)
        );
        assert!(p.max_full_sequences >= 1 && p.kv_tokens >= 131_072);
        // Under KAITO, which passes --gpu-memory-utilization=0.84, even a
        // 2048-token context needs the second node, as KAITO says.
        let p = plan(&llama, &nodes(2, 2, 80.0, 0.84), Some(2048)).unwrap();
        assert_eq!(p.nodes_needed, 2);
        // With 0.9 and 2048 tokens strata fits it on one node, where KAITO's
        // 2% padding and 5% per-GPU overhead ask for two.
        let p = plan(&llama, &nodes(2, 2, 80.0, 0.9), Some(2048)).unwrap();
        assert_eq!(p.nodes_needed, 1);
        // Given three nodes, it still uses two.
        assert_eq!(
            plan(&llama, &nodes(3, 2, 80.0, 0.9), None)
                .unwrap()
                .nodes_needed,
            2
        );
    }

    #[test]
    fn deepseek_r1_on_h100_nodes_needs_five_under_kaitos_utilization() {
        let r1 = preset("deepseek-r1-0528").unwrap();
        // KAITO passes 0.84: 4 nodes would put 80.2 GiB of weights on a GPU
        // offering 79.0, so 5, as KAITO's estimator says.
        let p = plan(&r1, &nodes(6, 2, 94.0, 0.84), None).unwrap();
        assert_eq!((p.tensor_parallel, p.nodes_needed), (2, 5));
        // MLA: the latent is split by stages, not by TP ranks.
        let per_token = r1.kv_bytes_per_token as f64 / 5.0;
        assert_eq!(
            p.kv_tokens,
            (p.kv_bytes_per_gpu as f64 / per_token) as usize / 16 * 16
        );
        let err = plan(&r1, &nodes(4, 2, 94.0, 0.84), None).unwrap_err();
        assert!(
            err.contains("short per GPU") && err.contains("5 nodes would do"),
            "{err}"
        );
        // At strata's default 0.9, 4 nodes hold the weights, the reserve and
        // a whole 163840-token sequence (2.7 GiB of KV per GPU), where
        // KAITO's 2% padding and 5% overhead ask for a fifth node.
        let p = plan(&r1, &nodes(6, 2, 94.0, 0.9), None).unwrap();
        assert_eq!(p.nodes_needed, 4);
        let err = plan(&r1, &nodes(1, 2, 94.0, 0.9), Some(2048)).unwrap_err();
        assert!(err.contains("4 nodes would do"), "{err}");
    }

    #[test]
    fn tp_divides_the_kv_heads_and_bad_machines_are_refused() {
        let demo = preset("SmolLM2-135M-Instruct").unwrap();
        assert_eq!(demo.tensor_parallel(8), 3);
        assert_eq!(demo.tensor_parallel(2), 1);
        let p = plan(&demo, &nodes(1, 1, 24.0, 0.9), None).unwrap();
        assert_eq!(p.nodes_needed, 1);
        assert_eq!(p.kv_tokens % BLOCK_SIZE, 0);
        assert!(plan(&demo, &nodes(0, 1, 24.0, 0.9), None).is_err());
        assert!(plan(&demo, &nodes(1, 1, 24.0, 1.5), None).is_err());
    }
}
