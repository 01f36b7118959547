//! The Llama family (Llama 2/3.x, SmolLM2, Mistral-style configs) as one stage.

use std::sync::Arc;

use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use strata_comm::Communicator;
use strata_kernels::RopeTables;
use strata_types::{LayerRange, ModelConfig, BLOCK_SIZE};

use crate::attention::{paged_attention, write_kv, Heads};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerCache, LayerKv};
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
    /// The batch's indices as tensors, for the kernels (device-layout cache only).
    device: Option<DeviceInputs<'a>>,
}

/// What strata's kernels read, uploaded once per forward.
struct DeviceInputs<'a> {
    positions: Tensor,
    slots: Tensor,
    token_seq: Tensor,
    /// `[seqs, max_blocks]`, short tables padded with block 0 (never read:
    /// a token reads only the blocks up to its position).
    block_tables: Tensor,
    rope: &'a RopeTables,
}

impl<'a> DeviceInputs<'a> {
    fn new(ctx: &Ctx, rope: &'a RopeTables, device: &Device) -> Result<Self> {
        let input = ctx.input;
        let max_blocks = ctx
            .block_tables
            .iter()
            .map(|t| t.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = vec![0u32; ctx.block_tables.len() * max_blocks];
        for (row, t) in tables.chunks_mut(max_blocks).zip(&ctx.block_tables) {
            row[..t.len()].copy_from_slice(t);
        }
        Ok(Self {
            positions: Tensor::new(input.positions, device)?,
            slots: Tensor::new(input.slot_mapping, device)?,
            token_seq: Tensor::new(ctx.token_seq.as_slice(), device)?,
            block_tables: Tensor::from_vec(tables, (ctx.block_tables.len(), max_blocks), device)?,
            rope,
        })
    }
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

    /// `x` is the previous layer's output and `residual` the stream before it
    /// (`None` at the stage's first layer, where `x` is the whole stream).
    /// Returns this layer's output and the stream before it: the residual
    /// adds are fused into the next RMSNorm.
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        ctx: &Ctx,
        cache: LayerCache,
    ) -> Result<(Tensor, Tensor)> {
        let (residual, h) = match residual {
            None => (x.clone(), self.input_layernorm.forward(x)?),
            Some(r) => self.input_layernorm.forward_residual(x, r)?,
        };
        let attn = match cache {
            LayerCache::Host(kv) => self.host_attention(&h, ctx, kv)?,
            LayerCache::Device(kv) => {
                let d = ctx
                    .device
                    .as_ref()
                    .expect("built for a device-layout cache");
                let qkv = self.qkv_proj.forward(&h)?;
                let Heads {
                    num_heads,
                    num_kv_heads,
                    head_dim,
                } = ctx.heads;
                let (q_w, kv_w) = (num_heads * head_dim, num_kv_heads * head_dim);
                let k = qkv.narrow(1, q_w, kv_w)?;
                let v = qkv.narrow(1, q_w + kv_w, kv_w)?;
                strata_kernels::write_kv(kv, &k, &v, &d.positions, &d.slots, d.rope)?;
                strata_kernels::paged_attention(
                    &qkv.narrow(1, 0, q_w)?,
                    kv,
                    &d.positions,
                    &d.token_seq,
                    &d.block_tables,
                    d.rope,
                    num_heads,
                )?
            }
        };
        let (residual, h) = self
            .post_attention_layernorm
            .forward_residual(&self.o_proj.forward(&attn)?, &residual)?;
        let m = strata_kernels::silu_and_mul(&self.gate_up_proj.forward(&h)?)?;
        Ok((self.down_proj.forward(&m)?, residual))
    }

    /// Attention on the CPU's own layout and code (`attention.rs`).
    fn host_attention(&self, h: &Tensor, ctx: &Ctx, cache: &mut LayerKv) -> Result<Tensor> {
        let qkv = self.qkv_proj.forward_split(h)?;
        let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
        let tokens = h.dim(0)?;
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
        Ok(Tensor::from_vec(
            out,
            (tokens, heads.num_heads * heads.head_dim),
            h.device(),
        )?)
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
            "the host KV-cache layout is read on the CPU only".into(),
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
    /// `rope`'s tables on the device, made on the first forward that needs them.
    rope_tables: OnceLock<RopeTables>,
    heads: Heads,
    device: Device,
    dtype: DType,
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
        let (device, dtype) = (w.device().clone(), w.dtype());
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
            Some(
                w.tensor("rope_freqs.weight", None)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        Ok(Self {
            rope: Rope::new(cfg, freq_factors.as_deref(), max_positions),
            rope_tables: OnceLock::new(),
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
            dtype,
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

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The activation (and KV cache) dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// An empty KV cache for this stage's layers and shard: the host layout
    /// on the CPU, the kernels' layout on a GPU.
    pub fn new_kv_cache(&self, num_blocks: usize) -> Result<KvCache> {
        if self.device.is_cpu() {
            Ok(KvCache::new(
                self.layers.len(),
                num_blocks,
                self.heads.num_kv_heads,
                self.heads.head_dim,
            ))
        } else {
            self.new_device_kv_cache(num_blocks)
        }
    }

    /// The kernels' cache layout on this model's device, whatever it is: on
    /// the CPU it runs the GPU's code path with the kernels' CPU references,
    /// which is how tests hold that path to the CPU one.
    pub fn new_device_kv_cache(&self, num_blocks: usize) -> Result<KvCache> {
        KvCache::new_on_device(
            self.layers.len(),
            num_blocks,
            self.heads.num_kv_heads,
            self.heads.head_dim,
            self.dtype,
            &self.device,
        )
    }

    /// Bytes of KV cache one block takes on this stage and shard.
    pub fn kv_bytes_per_block(&self) -> usize {
        KvCache::bytes_per_block(
            self.layers.len(),
            self.heads.num_kv_heads,
            self.heads.head_dim,
            self.dtype.size_in_bytes(),
        )
    }

    /// A generous bound on the device memory one step of `tokens` tokens
    /// needs beyond weights and KV cache: a layer's live activations (candle
    /// frees each layer's as the next begins), the logits of up to 256
    /// sequences, and room for the CUDA libraries' workspaces.
    pub fn activation_bytes(&self, tokens: usize) -> usize {
        let c = &self.cfg;
        let ws = self.heads.num_heads.max(1) * c.head_dim;
        let kv = self.heads.num_kv_heads * c.head_dim;
        let inter = c.intermediate_size * self.heads.num_heads / c.num_heads.max(1);
        let per_token = 4 * c.hidden_size + ws + 2 * kv + ws + 3 * inter;
        let layer = 2 * tokens * per_token * self.dtype.size_in_bytes();
        let logits = if self.lm_head.is_some() {
            tokens.min(256) * c.vocab_size * (self.dtype.size_in_bytes() + 4)
        } else {
            0
        };
        layer + logits + (512 << 20)
    }

    /// Runs one sequence's `tokens`, at positions `start..` of its blocks
    /// `table`, through a whole model; returns the logits of every token
    /// (`all_logits`) or of the last. The checks and tests drive a model
    /// this way, without a scheduler.
    pub fn forward_sequence(
        &self,
        kv: &mut KvCache,
        table: &[u32],
        start: usize,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Tensor> {
        let positions: Vec<u32> = (start..start + tokens.len()).map(|p| p as u32).collect();
        let slots: Vec<u32> = positions
            .iter()
            .map(|&p| table[p as usize / BLOCK_SIZE] * BLOCK_SIZE as u32 + p % BLOCK_SIZE as u32)
            .collect();
        let seqs = [SeqInfo {
            query_len: tokens.len(),
            block_table: table,
        }];
        let idx: Vec<u32> = if all_logits {
            (0..tokens.len() as u32).collect()
        } else {
            vec![tokens.len().saturating_sub(1) as u32]
        };
        let input = BatchInput {
            token_ids: tokens,
            positions: &positions,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_indices: &idx,
        };
        match self.forward(&input, None, kv)? {
            StageOutput::Logits(l) => Ok(l),
            StageOutput::Hidden(_) => Err(Error::Config(
                "forward_sequence needs the whole model (its last stage returns logits)".into(),
            )),
        }
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
            (_, Some(h)) => h.to_device(&self.device)?.to_dtype(self.dtype)?,
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
        let mut ctx = Ctx {
            input,
            token_seq,
            block_tables: input.seqs.iter().map(|s| s.block_table).collect(),
            rope: &self.rope,
            heads: self.heads,
            device: None,
        };
        if kv.num_layers() > 0 && matches!(kv.layer(0), LayerCache::Device(_)) {
            let tables = match self.rope_tables.get() {
                Some(t) => t,
                None => {
                    let t = self.rope.tables(&self.device)?;
                    self.rope_tables.get_or_init(|| t)
                }
            };
            ctx.device = Some(DeviceInputs::new(&ctx, tables, &self.device)?);
        }
        let mut residual = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (out, r) = layer.forward(&x, residual.as_ref(), &ctx, kv.layer(i))?;
            x = out;
            residual = Some(r);
        }
        match (&self.norm, &self.lm_head) {
            (Some(_), Some(_)) if input.logits_indices.is_empty() => Ok(StageOutput::Logits(
                Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?,
            )),
            (Some(norm), Some(head)) => {
                let idx = Tensor::new(input.logits_indices, &self.device)?;
                let x = x.index_select(&idx, 0)?;
                let rows = match residual {
                    Some(r) => norm.forward_residual(&x, &r.index_select(&idx, 0)?)?.1,
                    None => norm.forward(&x)?,
                };
                Ok(StageOutput::Logits(
                    head.forward(&rows)?.to_dtype(DType::F32)?,
                ))
            }
            // The next stage gets the whole residual stream.
            _ => Ok(StageOutput::Hidden(match residual {
                Some(r) => (x + r)?,
                None => x,
            })),
        }
    }
}
