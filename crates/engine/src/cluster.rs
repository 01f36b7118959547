//! The leader's side of a cluster: who has joined, forming the cluster
//! (Join, LoadStage, Execute), heartbeats, and the health `/health` reports.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use strata_model::{dtype_name, Placement, Weights};
use strata_proto::v1::leader_server::{Leader, LeaderServer};
use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{self as pb, execute_request::Kind};
use strata_proto::{AddToken, CheckToken, BUILD_VERSION};
use strata_types::{ClusterLayout, ModelConfig};
use strata_worker::{stage_nccl_id, KvBudget, Links, LoadedNode, NodeStages, RingMember};
use tokio::sync::{mpsc as tmpsc, Notify};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::{EngineError, Result};
use crate::executor::RemoteNode;

/// A heartbeat older than this makes the cluster unhealthy.
const HEARTBEAT_STALE: Duration = Duration::from_secs(5);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// How the leader forms its cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nnodes: usize,
    /// Where the leader serves the cluster protocol.
    pub listen: SocketAddr,
    pub token: String,
    /// How long to wait for workers to join, load and connect.
    pub timeout: Duration,
    pub runtime: tokio::runtime::Handle,
    pub state: Arc<ClusterState>,
}

#[derive(Debug, Default, Clone)]
struct NodeStatus {
    joined: bool,
    loaded: bool,
    last_heartbeat: Option<Instant>,
    /// Checkpoint bytes the node read for its stages.
    weight_bytes: u64,
    /// Why the leader last refused a worker claiming this rank, until one joins.
    refused: Option<String>,
}

/// What every node is doing, for `/health`: ready only when every node has
/// joined, loaded its stage and answered a heartbeat recently.
#[derive(Debug)]
pub struct ClusterState {
    nodes: Mutex<Vec<NodeStatus>>,
}

impl ClusterState {
    pub fn new(nnodes: usize) -> Arc<Self> {
        let mut nodes = vec![NodeStatus::default(); nnodes.max(1)];
        // The leader has joined itself.
        nodes[0].joined = true;
        Arc::new(Self {
            nodes: Mutex::new(nodes),
        })
    }

    fn update(&self, node: usize, f: impl FnOnce(&mut NodeStatus)) {
        if let Some(n) = self.nodes.lock().expect("poisoned").get_mut(node) {
            f(n);
        }
    }

    /// What keeps the cluster from serving; empty when it is ready.
    pub fn problems(&self) -> Vec<String> {
        let nodes = self.nodes.lock().expect("poisoned");
        let mut out = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let who = if i == 0 {
                "node 0 (leader)".to_string()
            } else {
                format!("node {i}")
            };
            if !n.joined {
                match &n.refused {
                    Some(why) => out.push(format!("{who}: not joined (refused: {why})")),
                    None => out.push(format!("{who}: not joined")),
                }
            } else if !n.loaded {
                out.push(format!("{who}: joined, stage not loaded yet"));
            } else if i > 0 {
                match n.last_heartbeat {
                    Some(t) if t.elapsed() <= HEARTBEAT_STALE => {}
                    Some(t) => out.push(format!(
                        "{who}: no heartbeat for {:.1} s",
                        t.elapsed().as_secs_f32()
                    )),
                    None => out.push(format!("{who}: no heartbeat yet")),
                }
            }
        }
        out
    }

    /// Marks `node` loaded, having read `weight_bytes` of the checkpoint.
    pub fn set_loaded(&self, node: usize, weight_bytes: u64) {
        self.update(node, |n| {
            n.loaded = true;
            n.weight_bytes = weight_bytes;
            n.last_heartbeat = Some(Instant::now());
        });
    }

    /// Checkpoint bytes each node read (0 until it has loaded), by node rank.
    pub fn weight_bytes(&self) -> Vec<u64> {
        let nodes = self.nodes.lock().expect("poisoned");
        nodes.iter().map(|n| n.weight_bytes).collect()
    }
}

/// A worker that has joined.
#[derive(Debug, Clone)]
struct Member {
    worker_addr: String,
    data_addr: SocketAddr,
    comm_addr: SocketAddr,
    /// The leader's address as this worker reached it.
    leader_ip: IpAddr,
}

struct LeaderService {
    nnodes: usize,
    fingerprint: String,
    members: Mutex<BTreeMap<usize, Member>>,
    changed: Notify,
    state: Arc<ClusterState>,
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
        let refuse = |why: String| {
            // A refused worker retries every few seconds (a new leader may
            // take it): say each reason once, and show it on /health.
            let mut repeated = false;
            self.state.update(rank, |n| {
                repeated = n.refused.as_deref() == Some(why.as_str());
                n.refused = Some(why.clone());
            });
            if repeated {
                tracing::debug!("refused node {rank} ({}) again: {why}", j.worker_addr);
            } else {
                tracing::warn!("refused node {rank} ({}): {why}", j.worker_addr);
            }
            Err(Status::failed_precondition(why))
        };
        if j.nnodes as usize != self.nnodes {
            return refuse(format!(
                "the worker was started with --nnodes {} but the leader with --nnodes {}",
                j.nnodes, self.nnodes
            ));
        }
        if rank == 0 || rank >= self.nnodes {
            return refuse(format!(
                "node rank {rank} is not a worker rank of a {}-node cluster (1..{})",
                self.nnodes,
                self.nnodes - 1
            ));
        }
        if j.build_version != BUILD_VERSION {
            return refuse(format!(
                "the worker runs strata {} but the leader {BUILD_VERSION}",
                j.build_version
            ));
        }
        if j.model_fingerprint != self.fingerprint {
            return refuse(format!(
                "node {rank} opened a different model (fingerprint {}) than the leader ({}); \
                 every node must serve the same checkpoint",
                j.model_fingerprint, self.fingerprint
            ));
        }
        let worker: SocketAddr = tokio::net::lookup_host(&j.worker_addr)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Status::invalid_argument(format!("cannot resolve {}", j.worker_addr)))?;
        let member = Member {
            worker_addr: j.worker_addr.clone(),
            data_addr: SocketAddr::new(worker.ip(), j.data_port as u16),
            comm_addr: SocketAddr::new(worker.ip(), j.comm_port as u16),
            leader_ip,
        };
        {
            let mut members = self.members.lock().expect("poisoned");
            if let Some(old) = members.get(&rank) {
                if old.worker_addr != member.worker_addr {
                    return refuse(format!(
                        "node rank {rank} has already joined from {}",
                        old.worker_addr
                    ));
                }
            }
            members.insert(rank, member);
        }
        tracing::info!(
            "node {rank} joined from {} ({} device(s), {:.1} GiB)",
            j.worker_addr,
            j.devices,
            j.memory_bytes as f64 / (1u64 << 30) as f64
        );
        self.state.update(rank, |n| {
            n.joined = true;
            n.refused = None;
        });
        self.changed.notify_waiters();
        Ok(Response::new(pb::JoinReply {
            leader_build_version: BUILD_VERSION.into(),
        }))
    }
}

type Client = WorkerClient<InterceptedService<Channel, AddToken>>;

fn cluster_err(msg: impl Into<String>) -> EngineError {
    EngineError::Cluster(msg.into())
}

/// Everything the leader's own node needs to join the cluster's stages.
pub(crate) struct Formed {
    pub local: NodeStages,
    pub remotes: Vec<RemoteNode>,
    pub num_blocks: usize,
}

/// How every node loads: the KV budget, the leader's placement (workers
/// compute in its dtype on their own devices), the rope length.
pub(crate) struct NodeSetup<'a> {
    pub budget: KvBudget,
    pub placement: &'a Placement,
    pub max_model_len: usize,
}

/// Forms the cluster: waits for every worker to join, loads every node's
/// stages (the leader's own here, the others by LoadStage), allocates the
/// least KV capacity any node can hold, and opens the step streams.
pub(crate) fn form(
    opts: &ClusterOptions,
    layout: &ClusterLayout,
    weights: &Weights,
    config: &ModelConfig,
    setup: NodeSetup,
    progress: &mut dyn FnMut(usize, strata_types::LayerRange),
) -> Result<Formed> {
    let max_model_len = setup.max_model_len;
    let (kv_cache_bytes, gpu_memory_utilization, max_num_batched_tokens) = match setup.budget {
        KvBudget::Bytes(b) => (b, 0.0, 0),
        KvBudget::DeviceFraction {
            fraction,
            max_batch_tokens,
        } => (0, fraction, max_batch_tokens as u32),
    };
    let rt = &opts.runtime;
    let add_token = AddToken::new(&opts.token).map_err(cluster_err)?;
    let comm_listener = TcpListener::bind(SocketAddr::new(opts.listen.ip(), 0))
        .map_err(|e| cluster_err(e.to_string()))?;
    let comm_port = comm_listener
        .local_addr()
        .map_err(|e| cluster_err(e.to_string()))?
        .port();

    let service = Arc::new(LeaderService {
        nnodes: opts.nnodes,
        fingerprint: weights.fingerprint(),
        members: Mutex::new(BTreeMap::new()),
        changed: Notify::new(),
        state: opts.state.clone(),
    });
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(opts.listen))
        .map_err(|e| cluster_err(format!("binding the cluster port {}: {e}", opts.listen)))?;
    tracing::info!(
        "waiting for {} worker node(s) to join at {}",
        opts.nnodes - 1,
        opts.listen
    );
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(InterceptedService::new(
                LeaderServer::from_arc(service.clone()),
                CheckToken::new(&opts.token),
            ))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // Wait for every worker, saying who is missing now and then.
    let members = rt.block_on(async {
        let deadline = Instant::now() + opts.timeout;
        let mut last_log = Instant::now();
        loop {
            let changed = service.changed.notified();
            let missing: Vec<usize> = {
                let m = service.members.lock().expect("poisoned");
                (1..opts.nnodes).filter(|r| !m.contains_key(r)).collect()
            };
            if missing.is_empty() {
                return Ok(service.members.lock().expect("poisoned").clone());
            }
            if Instant::now() >= deadline {
                return Err(cluster_err(format!(
                    "node(s) {missing:?} did not join within {:?}",
                    opts.timeout
                )));
            }
            if last_log.elapsed() >= Duration::from_secs(10) {
                tracing::info!("still waiting for node(s) {missing:?} to join");
                last_log = Instant::now();
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    })?;

    // Where each node is reached: the leader at the address its workers used.
    let leader_ip = members.values().next().expect("nnodes > 1").leader_ip;
    let comm_addr = |n: usize| {
        if n == 0 {
            SocketAddr::new(leader_ip, comm_port)
        } else {
            members[&n].comm_addr
        }
    };
    let mut clients: BTreeMap<usize, Client> = BTreeMap::new();
    for (&rank, m) in &members {
        let channel = rt
            .block_on(
                tonic::transport::Endpoint::from_shared(format!("http://{}", m.worker_addr))
                    .map_err(|e| cluster_err(e.to_string()))?
                    .connect_timeout(Duration::from_secs(5))
                    .connect(),
            )
            .map_err(|e| cluster_err(format!("node {rank} at {}: {e}", m.worker_addr)))?;
        clients.insert(
            rank,
            WorkerClient::with_interceptor(channel, add_token.clone())
                .max_decoding_message_size(64 << 20),
        );
    }

    // Stages whose ranks span nodes get an NCCL id on GPUs (made here, so
    // NCCL's bootstrap root lives in the leader).
    let mut nccl_ids = BTreeMap::new();
    for slot in layout.nodes.iter().flat_map(|n| &n.slots) {
        if slot.spans_nodes() && !nccl_ids.contains_key(&slot.stage) {
            let id = stage_nccl_id(setup.placement).map_err(|e| cluster_err(e.to_string()))?;
            nccl_ids.insert(slot.stage, id);
        }
    }
    let nccl_id_of = |plan: &strata_types::NodePlan| {
        plan.slots
            .iter()
            .find(|s| s.spans_nodes())
            .and_then(|s| nccl_ids[&s.stage].clone())
    };

    // Every worker loads while the leader loads its own stages.
    let mut loads = Vec::new();
    for (&rank, client) in &clients {
        let plan = &layout.nodes[rank];
        let req = pb::LoadStageRequest {
            slots: plan.slots.iter().map(Into::into).collect(),
            kv_cache_bytes,
            max_model_len: max_model_len as u32,
            comm_ring: plan
                .ring
                .iter()
                .map(|&n| comm_addr(n).to_string())
                .collect(),
            next_data_addr: plan
                .next
                .map(|n| members[&n].data_addr.to_string())
                .unwrap_or_default(),
            has_previous: plan.has_previous,
            dtype: dtype_name(setup.placement.dtype()).into(),
            gpu_memory_utilization,
            max_num_batched_tokens,
            nccl_id: nccl_id_of(plan).unwrap_or_default(),
        };
        let mut client = client.clone();
        loads.push((rank, rt.spawn(async move { client.load_stage(req).await })));
    }
    let plan = &layout.nodes[0];
    let ring = (!plan.ring.is_empty()).then(|| RingMember {
        rank: 0,
        listener: comm_listener,
        addrs: plan.ring.iter().map(|&n| comm_addr(n)).collect(),
        token: opts.token.clone(),
        timeout: opts.timeout,
        nccl_id: nccl_id_of(plan),
    });
    let local = LoadedNode::load(
        weights,
        config,
        &plan.slots,
        ring,
        max_model_len,
        setup.placement,
        progress,
    )
    .map_err(|e| cluster_err(format!("loading the leader's stages: {e}")))?;
    let mut num_blocks = local
        .kv_blocks(setup.budget)
        .map_err(|e| cluster_err(format!("sizing the leader's KV cache: {e}")))?
        as u64;
    opts.state.set_loaded(0, weights.bytes_read());
    for (rank, load) in loads {
        let reply = rt
            .block_on(tokio::time::timeout(opts.timeout, load))
            .map_err(|_| {
                cluster_err(format!(
                    "node {rank} did not finish loading within {:?}",
                    opts.timeout
                ))
            })?
            .map_err(|e| cluster_err(e.to_string()))?
            .map_err(|s| cluster_err(format!("node {rank} could not load: {}", s.message())))?
            .into_inner();
        tracing::info!(
            "node {rank} loaded its stages ({:.1} MiB of weights); it holds {} KV blocks",
            reply.weight_bytes_read as f64 / (1 << 20) as f64,
            reply.num_blocks
        );
        num_blocks = num_blocks.min(reply.num_blocks);
        opts.state.set_loaded(rank, reply.weight_bytes_read);
    }
    if num_blocks == 0 {
        return Err(cluster_err(
            "the KV budget holds no block on some node (give it more with --kv-cache-memory or --gpu-memory-utilization)",
        ));
    }

    // Open the step streams; each worker connects its data plane on Start.
    let mut remotes = Vec::new();
    let mut streams = Vec::new();
    for (&rank, client) in &clients {
        let (tx, rx) = tmpsc::unbounded_channel();
        tx.send(pb::ExecuteRequest {
            kind: Some(Kind::Start(pb::Start { num_blocks })),
        })
        .expect("receiver held");
        let mut client = client.clone();
        streams.push((
            rank,
            tx,
            rt.spawn(async move { client.execute(UnboundedReceiverStream::new(rx)).await }),
        ));
    }
    let links = Links {
        input: None,
        output: plan
            .next
            .map(|n| {
                strata_comm::TcpTransport::connect(
                    members[&n].data_addr,
                    0,
                    &opts.token,
                    opts.timeout,
                )
            })
            .transpose()
            .map_err(|e| cluster_err(e.to_string()))?,
    };
    for (rank, tx, call) in streams {
        let mut replies = rt
            .block_on(tokio::time::timeout(opts.timeout, call))
            .map_err(|_| {
                cluster_err(format!(
                    "node {rank} did not open its step stream within {:?}",
                    opts.timeout
                ))
            })?
            .map_err(|e| cluster_err(e.to_string()))?
            .map_err(|s| cluster_err(format!("node {rank}: {}", s.message())))?
            .into_inner();
        let (reply_tx, reply_rx) = mpsc::channel();
        rt.spawn(async move {
            while let Some(r) = replies.next().await {
                let r =
                    r.map_err(|s| format!("node {rank}: the step stream broke: {}", s.message()));
                let broken = r.is_err();
                if reply_tx.send(r).is_err() || broken {
                    return;
                }
            }
            let _ = reply_tx.send(Err(format!("node {rank} closed its step stream")));
        });
        // The first reply says the worker started (or why not).
        match reply_rx.recv_timeout(opts.timeout) {
            Ok(Ok(r)) if r.error.is_empty() => {}
            Ok(Ok(r)) => return Err(cluster_err(r.error)),
            Ok(Err(e)) => return Err(cluster_err(e)),
            Err(_) => {
                return Err(cluster_err(format!(
                    "node {rank} did not start within {:?}",
                    opts.timeout
                )))
            }
        }
        remotes.push(RemoteNode {
            rank,
            tx,
            rx: reply_rx,
        });
    }
    let local = local
        .start(num_blocks as usize, links)
        .map_err(|e| cluster_err(format!("starting the leader's stages: {e}")))?;

    // Heartbeats: every worker, every second, for as long as the leader runs.
    for (rank, mut client) in clients {
        let state = opts.state.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT_EVERY).await;
                let beat =
                    tokio::time::timeout(HEARTBEAT_STALE, client.health(pb::HealthRequest {}))
                        .await;
                match beat {
                    Ok(Ok(r)) if r.get_ref().loaded => {
                        state.update(rank, |n| n.last_heartbeat = Some(Instant::now()))
                    }
                    Ok(Ok(_)) => state.update(rank, |n| n.loaded = false),
                    _ => {}
                }
            }
        });
    }
    Ok(Formed {
        local,
        remotes,
        num_blocks: num_blocks as usize,
    })
}
