//! strata's OpenAI-compatible HTTP API.

mod chat_output;
mod error;
mod generate;
mod metrics;
mod protocol;
mod reasoning;
mod response;
mod routes;
mod sse;
mod structured;
mod tool_parsers;
mod tools;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use strata_engine::{ChatTemplate, ClusterState, EngineHandle, ModelInfo, StructuredOutputs};

pub use error::ApiError;
pub use reasoning::ReasoningParser;
pub use tool_parsers::ToolParser;

/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Readiness: on the leader 200 only when the whole cluster serves; on a
/// worker 200 once it has started and can take part (see [`probe_router`]).
pub const HEALTH_PATH: &str = "/health";
/// Liveness: 503 only when the process cannot recover by itself.
pub const LIVENESS_PATH: &str = "/livez";

pub struct AppState {
    pub engine: EngineHandle,
    /// Every node's readiness, for `/health`.
    pub cluster: Arc<ClusterState>,
    pub info: ModelInfo,
    /// Compiles the requests' structured outputs against the tokenizer.
    pub structured: StructuredOutputs,
    /// `--reasoning-parser`: splits `<think>…</think>` off chat answers.
    pub reasoning: Option<ReasoningParser>,
    /// `--enable-auto-tool-choice --tool-call-parser`: reads `auto` calls.
    pub tool_parser: Option<ToolParser>,
    /// `--chat-template`: used in place of the model's own.
    pub chat_template: Option<ChatTemplate>,
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub started: u64,
    /// Set when a shutdown begins: `/health` says 503 and new requests are
    /// refused while those in flight finish.
    pub draining: AtomicBool,
}

impl AppState {
    /// `--chat-template` if given, else the model's own.
    pub fn chat_template(&self) -> Result<&ChatTemplate, ApiError> {
        self.chat_template
            .as_ref()
            .or(self.engine.tokenizer().chat_template.as_ref())
            .ok_or_else(|| strata_engine::EngineError::NoChatTemplate.into())
    }
}

/// Every route; `/v1/*` behind the API key when one is set.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route(HEALTH_PATH, get(routes::health))
        .route(LIVENESS_PATH, get(routes::liveness))
        .route("/version", get(routes::version))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/metrics", get(metrics::metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return ApiError::shutting_down().into_response();
    }
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// While the model loads (and the cluster forms): `/health` answers 503
/// naming what is missing, everything else 503 "loading".
fn loading_router(cluster: Arc<ClusterState>) -> Router {
    Router::new()
        .route(
            HEALTH_PATH,
            get(move || {
                let cluster = cluster.clone();
                async move {
                    let mut missing = cluster.problems();
                    if missing.is_empty() {
                        missing.push("engine: starting".into());
                    }
                    routes::health_response(missing)
                }
            }),
        )
        // Loading and waiting for workers are progress, bounded by
        // --cluster-timeout: no reason to restart.
        .route(LIVENESS_PATH, get(|| async { routes::live_response(None) }))
        .route("/version", get(routes::version))
        .fallback(|| async { ApiError::loading().into_response() })
}

/// A worker node's probes on its `--port`. `ready()` gives the readiness
/// body: `Ok` answers 200, `Err` 503. Liveness is 200 while the process
/// answers: a worker whose leader is gone exits by itself (its watchdog),
/// so there is never a stuck worker for a liveness probe to restart.
pub fn probe_router(
    ready: impl Fn() -> Result<serde_json::Value, serde_json::Value> + Clone + Send + Sync + 'static,
) -> Router {
    Router::new()
        .route(
            HEALTH_PATH,
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(body) => (axum::http::StatusCode::OK, axum::Json(body)),
                        Err(body) => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(body),
                        ),
                    }
                }
            }),
        )
        .route(LIVENESS_PATH, get(|| async { routes::live_response(None) }))
        .route("/version", get(routes::version))
}

/// Serves a worker's [`probe_router`] on `addr`.
pub async fn serve_probes(addr: SocketAddr, router: Router) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding {addr} for the probes: {e}"))?;
    axum::serve(listener, router)
        .await
        .map_err(|e| format!("serving the probes on {addr}: {e}"))
}

/// Binds `addr` at once and serves the loading routes until `ready` yields
/// the engine, then the full API on the same socket until `shutdown`
/// resolves. A probe can watch `/health` from the first second.
///
/// A shutdown drains: `/health` turns 503 and new requests are refused at
/// once, requests in flight get up to `grace` to finish, and whatever is
/// still running then is cut when the process exits (which also closes
/// the workers' step streams, so they exit too).
pub async fn serve(
    addr: SocketAddr,
    cluster: Arc<ClusterState>,
    ready: impl std::future::Future<Output = Result<AppState, String>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("serving on {addr}: {e}");
    let std_listener = std::net::TcpListener::bind(addr).map_err(io)?;
    std_listener.set_nonblocking(true).map_err(io)?;
    tracing::info!(
        "listening on http://{} (503 until the model is loaded)",
        std_listener.local_addr().map_err(io)?
    );
    let loading =
        tokio::net::TcpListener::from_std(std_listener.try_clone().map_err(io)?).map_err(io)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let loading = tokio::spawn(async move {
        axum::serve(loading, loading_router(cluster))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let mut shutdown = Box::pin(shutdown);
    let state = tokio::select! {
        s = ready => Some(s),
        _ = &mut shutdown => None,
    };
    let _ = stop_tx.send(());
    let _ = loading.await;
    let Some(state) = state else {
        tracing::info!("shut down before the model was loaded");
        return Ok(());
    };
    let state = Arc::new(state?);
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(io)?;
    tracing::info!("serving the OpenAI API on http://{addr}");
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(async {
        let _ = drained_rx.await;
    });
    let mut server = std::pin::pin!(server.into_future());
    tokio::select! {
        r = &mut server => return r.map_err(io),
        _ = &mut shutdown => {}
    }
    state.draining.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + grace;
    let in_flight = |state: &AppState| state.engine.stats().num_pending;
    tracing::info!(
        "draining: {} request(s) in flight get up to {grace:?} to finish",
        in_flight(&state)
    );
    // The server keeps running meanwhile (probes see "draining", new
    // requests get 503); once nothing is in flight it stops accepting,
    // closes idle connections and finishes the responses being written.
    let watcher = state.clone();
    tokio::spawn(async move {
        while in_flight(&watcher) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = drained_tx.send(());
    });
    tokio::select! {
        r = &mut server => r.map_err(io)?,
        _ = tokio::time::sleep_until(deadline) => tracing::warn!(
            "cutting {} request(s) still running after the {grace:?} grace period",
            in_flight(&state)
        ),
    }
    tracing::info!("shut down");
    Ok(())
}
