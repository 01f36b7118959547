use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}: not a safetensors file or folder, nor a .gguf file")]
    UnknownFormat(PathBuf),
    #[error("weight `{0}` not found in the checkpoint")]
    MissingWeight(String),
    #[error("weight `{name}`: {msg}")]
    BadWeight { name: String, msg: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid config: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, Error>;
