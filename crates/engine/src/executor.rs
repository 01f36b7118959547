//! Runs a step on the stages. The engine loop only sees [`Executor`]; the
//! one implementation runs this node's stages in-process and, in a cluster,
//! streams the same step to every worker node.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Duration;

use strata_proto::v1::{self as pb, execute_request::Kind};
use strata_types::{SchedulerOutput, StepResult};
use strata_worker::NodeStages;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::{EngineError, Result};

/// How long a step may take on a worker before the leader gives up on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs steps, possibly several at once: `submit` starts one, `collect`
/// returns the oldest one's result. Steps finish in the order submitted.
pub trait Executor: Send {
    /// How many steps may be in flight at once (the pipeline depth).
    fn max_in_flight(&self) -> usize {
        1
    }
    fn submit(&mut self, out: &SchedulerOutput) -> Result<()>;
    fn collect(&mut self) -> Result<StepResult>;
    /// Activation bytes this node has sent to the next pipeline node.
    fn activation_bytes_sent(&self) -> u64 {
        0
    }
}

/// A worker node's end of the step stream, as the leader sees it.
pub(crate) struct RemoteNode {
    pub rank: usize,
    pub tx: UnboundedSender<pb::ExecuteRequest>,
    pub rx: mpsc::Receiver<std::result::Result<pb::StepReply, String>>,
}

/// The leader's stages plus every worker node's. Each step goes to all of
/// them; activations flow node to node on the data plane, and the node that
/// runs the last stage's first rank answers with the sampled tokens.
pub struct PipelineExecutor {
    local: NodeStages,
    remotes: Vec<RemoteNode>,
    /// The node whose reply carries the sampled tokens (0: this one).
    result_node: usize,
    /// Pipeline stages on different nodes, which can work at once.
    depth: usize,
    /// Submitted steps, oldest first, with what this node's stages made of each.
    pending: VecDeque<(u64, Result<Option<StepResult>>)>,
}

impl PipelineExecutor {
    /// Every stage in this process.
    pub fn local(local: NodeStages) -> Self {
        Self {
            local,
            remotes: Vec::new(),
            result_node: 0,
            depth: 1,
            pending: VecDeque::new(),
        }
    }

    pub(crate) fn cluster(
        local: NodeStages,
        remotes: Vec<RemoteNode>,
        result_node: usize,
        depth: usize,
    ) -> Self {
        Self {
            local,
            remotes,
            result_node,
            depth,
            pending: VecDeque::new(),
        }
    }
}

fn exec_err(msg: impl Into<String>) -> EngineError {
    EngineError::Execution(msg.into())
}

impl Executor for PipelineExecutor {
    fn max_in_flight(&self) -> usize {
        self.depth
    }

    fn activation_bytes_sent(&self) -> u64 {
        self.local.bytes_sent()
    }

    /// Hands the step to every worker, then runs this node's stages on it
    /// (the first stage: its activations go on to the next node).
    fn submit(&mut self, out: &SchedulerOutput) -> Result<()> {
        if !self.remotes.is_empty() {
            let msg = pb::SchedulerOutput::from(out);
            for r in &self.remotes {
                r.tx.send(pb::ExecuteRequest {
                    kind: Some(Kind::Step(msg.clone())),
                })
                .map_err(|_| exec_err(format!("node {}: the step stream is closed", r.rank)))?;
            }
        }
        let local = self.local.execute(out).map_err(|e| exec_err(e.to_string()));
        self.pending.push_back((out.step_id, local));
        Ok(())
    }

    fn collect(&mut self) -> Result<StepResult> {
        let (step, local) = self
            .pending
            .pop_front()
            .ok_or_else(|| exec_err("collect without a step in flight"))?;
        let mut first_error = None;
        let mut result = match local {
            Ok(r) => r,
            Err(e) => {
                first_error = Some(e);
                None
            }
        };
        // Collect every node's answer, even after a failure, so the streams
        // stay in step.
        for r in &self.remotes {
            let reply = match r.rx.recv_timeout(STEP_TIMEOUT) {
                Ok(Ok(reply)) if !reply.error.is_empty() => Err(exec_err(reply.error)),
                Ok(Ok(reply)) if reply.step_id != step => Err(exec_err(format!(
                    "node {} answered step {} while step {step} ran",
                    r.rank, reply.step_id
                ))),
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(e)) => Err(exec_err(e)),
                Err(_) => Err(exec_err(format!(
                    "node {} did not answer step {step} within {STEP_TIMEOUT:?}",
                    r.rank
                ))),
            };
            match reply {
                Ok(reply) if r.rank == self.result_node => result = reply.result.map(Into::into),
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        result.ok_or_else(|| exec_err(format!("no node sampled step {step}")))
    }
}
