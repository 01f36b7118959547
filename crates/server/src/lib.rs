//! strata's OpenAI-compatible HTTP API.

mod error;
mod generate;
mod protocol;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use strata_engine::{ClusterState, EngineHandle, ModelInfo};

pub use error::ApiError;

/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 16 << 20;

pub struct AppState {
    pub engine: EngineHandle,
    /// Every node's readiness, for `/health`.
    pub cluster: Arc<ClusterState>,
    pub info: ModelInfo,
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub started: u64,
}

/// Every route; `/v1/*` behind the API key when one is set.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
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
        .route("/health", get(routes::health))
        .route("/version", get(routes::version))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/metrics", get(routes::metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
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
            "/health",
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
        .route("/version", get(routes::version))
        .fallback(|| async { ApiError::loading().into_response() })
}

/// Binds `addr` at once and serves the loading routes until `ready` yields
/// the engine, then the full API on the same socket until `shutdown`
/// resolves. A probe can watch `/health` from the first second.
pub async fn serve(
    addr: SocketAddr,
    cluster: Arc<ClusterState>,
    ready: impl std::future::Future<Output = Result<AppState, String>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
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
    let state = state?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(io)?;
    tracing::info!("serving the OpenAI API on http://{addr}");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(io)
}
