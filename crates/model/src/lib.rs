//! Model code in candle: each architecture is a module that resolves its
//! config and loads one pipeline stage (a
//! [`LayerRange`](strata_types::LayerRange)) of one tensor-parallel shard as
//! a [`StageModel`], with attention over a paged KV cache. [`arch`] is the
//! interface and the registry.
//!
//! Nothing here knows about requests, HTTP or networks: a forward pass takes a
//! flattened batch ([`BatchInput`]) and a [`KvCache`], and returns hidden
//! states (middle stages) or logits (the last stage).

pub mod arch;
mod attention;
mod batch;
mod config;
mod decoder;
mod deepseek;
mod device;
mod error;
mod fp8;
mod half_matrix;
mod kv_cache;
mod layers;
mod llama;
mod mlp;
mod pages;
mod quant;
mod rope;
pub mod weights;

pub use arch::{from_gguf_metadata, from_hf_config, load_whole, Architecture, StageModel};
pub use attention::{paged_attention, write_kv, Heads};
pub use batch::{BatchInput, SeqInfo, StageOutput};
pub use deepseek::DeepseekConfig;
pub use device::{dtype_from_name, dtype_name, parse_dtype, DeviceRequest, Placement};
pub use error::{Error, Result};
pub use fp8::Fp8;
pub use half_matrix::{HalfKind, HalfMatrix};
pub use kv_cache::{KvCache, KvElem, LayerKv, Plane};
pub use layers::{
    ColumnParallelLinear, Matmul, ParallelLmHead, RmsNorm, RowParallelLinear, VocabEmbedding,
};
pub use llama::{LlamaConfig, MoeConfig};
pub use quant::{Q4_1Matrix, Q8_0Matrix, QuantMatrix};
pub use rope::{Rope, RopeConfig, RopeScaling};
pub use weights::{Shard, WeightFormat, Weights};
