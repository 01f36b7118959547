//! A stage at run time: it applies step messages to its per-request state,
//! runs its layers over the flattened batch, and (on the last stage) samples.
//!
//! A runner holds no scheduling logic: everything it does follows from the
//! [`SchedulerOutput`](strata_types::SchedulerOutput) it is given, so the
//! leader can drive it in-process or, later, over gRPC.

mod runner;
mod sampler;

pub use runner::{ModelRunner, RunnerError, StageResult};
pub use sampler::sample;
