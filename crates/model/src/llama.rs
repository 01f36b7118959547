//! The Llama family (Llama 2/3.x, SmolLM2, Mistral-style configs) as one stage.

use std::sync::Arc;

use candle_core::{Device, Storage, Tensor};
use strata_comm::Communicator;
use strata_types::{LayerRange, ModelConfig};

use crate::attention::{paged_attention, write_kv, Heads};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerKv};
use crate::layers::{
    ColumnParallelLinear, ParallelLmHead, RmsNorm, RowParallelLinear, VocabEmbedding,
};
use crate::rope::Rope;
use crate::weights::{Shard, Weights};

/// One sequence's slice of a flattened batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqInfo<'a> {
    /// Tokens of this sequence in the batch (they are contiguous, in order).
    pub query_len: usize,
    /// Physical blocks holding the sequence's KV, in position order.
    pub block_table: &'a [u32],
}

/// A flattened batch: the new tokens of every scheduled sequence, one after
/// another (prefill chunks and decodes alike).
#[derive(Debug, Clone, Copy)]
pub struct BatchInput<'a> {
    pub token_ids: &'a [u32],
    pub positions: &'a [u32],
    /// Cache slot (`block * BLOCK_SIZE + offset`) of each token.
    pub slot_mapping: &'a [u32],
    pub seqs: &'a [SeqInfo<'a>],
    /// Rows of the batch whose logits the last stage returns.
    pub logits_indices: &'a [u32],
}

#[derive(Debug)]
pub enum StageOutput {
    /// `[tokens, hidden]` for the next stage.
    Hidden(Tensor),
    /// `[logits_indices.len(), vocab]`.
    Logits(Tensor),
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    /// q, k and v projections, run as one matmul.
    qkv_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
    post_attention_layernorm: RmsNorm,
    /// gate and up projections, run as one matmul.
    gate_up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

/// Per-forward context shared by every layer.
struct Ctx<'a> {
    input: &'a BatchInput<'a>,
    token_seq: Vec<u32>,
    block_tables: Vec<&'a [u32]>,
    rope: &'a Rope,
    heads: Heads,
}

impl DecoderLayer {
    fn load(
        w: &Weights,
        cfg: &ModelConfig,
        i: usize,
        comm: &Arc<dyn Communicator>,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let bias = cfg.attention_bias;
        let c = &**comm;
        Ok(Self {
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                cfg.rms_norm_eps,
            )?,
            qkv_proj: ColumnParallelLinear::load_merged(
                w,
                &[
                    &format!("{p}.self_attn.q_proj"),
                    &format!("{p}.self_attn.k_proj"),
                    &format!("{p}.self_attn.v_proj"),
                ],
                c,
                bias,
            )?,
            o_proj: RowParallelLinear::load(
                w,
                &format!("{p}.self_attn.o_proj"),
                comm.clone(),
                false,
            )?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                cfg.rms_norm_eps,
            )?,
            gate_up_proj: ColumnParallelLinear::load_merged(
                w,
                &[&format!("{p}.mlp.gate_proj"), &format!("{p}.mlp.up_proj")],
                c,
                false,
            )?,
            down_proj: RowParallelLinear::load(
                w,
                &format!("{p}.mlp.down_proj"),
                comm.clone(),
                false,
            )?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx, cache: &mut LayerKv) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let qkv = self.qkv_proj.forward_split(&h)?;
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
        let tokens = x.dim(0)?;
        let heads = ctx.heads;
        let mut out = vec![0f32; tokens * heads.num_heads * heads.head_dim];
        with_f32(k, |k| {
            with_f32(v, |v| {
                write_kv(
                    cache,
                    k,
                    v,
                    ctx.input.positions,
                    ctx.input.slot_mapping,
                    ctx.rope,
                    heads,
                )
            })
        })??;
        with_f32(q, |q| {
            paged_attention(
                q,
                cache,
                ctx.input.positions,
                &ctx.token_seq,
                &ctx.block_tables,
                ctx.rope,
                heads,
                &mut out,
            )
        })?;
        let attn = Tensor::from_vec(out, (tokens, heads.num_heads * heads.head_dim), x.device())?;
        let x = (x + self.o_proj.forward(&attn)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let gu = self.gate_up_proj.forward_split(&h)?;
        let m = (gu[0].silu()? * &gu[1])?;
        Ok((x + self.down_proj.forward(&m)?)?)
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&data[start..start + layout.shape().elem_count()]))
        }
        _ => Err(Error::Unsupported(
            "paged attention runs on the CPU only in this build".into(),
        )),
    }
}

/// One pipeline stage of a Llama-family model, for one tensor-parallel rank.
#[derive(Debug)]
pub struct Llama {
    cfg: ModelConfig,
    range: LayerRange,
    embed: Option<VocabEmbedding>,
    layers: Vec<DecoderLayer>,
    norm: Option<RmsNorm>,
    lm_head: Option<ParallelLmHead>,
    rope: Rope,
    heads: Heads,
    device: Device,
}

impl Llama {
    /// Loads layers `range` (and the embedding / final norm and lm_head when
    /// the range is first / last), reading only those tensors. `on_layer` is
    /// told each layer as it is loaded, for progress.
    pub fn load(
        w: &Weights,
        cfg: &ModelConfig,
        range: LayerRange,
        comm: Arc<dyn Communicator>,
        max_positions: usize,
        on_layer: &mut dyn FnMut(usize, LayerRange),
    ) -> Result<Self> {
        if range.end > cfg.num_layers || range.is_empty() {
            return Err(Error::Config(format!(
                "layer range [{}, {}) is not inside the model's {} layers",
                range.start, range.end, cfg.num_layers
            )));
        }
        let ws = comm.world_size();
        if !cfg.num_kv_heads.is_multiple_of(ws) {
            return Err(Error::Config(format!(
                "tensor parallel size {ws} must divide the {} KV heads",
                cfg.num_kv_heads
            )));
        }
        let device = Device::Cpu;
        let vocab_shard = (ws > 1).then(|| Shard::uneven(0, comm.rank(), ws));
        let is_last = range.is_last(cfg.num_layers);
        // A tied lm_head reuses the embedding matrix, read once; GGUF keeps it
        // quantized for the matmul and dequantizes a copy for lookups.
        let embed_needed = range.is_first() || (is_last && cfg.tie_word_embeddings);
        let embed_mm = embed_needed
            .then(|| w.matmul("model.embed_tokens.weight", vocab_shard))
            .transpose()?;
        let embed = match (&embed_mm, range.is_first()) {
            (Some(mm), true) => Some(VocabEmbedding::new(
                mm.dense()?,
                cfg.vocab_size,
                comm.clone(),
            )?),
            _ => None,
        };
        let mut layers = Vec::with_capacity(range.len());
        for i in range.start..range.end {
            layers.push(DecoderLayer::load(w, cfg, i, &comm)?);
            on_layer(i, range);
        }
        let (norm, lm_head) = if is_last {
            let head = if cfg.tie_word_embeddings {
                embed_mm.expect("read above for a tied head")
            } else {
                w.matmul("lm_head.weight", vocab_shard)?
            };
            (
                Some(RmsNorm::load(w, "model.norm.weight", cfg.rms_norm_eps)?),
                Some(ParallelLmHead::new(head, cfg.vocab_size, comm.clone())),
            )
        } else {
            (None, None)
        };
        let freq_factors = if w.contains("rope_freqs.weight") {
            Some(w.tensor("rope_freqs.weight", None)?.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(Self {
            rope: Rope::new(cfg, freq_factors.as_deref(), max_positions),
            heads: Heads {
                num_heads: cfg.num_heads / ws,
                num_kv_heads: cfg.num_kv_heads / ws,
                head_dim: cfg.head_dim,
            },
            cfg: cfg.clone(),
            range,
            embed,
            layers,
            norm,
            lm_head,
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn layer_range(&self) -> LayerRange {
        self.range
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// An empty KV cache for this stage's layers and shard.
    pub fn new_kv_cache(&self, num_blocks: usize) -> KvCache {
        KvCache::new(
            self.layers.len(),
            num_blocks,
            self.heads.num_kv_heads,
            self.heads.head_dim,
        )
    }

    /// Bytes of KV cache one block takes on this stage and shard.
    pub fn kv_bytes_per_block(&self) -> usize {
        KvCache::bytes_per_block(
            self.layers.len(),
            self.heads.num_kv_heads,
            self.heads.head_dim,
        )
    }

    /// Runs the stage. The first stage embeds `input.token_ids`; later stages
    /// take the previous stage's `hidden`.
    pub fn forward(
        &self,
        input: &BatchInput,
        hidden: Option<Tensor>,
        kv: &mut KvCache,
    ) -> Result<StageOutput> {
        let mut x = match (&self.embed, hidden) {
            (_, Some(h)) => h,
            (Some(e), None) => e.forward(input.token_ids)?,
            (None, None) => {
                return Err(Error::Config(
                    "a stage after the first needs the previous stage's hidden states".into(),
                ))
            }
        };
        let mut token_seq = Vec::with_capacity(input.positions.len());
        for (s, seq) in input.seqs.iter().enumerate() {
            token_seq.extend(std::iter::repeat_n(s as u32, seq.query_len));
        }
        let ctx = Ctx {
            input,
            token_seq,
            block_tables: input.seqs.iter().map(|s| s.block_table).collect(),
            rope: &self.rope,
            heads: self.heads,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &ctx, kv.layer_mut(i))?;
        }
        match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) => {
                let idx = Tensor::new(input.logits_indices, &self.device)?;
                let rows = norm.forward(&x.index_select(&idx, 0)?)?;
                Ok(StageOutput::Logits(head.forward(&rows)?))
            }
            _ => Ok(StageOutput::Hidden(x)),
        }
    }
}
