//! Model code: Llama-family architectures in candle, loaded for one pipeline
//! stage (a [`LayerRange`](strata_types::LayerRange)) and one tensor-parallel
//! shard, with attention over a paged KV cache.
//!
//! Nothing here knows about requests, HTTP or networks: a forward pass takes a
//! flattened batch ([`BatchInput`]) and a [`KvCache`], and returns hidden
//! states (middle stages) or logits (the last stage).

mod attention;
mod config;
mod device;
mod error;
mod kv_cache;
mod layers;
mod llama;
mod quant;
mod rope;
pub mod weights;

pub use attention::{paged_attention, write_kv, Heads};
pub use config::{config_from_gguf, config_from_hf_json};
pub use device::{dtype_from_name, dtype_name, parse_dtype, DeviceRequest, Placement};
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use layers::{
    ColumnParallelLinear, Matmul, ParallelLmHead, RmsNorm, RowParallelLinear, VocabEmbedding,
};
pub use llama::{BatchInput, Llama, SeqInfo, StageOutput};
pub use quant::{Q4_1Matrix, Q8_0Matrix, QuantMatrix};
pub use rope::Rope;
pub use weights::{Shard, WeightFormat, Weights};
