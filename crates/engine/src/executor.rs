//! Runs a step on the stages. The engine loop only sees this trait, so the
//! in-process runner here and remote stages (over gRPC) are interchangeable.

use strata_types::{SchedulerOutput, StepResult};
use strata_worker::{ModelRunner, StageResult};

use crate::error::{EngineError, Result};

pub trait Executor: Send {
    fn execute(&mut self, out: &SchedulerOutput) -> Result<StepResult>;
}

/// Every stage in this process, in pipeline order: each step runs them one
/// after another, handing hidden states down the pipeline.
pub struct LocalExecutor {
    stages: Vec<ModelRunner>,
}

impl LocalExecutor {
    pub fn new(stages: Vec<ModelRunner>) -> Self {
        assert!(!stages.is_empty(), "an executor needs a stage");
        Self { stages }
    }
}

impl Executor for LocalExecutor {
    fn execute(&mut self, out: &SchedulerOutput) -> Result<StepResult> {
        let fail = |e: strata_worker::RunnerError| EngineError::Execution(e.to_string());
        let mut hidden = None;
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            match stage.execute(out, hidden.take()).map_err(fail)? {
                StageResult::Hidden(h) if i < last => hidden = h,
                StageResult::Sampled(r) if i == last => return Ok(r),
                _ => {
                    return Err(EngineError::Execution(format!(
                        "stage {i} of {} answered out of turn",
                        last + 1
                    )))
                }
            }
        }
        unreachable!("the last stage returns or fails")
    }
}
