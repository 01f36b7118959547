//! The leader's side of a cluster: the Join service, heartbeats, and the
//! two transitions every node goes through — load its share, start it —
//! run for all nodes when the cluster forms and again for whichever nodes a
//! recovery needs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::DType;
use strata_model::{Placement, Weights};
use strata_proto::v1::leader_server::{Leader, LeaderServer};
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{self as pb, execute_request::Kind};
use strata_proto::{AddToken, CheckToken, BUILD_VERSION};
use strata_types::ClusterLayout;
use strata_worker::{
    stage_nccl_id, DraftSpec, KvBudget, LoadSpec, NodeConfig, NodeRuntime, StartSpec,
    LEADER_SILENCE,
};
use tokio::sync::{mpsc as tmpsc, Notify};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::{EngineError, Result};
use crate::executor::{RemoteNode, RemoteReply};
use crate::membership::{ClusterState, NodePhase};

/// How often the leader beats each worker, and how long one beat may take.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// How the leader forms its cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nnodes: usize,
    /// Where the leader serves the cluster protocol.
    pub listen: SocketAddr,
    pub token: String,
    /// The bound on every wait: for workers to join, load and connect.
    pub timeout: Duration,
    pub runtime: tokio::runtime::Handle,
    pub state: Arc<ClusterState>,
}

type Client = WorkerClient<InterceptedService<Channel, AddToken>>;

/// A worker that has joined.
#[derive(Clone)]
struct Member {
    worker_addr: String,
    /// The worker process (JoinRequest.instance).
    instance: u64,
    data_addr: SocketAddr,
    comm_addr: SocketAddr,
    /// The leader's address as this worker reached it.
    leader_ip: IpAddr,
    client: Client,
}

/// The workers that have joined, by node rank.
#[derive(Default)]
struct Members {
    map: Mutex<BTreeMap<usize, Member>>,
    changed: Notify,
}

impl Members {
    fn get(&self, rank: usize) -> Option<Member> {
        self.map.lock().expect("poisoned").get(&rank).cloned()
    }
}

struct LeaderService {
    nnodes: usize,
    fingerprint: String,
    epoch: u64,
    add_token: AddToken,
    members: Arc<Members>,
    state: Arc<ClusterState>,
}

impl LeaderService {
    fn refuse<T>(&self, rank: usize, addr: &str, why: String) -> std::result::Result<T, Status> {
        // A refused worker retries every few seconds (a new leader may take
        // it): say each reason once, and show it on /health.
        if self.state.refused(rank, &why) {
            tracing::warn!("refused node {rank} ({addr}): {why}");
        } else {
            tracing::debug!("refused node {rank} ({addr}) again: {why}");
        }
        Err(Status::failed_precondition(why))
    }
}

#[tonic::async_trait]
impl Leader for LeaderService {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> std::result::Result<Response<pb::JoinReply>, Status> {
        let leader_ip = req
            .local_addr()
            .map(|a| a.ip())
            .ok_or_else(|| Status::internal("no local address on the connection"))?;
        let j = req.into_inner();
        let rank = j.node_rank as usize;
        let addr = j.worker_addr.as_str();
        if j.nnodes as usize != self.nnodes {
            return self.refuse(
                rank,
                addr,
                format!(
                    "the worker was started with --nnodes {} but the leader with --nnodes {}",
                    j.nnodes, self.nnodes
                ),
            );
        }
        if rank == 0 || rank >= self.nnodes {
            return self.refuse(
                rank,
                addr,
                format!(
                    "node rank {rank} is not a worker rank of a {}-node cluster (1..{})",
                    self.nnodes,
                    self.nnodes - 1
                ),
            );
        }
        if j.build_version != BUILD_VERSION {
            return self.refuse(
                rank,
                addr,
                format!(
                    "the worker runs strata {} but the leader {BUILD_VERSION}",
                    j.build_version
                ),
            );
        }
        if j.model_fingerprint != self.fingerprint {
            return self.refuse(
                rank,
                addr,
                format!(
                    "node {rank} opened a different model (fingerprint {}) than the leader ({}); \
                     every node must serve the same checkpoint",
                    j.model_fingerprint, self.fingerprint
                ),
            );
        }
        let worker: SocketAddr = tokio::net::lookup_host(&j.worker_addr)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Status::invalid_argument(format!("cannot resolve {}", j.worker_addr)))?;
        let same = self
            .members
            .get(rank)
            .is_some_and(|m| m.instance == j.instance && m.worker_addr == j.worker_addr);
        if !same {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", j.worker_addr))
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
                    .connect_timeout(HEARTBEAT_TIMEOUT)
                    .connect_lazy();
            let member = Member {
                worker_addr: j.worker_addr.clone(),
                instance: j.instance,
                data_addr: SocketAddr::new(worker.ip(), j.data_port as u16),
                comm_addr: SocketAddr::new(worker.ip(), j.comm_port as u16),
                leader_ip,
                client: WorkerClient::with_interceptor(channel, self.add_token.clone())
                    .max_decoding_message_size(64 << 20),
            };
            let old = self
                .members
                .map
                .lock()
                .expect("poisoned")
                .insert(rank, member);
            tracing::info!(
                "node {rank} joined from {} ({} device(s), {:.1} GiB)",
                j.worker_addr,
                j.devices,
                j.memory_bytes as f64 / (1u64 << 30) as f64
            );
            if old.is_some() {
                // A new process took the rank: the old one is gone.
                self.state.lose(
                    rank,
                    format!("a new process joined as node {rank} from {}", j.worker_addr),
                );
            }
        }
        self.state.joined(rank);
        self.members.changed.notify_waiters();
        Ok(Response::new(pb::JoinReply {
            leader_build_version: BUILD_VERSION.into(),
            epoch: self.epoch,
        }))
    }
}

fn cluster_err(msg: impl Into<String>) -> EngineError {
    EngineError::Cluster(msg.into())
}

/// How every node loads: the KV budget, the dtype (workers compute in the
/// leader's on their own devices), the rope length.
pub(crate) struct NodeSetup<'a> {
    pub budget: KvBudget,
    pub placement: &'a Placement,
    /// What every node's KV cache holds.
    pub kv_dtype: DType,
    /// `--device`, for the leader's own node.
    pub device: strata_model::DeviceRequest,
    pub max_model_len: usize,
    /// Speculative decoding's draft model, for the node that samples.
    pub draft: Option<DraftSpec>,
}

/// The leader's view of its cluster, and the one place that loads and
/// starts its nodes.
pub(crate) struct Cluster {
    rt: tokio::runtime::Handle,
    timeout: Duration,
    epoch: u64,
    state: Arc<ClusterState>,
    layout: ClusterLayout,
    members: Arc<Members>,
    /// The leader's own node.
    local: NodeRuntime,
    comm_port: u16,
    budget: KvBudget,
    /// The leader's devices and dtype; workers compute in the same dtype.
    placement: Placement,
    kv_dtype: DType,
    max_model_len: usize,
    draft: Option<DraftSpec>,
    /// Per stage whose ranks span nodes: its NCCL id (on GPUs).
    nccl_ids: BTreeMap<usize, Option<Vec<u8>>>,
    /// What each node has loaded, and which process of it (0: the leader).
    loaded: BTreeMap<usize, (u64, LoadSpec)>,
    num_blocks: usize,
    /// The last recovery failure said, so a retry says it once.
    last_failure: Option<String>,
}

impl Cluster {
    /// Serves the cluster protocol and forms the cluster: waits for every
    /// worker to join, loads every node (the leader's own in-process), and
    /// starts them all with the least KV capacity any holds.
    pub fn form(
        opts: &ClusterOptions,
        layout: &ClusterLayout,
        weights: Arc<Weights>,
        setup: NodeSetup,
    ) -> Result<(Self, NodeRuntime, Vec<RemoteNode>, u64)> {
        let rt = opts.runtime.clone();
        let comm = TcpListener::bind(SocketAddr::new(opts.listen.ip(), 0))
            .map_err(|e| cluster_err(e.to_string()))?;
        let comm_port = comm
            .local_addr()
            .map_err(|e| cluster_err(e.to_string()))?
            .port();
        let epoch = rand::random::<u64>();
        let members = Arc::new(Members::default());
        let service = LeaderService {
            nnodes: opts.nnodes,
            fingerprint: weights.fingerprint(),
            epoch,
            add_token: AddToken::new(&opts.token).map_err(cluster_err)?,
            members: members.clone(),
            state: opts.state.clone(),
        };
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(opts.listen))
            .map_err(|e| cluster_err(format!("binding the cluster port {}: {e}", opts.listen)))?;
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(InterceptedService::new(
                    LeaderServer::new(service),
                    CheckToken::new(&opts.token),
                ))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        for rank in 1..opts.nnodes {
            rt.spawn(heartbeat(rank, epoch, members.clone(), opts.state.clone()));
        }
        let model = weights.architecture()?;
        let local = NodeRuntime::spawn(NodeConfig {
            rank: 0,
            weights,
            model,
            device: setup.device,
            token: opts.token.clone(),
            timeout: opts.timeout,
            data: None,
            comm: Some(comm),
        });
        // Stages whose ranks span nodes get an NCCL id on GPUs (made here,
        // so NCCL's bootstrap root lives in the leader).
        let mut nccl_ids = BTreeMap::new();
        for slot in layout.nodes.iter().flat_map(|n| &n.slots) {
            if slot.spans_nodes() && !nccl_ids.contains_key(&slot.stage) {
                let id = stage_nccl_id(setup.placement).map_err(|e| cluster_err(e.to_string()))?;
                nccl_ids.insert(slot.stage, id);
            }
        }
        let mut cluster = Self {
            rt,
            timeout: opts.timeout,
            epoch,
            state: opts.state.clone(),
            layout: layout.clone(),
            members,
            local: local.clone(),
            comm_port,
            budget: setup.budget,
            placement: setup.placement.clone(),
            kv_dtype: setup.kv_dtype,
            max_model_len: setup.max_model_len,
            draft: setup.draft,
            nccl_ids,
            loaded: BTreeMap::new(),
            num_blocks: 0,
            last_failure: None,
        };
        tracing::info!(
            "waiting for {} worker node(s) to join at {}",
            opts.nnodes - 1,
            opts.listen
        );
        cluster.wait_all_joined()?;
        let all: Vec<usize> = (0..opts.nnodes).collect();
        let num_blocks = cluster.load(&all)?;
        if num_blocks == 0 {
            return Err(cluster_err(
                "the KV budget holds no block on some node (give it more with --kv-cache-memory or --gpu-memory-utilization)",
            ));
        }
        cluster.num_blocks = num_blocks;
        let (remotes, run) = cluster.start_all()?;
        cluster.state.set_all_ready();
        Ok((cluster, local, remotes, run))
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    /// Waits (up to the cluster timeout) until every worker has joined,
    /// saying who is missing now and then.
    fn wait_all_joined(&self) -> Result<()> {
        let nnodes = self.layout.nodes.len();
        let members = &self.members;
        self.rt.block_on(async {
            let deadline = Instant::now() + self.timeout;
            let mut last_log = Instant::now();
            loop {
                let changed = members.changed.notified();
                let missing: Vec<usize> = {
                    let m = members.map.lock().expect("poisoned");
                    (1..nnodes).filter(|r| !m.contains_key(r)).collect()
                };
                if missing.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(cluster_err(format!(
                        "node(s) {missing:?} did not join within {:?}",
                        self.timeout
                    )));
                }
                if last_log.elapsed() >= Duration::from_secs(10) {
                    tracing::info!("still waiting for node(s) {missing:?} to join");
                    last_log = Instant::now();
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
            }
        })
    }

    fn member(&self, rank: usize) -> Result<Member> {
        self.members
            .get(rank)
            .ok_or_else(|| cluster_err(format!("node {rank} has not joined")))
    }

    /// Where node `rank`'s ring listener is.
    fn comm_addr(&self, rank: usize) -> Result<SocketAddr> {
        if rank == 0 {
            // The leader, at the address its workers reached it at.
            let ip = self
                .members
                .map
                .lock()
                .expect("poisoned")
                .values()
                .next()
                .map(|m| m.leader_ip)
                .ok_or_else(|| cluster_err("no worker has joined"))?;
            return Ok(SocketAddr::new(ip, self.comm_port));
        }
        Ok(self.member(rank)?.comm_addr)
    }

    /// What node `rank` loads.
    fn load_spec(&self, rank: usize) -> Result<LoadSpec> {
        let plan = &self.layout.nodes[rank];
        let nccl_id = plan
            .slots
            .iter()
            .find(|s| s.spans_nodes())
            .and_then(|s| self.nccl_ids[&s.stage].clone());
        Ok(LoadSpec {
            slots: plan.slots.clone(),
            budget: self.budget,
            max_model_len: self.max_model_len,
            dtype: self.placement.dtype(),
            kv_dtype: self.kv_dtype,
            nccl_id,
            draft: self
                .draft
                .clone()
                .filter(|_| rank == self.layout.result_node()),
        })
    }

    /// How node `rank` starts, given who is in the cluster now.
    fn start_spec(&self, rank: usize) -> Result<StartSpec> {
        let plan = &self.layout.nodes[rank];
        let next = plan
            .next
            .map(|n| self.member(n).map(|m| m.data_addr))
            .transpose()?;
        let ring = plan
            .ring
            .iter()
            .map(|&n| self.comm_addr(n))
            .collect::<Result<Vec<_>>>()?;
        Ok(StartSpec {
            num_blocks: self.num_blocks,
            next,
            has_previous: plan.has_previous,
            ring,
        })
    }

    /// Waits (up to the cluster timeout) for a call to worker `rank`, so
    /// that it could `what`.
    fn answer<T>(
        &self,
        rank: usize,
        what: &str,
        call: tokio::task::JoinHandle<std::result::Result<Response<T>, Status>>,
    ) -> Result<T> {
        let answered = self
            .rt
            .block_on(tokio::time::timeout(self.timeout, call))
            .map_err(|_| {
                cluster_err(format!(
                    "node {rank} did not {what} within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|e| cluster_err(e.to_string()))?;
        answered
            .map(Response::into_inner)
            .map_err(|s| cluster_err(format!("node {rank} could not {what}: {}", s.message())))
    }

    /// Loads `ranks` at once (the leader's own node in-process); returns the
    /// fewest KV blocks any of them holds.
    fn load(&mut self, ranks: &[usize]) -> Result<usize> {
        let mut calls = Vec::new();
        for &rank in ranks.iter().filter(|&&r| r > 0) {
            let (spec, member) = (self.load_spec(rank)?, self.member(rank)?);
            let req = pb::LoadStageRequest::from(&spec);
            let mut client = member.client.clone();
            let call = self.rt.spawn(async move { client.load_stage(req).await });
            calls.push((rank, member.instance, spec, call));
        }
        let mut fewest = usize::MAX;
        if ranks.contains(&0) {
            let spec = self.load_spec(0)?;
            let report = self
                .local
                .load(spec.clone())
                .wait_blocking()
                .map_err(|e| cluster_err(format!("loading the leader's stages: {e}")))?;
            self.state.set_loaded(0, report.weight_bytes);
            self.loaded.insert(0, (0, spec));
            fewest = fewest.min(report.num_blocks);
        }
        for (rank, instance, spec, call) in calls {
            let reply = self.answer(rank, "finish loading", call)?;
            tracing::info!(
                "node {rank} loaded its stages ({:.1} MiB of weights); it holds {} KV blocks",
                reply.weight_bytes_read as f64 / (1 << 20) as f64,
                reply.num_blocks
            );
            self.state.set_loaded(rank, reply.weight_bytes_read);
            self.loaded.insert(rank, (instance, spec));
            fewest = fewest.min(reply.num_blocks as usize);
        }
        Ok(fewest)
    }

    /// Starts every node: a new step stream to each worker (which drops its
    /// requests and reconnects its data plane) and the leader's own node.
    /// Returns the workers' streams and the leader's run number.
    fn start_all(&mut self) -> Result<(Vec<RemoteNode>, u64)> {
        let mut calls = Vec::new();
        for rank in 1..self.layout.nodes.len() {
            let (spec, member) = (self.start_spec(rank)?, self.member(rank)?);
            let (tx, rx) = tmpsc::unbounded_channel();
            tx.send(pb::ExecuteRequest {
                kind: Some(Kind::Start(spec.to_wire(self.epoch))),
            })
            .expect("receiver held");
            let mut client = member.client.clone();
            let call = self
                .rt
                .spawn(async move { client.execute(UnboundedReceiverStream::new(rx)).await });
            calls.push((rank, tx, call));
        }
        let local = self.local.start(self.start_spec(0)?);
        let mut remotes = Vec::new();
        for (rank, tx, call) in calls {
            let mut replies = self.answer(rank, "open its step stream", call)?;
            let (reply_tx, reply_rx) = mpsc::channel::<RemoteReply>();
            let state = self.state.clone();
            self.rt.spawn(async move {
                let why = loop {
                    match replies.next().await {
                        Some(Ok(r)) => {
                            if reply_tx.send(Ok(r)).is_err() {
                                return; // an old stream, dropped by a recovery
                            }
                        }
                        Some(Err(s)) => break format!("its step stream broke: {}", s.message()),
                        None => break "it closed its step stream".to_string(),
                    }
                };
                // Only the current stream's end loses the node: its
                // receiver is still held.
                if reply_tx.send(Err(why.clone())).is_ok() {
                    state.lose(rank, why);
                }
            });
            // The first reply says the worker started (or why not).
            match reply_rx.recv_timeout(self.timeout) {
                Ok(Ok(r)) if r.error.is_none() => {}
                Ok(Ok(r)) => {
                    return Err(cluster_err(format!(
                        "node {rank} could not start: {}",
                        r.error.map(|e| e.message).unwrap_or_default()
                    )))
                }
                Ok(Err(e)) => return Err(cluster_err(format!("node {rank}: {e}"))),
                Err(_) => {
                    return Err(cluster_err(format!(
                        "node {rank} did not start within {:?}",
                        self.timeout
                    )))
                }
            }
            remotes.push(RemoteNode {
                rank,
                tx,
                rx: reply_rx,
            });
        }
        let run = local
            .wait_blocking()
            .map_err(|e| cluster_err(format!("starting the leader's stages: {e}")))?;
        Ok((remotes, run))
    }

    /// One try at bringing the cluster back after a node was lost: once
    /// every lost node answers again (the same process, or a new one that
    /// joined in its place), reloads what changed and restarts every node.
    /// `Ok(None)`: not yet (nothing waits long here but the reload).
    pub fn try_recover(&mut self) -> Result<Option<(Vec<RemoteNode>, u64)>> {
        // Called from the engine thread: the waits below need the runtime.
        let rt = self.rt.clone();
        let _entered = rt.enter();
        let recovering = self.state.recovering();
        if recovering
            .iter()
            .any(|&r| !self.state.answers_since_lost(r))
        {
            return Ok(None);
        }
        for &r in &recovering {
            self.state.set_phase(
                r,
                NodePhase::Rejoining {
                    since: Instant::now(),
                },
            );
        }
        if let Err(e) = self.renew_nccl_ids(&recovering) {
            tracing::warn!("recovery failed: {e}");
            return Ok(None);
        }
        match self.reload_and_start() {
            Ok(started) => {
                self.last_failure = None;
                self.state.set_all_ready();
                Ok(Some(started))
            }
            Err(e) => {
                // Back to lost: the next try waits for it to answer again.
                let why = format!("recovery failed: {e}");
                if self.last_failure.as_deref() != Some(why.as_str()) {
                    tracing::warn!("{why}; retrying");
                    self.last_failure = Some(why.clone());
                }
                for &r in &recovering {
                    self.state.lose(r, why.clone());
                }
                Ok(None)
            }
        }
    }

    /// An NCCL communicator cannot take a replaced rank back: a stage on
    /// GPUs that lost one gets a new id, so all its ranks reload and join
    /// afresh. (A TCP ring reconnects at start and needs nothing here.)
    fn renew_nccl_ids(&mut self, lost: &[usize]) -> Result<()> {
        for &rank in lost {
            let node = &self.layout.nodes[rank];
            let Some(slot) = node.slots.iter().find(|s| s.spans_nodes()) else {
                continue;
            };
            if matches!(self.nccl_ids.get(&slot.stage), Some(Some(_))) {
                let id = stage_nccl_id(&self.placement).map_err(|e| cluster_err(e.to_string()))?;
                self.nccl_ids.insert(slot.stage, id);
            }
        }
        Ok(())
    }

    fn reload_and_start(&mut self) -> Result<(Vec<RemoteNode>, u64)> {
        // A node needs loading when it is a new process, or when what it
        // loads changed (its stage's NCCL id was renewed).
        let mut stale = Vec::new();
        for rank in 0..self.layout.nodes.len() {
            let instance = if rank == 0 {
                0
            } else {
                self.member(rank)?.instance
            };
            let spec = self.load_spec(rank)?;
            if self.loaded.get(&rank) != Some(&(instance, spec)) {
                stale.push(rank);
            }
        }
        if !stale.is_empty() {
            let fewest = self.load(&stale)?;
            if fewest < self.num_blocks {
                return Err(cluster_err(format!(
                    "node(s) {stale:?} hold {fewest} KV blocks, fewer than the cluster's {}",
                    self.num_blocks
                )));
            }
        }
        self.start_all()
    }
}

/// Beats worker `rank` for the life of the leader: a beat answered by the
/// process that joined keeps it; a ready node silent for two seconds is
/// lost. The worker, for its part, rejoins after [`LEADER_SILENCE`].
async fn heartbeat(rank: usize, epoch: u64, members: Arc<Members>, state: Arc<ClusterState>) {
    const _: () = assert!(HEARTBEAT_EVERY.as_millis() * 4 <= LEADER_SILENCE.as_millis());
    loop {
        tokio::time::sleep(HEARTBEAT_EVERY).await;
        let Some(member) = members.get(rank) else {
            continue;
        };
        let mut client = member.client;
        let sent = Instant::now();
        let beat = tokio::time::timeout(
            HEARTBEAT_TIMEOUT,
            client.health(pb::HealthRequest { epoch }),
        )
        .await;
        match beat {
            Ok(Ok(r)) if r.get_ref().instance == member.instance => state.beat(rank, sent),
            _ => state.missed(rank),
        }
    }
}
