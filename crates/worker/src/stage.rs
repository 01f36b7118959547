//! What one node runs: its pipeline stages in order, each a single runner or
//! tensor-parallel ranks on threads, fed by and feeding the data plane.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use candle_core::{DType, Tensor};
use strata_comm::{Communicator, SingleRank, TcpComm, TcpTransport, ThreadComm};
use strata_model::{Architecture, Placement, StageModel, Weights};
use strata_types::{SchedulerOutput, StageSlot, StepResult};

use crate::drafter::{DraftSpec, Drafter};
use crate::masks::MaskBoard;
use crate::runner::{ModelRunner, RunnerError, StageResult};

/// A node's models, loaded but without a KV cache: the leader first learns
/// how many blocks every node can hold, then starts them all with the least.
pub struct LoadedNode {
    stages: Vec<Vec<Box<dyn StageModel>>>,
    placement: Placement,
    /// What the KV cache holds (`--kv-cache-dtype`).
    kv_dtype: DType,
    /// This node's rank of a stage that spans nodes over TCP: connected at
    /// every start, so a replaced peer rejoins without a reload.
    ring: Option<Arc<TcpComm>>,
    /// The draft model, when this node runs the last stage's first rank
    /// (whose result speaks for the stage), and the index in `stages` of
    /// that stage.
    draft: Option<LoadedDraft>,
}

struct LoadedDraft {
    model: Box<dyn StageModel>,
    spec: DraftSpec,
    stage: usize,
    /// The local device it computes on.
    device: usize,
}

/// How much memory a node's KV cache may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    /// Bytes for this node's layers (`--kv-cache-memory`).
    Bytes(u64),
    /// vLLM's `--gpu-memory-utilization`: per device, this fraction of its
    /// memory, less what is already used (the weights) and an activation
    /// reserve for `max_batch_tokens` tokens a step.
    DeviceFraction {
        fraction: f64,
        max_batch_tokens: usize,
    },
}

impl LoadedNode {
    /// Loads `slots` (this node's stages, in pipeline order) onto
    /// `placement`'s devices, local rank `i` on device `i`. A slot whose
    /// ranks all live here gets one thread-backed communicator per rank; one
    /// that spans nodes is a single rank of a ring between nodes: NCCL's when
    /// the leader gave the stage an `nccl_id`, else TCP's.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        weights: &Weights,
        model: &dyn Architecture,
        slots: &[StageSlot],
        nccl_id: Option<&[u8]>,
        max_model_len: usize,
        placement: &Placement,
        kv_dtype: DType,
        draft: Option<&DraftSpec>,
        progress: &mut dyn FnMut(usize, strata_types::LayerRange),
    ) -> Result<Self, RunnerError> {
        let mut stages = Vec::with_capacity(slots.len());
        let mut local = 0;
        let mut ring = None;
        let mut loaded_draft = None;
        let num_layers = model.config().num_layers;
        for (i, slot) in slots.iter().enumerate() {
            if let Some(spec) =
                draft.filter(|_| slot.layers.end == num_layers && slot.tp_rank_begin == 0)
            {
                let device = placement.device(local);
                tracing::info!("loading the draft model {}", spec.model.display());
                loaded_draft = Some(LoadedDraft {
                    model: spec.load(
                        model.config().vocab_size,
                        device,
                        placement.dtype(),
                        max_model_len,
                    )?,
                    spec: spec.clone(),
                    stage: i,
                    device: local,
                });
            }
            let comms = if slot.spans_nodes() {
                spanning_communicator(slot, nccl_id, placement, local, &mut ring)?
            } else {
                communicators(slot, placement, local)?
            };
            let mut models = Vec::with_capacity(comms.len());
            for comm in comms {
                let w = weights.on(placement.device(local), placement.dtype());
                models.push(model.load_stage(&w, slot.layers, comm, max_model_len, progress)?);
                local += 1;
            }
            stages.push(models);
        }
        Ok(Self {
            stages,
            placement: placement.clone(),
            kv_dtype,
            ring,
            draft: loaded_draft,
        })
    }

    /// This node's rank of a TCP ring between nodes, if it has one.
    pub fn ring(&self) -> Option<&Arc<TcpComm>> {
        self.ring.as_ref()
    }

    /// KV bytes one block costs on this node, over all its layers and ranks
    /// (and the draft model's).
    pub fn bytes_per_block(&self) -> usize {
        self.models()
            .map(|(_, m)| m.kv_bytes_per_block_in(self.kv_dtype))
            .sum::<usize>()
            + self.draft_bytes_per_block()
    }

    fn draft_bytes_per_block(&self) -> usize {
        self.draft
            .as_ref()
            .map_or(0, |d| d.model.kv_bytes_per_block_in(self.kv_dtype))
    }

    fn models(&self) -> impl Iterator<Item = (usize, &dyn StageModel)> {
        self.stages.iter().flatten().map(|m| &**m).enumerate()
    }

    /// The KV blocks `budget` holds on this node: the fewest any of its
    /// devices can hold for the ranks it carries.
    pub fn kv_blocks(&self, budget: KvBudget) -> Result<usize, RunnerError> {
        let (fraction, max_batch_tokens) = match budget {
            KvBudget::Bytes(b) => return Ok((b / self.bytes_per_block() as u64) as usize),
            KvBudget::DeviceFraction {
                fraction,
                max_batch_tokens,
            } => (fraction, max_batch_tokens),
        };
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(RunnerError::Setup(format!(
                "--gpu-memory-utilization must be in (0, 1], got {fraction}"
            )));
        }
        let devices = self.placement.devices().len();
        let mut fewest = usize::MAX;
        for d in 0..devices {
            let on_device = || self.models().filter(move |(i, _)| i % devices == d);
            let draft = self.draft.as_ref().filter(|x| x.device == d);
            let per_block: usize = on_device()
                .map(|(_, m)| m.kv_bytes_per_block_in(self.kv_dtype))
                .sum::<usize>()
                + draft.map_or(0, |_| self.draft_bytes_per_block());
            let reserve: u64 = on_device()
                .chain(draft.map(|x| (d, &*x.model)))
                .map(|(_, m)| m.activation_bytes(max_batch_tokens) as u64)
                .sum();
            let Some((free, total)) = self.placement.memory(d)? else {
                return Err(RunnerError::Setup(
                    "--gpu-memory-utilization needs a GPU; on the CPU use --kv-cache-memory".into(),
                ));
            };
            let used = total - free;
            let budget = (fraction * total as f64) as i64 - used as i64 - reserve as i64;
            if budget <= 0 {
                return Err(RunnerError::Setup(format!(
                    "--gpu-memory-utilization {fraction} leaves no KV cache on device {d}: \
                     {:.2} GiB of {:.2} GiB are in use after loading, and activations need {:.2} GiB",
                    used as f64 / GIB,
                    total as f64 / GIB,
                    reserve as f64 / GIB
                )));
            }
            fewest = fewest.min(budget as usize / per_block.max(1));
        }
        Ok(fewest)
    }

    /// Allocates `num_blocks` of KV cache per rank and starts the rank threads.
    /// `masks`: where the leader posts token masks for the sampling stage.
    pub fn start(
        self,
        num_blocks: usize,
        links: Links,
        masks: &Arc<MaskBoard>,
    ) -> Result<NodeStages, RunnerError> {
        let mut stages = Vec::with_capacity(self.stages.len());
        let mut draft = self.draft;
        for (i, models) in self.stages.into_iter().enumerate() {
            let mut runners = models
                .into_iter()
                .map(|m| ModelRunner::new(m, num_blocks, self.kv_dtype, masks.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(d) = draft.take_if(|d| d.stage == i) {
                let drafter = Drafter::new(d.model, num_blocks, self.kv_dtype, &d.spec)?;
                let first = runners.remove(0).with_drafter(drafter);
                runners.insert(0, first);
            }
            stages.push(if runners.len() == 1 {
                LocalStage::Single(Box::new(runners.remove(0)))
            } else {
                LocalStage::Parallel(TpStage::new(runners))
            });
        }
        let mut node = NodeStages::new(stages, links);
        node.ring = self.ring;
        Ok(node)
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The communicator of this node's one rank of a stage that spans nodes,
/// on local device `first`: NCCL joined now, or a TCP ring left for `start`
/// to connect (kept in `ring`).
fn spanning_communicator(
    slot: &StageSlot,
    nccl_id: Option<&[u8]>,
    placement: &Placement,
    first: usize,
    ring: &mut Option<Arc<TcpComm>>,
) -> Result<Vec<Arc<dyn Communicator>>, RunnerError> {
    if slot.tp_rank_count != 1 || ring.is_some() {
        return Err(RunnerError::Setup(format!(
            "stage {} spans nodes: a node holds one rank of at most one such stage",
            slot.stage
        )));
    }
    if let Some(id) = nccl_id {
        return nccl_join(placement, first, slot.tp_rank_begin, slot.tp_size, id);
    }
    let comm = Arc::new(TcpComm::new(slot.tp_rank_begin, slot.tp_size));
    *ring = Some(comm.clone());
    Ok(vec![comm])
}

/// The communicators of a stage's local ranks, the first on local device
/// `first`: NCCL on GPUs (when built with it), shared memory on CPUs.
fn communicators(
    slot: &StageSlot,
    placement: &Placement,
    first: usize,
) -> Result<Vec<Arc<dyn Communicator>>, RunnerError> {
    if slot.tp_size == 1 {
        return Ok(vec![Arc::new(SingleRank)]);
    }
    #[cfg(feature = "nccl")]
    if !placement.is_cpu() && slot.tp_size <= placement.devices().len() {
        let devices: Vec<_> = (0..slot.tp_size)
            .map(|i| placement.device(first + i).clone())
            .collect();
        return Ok(strata_comm::NcclComm::group(&devices)?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Communicator>)
            .collect());
    }
    let _ = (placement, first); // read only with NCCL
    Ok(ThreadComm::group(slot.tp_size)
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect())
}

#[cfg(feature = "nccl")]
fn nccl_join(
    placement: &Placement,
    first: usize,
    rank: usize,
    world_size: usize,
    id: &[u8],
) -> Result<Vec<Arc<dyn Communicator>>, RunnerError> {
    if placement.is_cpu() {
        return Err(RunnerError::Setup(
            "the leader runs this stage's ranks with NCCL, but this node computes on the CPU"
                .into(),
        ));
    }
    let c = strata_comm::NcclComm::join(placement.device(first), rank, world_size, id)?;
    Ok(vec![Arc::new(c)])
}

#[cfg(not(feature = "nccl"))]
fn nccl_join(
    _: &Placement,
    _: usize,
    _: usize,
    _: usize,
    _: &[u8],
) -> Result<Vec<Arc<dyn Communicator>>, RunnerError> {
    Err(RunnerError::Setup(
        "the leader runs this stage's ranks with NCCL, but this binary was built without it (--features nccl)".into(),
    ))
}

/// A fresh NCCL unique id for a stage whose ranks span nodes, when this
/// (leader) process computes on GPUs with NCCL; `None` keeps the TCP ring.
pub fn stage_nccl_id(placement: &Placement) -> Result<Option<Vec<u8>>, RunnerError> {
    #[cfg(feature = "nccl")]
    if !placement.is_cpu() {
        return Ok(Some(strata_comm::nccl_unique_id()?));
    }
    let _ = placement;
    Ok(None)
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
            // The whole step on one of rayon's workers: the model's hundreds
            // of parallel loops per step then split work inside the pool,
            // instead of each handing a job in from outside and sleeping
            // until it is done (two thread wake-ups per loop, a third of a
            // single-stream step on two cores). Tensor-parallel ranks stay
            // on threads of their own: ranks blocked in a collective on
            // pool workers would starve a pool smaller than the rank count.
            LocalStage::Single(r) => rayon::scope(|_| r.execute(out, hidden)),
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
    ring: Option<Arc<TcpComm>>,
}

impl NodeStages {
    pub fn new(stages: Vec<LocalStage>, links: Links) -> Self {
        assert!(!stages.is_empty(), "a node runs at least one stage");
        Self {
            stages,
            links,
            ring: None,
        }
    }

    /// This node's rank of a TCP ring between nodes, if it has one.
    pub fn ring(&self) -> Option<&Arc<TcpComm>> {
        self.ring.as_ref()
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
                let (got, t) = input
                    .recv()
                    .map_err(|e| RunnerError::Link(format!("from the previous node: {e}")))?;
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
            let done = stage.execute(out, hidden.take()).map_err(|e| {
                // A collective that failed on a broken ring: a peer is gone.
                match &self.ring {
                    Some(r) if r.is_down() => {
                        RunnerError::Link(format!("tensor-parallel ring: {e}"))
                    }
                    _ => e,
                }
            })?;
            match done {
                StageResult::Hidden(h) if i < last => hidden = h,
                StageResult::Hidden(h) => {
                    if let (Some(output), Some(h)) = (&mut self.links.output, &h) {
                        output
                            .send(step, h)
                            .map_err(|e| RunnerError::Link(format!("to the next node: {e}")))?;
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

    /// Replaces the data-plane links (a neighbouring node was replaced) and
    /// drops every request: the leader recomputes them. Weights and KV cache
    /// stay.
    pub fn relink(&mut self, links: Links) {
        self.links = links;
        self.reset();
    }

    /// Second handles on the data plane's and the ring's connections, to
    /// shut them down from another thread.
    pub fn link_handles(&self) -> Vec<std::net::TcpStream> {
        let mut handles: Vec<_> = [&self.links.input, &self.links.output]
            .into_iter()
            .flatten()
            .filter_map(|l| l.shutdown_handle().ok())
            .collect();
        handles.extend(self.ring.iter().flat_map(|r| r.shutdown_handles()));
        handles
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
