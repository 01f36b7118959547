//! What one node runs: its pipeline stages in order, each a single runner or
//! tensor-parallel ranks on threads, fed by and feeding the data plane.

use std::net::{SocketAddr, TcpListener};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::Tensor;
use strata_comm::{Communicator, SingleRank, TcpComm, TcpTransport, ThreadComm};
use strata_model::{KvCache, Llama, Weights};
use strata_types::{ModelConfig, SchedulerOutput, StageSlot, StepResult};

use crate::runner::{ModelRunner, RunnerError, StageResult};

/// A node's models, loaded but without a KV cache: the leader first learns
/// how many blocks every node can hold, then starts them all with the least.
pub struct LoadedNode {
    stages: Vec<Vec<Llama>>,
    bytes_per_block: usize,
}

/// This node's place in a tensor-parallel ring that spans nodes.
pub struct RingMember {
    pub rank: usize,
    /// Bound before the node announced its address.
    pub listener: TcpListener,
    /// Every rank's listener, in rank order.
    pub addrs: Vec<SocketAddr>,
    pub token: String,
    pub timeout: Duration,
}

impl LoadedNode {
    /// Loads `slots` (this node's stages, in pipeline order). A slot whose
    /// ranks all live here gets one thread-backed communicator per rank; one
    /// that spans nodes is a single rank of `ring`.
    pub fn load(
        weights: &Weights,
        config: &ModelConfig,
        slots: &[StageSlot],
        mut ring: Option<RingMember>,
        max_model_len: usize,
        progress: &mut dyn FnMut(usize, strata_types::LayerRange),
    ) -> Result<Self, RunnerError> {
        let mut stages = Vec::with_capacity(slots.len());
        let mut bytes_per_block = 0;
        for slot in slots {
            let comms: Vec<Arc<dyn Communicator>> = if slot.spans_nodes() {
                let r = ring.take().ok_or_else(|| {
                    RunnerError::Setup(format!(
                        "stage {} spans nodes but this node was given no tensor-parallel ring",
                        slot.stage
                    ))
                })?;
                vec![Arc::new(TcpComm::join(
                    r.rank, r.listener, &r.addrs, &r.token, r.timeout,
                )?)]
            } else if slot.tp_size == 1 {
                vec![Arc::new(SingleRank)]
            } else {
                ThreadComm::group(slot.tp_size)
                    .into_iter()
                    .map(|c| Arc::new(c) as Arc<dyn Communicator>)
                    .collect()
            };
            let models = comms
                .into_iter()
                .map(|comm| {
                    Llama::load(weights, config, slot.layers, comm, max_model_len, progress)
                })
                .collect::<Result<Vec<_>, _>>()?;
            bytes_per_block += slot.tp_rank_count
                * KvCache::bytes_per_block(
                    slot.layers.len(),
                    config.num_kv_heads / slot.tp_size,
                    config.head_dim,
                );
            stages.push(models);
        }
        Ok(Self {
            stages,
            bytes_per_block,
        })
    }

    /// KV bytes one block costs on this node, over all its layers and ranks.
    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_block
    }

    /// Allocates `num_blocks` of KV cache per rank and starts the rank threads.
    pub fn start(self, num_blocks: usize, links: Links) -> NodeStages {
        let stages = self
            .stages
            .into_iter()
            .map(|models| {
                let mut runners: Vec<ModelRunner> = models
                    .into_iter()
                    .map(|m| ModelRunner::new(m, num_blocks))
                    .collect();
                if runners.len() == 1 {
                    LocalStage::Single(Box::new(runners.remove(0)))
                } else {
                    LocalStage::Parallel(TpStage::new(runners))
                }
            })
            .collect();
        NodeStages::new(stages, links)
    }
}

/// A node's data-plane links: activations in from the node before, out to
/// the node after.
#[derive(Default)]
pub struct Links {
    pub input: Option<TcpTransport>,
    pub output: Option<TcpTransport>,
}

/// One pipeline stage in this process.
pub enum LocalStage {
    Single(Box<ModelRunner>),
    Parallel(TpStage),
}

impl LocalStage {
    fn execute(
        &mut self,
        out: &SchedulerOutput,
        hidden: Option<Tensor>,
    ) -> Result<StageResult, RunnerError> {
        match self {
            LocalStage::Single(r) => r.execute(out, hidden),
            LocalStage::Parallel(tp) => tp.execute(out, hidden),
        }
    }

    fn reset(&mut self) {
        match self {
            LocalStage::Single(r) => r.reset(),
            LocalStage::Parallel(tp) => tp.reset(),
        }
    }
}

/// Every stage this node runs, in pipeline order, and its data-plane links.
pub struct NodeStages {
    stages: Vec<LocalStage>,
    links: Links,
}

impl NodeStages {
    pub fn new(stages: Vec<LocalStage>, links: Links) -> Self {
        assert!(!stages.is_empty(), "a node runs at least one stage");
        Self { stages, links }
    }

    /// Runs one step through this node's stages: activations come from the
    /// previous node (or the token ids on the first stage) and go on to the
    /// next. Returns the sampled tokens when this node runs the last stage.
    /// Every node sees every step, even one with nothing scheduled, so that
    /// all of them drop finished requests together.
    pub fn execute(&mut self, out: &SchedulerOutput) -> Result<Option<StepResult>, RunnerError> {
        let step = out.step_id;
        let mut hidden = None;
        if let Some(input) = &mut self.links.input {
            // Nothing scheduled means nothing was sent: both ends know it.
            if out.total_num_scheduled_tokens > 0 {
                let (got, t) = input.recv()?;
                if got != step {
                    return Err(RunnerError::Protocol {
                        step,
                        msg: format!("the previous stage sent activations for step {got}"),
                    });
                }
                hidden = Some(t);
            }
        }
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            match stage.execute(out, hidden.take())? {
                StageResult::Hidden(h) if i < last => hidden = h,
                StageResult::Hidden(h) => {
                    if let (Some(output), Some(h)) = (&mut self.links.output, &h) {
                        output.send(step, h)?;
                    }
                    return Ok(None);
                }
                StageResult::Sampled(r) if i == last => return Ok(Some(r)),
                StageResult::Sampled(_) => {
                    return Err(RunnerError::Protocol {
                        step,
                        msg: format!("stage {i} of {} sampled before the last", last + 1),
                    })
                }
            }
        }
        unreachable!("the last stage returns")
    }

    /// Drops every request's state (the leader restarted or asked for it).
    pub fn reset(&mut self) {
        for s in &mut self.stages {
            s.reset();
        }
    }

    /// Activation bytes sent to the next node so far.
    pub fn bytes_sent(&self) -> u64 {
        self.links.output.as_ref().map_or(0, |o| o.bytes_sent())
    }
}

enum Job {
    Step(Arc<SchedulerOutput>, Option<Tensor>),
    Reset,
}
type JobResult = Result<StageResult, RunnerError>;

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
                    for job in job_rx {
                        match job {
                            Job::Step(out, hidden) => {
                                if res_tx.send(runner.execute(&out, hidden)).is_err() {
                                    return;
                                }
                            }
                            Job::Reset => runner.reset(),
                        }
                    }
                })
                .expect("spawning a tensor-parallel rank");
            ranks.push((job_tx, res_rx));
            threads.push(t);
        }
        Self { ranks, threads }
    }

    fn execute(
        &mut self,
        out: &SchedulerOutput,
        hidden: Option<Tensor>,
    ) -> Result<StageResult, RunnerError> {
        let gone = || RunnerError::Setup("a tensor-parallel rank thread has exited".into());
        let out = Arc::new(out.clone());
        for (tx, _) in &self.ranks {
            tx.send(Job::Step(out.clone(), hidden.clone()))
                .map_err(|_| gone())?;
        }
        // Wait for every rank, so none runs ahead into the next step.
        let mut results = Vec::with_capacity(self.ranks.len());
        for (_, rx) in &self.ranks {
            results.push(rx.recv().map_err(|_| gone())?);
        }
        results.into_iter().next().expect("at least one rank")
    }

    fn reset(&mut self) {
        for (tx, _) in &self.ranks {
            let _ = tx.send(Job::Reset);
        }
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
