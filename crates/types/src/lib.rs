//! Plain data shared across strata: no tensors, no I/O.
//!
//! The step messages here ([`SchedulerOutput`], [`StepResult`]) are what the
//! leader sends to stages and gets back; they carry ids and diffs only, so the
//! same types travel in-process today and over gRPC later.

mod config;
mod layout;
mod mask;
pub mod plan;
mod sampling;
mod step;

pub use config::{KvLayout, LayerRange, ModelConfig, RopeStyle};
pub use layout::{ClusterLayout, NodePlan, StageSlot};
pub use mask::{StepMasks, TokenMask};
pub use sampling::SamplingParams;
pub use step::{
    CachedRequestData, Logprobs, NewRequestData, SampledToken, SchedulerOutput, StepResult,
};

/// Identifies one sequence in the engine (one choice of one API request).
pub type RequestId = u64;
/// A token id in the model's vocabulary.
pub type TokenId = u32;
/// A physical KV-cache block, the same id on every stage.
pub type BlockId = u32;

/// Why a sequence stopped, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// The client went away or the request was cancelled.
    Abort,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Tokens per KV-cache block.
pub const BLOCK_SIZE: usize = 16;
