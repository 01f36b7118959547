//! Runs a step on the stages. The engine loop only sees [`Executor`], so the
//! in-process stages here and remote stages (over gRPC) are interchangeable.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use candle_core::Tensor;
use strata_types::{SchedulerOutput, StepResult};
use strata_worker::{ModelRunner, RunnerError, StageResult};

use crate::error::{EngineError, Result};

pub trait Executor: Send {
    fn execute(&mut self, out: &SchedulerOutput) -> Result<StepResult>;
}

/// One pipeline stage in this process: a single runner, or its
/// tensor-parallel ranks on threads of their own.
pub enum LocalStage {
    Single(Box<ModelRunner>),
    Parallel(TpStage),
}

impl LocalStage {
    fn execute(&mut self, out: &SchedulerOutput, hidden: Option<Tensor>) -> Result<StageResult> {
        match self {
            LocalStage::Single(r) => r.execute(out, hidden).map_err(runner_error),
            LocalStage::Parallel(tp) => tp.execute(out, hidden),
        }
    }
}

fn runner_error(e: RunnerError) -> EngineError {
    EngineError::Execution(e.to_string())
}

/// Every stage in this process, in pipeline order: each step runs them one
/// after another, handing hidden states down the pipeline.
pub struct LocalExecutor {
    stages: Vec<LocalStage>,
}

impl LocalExecutor {
    pub fn new(stages: Vec<LocalStage>) -> Self {
        assert!(!stages.is_empty(), "an executor needs a stage");
        Self { stages }
    }
}

impl Executor for LocalExecutor {
    fn execute(&mut self, out: &SchedulerOutput) -> Result<StepResult> {
        let mut hidden = None;
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            match stage.execute(out, hidden.take())? {
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

type Job = (Arc<SchedulerOutput>, Option<Tensor>);
type JobResult = std::result::Result<StageResult, RunnerError>;

/// A stage's tensor-parallel ranks, each a thread owning its runner (its
/// shard of the weights and of the KV cache). Every rank runs every step on
/// the same input; their collectives meet inside the model, and since the
/// logits are gathered on all of them, rank 0's result speaks for the stage.
pub struct TpStage {
    ranks: Vec<(mpsc::Sender<Job>, mpsc::Receiver<JobResult>)>,
    threads: Vec<JoinHandle<()>>,
}

impl TpStage {
    pub fn new(runners: Vec<ModelRunner>) -> Self {
        let mut ranks = Vec::new();
        let mut threads = Vec::new();
        for (rank, mut runner) in runners.into_iter().enumerate() {
            let (job_tx, job_rx) = mpsc::channel::<Job>();
            let (res_tx, res_rx) = mpsc::channel();
            let t = std::thread::Builder::new()
                .name(format!("strata-tp{rank}"))
                .spawn(move || {
                    for (out, hidden) in job_rx {
                        if res_tx.send(runner.execute(&out, hidden)).is_err() {
                            return;
                        }
                    }
                })
                .expect("spawning a tensor-parallel rank");
            ranks.push((job_tx, res_rx));
            threads.push(t);
        }
        Self { ranks, threads }
    }

    fn execute(&mut self, out: &SchedulerOutput, hidden: Option<Tensor>) -> Result<StageResult> {
        let gone = || EngineError::Execution("a tensor-parallel rank thread has exited".into());
        let out = Arc::new(out.clone());
        for (tx, _) in &self.ranks {
            tx.send((out.clone(), hidden.clone())).map_err(|_| gone())?;
        }
        // Wait for every rank, so none runs ahead into the next step.
        let mut results = Vec::with_capacity(self.ranks.len());
        for (_, rx) in &self.ranks {
            results.push(rx.recv().map_err(|_| gone())?);
        }
        let first = results.into_iter().next().expect("at least one rank");
        first.map_err(runner_error)
    }
}

impl Drop for TpStage {
    fn drop(&mut self) {
        // Closing the job channels ends the rank threads.
        self.ranks.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
