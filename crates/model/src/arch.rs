//! The one interface between the engine and a model architecture, and the
//! registry that picks the architecture a checkpoint names.
//!
//! A checkpoint's config resolves into an [`Architecture`]: the model's own
//! full config, which summarises itself for the engine ([`ModelConfig`]: KV
//! layout, tensor-parallel unit, sizes) and loads one pipeline stage of one
//! tensor-parallel rank as a [`StageModel`]. The worker holds stage models
//! and the engine reads summaries; neither names an architecture, so a new
//! one is a module here and a line in [`REGISTRY`].

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};
use strata_comm::Communicator;
use strata_types::{KvLayout, LayerRange, ModelConfig};

use crate::batch::{BatchInput, OneSequence, StageOutput};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::weights::Weights;

/// A resolved architecture: what the engine needs to know, and how to load
/// a stage.
pub trait Architecture: Send + Sync + std::fmt::Debug {
    fn config(&self) -> &ModelConfig;

    /// Loads layers `range` (and the embedding / final norm and lm_head when
    /// the range is first / last) for `comm`'s rank, reading only those
    /// tensors and only this rank's share of them. `on_layer` is told each
    /// layer as it is loaded, for progress.
    fn load_stage(
        &self,
        w: &Weights,
        range: LayerRange,
        comm: Arc<dyn Communicator>,
        max_positions: usize,
        on_layer: &mut dyn FnMut(usize, LayerRange),
    ) -> Result<Box<dyn StageModel>>;
}

/// One pipeline stage of a model, for one tensor-parallel rank.
pub trait StageModel: Send + Sync + std::fmt::Debug {
    fn config(&self) -> &ModelConfig;
    fn layer_range(&self) -> LayerRange;
    fn device(&self) -> &Device;
    /// The activation (and KV cache) dtype.
    fn dtype(&self) -> DType;
    /// The longest sequence the position tables cover.
    fn max_positions(&self) -> usize;
    /// What this rank's cache keeps per token and layer.
    fn kv_layout(&self) -> KvLayout;

    /// A generous bound on the device memory one step of `tokens` tokens
    /// needs beyond weights and KV cache.
    fn activation_bytes(&self, tokens: usize) -> usize;

    /// Runs the stage. The first stage embeds `input.token_ids`; later
    /// stages take the previous stage's `hidden`.
    fn forward(
        &self,
        input: &BatchInput,
        hidden: Option<Tensor>,
        kv: &mut KvCache,
    ) -> Result<StageOutput>;

    fn is_last(&self) -> bool {
        self.layer_range().is_last(self.config().num_layers)
    }

    /// An empty KV cache for this stage's layers and shard, in the
    /// activation dtype (see [`StageModel::new_kv_cache_in`]).
    fn new_kv_cache(&self, num_blocks: usize) -> Result<KvCache> {
        self.new_kv_cache_in(num_blocks, self.dtype())
    }

    /// An empty KV cache in `kv_dtype`: the host layout on the CPU (f32 or
    /// bf16), the kernels' layout on a GPU (in the activation dtype only).
    fn new_kv_cache_in(&self, num_blocks: usize, kv_dtype: DType) -> Result<KvCache> {
        if self.device().is_cpu() {
            KvCache::new(
                self.layer_range().len(),
                num_blocks,
                self.kv_layout(),
                kv_dtype,
            )
        } else if kv_dtype != self.dtype() {
            Err(crate::Error::Unsupported(format!(
                "a {kv_dtype:?} KV cache on a GPU computing in {:?}: it keeps --dtype",
                self.dtype()
            )))
        } else {
            self.new_device_kv_cache(num_blocks)
        }
    }

    /// The kernels' cache layout on this model's device, whatever it is: on
    /// the CPU it runs the GPU's code path with the kernels' CPU references,
    /// which is how tests hold that path to the CPU one.
    fn new_device_kv_cache(&self, num_blocks: usize) -> Result<KvCache> {
        KvCache::new_on_device(
            self.layer_range().len(),
            num_blocks,
            self.kv_layout(),
            self.dtype(),
            self.device(),
        )
    }

    /// Bytes of KV cache one block takes on this stage and shard, in the
    /// activation dtype.
    fn kv_bytes_per_block(&self) -> usize {
        self.kv_bytes_per_block_in(self.dtype())
    }

    /// Bytes of KV cache one block takes on this stage and shard, in `kv_dtype`.
    fn kv_bytes_per_block_in(&self, kv_dtype: DType) -> usize {
        KvCache::bytes_per_block(
            self.layer_range().len(),
            self.kv_layout(),
            kv_dtype.size_in_bytes(),
        )
    }

    /// Runs one sequence's `tokens`, at positions `start..` of its blocks
    /// `table`, through a whole model; returns the logits of every token
    /// (`all_logits`) or of the last. The checks and tests drive a model
    /// this way, without a scheduler.
    fn forward_sequence(
        &self,
        kv: &mut KvCache,
        table: &[u32],
        start: usize,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Tensor> {
        let seq = OneSequence::new(table, start, tokens.len(), all_logits);
        match seq.run(table, tokens, |input| self.forward(input, None, kv))? {
            StageOutput::Logits(l) => Ok(l),
            StageOutput::Hidden(_) => Err(Error::Config(
                "forward_sequence needs the whole model (its last stage returns logits)".into(),
            )),
        }
    }
}

/// GGUF metadata, as candle reads it.
pub type GgufMetadata = HashMap<String, Value>;

/// Resolves a config.json: `(architecture name, its text)`.
type FromHf = fn(&str, &str) -> Result<Arc<dyn Architecture>>;
/// Resolves GGUF metadata: `(general.architecture, metadata, the file has
/// an output.weight)`.
type FromGguf = fn(&str, &GgufMetadata, bool) -> Result<Arc<dyn Architecture>>;

/// One architecture module's entry points.
struct Registered {
    /// `architectures[0]` spellings in `config.json`.
    hf: &'static [&'static str],
    /// `general.architecture` spellings in GGUF.
    gguf: &'static [&'static str],
    from_hf: FromHf,
    from_gguf: Option<FromGguf>,
}

const REGISTRY: &[Registered] = &[
    Registered {
        hf: crate::llama::HF_NAMES,
        gguf: crate::llama::GGUF_NAMES,
        from_hf: crate::llama::from_hf,
        from_gguf: Some(crate::llama::from_gguf),
    },
    Registered {
        hf: crate::deepseek::HF_NAMES,
        gguf: &[],
        from_hf: crate::deepseek::from_hf,
        from_gguf: None,
    },
];

/// Every `config.json` architecture strata loads.
pub fn supported_hf() -> Vec<&'static str> {
    REGISTRY.iter().flat_map(|r| r.hf.iter().copied()).collect()
}

/// Every GGUF `general.architecture` strata loads.
pub fn supported_gguf() -> Vec<&'static str> {
    REGISTRY
        .iter()
        .flat_map(|r| r.gguf.iter().copied())
        .collect()
}

/// Resolves a Hugging Face `config.json` (a config without `architectures`
/// is taken for Llama, as older ones were).
pub fn from_hf_config(text: &str) -> Result<Arc<dyn Architecture>> {
    #[derive(serde::Deserialize)]
    struct Names {
        #[serde(default)]
        architectures: Vec<String>,
    }
    let names: Names =
        serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
    let name = names
        .architectures
        .first()
        .map_or("LlamaForCausalLM", String::as_str);
    let r = REGISTRY
        .iter()
        .find(|r| r.hf.contains(&name))
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "architecture {name}; strata supports {}",
                supported_hf().join(", ")
            ))
        })?;
    (r.from_hf)(name, text)
}

/// Resolves GGUF metadata by its `general.architecture`.
pub fn from_gguf_metadata(
    md: &GgufMetadata,
    has_output_weight: bool,
) -> Result<Arc<dyn Architecture>> {
    let name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let from = REGISTRY
        .iter()
        .find(|r| r.gguf.contains(&name.as_str()))
        .and_then(|r| r.from_gguf)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "GGUF architecture `{name}` (supported: {})",
                supported_gguf().join(", ")
            ))
        })?;
    from(&name, md, has_output_weight)
}

/// The whole model in `w` as one stage for `comm`'s rank: how the checks
/// and tests run a model without a cluster.
pub fn load_whole(
    w: &Weights,
    comm: Arc<dyn Communicator>,
    max_positions: usize,
) -> Result<Box<dyn StageModel>> {
    let arch = w.architecture()?;
    let layers = LayerRange::full(arch.config().num_layers);
    arch.load_stage(w, layers, comm, max_positions, &mut |_, _| {})
}
