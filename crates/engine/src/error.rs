use strata_types::TokenId;

/// Everything the engine can refuse or fail with. The server maps each
/// variant to one HTTP status, in one place.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("this model has no chat template; use /v1/completions")]
    NoChatTemplate,
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {0} is outside the vocabulary")]
    BadTokenId(TokenId),
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but {prompt_tokens} prompt tokens \
         plus {max_tokens} requested tokens make {total}; reduce the prompt or `max_tokens`",
        total = prompt_tokens + max_tokens
    )]
    ContextLength {
        max_model_len: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error(
        "the KV cache holds {capacity} tokens, fewer than this request's {needed}; \
         start the server with a larger --kv-cache-memory"
    )]
    KvCacheTooSmall { capacity: usize, needed: usize },
    #[error("the server is at capacity ({0} requests waiting or running); retry later")]
    Overloaded(usize),
    #[error("the engine has stopped: {0}")]
    Stopped(String),
    #[error("execution failed: {0}")]
    Execution(String),
    #[error("cluster: {0}")]
    Cluster(String),
    /// A node was lost: the engine pauses and recovers, keeping requests.
    #[error("{}", match node {
        Some(n) => format!("node {n} was lost ({reason})"),
        None => format!("a node was lost ({reason})"),
    })]
    NodeLost { node: Option<usize>, reason: String },
    /// The cluster cannot serve now (a lost node outlasted the recovery
    /// timeout); a client may retry later.
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl From<strata_model::Error> for EngineError {
    fn from(e: strata_model::Error) -> Self {
        EngineError::Model(e.to_string())
    }
}
