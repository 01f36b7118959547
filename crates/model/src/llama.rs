//! The Llama family: Llama 2/3.x, SmolLM2, Mistral-style configs, and Qwen2
//! and Qwen3, which differ from Llama by a switch each (q/k/v biases; a
//! per-head RMSNorm on queries and keys).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde::Deserialize;
use strata_comm::Communicator;
use strata_types::{KvLayout, LayerRange, ModelConfig, RopeStyle};

use crate::arch::{Architecture, GgufMetadata, StageModel};
use crate::attention::{HeadAttention, Heads};
use crate::batch::Batch;
use crate::config::{gcd, GgufKeys, HfRopeFields};
use crate::decoder::{DecoderStage, Layer, StageSpec};
use crate::error::{Error, Result};
use crate::kv_cache::LayerCache;
use crate::layers::{ColumnParallelLinear, RmsNorm, RowParallelLinear};
use crate::mlp::{DenseMlp, Mlp, Routing, SparseMoe};
use crate::rope::{Rope, RopeConfig};
use crate::weights::Weights;

pub(crate) const HF_NAMES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
];
pub(crate) const GGUF_NAMES: &[&str] = &["llama", "qwen2", "qwen3"];

/// A Llama-family model's resolved config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's and Qwen3's `attention_bias`).
    pub o_bias: bool,
    /// A per-head RMSNorm on queries and keys before rope (Qwen3).
    pub qk_norm: bool,
    /// Sparse feed-forward layers (Qwen3-MoE).
    pub moe: Option<MoeConfig>,
    summary: ModelConfig,
}

/// Qwen3-MoE's experts and which layers have them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MoeConfig {
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Layers that keep a dense MLP.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Every `decoder_sparse_step`-th layer is sparse.
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
}

fn one() -> usize {
    1
}

impl MoeConfig {
    /// transformers' rule for which layers are sparse.
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }
}

/// `config.json` as Hugging Face writes it for this family.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(flatten)]
    rope: HfRopeFields,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    sliding_window: Option<usize>,
    /// Qwen2/Qwen3: the window applies only when this is set.
    use_sliding_window: Option<bool>,
}

/// `config.json`'s expert fields, when it has them.
#[derive(Debug, Deserialize)]
struct HfMoe {
    #[serde(flatten)]
    moe: Option<MoeConfig>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

pub(crate) fn from_hf(name: &str, text: &str) -> Result<Arc<dyn Architecture>> {
    let c: HfConfig =
        serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
    let moe = if name == "Qwen3MoeForCausalLM" {
        let m: HfMoe =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        Some(m.moe.ok_or_else(|| {
            Error::Config(format!(
                "{name} needs num_experts, num_experts_per_tok and moe_intermediate_size"
            ))
        })?)
    } else {
        None
    };
    let (theta, scaling) = c.rope.resolve()?;
    let head_dim = c
        .head_dim
        .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
    let qwen2 = name == "Qwen2ForCausalLM";
    let qwen3 = name == "Qwen3ForCausalLM";
    let mistral = name == "MistralForCausalLM";
    let mut max_pos = c.max_position_embeddings;
    // A sliding window strata does not apply: cap the context at it, where
    // full attention and the window agree.
    let windowed = match c.use_sliding_window {
        Some(used) => used,
        None => mistral,
    };
    if let (true, Some(w)) = (windowed, c.sliding_window) {
        if w < max_pos {
            tracing::warn!(
                "{name} attends through a sliding window of {w} tokens; strata attends to \
                 the whole context, so it caps the context at {w} tokens, where the two agree"
            );
            max_pos = w;
        }
    }
    LlamaConfig::finish(
        name,
        LlamaConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope: RopeConfig {
                dim: head_dim,
                theta,
                scaling,
                style: RopeStyle::Half,
            },
            max_position_embeddings: max_pos,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: qwen2 || (c.attention_bias && !mistral),
            o_bias: c.attention_bias && !mistral && !qwen2,
            qk_norm: qwen3 || moe.is_some(),
            moe,
            summary: unresolved(),
        },
    )
}

/// Resolves GGUF metadata. llama.cpp's converter permutes Llama's q/k for
/// interleaved rope; Qwen's it leaves in Hugging Face's order.
pub(crate) fn from_gguf(
    arch: &str,
    md: &GgufMetadata,
    has_output_weight: bool,
) -> Result<Arc<dyn Architecture>> {
    let k = GgufKeys { md, prefix: arch };
    let hidden = k.usize("embedding_length")?;
    let heads = k.usize("attention.head_count")?;
    let head_dim = k
        .usize("attention.key_length")
        .or_else(|_| k.usize("rope.dimension_count"))
        .unwrap_or(hidden / heads.max(1));
    let (name, style) = match arch {
        "qwen2" => ("Qwen2ForCausalLM", RopeStyle::Half),
        "qwen3" => ("Qwen3ForCausalLM", RopeStyle::Half),
        _ => ("LlamaForCausalLM", RopeStyle::Interleaved),
    };
    LlamaConfig::finish(
        name,
        LlamaConfig {
            vocab_size: k.vocab_size()?,
            hidden_size: hidden,
            intermediate_size: k.usize("feed_forward_length")?,
            num_layers: k.usize("block_count")?,
            num_heads: heads,
            num_kv_heads: k.usize("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            rms_norm_eps: k.f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            rope: RopeConfig {
                dim: head_dim,
                theta: k.f32("rope.freq_base").unwrap_or(10_000.0),
                // Llama 3 GGUFs carry the scaling as a `rope_freqs` tensor instead.
                scaling: None,
                style,
            },
            max_position_embeddings: k.usize("context_length").unwrap_or(2048),
            tie_word_embeddings: !has_output_weight,
            qkv_bias: arch == "qwen2",
            o_bias: false,
            qk_norm: arch == "qwen3",
            moe: None,
            summary: unresolved(),
        },
    )
}

/// The summary until [`LlamaConfig::finish`] fills it in.
fn unresolved() -> ModelConfig {
    ModelConfig {
        architecture: String::new(),
        vocab_size: 0,
        hidden_size: 0,
        intermediate_size: 0,
        num_layers: 0,
        num_heads: 0,
        kv: KvLayout::Heads {
            num_kv_heads: 0,
            head_dim: 0,
        },
        max_position_embeddings: 0,
        head_cost_in_layers: 0.0,
        tensor_parallel_unit: 1,
    }
}

impl LlamaConfig {
    /// Checks `c` and fills in its summary.
    fn finish(name: &str, mut c: LlamaConfig) -> Result<Arc<dyn Architecture>> {
        if c.num_heads == 0 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(Error::Config(format!(
                "{} attention heads do not group evenly over {} KV heads",
                c.num_heads, c.num_kv_heads
            )));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!("head_dim {} is odd", c.head_dim)));
        }
        if let Some(m) = &c.moe {
            if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
                return Err(Error::Config(format!(
                    "{} experts per token of {}",
                    m.num_experts_per_tok, m.num_experts
                )));
            }
        }
        let h = c.hidden_size;
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        // The MLP width a token passes through: its active experts' for MoE.
        let active = match &c.moe {
            Some(m) if (0..c.num_layers).any(|l| m.is_sparse(l)) => {
                m.num_experts_per_tok * m.moe_intermediate_size
            }
            _ => c.intermediate_size,
        };
        let layer = h * (q + 2 * kv) + q * h + 3 * h * active;
        // Heads split by KV head; experts whole on a rank.
        let unit = match &c.moe {
            Some(m) => gcd(c.num_kv_heads, m.num_experts),
            None => c.num_kv_heads,
        };
        c.summary = ModelConfig {
            architecture: name.into(),
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: active,
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            kv: KvLayout::Heads {
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
            },
            max_position_embeddings: c.max_position_embeddings,
            head_cost_in_layers: (c.vocab_size * h) as f64 / layer.max(1) as f64,
            tensor_parallel_unit: unit,
        };
        Ok(Arc::new(c))
    }
}

impl Architecture for LlamaConfig {
    fn config(&self) -> &ModelConfig {
        &self.summary
    }

    fn load_stage(
        &self,
        w: &Weights,
        range: LayerRange,
        comm: Arc<dyn Communicator>,
        max_positions: usize,
        on_layer: &mut dyn FnMut(usize, LayerRange),
    ) -> Result<Box<dyn StageModel>> {
        Ok(Box::new(load_stage(
            w,
            self,
            range,
            comm,
            max_positions,
            on_layer,
        )?))
    }
}

#[derive(Debug)]
pub(crate) struct DecoderLayer {
    input_layernorm: RmsNorm,
    /// q, k and v projections, run as one matmul.
    qkv_proj: ColumnParallelLinear,
    /// Qwen3's per-head norms of queries and keys.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    attention: HeadAttention,
    o_proj: RowParallelLinear,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(
        w: &Weights,
        cfg: &LlamaConfig,
        i: usize,
        heads: Heads,
        comm: &Arc<dyn Communicator>,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let eps = cfg.rms_norm_eps;
        let c = &**comm;
        let qk_norm = if cfg.qk_norm {
            Some((
                RmsNorm::load(w, &format!("{p}.self_attn.q_norm.weight"), eps)?,
                RmsNorm::load(w, &format!("{p}.self_attn.k_norm.weight"), eps)?,
            ))
        } else {
            None
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm.weight"), eps)?,
            qkv_proj: ColumnParallelLinear::load_merged(
                w,
                &[
                    &format!("{p}.self_attn.q_proj"),
                    &format!("{p}.self_attn.k_proj"),
                    &format!("{p}.self_attn.v_proj"),
                ],
                c,
                cfg.qkv_bias,
            )?,
            qk_norm,
            attention: HeadAttention { heads },
            o_proj: RowParallelLinear::load(
                w,
                &format!("{p}.self_attn.o_proj"),
                comm.clone(),
                cfg.o_bias,
            )?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                eps,
            )?,
            mlp: match &cfg.moe {
                Some(m) if m.is_sparse(i) => Mlp::Sparse(SparseMoe::load(
                    w,
                    &format!("{p}.mlp"),
                    m.num_experts,
                    Routing::Softmax {
                        top_k: m.num_experts_per_tok,
                        norm_topk_prob: m.norm_topk_prob,
                    },
                    false,
                    comm,
                )?),
                _ => Mlp::Dense(DenseMlp::load(w, &format!("{p}.mlp"), comm)?),
            },
        })
    }
}

impl Layer for DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        batch: &Batch,
        rope: &Rope,
        cache: LayerCache,
    ) -> Result<(Tensor, Tensor)> {
        let (residual, h) = match residual {
            None => (x.clone(), self.input_layernorm.forward(x)?),
            Some(r) => self.input_layernorm.forward_residual(x, r)?,
        };
        let qkv = self.qkv_proj.forward_split(&h)?;
        let (mut q, mut k, v) = (qkv[0].clone(), qkv[1].clone(), &qkv[2]);
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            let d = self.attention.heads.head_dim;
            let per_head = |t: &Tensor, norm: &RmsNorm| -> Result<Tensor> {
                let (tokens, width) = t.dims2()?;
                norm.forward(&t.contiguous()?.reshape((tokens * width / d, d))?)?
                    .reshape((tokens, width))
                    .map_err(Into::into)
            };
            q = per_head(&q, q_norm)?;
            k = per_head(&k, k_norm)?;
        }
        let attn = self.attention.forward(&q, &k, v, batch, rope, cache)?;
        let (residual, h) = self
            .post_attention_layernorm
            .forward_residual(&self.o_proj.forward(&attn)?, &residual)?;
        Ok((self.mlp.forward(&h)?, residual))
    }
}

/// One pipeline stage of a Llama-family model, for one tensor-parallel rank.
pub(crate) type Llama = DecoderStage<DecoderLayer>;

fn load_stage(
    w: &Weights,
    cfg: &LlamaConfig,
    range: LayerRange,
    comm: Arc<dyn Communicator>,
    max_positions: usize,
    on_layer: &mut dyn FnMut(usize, LayerRange),
) -> Result<Llama> {
    // DecoderStage::load refuses a size that does not divide, before any layer.
    let ws = comm.world_size();
    let heads = Heads {
        num_heads: cfg.num_heads / ws,
        num_kv_heads: cfg.num_kv_heads / ws,
        head_dim: cfg.head_dim,
    };
    let freq_factors = if w.contains("rope_freqs.weight") {
        Some(
            w.tensor("rope_freqs.weight", None)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?,
        )
    } else {
        None
    };
    let (q, kv) = (
        heads.num_heads * cfg.head_dim,
        heads.num_kv_heads * cfg.head_dim,
    );
    let inter = cfg.summary.intermediate_size / ws;
    let spec = StageSpec {
        summary: &cfg.summary,
        rope: Rope::new(&cfg.rope, freq_factors.as_deref(), max_positions),
        rms_norm_eps: cfg.rms_norm_eps,
        tie_word_embeddings: cfg.tie_word_embeddings,
        kv: KvLayout::Heads {
            num_kv_heads: heads.num_kv_heads,
            head_dim: heads.head_dim,
        },
        activations_per_token: 4 * cfg.hidden_size + 2 * q + 2 * kv + 3 * inter,
    };
    DecoderStage::load(
        w,
        spec,
        range,
        &comm,
        |i| DecoderLayer::load(w, cfg, i, heads, &comm),
        on_layer,
    )
}

#[cfg(test)]
mod tests {
    use crate::arch::from_hf_config;

    #[test]
    fn llama3_scaling_is_read_from_either_spelling() {
        let old = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":64}}"#;
        let new = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":64}}"#;
        let parse = |t: &str| format!("{:?}", from_hf_config(t).unwrap());
        let (a, b) = (parse(old), parse(new));
        assert_eq!(a, b);
        assert!(
            a.contains("theta: 500000.0") && a.contains("factor: 8.0"),
            "{a}"
        );
        assert!(a.contains("head_dim: 4"), "{a}");
    }

    #[test]
    fn unsupported_architectures_are_named_with_what_is_supported() {
        let c = r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#;
        let e = from_hf_config(c).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn qwen_switches_follow_the_architecture() {
        let base = r#""vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":64,
            "sliding_window":16,"use_sliding_window":false"#;
        let q2 = from_hf_config(&format!(
            r#"{{"architectures":["Qwen2ForCausalLM"],{base}}}"#
        ));
        let q2 = format!("{:?}", q2.unwrap());
        assert!(
            q2.contains("qkv_bias: true, o_bias: false, qk_norm: false"),
            "{q2}"
        );
        // The window is unused, so the context stays whole.
        assert!(q2.contains("max_position_embeddings: 64"), "{q2}");
        let q3 = from_hf_config(&format!(
            r#"{{"architectures":["Qwen3ForCausalLM"],"head_dim":6,{base}}}"#
        ));
        let q3 = format!("{:?}", q3.unwrap());
        assert!(
            q3.contains("qkv_bias: false, o_bias: false, qk_norm: true"),
            "{q3}"
        );
        assert!(q3.contains("head_dim: 6"), "{q3}");
        // A window in use caps the context where full attention agrees with it.
        let windowed = base.replace(
            r#""use_sliding_window":false"#,
            r#""use_sliding_window":true"#,
        );
        let w = from_hf_config(&format!(
            r#"{{"architectures":["Qwen2ForCausalLM"],{windowed}}}"#
        ));
        assert_eq!(w.unwrap().config().max_position_embeddings, 16);
    }
}
