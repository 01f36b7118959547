//! A worker node (node rank > 0): it joins the leader, loads its share of
//! the model when told, and runs every step the leader streams to it. It
//! holds no request logic; the leader's step messages say everything.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use strata_comm::TcpTransport;
use strata_model::{dtype_from_name, DeviceRequest, Placement, Weights};
use strata_proto::v1::leader_client::LeaderClient;
use strata_proto::v1::worker_server::{Worker, WorkerServer};
use strata_proto::v1::{self as pb, execute_request::Kind};
use strata_proto::{AddToken, CheckToken, BUILD_VERSION};
use strata_types::{ModelConfig, SchedulerOutput, StageSlot};
use tokio::sync::{mpsc as tmpsc, Notify};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::stage::{KvBudget, Links, LoadedNode, RingMember};
use crate::RunnerError;

/// A running worker exits when the leader's heartbeats (one a second) stop
/// for this long.
const LEADER_SILENCE: Duration = Duration::from_secs(15);

/// What a worker is doing, for its probes (`/health` on `--port`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Phase {
    /// Opening the checkpoint and binding its ports.
    #[default]
    Starting,
    /// Waiting for a leader that takes it: none answers yet, or the one that
    /// answers refused it (`refused` says why). During a rolling update the
    /// new workers wait here for the new leader.
    Joining { refused: Option<String> },
    /// Joined: loading its stage when told, then running steps.
    Joined,
}

/// A worker's phase, shared with whoever serves its probes.
#[derive(Debug, Default)]
pub struct WorkerStatus(Mutex<Phase>);

impl WorkerStatus {
    pub fn phase(&self) -> Phase {
        self.0.lock().expect("poisoned").clone()
    }

    fn set(&self, phase: Phase) {
        *self.0.lock().expect("poisoned") = phase;
    }
}

/// How a worker finds and joins its cluster.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub node_rank: usize,
    pub nnodes: usize,
    /// The leader's cluster address, `host:port`.
    pub leader_addr: String,
    pub model: PathBuf,
    /// Where the worker's own listeners bind.
    pub host: IpAddr,
    /// Port of the worker's gRPC service (0: any free port).
    pub port: u16,
    /// The address other nodes reach this one at; default: the local address
    /// of the route to the leader.
    pub advertise_host: Option<String>,
    pub token: String,
    /// How long to keep trying to join, and to wait for the other nodes.
    pub timeout: Duration,
    /// `--device`: the worker computes there, in the dtype the leader names.
    pub device: DeviceRequest,
    /// Updated as the worker starts, joins and runs.
    pub status: Arc<WorkerStatus>,
}

fn setup(msg: impl Into<String>) -> RunnerError {
    RunnerError::Setup(msg.into())
}

/// Runs the worker until the leader closes its step stream.
pub async fn run_worker(opts: WorkerOptions) -> Result<(), RunnerError> {
    let model = opts.model.clone();
    let (weights, config, fingerprint) = tokio::task::spawn_blocking(move || {
        let w = Weights::open(&model, &candle_core::Device::Cpu)?;
        let cfg = w.config()?;
        let fp = w.fingerprint();
        Ok::<_, RunnerError>((w, cfg, fp))
    })
    .await
    .map_err(|e| setup(e.to_string()))??;

    let bind = |port| {
        TcpListener::bind((opts.host, port))
            .map_err(|e| setup(format!("binding {}:{port}: {e}", opts.host)))
    };
    let grpc = bind(opts.port)?;
    let (data, comm) = (bind(0)?, bind(0)?);
    let port_of = |l: &TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
    let join = pb::JoinRequest {
        node_rank: opts.node_rank as u32,
        nnodes: opts.nnodes as u32,
        worker_addr: String::new(), // set once the route to the leader is known
        data_port: port_of(&data) as u32,
        comm_port: port_of(&comm) as u32,
        devices: 1,
        memory_bytes: total_memory(),
        build_version: BUILD_VERSION.into(),
        model_fingerprint: fingerprint,
    };
    let grpc_port = port_of(&grpc);

    let done = Arc::new(Notify::new());
    let running = Arc::new(Mutex::new(None));
    let last_beat = Arc::new(Mutex::new(Instant::now()));
    let service = WorkerService {
        node_rank: opts.node_rank,
        weights: Arc::new(weights),
        config,
        token: opts.token.clone(),
        timeout: opts.timeout,
        device: opts.device,
        data: Mutex::new(Some(data)),
        comm: Mutex::new(Some(comm)),
        loaded: Arc::new(Mutex::new(None)),
        running: running.clone(),
        last_beat: last_beat.clone(),
        done: done.clone(),
    };
    grpc.set_nonblocking(true)
        .map_err(|e| setup(e.to_string()))?;
    let listener = tokio::net::TcpListener::from_std(grpc).map_err(|e| setup(e.to_string()))?;
    let server = tonic::transport::Server::builder()
        .add_service(WorkerServer::with_interceptor(
            service,
            CheckToken::new(&opts.token),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), {
            let done = done.clone();
            async move { done.notified().await }
        });
    let server = tokio::spawn(server);
    tracing::info!(
        "node {} of {}: serving the worker protocol on port {grpc_port}; joining the leader at {}",
        opts.node_rank,
        opts.nnodes,
        opts.leader_addr
    );
    let mut join = join;
    let add_token = AddToken::new(&opts.token).map_err(setup)?;
    join_leader(&opts, &mut join, grpc_port, &add_token).await?;
    // A leader that dies before it starts this node, or goes silent after
    // (a host lost without a TCP reset), must not strand it.
    let watchdog = async {
        let mut deadline = Instant::now() + opts.timeout;
        let mut announced = Instant::now();
        while running.lock().expect("poisoned").is_none() {
            if Instant::now() >= deadline {
                return format!(
                    "the leader at {} did not start node {} within {:?} of its joining",
                    opts.leader_addr, opts.node_rank, opts.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Until started, re-announce this node now and then (joining
            // twice from one address is harmless): a leader replaced in
            // the meantime (a rolling update replaces it last) learns of
            // this node so, and a gone one sends it back to joining.
            if announced.elapsed() >= REANNOUNCE && running.lock().expect("poisoned").is_none() {
                announced = Instant::now();
                if let Err(s) = join_once(&opts, &join, &add_token).await {
                    tracing::info!(
                        "the leader at {} no longer takes node {} ({}); joining again",
                        opts.leader_addr,
                        opts.node_rank,
                        s.message()
                    );
                    if let Err(e) = join_leader(&opts, &mut join, grpc_port, &add_token).await {
                        return e.to_string();
                    }
                    deadline = Instant::now() + opts.timeout;
                }
            }
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let silent = last_beat.lock().expect("poisoned").elapsed();
            if silent > LEADER_SILENCE {
                return format!(
                    "no heartbeat from the leader at {} for {:.0} s",
                    opts.leader_addr,
                    silent.as_secs_f32()
                );
            }
        }
    };
    tokio::select! {
        r = server => {
            r.map_err(|e| setup(e.to_string()))?
                .map_err(|e| setup(format!("worker service: {e}")))?;
        }
        why = watchdog => return Err(setup(why)),
    }
    tracing::info!(
        "the leader closed the step stream; node {} exits",
        opts.node_rank
    );
    Ok(())
}

/// How often a joined node that has not been started re-announces itself.
const REANNOUNCE: Duration = Duration::from_secs(2);

/// One Join call.
async fn join_once(
    opts: &WorkerOptions,
    join: &pb::JoinRequest,
    add_token: &AddToken,
) -> Result<pb::JoinReply, Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", opts.leader_addr))
        .map_err(|e| Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    LeaderClient::with_interceptor(channel, add_token.clone())
        .join(join.clone())
        .await
        .map(Response::into_inner)
}

/// Joins with capped exponential backoff until `--cluster-timeout`: the
/// leader may start later, its name may not resolve yet (a StatefulSet pod's
/// DNS record appears with the pod), and a leader that refuses this node may
/// be replaced by one that takes it (a rolling update replaces workers
/// first), so a refusal is logged and retried rather than fatal. Fills in
/// `join.worker_addr` from the route to the leader.
async fn join_leader(
    opts: &WorkerOptions,
    join: &mut pb::JoinRequest,
    grpc_port: u16,
    add_token: &AddToken,
) -> Result<(), RunnerError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut last_log: Option<(Instant, String)> = None;
    opts.status.set(Phase::Joining { refused: None });
    loop {
        let attempt = match fill_worker_addr(opts, join, grpc_port) {
            Err(e) => Err(Status::unavailable(e.to_string())),
            Ok(()) => join_once(opts, join, add_token).await,
        };
        let why = match attempt {
            Ok(reply) => {
                tracing::info!(
                    "node {} joined the leader at {} as {} (build {})",
                    opts.node_rank,
                    opts.leader_addr,
                    join.worker_addr,
                    reply.leader_build_version
                );
                opts.status.set(Phase::Joined);
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                opts.status.set(Phase::Joining { refused: None });
                format!(
                    "the leader at {} did not answer: {}",
                    opts.leader_addr,
                    s.message()
                )
            }
            Err(s) => {
                let why = format!(
                    "the leader at {} refused node {}: {}",
                    opts.leader_addr,
                    opts.node_rank,
                    s.message()
                );
                opts.status.set(Phase::Joining {
                    refused: Some(why.clone()),
                });
                why
            }
        };
        if started.elapsed() >= opts.timeout {
            return Err(setup(format!("{why} (gave up after {:?})", opts.timeout)));
        }
        // A new reason at once, the same one every 10 s.
        let due = last_log
            .as_ref()
            .is_none_or(|(at, last)| *last != why || at.elapsed() >= Duration::from_secs(10));
        if due {
            tracing::info!("{why}; retrying until --cluster-timeout");
            last_log = Some((Instant::now(), why));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Sets the address the leader reaches this node's gRPC service at, once
/// it can be known: `--advertise-host`, else this host's address on the
/// route to the leader (whose name may not resolve yet).
fn fill_worker_addr(
    opts: &WorkerOptions,
    join: &mut pb::JoinRequest,
    grpc_port: u16,
) -> Result<(), RunnerError> {
    if join.worker_addr.is_empty() {
        let host = match &opts.advertise_host {
            Some(h) => h.clone(),
            None => route_to(&opts.leader_addr)?.to_string(),
        };
        join.worker_addr = format!("{host}:{grpc_port}");
    }
    Ok(())
}

/// The local address this host uses to reach `addr`: what the other nodes
/// can reach it at, without asking the user. (Connecting a UDP socket sends
/// nothing; it only picks the route.)
fn route_to(addr: &str) -> Result<IpAddr, RunnerError> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| setup(format!("resolving the leader address {addr}: {e}")))?
        .next()
        .ok_or_else(|| setup(format!("the leader address {addr} resolves to nothing")))?;
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(any).map_err(|e| setup(e.to_string()))?;
    s.connect(target)
        .map_err(|e| setup(format!("no route to the leader at {addr}: {e}")))?;
    Ok(s.local_addr().map_err(|e| setup(e.to_string()))?.ip())
}

fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// What LoadStage prepared for Execute to start.
struct Prepared {
    node: LoadedNode,
    next_data_addr: Option<SocketAddr>,
    has_previous: bool,
}

enum Job {
    Step(SchedulerOutput),
    Reset,
}

struct WorkerService {
    node_rank: usize,
    weights: Arc<Weights>,
    config: ModelConfig,
    token: String,
    timeout: Duration,
    device: DeviceRequest,
    data: Mutex<Option<TcpListener>>,
    comm: Mutex<Option<TcpListener>>,
    loaded: Arc<Mutex<Option<Prepared>>>,
    /// The running node's job queue, once Execute has started it.
    running: Arc<Mutex<Option<mpsc::Sender<Job>>>>,
    /// When the leader's heartbeat last arrived.
    last_beat: Arc<Mutex<Instant>>,
    done: Arc<Notify>,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::StepReply, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn load_stage(
        &self,
        req: Request<pb::LoadStageRequest>,
    ) -> Result<Response<pb::LoadStageReply>, Status> {
        let req = req.into_inner();
        let slots = req
            .slots
            .iter()
            .map(StageSlot::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        if slots.is_empty() {
            return Err(Status::invalid_argument("no stage to load"));
        }
        let dtype = dtype_from_name(&req.dtype).ok_or_else(|| {
            Status::invalid_argument(format!("unknown activation dtype `{}`", req.dtype))
        })?;
        let local_ranks = slots.iter().map(|s| s.tp_rank_count).sum();
        let placement = Placement::resolve(self.device, Some(dtype), local_ranks)
            .map_err(|e| Status::failed_precondition(format!("node {}: {e}", self.node_rank)))?;
        let budget = if req.gpu_memory_utilization > 0.0 && !placement.is_cpu() {
            KvBudget::DeviceFraction {
                fraction: req.gpu_memory_utilization,
                max_batch_tokens: req.max_num_batched_tokens as usize,
            }
        } else {
            KvBudget::Bytes(req.kv_cache_bytes)
        };
        let ring = if slots.iter().any(|s| s.spans_nodes()) {
            let addrs = req
                .comm_ring
                .iter()
                .map(|a| a.parse::<SocketAddr>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::invalid_argument(format!("tensor-parallel ring: {e}")))?;
            let listener = self.comm.lock().expect("poisoned").take().ok_or_else(|| {
                Status::failed_precondition("this node's tensor-parallel listener is in use")
            })?;
            Some(RingMember {
                rank: slots[0].tp_rank_begin,
                listener,
                addrs,
                token: self.token.clone(),
                timeout: self.timeout,
                nccl_id: (!req.nccl_id.is_empty()).then(|| req.nccl_id.clone()),
            })
        } else {
            None
        };
        let next_data_addr = match req.next_data_addr.as_str() {
            "" => None,
            a => Some(
                a.parse()
                    .map_err(|e| Status::invalid_argument(format!("next data address {a}: {e}")))?,
            ),
        };
        let (weights, config) = (self.weights.clone(), self.config.clone());
        let max_len = req.max_model_len as usize;
        let node_rank = self.node_rank;
        let node = tokio::task::spawn_blocking(move || {
            let mut progress = |layer: usize, _| {
                tracing::debug!("node {node_rank}: loaded layer {layer}");
            };
            let node = LoadedNode::load(
                &weights,
                &config,
                &slots,
                ring,
                max_len,
                &placement,
                &mut progress,
            )?;
            let blocks = node.kv_blocks(budget)?;
            Ok::<_, RunnerError>((node, blocks, placement))
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::failed_precondition(format!("loading node {node_rank}: {e}")))?;
        let (node, num_blocks, placement) = node;
        let num_blocks = num_blocks as u64;
        tracing::info!(
            "node {}: loaded layers {:?} on {} ({:.1} MiB read); the KV budget holds {num_blocks} blocks",
            self.node_rank,
            req.slots
                .iter()
                .map(|s| (s.first_layer..s.end_layer, s.tp_rank_begin))
                .collect::<Vec<_>>(),
            placement.describe(),
            self.weights.bytes_read() as f64 / (1 << 20) as f64
        );
        *self.loaded.lock().expect("poisoned") = Some(Prepared {
            node,
            next_data_addr,
            has_previous: req.has_previous,
        });
        Ok(Response::new(pb::LoadStageReply {
            num_blocks,
            weight_bytes_read: self.weights.bytes_read(),
        }))
    }

    type ExecuteStream = ReplyStream;

    async fn execute(
        &self,
        req: Request<Streaming<pb::ExecuteRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut inbound = req.into_inner();
        let start = match inbound.next().await {
            Some(Ok(pb::ExecuteRequest {
                kind: Some(Kind::Start(s)),
            })) => s,
            Some(Err(e)) => return Err(e),
            _ => return Err(Status::invalid_argument("Execute must open with Start")),
        };
        let prepared = self
            .loaded
            .lock()
            .expect("poisoned")
            .take()
            .ok_or_else(|| Status::failed_precondition("Execute before LoadStage"))?;
        let input_listener = if prepared.has_previous {
            let l = self.data.lock().expect("poisoned").take();
            Some(l.ok_or_else(|| Status::failed_precondition("the data listener is in use"))?)
        } else {
            None
        };
        let (reply_tx, reply_rx) = tmpsc::unbounded_channel();
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        *self.running.lock().expect("poisoned") = Some(job_tx.clone());
        // Heartbeats start now; the watchdog counts from here.
        *self.last_beat.lock().expect("poisoned") = Instant::now();
        let (token, timeout, rank) = (self.token.clone(), self.timeout, self.node_rank);
        let num_blocks = start.num_blocks as usize;
        let done = self.done.clone();
        let running = self.running.clone();
        // The node's stages run on a thread of their own: steps block on
        // compute and on the data plane.
        std::thread::Builder::new()
            .name(format!("strata-node{rank}"))
            .spawn(move || {
                let links = (|| {
                    let output = prepared
                        .next_data_addr
                        .map(|a| TcpTransport::connect(a, rank as u64, &token, timeout))
                        .transpose()?;
                    let input = input_listener
                        .map(|l| TcpTransport::accept(&l, &token, timeout).map(|(t, _)| t))
                        .transpose()?;
                    Ok::<_, candle_core::Error>(Links { input, output })
                })();
                let mut node = match links {
                    Ok(links) => match prepared.node.start(num_blocks, links) {
                        Ok(node) => {
                            let _ = reply_tx.send(Ok(pb::StepReply::default()));
                            node
                        }
                        Err(e) => {
                            let _ = reply_tx.send(Ok(pb::StepReply {
                                error: format!("node {rank}: allocating the KV cache: {e}"),
                                ..Default::default()
                            }));
                            return;
                        }
                    },
                    Err(e) => {
                        let _ = reply_tx.send(Ok(pb::StepReply {
                            error: format!("node {rank}: connecting the data plane: {e}"),
                            ..Default::default()
                        }));
                        return;
                    }
                };
                tracing::info!("node {rank}: running with {num_blocks} KV blocks");
                for job in job_rx {
                    match job {
                        Job::Reset => node.reset(),
                        Job::Step(out) => {
                            let reply = match node.execute(&out) {
                                Ok(r) => pb::StepReply {
                                    step_id: out.step_id,
                                    result: r.as_ref().map(Into::into),
                                    error: String::new(),
                                },
                                Err(e) => pb::StepReply {
                                    step_id: out.step_id,
                                    result: None,
                                    error: format!("node {rank}: {e}"),
                                },
                            };
                            if reply_tx.send(Ok(reply)).is_err() {
                                break;
                            }
                        }
                    }
                }
                tracing::info!(
                    "node {rank}: step stream closed ({} activation bytes sent)",
                    node.bytes_sent()
                );
            })
            .map_err(internal)?;
        // Forward the leader's steps until it closes the stream (or dies).
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                match msg {
                    Ok(pb::ExecuteRequest {
                        kind: Some(Kind::Step(s)),
                    }) => {
                        if job_tx.send(Job::Step(s.into())).is_err() {
                            break;
                        }
                    }
                    Ok(_) => tracing::warn!("node {rank}: ignoring a second Start"),
                    Err(e) => {
                        tracing::warn!("node {rank}: the step stream failed: {e}");
                        break;
                    }
                }
            }
            running.lock().expect("poisoned").take();
            drop(job_tx);
            done.notify_one();
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            reply_rx,
        ))))
    }

    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        *self.last_beat.lock().expect("poisoned") = Instant::now();
        let running = self.running.lock().expect("poisoned").is_some();
        let loaded = running || self.loaded.lock().expect("poisoned").is_some();
        Ok(Response::new(pb::HealthReply { loaded }))
    }

    async fn reset(
        &self,
        _req: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ResetReply>, Status> {
        if let Some(tx) = &*self.running.lock().expect("poisoned") {
            let _ = tx.send(Job::Reset);
        }
        Ok(Response::new(pb::ResetReply {}))
    }
}
