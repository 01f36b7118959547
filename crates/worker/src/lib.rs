//! A node at run time: its stages apply step messages to their per-request
//! state, run their layers over the flattened batch, and (on the last stage)
//! sample.
//!
//! A runner holds no scheduling logic: everything it does follows from the
//! [`SchedulerOutput`](strata_types::SchedulerOutput) it is given. One
//! [`NodeRuntime`] owns a node's lifecycle; the leader drives its own node's
//! runtime in-process, and [`run_worker`] serves a worker's over gRPC.

mod drafter;
mod masks;
mod node;
mod runner;
mod sampler;
mod service;
mod stage;
mod wire;

pub use drafter::{DraftSpec, Drafter};
pub use masks::MaskBoard;
pub use node::{LoadReport, LoadSpec, NodeConfig, NodeRuntime, Reply, StartSpec, StepOutcome};
pub use runner::{ModelRunner, RunnerError, StageResult};
pub use sampler::sample;
pub use service::{run_worker, Phase, WorkerOptions, WorkerStatus, LEADER_SILENCE};
pub use stage::{stage_nccl_id, KvBudget, Links, LoadedNode, LocalStage, NodeStages, TpStage};
