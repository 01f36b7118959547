//! The node runtime: one node's lifecycle (load its stages, size the KV
//! cache, connect the data plane, run steps, reset) on a thread of its own,
//! driven through a channel. The leader drives its own node in-process; a
//! worker's gRPC service is a thin adapter over the same runtime.
//!
//! Every command may come again: a load of the same share keeps the loaded
//! weights, and a start on a running node drops its requests and reconnects
//! its data plane. That is what recovery asks of a surviving node after a
//! neighbour was replaced.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use candle_core::DType;
use strata_comm::{TcpTransport, Wait};
use strata_model::{Architecture, DeviceRequest, Placement, Weights};
use strata_types::{SchedulerOutput, StageSlot, StepMasks, StepResult};
use tokio::sync::oneshot;

use crate::drafter::DraftSpec;
use crate::masks::MaskBoard;
use crate::runner::RunnerError;
use crate::stage::{KvBudget, Links, LoadedNode, NodeStages};

/// What a node needs for its whole life.
pub struct NodeConfig {
    pub rank: usize,
    pub weights: Arc<Weights>,
    /// The model's architecture, resolved from `weights`.
    pub model: Arc<dyn Architecture>,
    /// `--device`: this node computes there, in the dtype each load names.
    pub device: DeviceRequest,
    pub token: String,
    /// Bound on every wait for another node (the data plane, the ring).
    pub timeout: Duration,
    /// The data-plane listener (the previous node connects to it), kept for
    /// the life of the process so a replaced neighbour finds it again.
    pub data: Option<TcpListener>,
    /// The tensor-parallel ring's listener, likewise.
    pub comm: Option<TcpListener>,
}

/// Which share of the model a node loads, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// This node's stages, in pipeline order.
    pub slots: Vec<StageSlot>,
    pub budget: KvBudget,
    /// The longest sequence the rope tables cover.
    pub max_model_len: usize,
    pub dtype: DType,
    /// What the KV cache holds: f32 or bf16 on the CPU, `dtype` on a GPU.
    pub kv_dtype: DType,
    /// The NCCL id of this node's stage that spans nodes, when its ranks
    /// run on GPUs (NCCL joins at load); `None`: a TCP ring, if any,
    /// connected at each start.
    pub nccl_id: Option<Vec<u8>>,
    /// A draft model for speculative decoding, loaded by the node that runs
    /// the last stage's first rank.
    pub draft: Option<DraftSpec>,
}

/// What a load made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// The KV blocks the node's budget holds.
    pub num_blocks: usize,
    /// Checkpoint bytes this process has read.
    pub weight_bytes: u64,
}

/// How a node starts running.
#[derive(Debug, Clone, PartialEq)]
pub struct StartSpec {
    /// KV blocks per rank: the fewest any node holds.
    pub num_blocks: usize,
    /// The next node's data-plane listener; `None` on the last node.
    pub next: Option<SocketAddr>,
    /// Whether a previous node sends this one activations.
    pub has_previous: bool,
    /// Every rank's ring listener, when this node holds a rank of a stage
    /// that spans nodes; else empty.
    pub ring: Vec<SocketAddr>,
}

/// A step's outcome on this node: the sampled tokens when it runs the last
/// stage.
pub type StepOutcome = Result<Option<StepResult>, RunnerError>;
type StepReply = Box<dyn FnOnce(StepOutcome) + Send>;

enum Command {
    Load(LoadSpec, oneshot::Sender<Result<LoadReport, RunnerError>>),
    Start(StartSpec, oneshot::Sender<Result<u64, RunnerError>>),
    Step(u64, SchedulerOutput, StepReply),
    Reset,
}

/// The handle on a node runtime; cheap to clone. The runtime thread ends
/// when the last handle is dropped.
#[derive(Clone)]
pub struct NodeRuntime {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// What the runtime thread shares with its handles.
#[derive(Default)]
struct Shared {
    loaded: AtomicBool,
    bytes_sent: AtomicU64,
    /// The running data plane's connections, for `interrupt`.
    links: Mutex<Vec<TcpStream>>,
    /// Starts asked for so far: a start still connecting gives up once a
    /// newer one is asked for, so a recovery try that failed half-way (a
    /// neighbour it dialed was already dead) cannot hold up the next.
    starts: AtomicU64,
    masks: Arc<MaskBoard>,
}

impl NodeRuntime {
    /// Starts the runtime thread.
    pub fn spawn(cfg: NodeConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let thread = Runtime {
            cfg,
            shared: shared.clone(),
            current: None,
            stages: State::Empty,
            run: 0,
            starts_taken: 0,
            sent_before: 0,
        };
        std::thread::Builder::new()
            .name(format!("strata-node{}", thread.cfg.rank))
            .spawn(move || thread.serve(rx))
            .expect("spawning the node runtime");
        Self { tx, shared }
    }

    fn send(&self, cmd: Command) {
        // The thread only ends when every handle is gone.
        let _ = self.tx.send(cmd);
    }

    /// Loads `spec`'s share (or keeps it, when it is the one loaded).
    pub fn load(&self, spec: LoadSpec) -> Reply<LoadReport> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Load(spec, tx));
        Reply(rx)
    }

    /// Allocates the KV cache if it is not yet, drops every request, and
    /// connects the data plane. Answers the run number that steps must
    /// carry: steps of an earlier run are refused.
    pub fn start(&self, spec: StartSpec) -> Reply<u64> {
        // A step blocked on a neighbour that is gone must not hold the
        // start, nor an earlier start still connecting.
        self.shared.starts.fetch_add(1, Ordering::SeqCst);
        self.interrupt();
        let (tx, rx) = oneshot::channel();
        self.send(Command::Start(spec, tx));
        Reply(rx)
    }

    /// Queues a step of run `run`; `reply` gets its outcome.
    pub fn step(
        &self,
        run: u64,
        out: SchedulerOutput,
        reply: impl FnOnce(StepOutcome) + Send + 'static,
    ) {
        self.send(Command::Step(run, out, Box::new(reply)));
    }

    /// Posts a step's token masks for the stage that samples it (sent after
    /// the step: the sampler waits for them once its logits are ready).
    pub fn post_masks(&self, masks: StepMasks) {
        self.shared.masks.post(masks);
    }

    /// Drops every request's state.
    pub fn reset(&self) {
        self.send(Command::Reset);
    }

    /// Shuts the data plane down, so a step waiting on a lost neighbour
    /// fails now instead of at a timeout.
    pub fn interrupt(&self) {
        self.shared.masks.interrupt();
        for s in self.shared.links.lock().expect("poisoned").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// True once a load has finished.
    pub fn is_loaded(&self) -> bool {
        self.shared.loaded.load(Ordering::SeqCst)
    }

    /// Activation bytes sent to the next node, over every run.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::Relaxed)
    }
}

/// The answer to a command, awaited from async code or from a thread.
pub struct Reply<T>(oneshot::Receiver<Result<T, RunnerError>>);

impl<T> Reply<T> {
    pub async fn wait(self) -> Result<T, RunnerError> {
        self.0.await.map_err(|_| gone())?
    }

    /// Blocks this thread (never call it from async code).
    pub fn wait_blocking(self) -> Result<T, RunnerError> {
        self.0.blocking_recv().map_err(|_| gone())?
    }
}

fn gone() -> RunnerError {
    RunnerError::Setup("the node runtime has stopped".into())
}

/// A node's stages, as far as they have come.
enum State {
    Empty,
    Loaded(LoadedNode),
    Running(NodeStages),
}

struct Runtime {
    cfg: NodeConfig,
    shared: Arc<Shared>,
    /// The loaded share and what loading it made.
    current: Option<(LoadSpec, LoadReport)>,
    stages: State,
    /// Bumped by every start; steps carry the run they belong to.
    run: u64,
    /// Starts taken from the queue (`Shared::starts` counts those asked).
    starts_taken: u64,
    /// Activation bytes sent on links since replaced.
    sent_before: u64,
}

impl Runtime {
    fn serve(mut self, rx: mpsc::Receiver<Command>) {
        for cmd in rx {
            match cmd {
                Command::Load(spec, reply) => {
                    let _ = reply.send(self.load(spec));
                }
                Command::Start(spec, reply) => {
                    self.starts_taken += 1;
                    let _ = reply.send(self.start(spec));
                }
                Command::Step(run, out, reply) => reply(self.step(run, &out)),
                Command::Reset => {
                    if let State::Running(s) = &mut self.stages {
                        s.reset();
                    }
                }
            }
        }
    }

    fn load(&mut self, spec: LoadSpec) -> Result<LoadReport, RunnerError> {
        if let Some((loaded, report)) = &self.current {
            if *loaded == spec {
                tracing::info!(
                    "node {}: keeps its loaded stages ({} KV blocks)",
                    self.cfg.rank,
                    report.num_blocks
                );
                return Ok(*report);
            }
        }
        // Free the old share first: a GPU may not hold two.
        self.current = None;
        self.stages = State::Empty;
        self.shared.loaded.store(false, Ordering::SeqCst);
        let rank = self.cfg.rank;
        let local_ranks = spec.slots.iter().map(|s| s.tp_rank_count).sum();
        let placement = Placement::resolve(self.cfg.device, Some(spec.dtype), local_ranks)?;
        // Progress over what this node loads: each layer of each local rank.
        let total: usize = spec
            .slots
            .iter()
            .map(|s| s.layers.len() * s.tp_rank_count)
            .sum();
        let unit = if spec.slots.iter().all(|s| s.tp_rank_count == 1) {
            "layers"
        } else {
            "layer shards"
        };
        let (mut done, mut last_pct) = (0, 0);
        let mut progress = |_layer: usize, _| {
            done += 1;
            let pct = done * 100 / total.max(1);
            if pct >= last_pct + 10 || done == total {
                last_pct = pct;
                tracing::info!("node {rank}: loaded {done}/{total} {unit} ({pct}%)");
            }
        };
        let node = LoadedNode::load(
            &self.cfg.weights,
            &*self.cfg.model,
            &spec.slots,
            spec.nccl_id.as_deref(),
            spec.max_model_len,
            &placement,
            spec.kv_dtype,
            spec.draft.as_ref(),
            &mut progress,
        )?;
        let num_blocks = node.kv_blocks(spec.budget)?;
        let report = LoadReport {
            num_blocks,
            weight_bytes: self.cfg.weights.bytes_read(),
        };
        tracing::info!(
            "node {rank}: loaded layers {:?} on {} ({:.1} MiB read); the KV budget holds {num_blocks} blocks",
            spec.slots
                .iter()
                .map(|s| (s.layers.start..s.layers.end, s.tp_rank_begin))
                .collect::<Vec<_>>(),
            placement.describe(),
            report.weight_bytes as f64 / (1 << 20) as f64
        );
        self.stages = State::Loaded(node);
        self.current = Some((spec, report));
        self.shared.loaded.store(true, Ordering::SeqCst);
        Ok(report)
    }

    /// Connects the data plane and, first, the tensor-parallel ring between
    /// nodes if this node holds a rank of one. Every node starts at once, so
    /// each connection's peer is connecting too.
    fn links(&self, spec: &StartSpec) -> Result<Links, RunnerError> {
        let (token, rank) = (&self.cfg.token, self.cfg.rank);
        let (shared, this_start) = (self.shared.clone(), self.starts_taken);
        let wait = Wait::new(self.cfg.timeout)
            .unless(move || shared.starts.load(Ordering::SeqCst) > this_start);
        let link = |e: candle_core::Error| RunnerError::Link(e.to_string());
        let ring = match &self.stages {
            State::Loaded(n) => n.ring(),
            State::Running(s) => s.ring(),
            State::Empty => None,
        };
        if let Some(ring) = ring {
            if spec.ring.is_empty() {
                return Err(RunnerError::Setup(
                    "this node holds a rank of a stage that spans nodes, but the start names no ring"
                        .into(),
                ));
            }
            let listener = self
                .cfg
                .comm
                .as_ref()
                .ok_or_else(|| RunnerError::Setup("this node has no ring listener".into()))?;
            ring.connect(listener, &spec.ring, token, wait.clone())
                .map_err(link)?;
        }
        let output = spec
            .next
            .map(|a| TcpTransport::connect(a, rank as u64, token, wait.clone()))
            .transpose()
            .map_err(link)?;
        let input = if spec.has_previous {
            let listener = self
                .cfg
                .data
                .as_ref()
                .ok_or_else(|| RunnerError::Setup("this node has no data listener".into()))?;
            Some(TcpTransport::accept(listener, token, wait).map_err(link)?.0)
        } else {
            None
        };
        Ok(Links { input, output })
    }

    fn start(&mut self, spec: StartSpec) -> Result<u64, RunnerError> {
        let held = self.current.as_ref().map(|(_, r)| r.num_blocks);
        match held {
            None => return Err(RunnerError::Setup("start before load".into())),
            Some(n) if n < spec.num_blocks => {
                return Err(RunnerError::Setup(format!(
                    "node {} holds {n} KV blocks, fewer than the cluster's {}",
                    self.cfg.rank, spec.num_blocks
                )))
            }
            Some(_) => {}
        }
        // Drop the old links before connecting the new ones.
        if let State::Running(s) = &mut self.stages {
            self.sent_before += s.bytes_sent();
            s.relink(Links::default());
        }
        let links = self.links(&spec)?;
        self.stages = match std::mem::replace(&mut self.stages, State::Empty) {
            State::Loaded(node) => {
                State::Running(node.start(spec.num_blocks, links, &self.shared.masks)?)
            }
            State::Running(mut s) => {
                s.relink(links);
                State::Running(s)
            }
            State::Empty => unreachable!("loaded above"),
        };
        if let State::Running(s) = &self.stages {
            *self.shared.links.lock().expect("poisoned") = s.link_handles();
        }
        self.run += 1;
        tracing::info!(
            "node {}: running with {} KV blocks (run {})",
            self.cfg.rank,
            spec.num_blocks,
            self.run
        );
        Ok(self.run)
    }

    fn step(&mut self, run: u64, out: &SchedulerOutput) -> StepOutcome {
        let State::Running(stages) = &mut self.stages else {
            return Err(RunnerError::Setup("a step before the node started".into()));
        };
        if run != self.run {
            return Err(RunnerError::Link(format!(
                "step {} belongs to run {run}, but the node has restarted (run {})",
                out.step_id, self.run
            )));
        }
        let r = stages.execute(out);
        self.shared
            .bytes_sent
            .store(self.sent_before + stages.bytes_sent(), Ordering::Relaxed);
        r
    }
}
