//! Every failure the API reports, in OpenAI's error shape. This is the one
//! place where engine errors become HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use strata_engine::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 for a bad request parameter, naming it.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 503 while the model loads or the cluster forms.
    pub fn loading() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "The model is still loading; /health says what is missing.".into(),
            kind: "service_unavailable",
            param: None,
            code: Some("model_loading"),
        }
    }

    /// 503 once a shutdown has begun: requests in flight finish, new ones
    /// go to another replica.
    pub fn shutting_down() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "The server is shutting down and takes no new requests.".into(),
            kind: "service_unavailable",
            param: None,
            code: Some("shutting_down"),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer <key>`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Self::from(&e)
    }
}

impl From<&EngineError> for ApiError {
    fn from(e: &EngineError) -> Self {
        let (status, kind, code, param) = match e {
            EngineError::EmptyPrompt | EngineError::BadTokenId(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                Some("prompt"),
            ),
            EngineError::ContextLength { .. } | EngineError::KvCacheTooSmall { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
                Some("max_tokens"),
            ),
            EngineError::Template(_) | EngineError::NoChatTemplate => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                Some("messages"),
            ),
            EngineError::Tokenizer(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None, None)
            }
            EngineError::Overloaded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                Some("overloaded"),
                None,
            ),
            EngineError::Stopped(_)
            | EngineError::Cluster(_)
            | EngineError::NodeLost { .. }
            | EngineError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                None,
                None,
            ),
            EngineError::Model(_) | EngineError::Execution(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                None,
                None,
            ),
        };
        Self {
            status,
            message: e.to_string(),
            kind,
            param: param.map(str::to_string),
            code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A 503 is a state (loading, stopped) the log already tells.
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!("{}", self.message);
        }
        (self.status, Json(self.to_json())).into_response()
    }
}
