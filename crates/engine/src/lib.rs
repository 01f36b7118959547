//! The leader side of strata: the engine loop over the scheduler and an
//! [`Executor`], and everything that turns text into tokens and back
//! (tokenizer, chat template, incremental detokenizer with stop strings).

mod chat;
mod cluster;
mod demo;
mod detokenizer;
mod engine;
mod error;
mod executor;
mod load;
mod membership;
mod metrics;
mod structured;
mod tokenizer;

pub use chat::ChatTemplate;
pub use cluster::ClusterOptions;
pub use demo::{cache_dir, ensure_demo_model, DEMO_MODEL_NAME};
pub use detokenizer::IncrementalDetokenizer;
pub use engine::{
    start_engine, EngineConfig, EngineHandle, EngineStats, GenerateRequest, OutputStream,
    RecoveryStats, RequestOutput,
};
pub use error::{EngineError, Result};
pub use executor::{Executor, PipelineExecutor};
pub use load::{load_engine, GenerationDefaults, LoadOptions, ModelInfo};
pub use membership::{ClusterState, NodePhase, HEARTBEAT_LOST};
pub use metrics::{Histogram, RequestMetrics, FINISHED_REASONS};
pub use strata_sched::SpeculativeConfig;
pub use structured::{Constraint, Guide, JsonStyle, StructuredOutputs};
pub use tokenizer::Tokenizer;
