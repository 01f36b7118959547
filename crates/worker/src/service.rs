//! A worker node (node rank > 0): it joins the leader and serves the worker
//! protocol, a thin adapter over its node runtime. It holds no request
//! logic; the leader's step messages say everything. A worker outlives its
//! leader: when the leader goes silent it drops its requests, keeps its
//! weights, and joins again (a restarted leader takes it back).

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_model::{DeviceRequest, Weights};
use strata_proto::v1::leader_client::LeaderClient;
use strata_proto::v1::worker_server::{Worker, WorkerServer};
use strata_proto::v1::{self as pb, execute_request::Kind};
use strata_proto::{AddToken, CheckToken, BUILD_VERSION};
use tokio::sync::mpsc as tmpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::node::{LoadSpec, NodeConfig, NodeRuntime, StartSpec, StepOutcome};
use crate::RunnerError;

/// The leader beats every half second; after this long without a beat the
/// worker takes it for gone, drops its requests and joins again.
pub const LEADER_SILENCE: Duration = Duration::from_secs(3);
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

/// Runs the worker: joins the leader and serves it, joining again whenever
/// the leader goes silent. Ends with an error when no leader takes this node
/// within `--cluster-timeout`.
pub async fn run_worker(opts: WorkerOptions) -> Result<(), RunnerError> {
    let model = opts.model.clone();
    let (weights, model, fingerprint) = tokio::task::spawn_blocking(move || {
        let w = Weights::open(&model, &candle_core::Device::Cpu)?;
        let arch = w.architecture()?;
        let fp = w.fingerprint();
        Ok::<_, RunnerError>((w, arch, fp))
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
    let instance = rand::random::<u64>();
    let mut join = pb::JoinRequest {
        node_rank: opts.node_rank as u32,
        nnodes: opts.nnodes as u32,
        worker_addr: String::new(), // set once the route to the leader is known
        data_port: port_of(&data) as u32,
        comm_port: port_of(&comm) as u32,
        devices: 1,
        memory_bytes: total_memory(),
        build_version: BUILD_VERSION.into(),
        model_fingerprint: fingerprint,
        instance,
    };
    let grpc_port = port_of(&grpc);
    let runtime = NodeRuntime::spawn(NodeConfig {
        rank: opts.node_rank,
        weights: Arc::new(weights),
        model,
        device: opts.device,
        token: opts.token.clone(),
        timeout: opts.timeout,
        data: Some(data),
        comm: Some(comm),
    });
    let leader = Arc::new(LeaderWatch::default());
    let service = WorkerService {
        node_rank: opts.node_rank,
        runtime: runtime.clone(),
        instance,
        leader: leader.clone(),
    };
    grpc.set_nonblocking(true)
        .map_err(|e| setup(e.to_string()))?;
    let listener = tokio::net::TcpListener::from_std(grpc).map_err(|e| setup(e.to_string()))?;
    let server = tonic::transport::Server::builder()
        .add_service(WorkerServer::with_interceptor(
            service,
            CheckToken::new(&opts.token),
        ))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tracing::info!(
        "node {} of {}: serving the worker protocol on port {grpc_port}; joining the leader at {}",
        opts.node_rank,
        opts.nnodes,
        opts.leader_addr
    );
    let add_token = AddToken::new(&opts.token).map_err(setup)?;
    let serve_leaders = async {
        loop {
            let reply = join_leader(&opts, &mut join, grpc_port, &add_token).await?;
            leader.joined(reply.epoch);
            // Serve this leader until it goes silent (it died, or a
            // partition cut it off), then join whoever leads next.
            let tick = LEADER_SILENCE / 12;
            let mut last_tick = Instant::now();
            loop {
                tokio::time::sleep(tick).await;
                if last_tick.elapsed() > tick * 4 {
                    // This process was frozen (SIGSTOP, a paused VM): the
                    // silence is its own, so give the leader a fresh chance.
                    leader.refresh();
                }
                last_tick = Instant::now();
                let silent = leader.silence();
                if silent > LEADER_SILENCE {
                    tracing::warn!(
                        "no heartbeat from the leader at {} for {:.1} s: node {} drops its requests, \
                         keeps its weights and joins again",
                        opts.leader_addr,
                        silent.as_secs_f32(),
                        opts.node_rank
                    );
                    break;
                }
            }
            runtime.interrupt();
            runtime.reset();
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| setup(format!("worker service: {e}"))),
        r = serve_leaders => r,
    }
}

/// Which leader this worker serves and when it last heard from it.
#[derive(Debug)]
struct LeaderWatch {
    epoch: AtomicU64,
    last_beat: Mutex<Instant>,
}

impl Default for LeaderWatch {
    fn default() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            last_beat: Mutex::new(Instant::now()),
        }
    }
}

impl LeaderWatch {
    fn joined(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
        self.refresh();
    }

    /// Restarts the silence count (after this process was frozen).
    fn refresh(&self) {
        *self.last_beat.lock().expect("poisoned") = Instant::now();
    }

    /// A heartbeat; one from another leader than the one joined is ignored.
    fn beat(&self, epoch: u64) {
        if epoch == self.epoch.load(Ordering::SeqCst) {
            self.refresh();
        }
    }

    fn silence(&self) -> Duration {
        self.last_beat.lock().expect("poisoned").elapsed()
    }
}

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
) -> Result<pb::JoinReply, RunnerError> {
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
                return Ok(reply);
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

struct WorkerService {
    node_rank: usize,
    runtime: NodeRuntime,
    instance: u64,
    leader: Arc<LeaderWatch>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::StepReply, Status>> + Send>>;

fn step_reply(step_id: u64, outcome: StepOutcome) -> pb::StepReply {
    match outcome {
        Ok(r) => pb::StepReply {
            step_id,
            result: r.as_ref().map(Into::into),
            error: None,
        },
        Err(e) => pb::StepReply {
            step_id,
            result: None,
            error: Some((&e).into()),
        },
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn load_stage(
        &self,
        req: Request<pb::LoadStageRequest>,
    ) -> Result<Response<pb::LoadStageReply>, Status> {
        let spec = LoadSpec::try_from(req.into_inner()).map_err(Status::invalid_argument)?;
        let report = self.runtime.load(spec).wait().await.map_err(|e| {
            Status::failed_precondition(format!("loading node {}: {e}", self.node_rank))
        })?;
        Ok(Response::new(pb::LoadStageReply {
            num_blocks: report.num_blocks as u64,
            weight_bytes_read: report.weight_bytes,
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
        let spec = StartSpec::try_from(&start).map_err(Status::invalid_argument)?;
        let (reply_tx, reply_rx) = tmpsc::unbounded_channel();
        let (runtime, rank) = (self.runtime.clone(), self.node_rank);
        tokio::spawn(async move {
            // The first reply says the node started (or why not).
            let run = match runtime.start(spec).wait().await {
                Ok(run) => run,
                Err(e) => {
                    let _ = reply_tx.send(Ok(step_reply(0, Err(e))));
                    return;
                }
            };
            let _ = reply_tx.send(Ok(pb::StepReply::default()));
            // Forward the leader's steps until it closes the stream (a
            // recovery opens a new one) or the connection breaks.
            while let Some(msg) = inbound.next().await {
                match msg {
                    Ok(pb::ExecuteRequest {
                        kind: Some(Kind::Step(s)),
                    }) => {
                        let (tx, step_id) = (reply_tx.clone(), s.step_id);
                        runtime.step(run, s.into(), move |r| {
                            let _ = tx.send(Ok(step_reply(step_id, r)));
                        });
                    }
                    Ok(pb::ExecuteRequest {
                        kind: Some(Kind::Masks(m)),
                    }) => runtime.post_masks(m.into()),
                    Ok(_) => tracing::warn!("node {rank}: ignoring a second Start"),
                    Err(e) => {
                        tracing::info!("node {rank}: the step stream of run {run} broke: {e}");
                        return;
                    }
                }
            }
            tracing::debug!("node {rank}: the leader closed the step stream of run {run}");
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            reply_rx,
        ))))
    }

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        self.leader.beat(req.into_inner().epoch);
        Ok(Response::new(pb::HealthReply {
            loaded: self.runtime.is_loaded(),
            instance: self.instance,
        }))
    }

    async fn reset(
        &self,
        _req: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ResetReply>, Status> {
        self.runtime.reset();
        Ok(Response::new(pb::ResetReply {}))
    }
}
