//! What every decoder-only architecture's stage shares: the token embedding
//! on the first stage, a run of layers with the residual stream between
//! them, and the final norm and lm_head on the last. An architecture brings
//! its layer ([`Layer`]) and what its cache keeps per token.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use strata_comm::Communicator;
use strata_types::{KvLayout, LayerRange, ModelConfig};

use crate::arch::StageModel;
use crate::batch::{Batch, BatchInput, StageOutput};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, LayerCache};
use crate::layers::{ParallelLmHead, RmsNorm, VocabEmbedding};
use crate::rope::Rope;
use crate::weights::{Shard, Weights};

/// One decoder layer of an architecture.
pub(crate) trait Layer: Send + Sync + std::fmt::Debug {
    /// `x` is the previous layer's output and `residual` the stream before
    /// it (`None` at the stage's first layer, where `x` is the whole
    /// stream). Returns this layer's output and the stream before it: the
    /// residual adds are fused into the next RMSNorm.
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        batch: &Batch,
        rope: &Rope,
        cache: LayerCache,
    ) -> Result<(Tensor, Tensor)>;
}

/// What a stage needs to know about its architecture beyond its layers.
pub(crate) struct StageSpec<'a> {
    pub summary: &'a ModelConfig,
    pub rope: Rope,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// This rank's cache per token and layer.
    pub kv: KvLayout,
    /// Activation values one token keeps live in one layer, on this rank
    /// (for the memory reserve).
    pub activations_per_token: usize,
}

/// One pipeline stage of a decoder-only model, for one tensor-parallel rank.
#[derive(Debug)]
pub(crate) struct DecoderStage<L> {
    summary: ModelConfig,
    range: LayerRange,
    embed: Option<VocabEmbedding>,
    layers: Vec<L>,
    norm: Option<RmsNorm>,
    lm_head: Option<ParallelLmHead>,
    rope: Rope,
    kv: KvLayout,
    activations_per_token: usize,
    device: Device,
    dtype: DType,
}

impl<L: Layer> DecoderStage<L> {
    /// Loads layers `range` with `load_layer` (and the embedding / final
    /// norm and lm_head when the range is first / last), reading only those
    /// tensors.
    pub(crate) fn load(
        w: &Weights,
        spec: StageSpec,
        range: LayerRange,
        comm: &Arc<dyn Communicator>,
        mut load_layer: impl FnMut(usize) -> Result<L>,
        on_layer: &mut dyn FnMut(usize, LayerRange),
    ) -> Result<Self> {
        let cfg = spec.summary;
        if range.end > cfg.num_layers || range.is_empty() {
            return Err(Error::Config(format!(
                "layer range [{}, {}) is not inside the model's {} layers",
                range.start, range.end, cfg.num_layers
            )));
        }
        let ws = comm.world_size();
        cfg.check_tensor_parallel(ws).map_err(Error::Config)?;
        let (device, dtype) = (w.device().clone(), w.dtype());
        let vocab_shard = (ws > 1).then(|| Shard::uneven(0, comm.rank(), ws));
        let is_last = range.is_last(cfg.num_layers);
        // A tied lm_head reuses the embedding matrix, read once; GGUF keeps it
        // quantized for the matmul and dequantizes a copy for lookups.
        let embed_needed = range.is_first() || (is_last && spec.tie_word_embeddings);
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
            layers.push(load_layer(i)?);
            on_layer(i, range);
        }
        let (norm, lm_head) = if is_last {
            let head = if spec.tie_word_embeddings {
                embed_mm.expect("read above for a tied head")
            } else {
                w.matmul("lm_head.weight", vocab_shard)?
            };
            (
                Some(RmsNorm::load(w, "model.norm.weight", spec.rms_norm_eps)?),
                Some(ParallelLmHead::new(head, cfg.vocab_size, comm.clone())),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            summary: cfg.clone(),
            range,
            embed,
            layers,
            norm,
            lm_head,
            rope: spec.rope,
            kv: spec.kv,
            activations_per_token: spec.activations_per_token,
            device,
            dtype,
        })
    }
}

impl<L: Layer> StageModel for DecoderStage<L> {
    fn config(&self) -> &ModelConfig {
        &self.summary
    }

    fn layer_range(&self) -> LayerRange {
        self.range
    }

    fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn kv_layout(&self) -> KvLayout {
        self.kv
    }

    /// A layer's live activations (candle frees each layer's as the next
    /// begins), the logits of up to 256 sequences, and room for the CUDA
    /// libraries' workspaces.
    fn activation_bytes(&self, tokens: usize) -> usize {
        let bytes = self.dtype.size_in_bytes();
        let layer = 2 * tokens * self.activations_per_token * bytes;
        let logits = if self.lm_head.is_some() {
            tokens.min(256) * self.summary.vocab_size * (bytes + 4)
        } else {
            0
        };
        layer + logits + (512 << 20)
    }

    fn forward(
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
        let kernels = kv.num_layers() > 0 && matches!(kv.layer(0), LayerCache::Device(_));
        let batch = Batch::new(input, kernels.then_some(&self.device))?;
        let mut residual = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (out, r) = layer.forward(&x, residual.as_ref(), &batch, &self.rope, kv.layer(i))?;
            x = out;
            residual = Some(r);
        }
        match (&self.norm, &self.lm_head) {
            (Some(_), Some(_)) if input.logits_indices.is_empty() => Ok(StageOutput::Logits(
                Tensor::zeros((0, self.summary.vocab_size), DType::F32, &self.device)?,
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
