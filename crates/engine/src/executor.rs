//! Runs a step on the stages. The engine loop only sees [`Executor`]; the
//! one implementation runs this node's stages on its node runtime and, in a
//! cluster, streams the same step to every worker node.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use strata_proto::v1::{self as pb, execute_request::Kind};
use strata_types::{SchedulerOutput, StepMasks, StepResult};
use strata_worker::{NodeRuntime, RunnerError, StepOutcome};
use tokio::sync::mpsc::UnboundedSender;

use crate::cluster::Cluster;
use crate::error::{EngineError, Result};

/// How long a step may take before the leader gives up on it. A lost node
/// is noticed much sooner, by its broken stream or missed heartbeats.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a wait for a step checks whether a node was lost.
const LOST_POLL: Duration = Duration::from_millis(20);

/// Runs steps, possibly several at once: `submit` starts one, `collect`
/// returns the oldest one's result. Steps finish in the order submitted.
/// A step that fails with [`EngineError::NodeLost`] leaves the executor
/// paused: `abandon` drops what was in flight, and `try_resume` brings the
/// nodes back, with no request state on any of them.
pub trait Executor: Send {
    /// How many steps may be in flight at once (the pipeline depth).
    fn max_in_flight(&self) -> usize {
        1
    }
    fn submit(&mut self, out: &SchedulerOutput) -> Result<()>;
    /// Sends the token masks of a submitted step's constrained requests
    /// (its `structured_req_ids`), which its sampling stage waits for.
    fn post_masks(&mut self, masks: StepMasks) -> Result<()>;
    fn collect(&mut self) -> Result<StepResult>;
    /// Activation bytes this node has sent to the next pipeline node.
    fn activation_bytes_sent(&self) -> u64 {
        0
    }
    /// Drops every step in flight (after a node was lost).
    fn abandon(&mut self) {}
    /// One try at resuming after a node was lost; true once every node runs
    /// again, empty of requests.
    fn try_resume(&mut self) -> bool {
        true
    }
}

pub(crate) type RemoteReply = std::result::Result<pb::StepReply, String>;

/// A worker node's end of the step stream, as the leader sees it.
pub(crate) struct RemoteNode {
    pub rank: usize,
    pub tx: UnboundedSender<pb::ExecuteRequest>,
    pub rx: mpsc::Receiver<RemoteReply>,
}

/// A step submitted and not yet collected.
struct Pending {
    step_id: u64,
    local: mpsc::Receiver<StepOutcome>,
}

/// The leader's node plus every worker node. Each step goes to all of them;
/// activations flow node to node on the data plane, and the node that runs
/// the last stage's first rank answers with the sampled tokens.
pub struct PipelineExecutor {
    local: NodeRuntime,
    /// The local node's current run: its steps carry it.
    run: u64,
    cluster: Option<Cluster>,
    remotes: Vec<RemoteNode>,
    /// The node whose reply carries the sampled tokens (0: this one).
    result_node: usize,
    /// Pipeline stages on different nodes, which can work at once.
    depth: usize,
    pending: VecDeque<Pending>,
}

impl PipelineExecutor {
    /// Every stage on this node's runtime, started as run `run`.
    pub fn local(local: NodeRuntime, run: u64) -> Self {
        Self {
            local,
            run,
            cluster: None,
            remotes: Vec::new(),
            result_node: 0,
            depth: 1,
            pending: VecDeque::new(),
        }
    }

    pub(crate) fn cluster(
        cluster: Cluster,
        local: NodeRuntime,
        remotes: Vec<RemoteNode>,
        run: u64,
        result_node: usize,
        depth: usize,
    ) -> Self {
        Self {
            local,
            run,
            cluster: Some(cluster),
            remotes,
            result_node,
            depth,
            pending: VecDeque::new(),
        }
    }

    /// The node that was lost, if membership knows of one.
    fn lost(&self) -> Option<EngineError> {
        let (node, reason) = self.cluster.as_ref()?.state().first_lost()?;
        Some(EngineError::NodeLost {
            node: Some(node),
            reason,
        })
    }

    /// A node's step failure, typed: a broken data plane means a node was
    /// lost (membership may already know which).
    fn step_error(
        &self,
        node: usize,
        kind: Option<pb::step_error::Kind>,
        msg: String,
    ) -> EngineError {
        match kind {
            Some(pb::step_error::Kind::Link) => self.lost().unwrap_or(EngineError::NodeLost {
                node: None,
                reason: format!("node {node}: {msg}"),
            }),
            _ => EngineError::Execution(format!("node {node}: {msg}")),
        }
    }
}

impl PipelineExecutor {
    /// Sends one message (made only when there are workers) down every
    /// worker's step stream.
    fn send_to_workers(&self, message: impl FnOnce() -> Kind) -> Result<()> {
        if self.remotes.is_empty() {
            return Ok(());
        }
        let kind = message();
        for r in &self.remotes {
            r.tx.send(pb::ExecuteRequest {
                kind: Some(kind.clone()),
            })
            .map_err(|_| EngineError::NodeLost {
                node: Some(r.rank),
                reason: "its step stream is closed".into(),
            })?;
        }
        Ok(())
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

    /// Hands the step to every worker, then to this node's runtime (the
    /// first stage: its activations go on to the next node).
    fn submit(&mut self, out: &SchedulerOutput) -> Result<()> {
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        self.send_to_workers(|| Kind::Step(out.into()))?;
        let (tx, rx) = mpsc::channel();
        self.local.step(self.run, out.clone(), move |r| {
            let _ = tx.send(r);
        });
        self.pending.push_back(Pending {
            step_id: out.step_id,
            local: rx,
        });
        Ok(())
    }

    /// Every node gets them: whichever holds ranks of the last stage samples.
    fn post_masks(&mut self, masks: StepMasks) -> Result<()> {
        self.send_to_workers(|| Kind::Masks((&masks).into()))?;
        self.local.post_masks(masks);
        Ok(())
    }

    fn collect(&mut self) -> Result<StepResult> {
        let Pending {
            step_id: step,
            local,
        } = self
            .pending
            .pop_front()
            .ok_or_else(|| exec_err("collect without a step in flight"))?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        // Every node's answer, even after a failure, so the streams stay in
        // step; a lost node ends the wait at once.
        let mut answers: Vec<Option<Result<Option<StepResult>>>> =
            (0..=self.remotes.len()).map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            if answers[0].is_none() {
                match local.recv_timeout(LOST_POLL) {
                    Ok(r) => {
                        answers[0] = Some(r.map_err(|e| match e {
                            RunnerError::Link(m) => {
                                self.step_error(0, Some(pb::step_error::Kind::Link), m)
                            }
                            e => exec_err(format!("node 0: {e}")),
                        }))
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        answers[0] = Some(Err(exec_err("the leader's node runtime has stopped")))
                    }
                }
            }
            for (i, r) in self.remotes.iter().enumerate() {
                if answers[i + 1].is_some() {
                    continue;
                }
                let wait = if answers[0].is_some() {
                    LOST_POLL
                } else {
                    Duration::ZERO
                };
                let reply = match r.rx.recv_timeout(wait) {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(why)) => {
                        answers[i + 1] = Some(Err(EngineError::NodeLost {
                            node: Some(r.rank),
                            reason: why,
                        }));
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        answers[i + 1] = Some(Err(EngineError::NodeLost {
                            node: Some(r.rank),
                            reason: "its step stream is closed".into(),
                        }));
                        continue;
                    }
                };
                answers[i + 1] = Some(if let Some(e) = reply.error {
                    Err(self.step_error(
                        r.rank,
                        pb::step_error::Kind::try_from(e.kind).ok(),
                        e.message,
                    ))
                } else if reply.step_id != step {
                    Err(exec_err(format!(
                        "node {} answered step {} while step {step} ran",
                        r.rank, reply.step_id
                    )))
                } else {
                    Ok(reply.result.map(Into::into))
                });
            }
            if answers.iter().any(Option::is_none) {
                if let Some(lost) = self.lost() {
                    return Err(lost);
                }
                if Instant::now() >= deadline {
                    return Err(exec_err(format!(
                        "step {step} did not finish within {STEP_TIMEOUT:?}"
                    )));
                }
            }
        }
        let mut result = None;
        let mut first_error: Option<EngineError> = None;
        for (i, a) in answers.into_iter().enumerate() {
            let node = if i == 0 { 0 } else { self.remotes[i - 1].rank };
            match a.expect("every node answered") {
                Ok(r) if node == self.result_node => result = r,
                Ok(_) => {}
                // A lost node outranks the failures it caused elsewhere.
                Err(e @ EngineError::NodeLost { node: Some(_), .. }) => first_error = Some(e),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(self.lost().unwrap_or(e));
        }
        result.ok_or_else(|| exec_err(format!("no node sampled step {step}")))
    }

    fn abandon(&mut self) {
        self.pending.clear();
        // Closing the streams lets the workers' old runs go.
        self.remotes.clear();
        self.local.interrupt();
    }

    fn try_resume(&mut self) -> bool {
        let Some(cluster) = &mut self.cluster else {
            return true;
        };
        match cluster.try_recover() {
            Ok(Some((remotes, run))) => {
                self.remotes = remotes;
                self.run = run;
                true
            }
            _ => false,
        }
    }
}
