//! DeepSeek-V3 and R1 (`DeepseekV3ForCausalLM`), as transformers implements
//! it: multi-head latent attention (MLA) over a cache of compressed latents,
//! and a mixture of experts with group-limited sigmoid routing and shared
//! experts.
//!
//! The cache keeps, per token and layer, only the normalised latent
//! (`kv_lora_rank`) and the rotated rope key (`qk_rope_head_dim`). Attention
//! runs in the absorbed form of DeepSeek's reference and vLLM's MLA: each
//! head's no-rope query goes through `W_UK` into latent space, so scores
//! are taken against the cached rows directly; the weighted latents go
//! through `W_UV` after. Keys and values are never expanded per head.

use std::sync::Arc;

use candle_core::Tensor;
use serde::Deserialize;
use strata_comm::{Communicator, SingleRank};
use strata_types::{KvLayout, LayerRange, ModelConfig, RopeStyle};

use crate::arch::{Architecture, StageModel};
use crate::attention::{latent_attention, with_f32, write_latent};
use crate::batch::Batch;
use crate::config::{gcd, HfRopeFields};
use crate::decoder::{DecoderStage, Layer, StageSpec};
use crate::error::{Error, Result};
use crate::kv_cache::LayerCache;
use crate::layers::{ColumnParallelLinear, RmsNorm, RowParallelLinear};
use crate::mlp::{DenseMlp, Mlp, Routing, SparseMoe};
use crate::rope::{yarn_mscale, Rope, RopeConfig, RopeScaling};
use crate::weights::{Shard, Weights};

pub(crate) const HF_NAMES: &[&str] = &["DeepseekV3ForCausalLM"];

/// A DeepSeek-V3 model's resolved config.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepseekConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// `None`: queries through one `q_proj`; else `q_a_proj`, a norm, `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    /// Layers before this one are dense.
    pub first_k_dense_replace: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// `qk_head_dim^-0.5`, times YaRN's `mscale_all_dim` correction squared.
    pub softmax_scale: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    summary: ModelConfig,
}

/// `config.json` as DeepSeek and transformers write it.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    #[serde(alias = "num_local_experts")]
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    #[serde(default = "yes")]
    norm_topk_prob: bool,
    #[serde(default = "one_f32")]
    routed_scaling_factor: f32,
    #[serde(default)]
    first_k_dense_replace: usize,
    #[serde(default = "one")]
    moe_layer_freq: usize,
    scoring_func: Option<String>,
    topk_method: Option<String>,
    #[serde(default = "silu")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(flatten)]
    rope: HfRopeFields,
    #[serde(default = "yes")]
    rope_interleave: bool,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    quantization_config: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn one_f32() -> f32 {
    1.0
}
fn silu() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

fn unsupported(what: String) -> Error {
    Error::Unsupported(format!("DeepseekV3ForCausalLM with {what}"))
}

pub(crate) fn from_hf(name: &str, text: &str) -> Result<Arc<dyn Architecture>> {
    let c: HfConfig =
        serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
    // Refuse, before loading, every switch this implementation would get wrong.
    if c.hidden_act != "silu" {
        return Err(unsupported(format!(
            "hidden_act `{}` (supported: silu)",
            c.hidden_act
        )));
    }
    if let Some(f) = c.scoring_func.as_deref().filter(|f| *f != "sigmoid") {
        return Err(unsupported(format!(
            "scoring_func `{f}` (supported: sigmoid)"
        )));
    }
    if let Some(m) = c.topk_method.as_deref().filter(|m| *m != "noaux_tc") {
        return Err(unsupported(format!(
            "topk_method `{m}` (supported: noaux_tc)"
        )));
    }
    if c.moe_layer_freq != 1 {
        return Err(unsupported(format!(
            "moe_layer_freq {} (supported: 1)",
            c.moe_layer_freq
        )));
    }
    if let Some(kv) = c
        .num_key_value_heads
        .filter(|&h| h != c.num_attention_heads)
    {
        return Err(unsupported(format!(
            "{kv} key-value heads for {} attention heads (MLA expands one latent to every head)",
            c.num_attention_heads
        )));
    }
    if let Some(q) = &c.quantization_config {
        let method = q["quant_method"].as_str().unwrap_or("");
        let fmt = q["fmt"].as_str().unwrap_or("e4m3");
        if method != "fp8" || fmt != "e4m3" {
            return Err(unsupported(format!(
                "quantization `{method}` `{fmt}` (supported: fp8 e4m3 with weight_block_size)"
            )));
        }
    }
    let experts = c.n_routed_experts.unwrap_or(0);
    let n_group = c.n_group.unwrap_or(1).max(1);
    let topk_group = c.topk_group.unwrap_or(n_group);
    let top_k = c.num_experts_per_tok.unwrap_or(0);
    if experts > 0 {
        if !experts.is_multiple_of(n_group) || topk_group > n_group || topk_group == 0 {
            return Err(Error::Config(format!(
                "{experts} experts in {n_group} groups, {topk_group} chosen"
            )));
        }
        if top_k == 0 || top_k > topk_group * (experts / n_group) {
            return Err(Error::Config(format!(
                "{top_k} experts per token from {topk_group} groups of {}",
                experts / n_group
            )));
        }
        if experts / n_group < 2 {
            return Err(Error::Config(
                "expert groups are scored by their best two experts; a group has fewer".into(),
            ));
        }
    }
    let (theta, scaling) = c.rope.resolve()?;
    let qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim;
    let mut softmax_scale = (qk_head_dim as f32).powf(-0.5);
    if let Some(RopeScaling::Yarn { factor, .. }) = scaling {
        let all_dim = c
            .rope
            .rope_parameters
            .as_ref()
            .or(c.rope.rope_scaling.as_ref())
            .and_then(|r| r.mscale_all_dim)
            .unwrap_or(0.0);
        if all_dim != 0.0 {
            let m = yarn_mscale(factor, all_dim);
            softmax_scale *= m * m;
        }
    }
    if !c.qk_rope_head_dim.is_multiple_of(2) {
        return Err(Error::Config(format!(
            "qk_rope_head_dim {} is odd",
            c.qk_rope_head_dim
        )));
    }
    let mut cfg = DeepseekConfig {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        moe_intermediate_size: c.moe_intermediate_size,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        q_lora_rank: c.q_lora_rank,
        kv_lora_rank: c.kv_lora_rank,
        qk_nope_head_dim: c.qk_nope_head_dim,
        qk_rope_head_dim: c.qk_rope_head_dim,
        v_head_dim: c.v_head_dim,
        n_routed_experts: experts,
        n_shared_experts: c.n_shared_experts.unwrap_or(0),
        num_experts_per_tok: top_k,
        n_group,
        topk_group,
        norm_topk_prob: c.norm_topk_prob,
        routed_scaling_factor: c.routed_scaling_factor,
        first_k_dense_replace: if experts == 0 {
            c.num_hidden_layers
        } else {
            c.first_k_dense_replace
        },
        rms_norm_eps: c.rms_norm_eps,
        rope: RopeConfig {
            dim: c.qk_rope_head_dim,
            theta,
            scaling,
            // Interleaved pairs rotate the same way whatever order the
            // output is written in: scores are dot products.
            style: if c.rope_interleave {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Half
            },
        },
        softmax_scale,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
        attention_bias: c.attention_bias,
        summary: ModelConfig {
            architecture: name.into(),
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            kv: KvLayout::Latent {
                kv_lora_rank: 0,
                rope_head_dim: 0,
            },
            max_position_embeddings: 0,
            head_cost_in_layers: 0.0,
            tensor_parallel_unit: 1,
        },
    };
    cfg.summary = cfg.summarise(name);
    Ok(Arc::new(cfg))
}

impl DeepseekConfig {
    fn is_sparse(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace && self.n_routed_experts > 0
    }

    fn summarise(&self, name: &str) -> ModelConfig {
        let h = self.hidden_size;
        let qk = self.qk_nope_head_dim + self.qk_rope_head_dim;
        let heads = self.num_heads;
        let q = match self.q_lora_rank {
            Some(r) => h * r + r * heads * qk,
            None => h * heads * qk,
        };
        let attn = q
            + h * (self.kv_lora_rank + self.qk_rope_head_dim)
            + heads * (self.qk_nope_head_dim + self.v_head_dim) * self.kv_lora_rank
            + heads * self.v_head_dim * h;
        let sparse = (0..self.num_layers).any(|l| self.is_sparse(l));
        let active = if sparse {
            (self.num_experts_per_tok + self.n_shared_experts) * self.moe_intermediate_size
        } else {
            self.intermediate_size
        };
        let layer = attn + 3 * h * active;
        // Heads split by rank; whole experts on a rank; the dense MLPs' and
        // shared experts' intermediate dimensions split.
        let mut unit = heads;
        for d in [
            self.intermediate_size,
            self.moe_intermediate_size * self.n_shared_experts.max(1),
        ] {
            unit = gcd(unit, d);
        }
        if self.n_routed_experts > 0 {
            unit = gcd(unit, self.n_routed_experts);
        }
        ModelConfig {
            architecture: name.into(),
            vocab_size: self.vocab_size,
            hidden_size: h,
            intermediate_size: active,
            num_layers: self.num_layers,
            num_heads: heads,
            kv: KvLayout::Latent {
                kv_lora_rank: self.kv_lora_rank,
                rope_head_dim: self.qk_rope_head_dim,
            },
            max_position_embeddings: self.max_position_embeddings,
            head_cost_in_layers: (self.vocab_size * h) as f64 / layer.max(1) as f64,
            tensor_parallel_unit: unit,
        }
    }
}

impl Architecture for DeepseekConfig {
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
        if !w.device().is_cpu() {
            return Err(Error::Unsupported(
                "multi-head latent attention (DeepSeek) on a GPU: its kernels are not \
                 written yet; serve it on the CPU (--device cpu)"
                    .into(),
            ));
        }
        // DecoderStage::load refuses a size that does not divide, before any layer.
        let ws = comm.world_size();
        let heads = self.num_heads / ws;
        let spec = StageSpec {
            summary: &self.summary,
            rope: Rope::new(&self.rope, None, max_positions),
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            kv: self.summary.kv,
            activations_per_token: 4 * self.hidden_size
                + heads
                    * (self.qk_nope_head_dim
                        + self.qk_rope_head_dim
                        + 2 * (self.kv_lora_rank + self.qk_rope_head_dim)
                        + self.v_head_dim)
                + 3 * self.summary.intermediate_size / ws,
        };
        let stage = DecoderStage::load(
            w,
            spec,
            range,
            &comm,
            |i| DeepseekLayer::load(w, self, i, &comm),
            on_layer,
        )?;
        Ok(Box::new(stage))
    }
}

const LATENT_NORM_EPS: f64 = 1e-6;

/// How a layer makes its queries.
#[derive(Debug)]
enum QueryProj {
    Direct(ColumnParallelLinear),
    LowRank {
        a: ColumnParallelLinear,
        norm: RmsNorm,
        b: ColumnParallelLinear,
    },
}

/// Multi-head latent attention for this rank's heads.
#[derive(Debug)]
struct Mla {
    q: QueryProj,
    /// `kv_a_proj_with_mqa`: the latent and the shared rope key, on every rank.
    kv_a: ColumnParallelLinear,
    kv_a_norm: RmsNorm,
    /// `W_UK` per head, `[heads, nope, rank]`.
    w_uk: Tensor,
    /// `W_UV` per head, transposed: `[heads, rank, v]`.
    w_uv_t: Tensor,
    o_proj: RowParallelLinear,
    heads: usize,
    nope: usize,
    rope_dim: usize,
    rank: usize,
    scale: f32,
}

impl Mla {
    fn load(
        w: &Weights,
        c: &DeepseekConfig,
        p: &str,
        comm: &Arc<dyn Communicator>,
    ) -> Result<Self> {
        let ws = comm.world_size();
        let whole: &dyn Communicator = &SingleRank;
        // The latent norms keep RMSNorm's default epsilon whatever
        // `rms_norm_eps` says, in transformers and in DeepSeek's reference.
        let eps = LATENT_NORM_EPS;
        let bias = c.attention_bias;
        let q = match c.q_lora_rank {
            None => QueryProj::Direct(ColumnParallelLinear::load(
                w,
                &format!("{p}.q_proj"),
                &**comm,
                false,
            )?),
            Some(_) => QueryProj::LowRank {
                a: ColumnParallelLinear::load(w, &format!("{p}.q_a_proj"), whole, bias)?,
                norm: RmsNorm::load(w, &format!("{p}.q_a_layernorm.weight"), eps)?,
                b: ColumnParallelLinear::load(w, &format!("{p}.q_b_proj"), &**comm, false)?,
            },
        };
        let heads = c.num_heads / ws;
        let (nope, v, rank) = (c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let shard = (ws > 1).then(|| Shard::new(0, comm.rank(), ws));
        let kv_b = w
            .tensor(&format!("{p}.kv_b_proj.weight"), shard)?
            .reshape((heads, nope + v, rank))?;
        Ok(Self {
            q,
            kv_a: ColumnParallelLinear::load(w, &format!("{p}.kv_a_proj_with_mqa"), whole, bias)?,
            kv_a_norm: RmsNorm::load(w, &format!("{p}.kv_a_layernorm.weight"), eps)?,
            w_uk: kv_b.narrow(1, 0, nope)?.contiguous()?,
            w_uv_t: kv_b.narrow(1, nope, v)?.transpose(1, 2)?.contiguous()?,
            o_proj: RowParallelLinear::load(w, &format!("{p}.o_proj"), comm.clone(), bias)?,
            heads,
            nope,
            rope_dim: c.qk_rope_head_dim,
            rank,
            scale: c.softmax_scale,
        })
    }

    fn forward(&self, h: &Tensor, batch: &Batch, rope: &Rope, cache: LayerCache) -> Result<Tensor> {
        let LayerCache::Host(kv) = cache else {
            return Err(Error::Unsupported(
                "multi-head latent attention in the kernels' cache layout".into(),
            ));
        };
        let tokens = h.dim(0)?;
        let (heads, nope, rd, rank) = (self.heads, self.nope, self.rope_dim, self.rank);
        let q = match &self.q {
            QueryProj::Direct(p) => p.forward(h)?,
            QueryProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(h)?)?)?,
        }
        .reshape((tokens, heads, nope + rd))?;
        // Absorb W_UK: [heads, tokens, nope] x [heads, nope, rank].
        let q_latent = q
            .narrow(2, 0, nope)?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.w_uk)?
            .transpose(0, 1)?
            .contiguous()?;
        let q_rope = q.narrow(2, nope, rd)?.contiguous()?;
        let kv_a = self.kv_a.forward(h)?;
        let latent = self
            .kv_a_norm
            .forward(&kv_a.narrow(1, 0, rank)?.contiguous()?)?;
        let k_rope = kv_a.narrow(1, rank, rd)?;
        let input = batch.input;
        with_f32(&latent, |latent| {
            with_f32(&k_rope, |k_rope| {
                write_latent(
                    kv,
                    latent,
                    k_rope,
                    input.positions,
                    input.slot_mapping,
                    rope,
                )
            })
        })??;
        // Each head's query row: scaled latent query, then scaled rotated rope query.
        let row = rank + rd;
        let mut q_rows = vec![0f32; tokens * heads * row];
        with_f32(&q_latent, |ql| {
            with_f32(&q_rope, |qr| {
                for (i, dst) in q_rows.chunks_mut(row).enumerate() {
                    let pos = input.positions[i / heads] as usize;
                    let (lat, rot) = dst.split_at_mut(rank);
                    for (d, s) in lat.iter_mut().zip(&ql[i * rank..(i + 1) * rank]) {
                        *d = s * self.scale;
                    }
                    rope.apply(&qr[i * rd..(i + 1) * rd], pos, rot);
                    rot.iter_mut().for_each(|x| *x *= self.scale);
                }
            })
        })??;
        let mut out = vec![0f32; tokens * heads * rank];
        latent_attention(
            &q_rows,
            kv,
            input.positions,
            &batch.token_seq,
            &batch.block_tables,
            heads,
            rank,
            &mut out,
        );
        // Apply W_UV: [heads, tokens, rank] x [heads, rank, v].
        let o = Tensor::from_vec(out, (tokens, heads, rank), h.device())?
            .to_dtype(h.dtype())?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.w_uv_t)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((tokens, ()))?;
        self.o_proj.forward(&o)
    }
}

/// One DeepSeek-V3 decoder layer.
#[derive(Debug)]
pub(crate) struct DeepseekLayer {
    input_layernorm: RmsNorm,
    attention: Mla,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DeepseekLayer {
    fn load(
        w: &Weights,
        c: &DeepseekConfig,
        i: usize,
        comm: &Arc<dyn Communicator>,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let mlp = if c.is_sparse(i) {
            Mlp::Sparse(SparseMoe::load(
                w,
                &format!("{p}.mlp"),
                c.n_routed_experts,
                Routing::Grouped {
                    top_k: c.num_experts_per_tok,
                    n_group: c.n_group,
                    topk_group: c.topk_group,
                    norm_topk_prob: c.norm_topk_prob,
                    routed_scaling_factor: c.routed_scaling_factor,
                },
                c.n_shared_experts > 0,
                comm,
            )?)
        } else {
            Mlp::Dense(DenseMlp::load(w, &format!("{p}.mlp"), comm)?)
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                c.rms_norm_eps,
            )?,
            attention: Mla::load(w, c, &format!("{p}.self_attn"), comm)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                c.rms_norm_eps,
            )?,
            mlp,
        })
    }
}

impl Layer for DeepseekLayer {
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
        let attn = self.attention.forward(&h, batch, rope, cache)?;
        let (residual, h) = self
            .post_attention_layernorm
            .forward_residual(&attn, &residual)?;
        Ok((self.mlp.forward(&h)?, residual))
    }
}
