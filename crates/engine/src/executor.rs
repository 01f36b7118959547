//! Runs a step on the stages. The engine loop only sees this trait, so the
//! in-process runner here and remote stages (over gRPC) are interchangeable.

use strata_types::{SchedulerOutput, StepResult};
use strata_worker::ModelRunner;

use crate::error::{EngineError, Result};

pub trait Executor: Send {
    fn execute(&mut self, out: &SchedulerOutput) -> Result<StepResult>;
}

/// Every stage in this process: today, one runner holding the whole model.
pub struct LocalExecutor {
    runner: ModelRunner,
}

impl LocalExecutor {
    pub fn new(runner: ModelRunner) -> Self {
        Self { runner }
    }
}

impl Executor for LocalExecutor {
    fn execute(&mut self, out: &SchedulerOutput) -> Result<StepResult> {
        self.runner
            .execute(out)
            .map_err(|e| EngineError::Execution(e.to_string()))
    }
}
