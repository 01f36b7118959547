//! A stage at run time: it applies step messages to its per-request state,
//! runs its layers over the flattened batch, and (on the last stage) samples.
//!
//! A runner holds no scheduling logic: everything it does follows from the
//! [`SchedulerOutput`](strata_types::SchedulerOutput) it is given, so the
//! leader drives it the same way in-process ([`NodeStages`]) and over gRPC
//! ([`run_worker`]).

mod runner;
mod sampler;
mod service;
mod stage;

pub use runner::{ModelRunner, RunnerError, StageResult};
pub use sampler::sample;
pub use service::{run_worker, Phase, WorkerOptions, WorkerStatus};
pub use stage::{
    stage_nccl_id, KvBudget, Links, LoadedNode, LocalStage, NodeStages, RingMember, TpStage,
};
