//! OpenAI request bodies and their validation into engine requests.

use serde::Deserialize;
use serde_json::Value as Json;
use strata_engine::{GenerationDefaults, Guide};
use strata_types::SamplingParams;

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields chat and completions share (plus vLLM's extras).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub n: Option<usize>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub max_tokens: Option<i64>,
    pub skip_special_tokens: Option<bool>,
}

/// The chat-only fields. Parsed from the same body as [`CommonParams`]
/// (not flattened into it: serde's flatten loses the field name of an error).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Json>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub add_generation_prompt: Option<bool>,
    /// More variables for the chat template (vLLM's; e.g. `enable_thinking`).
    pub chat_template_kwargs: Option<serde_json::Map<String, Json>>,
}

/// `prompt`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// The completions-only fields, parsed beside [`CommonParams`].
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<usize>,
}

/// Parses a JSON body, naming the offending field on a type error.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let malformed = matches!(
            inner.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        if malformed || path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            let param = path.split(['.', '[']).next().unwrap_or(&path).to_string();
            ApiError::param(param, format!("invalid value for `{path}`: {inner}"))
        }
    })
}

/// Everything the handlers need to start the engine requests.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// The structured output's matcher, cloned fresh for each choice.
    pub guide: Option<Guide>,
}

pub const MAX_N: usize = 64;
pub const MAX_LOGPROBS: i64 = 20;

fn range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::param(
            name,
            format!("`{name}` must be between {lo} and {hi}, got {x}"),
        )),
        v => Ok(v),
    }
}

impl CommonParams {
    /// Checks every field and fills the gaps from the model's generation
    /// config, then OpenAI's defaults. `logprobs` is the number of top
    /// alternatives wanted, already validated by the caller.
    pub fn resolve(
        &self,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
        defaults: &GenerationDefaults,
    ) -> Result<Resolved, ApiError> {
        let temperature = range("temperature", self.temperature, 0.0, 2.0)?;
        let top_p = range("top_p", self.top_p, 0.0, 1.0)?;
        if top_p == Some(0.0) {
            return Err(ApiError::param("top_p", "`top_p` must be greater than 0"));
        }
        let min_p = range("min_p", self.min_p, 0.0, 1.0)?;
        let presence = range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        let frequency = range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        let repetition = range("repetition_penalty", self.repetition_penalty, 0.01, 2.0)?;
        let top_k = match self.top_k {
            Some(k) if k < -1 => {
                return Err(ApiError::param(
                    "top_k",
                    format!("`top_k` must be -1 (off) or at least 0, got {k}"),
                ))
            }
            Some(k) => Some(k.max(0) as usize),
            None => None,
        };
        let max_tokens = match max_tokens {
            Some(m) if m < 1 => {
                return Err(ApiError::param(
                    "max_tokens",
                    format!("`max_tokens` must be at least 1, got {m}"),
                ))
            }
            m => m.map(|m| m as usize),
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::param(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::param("stop", "stop strings must not be empty"));
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::param(
                "stream_options",
                "`stream_options` is only allowed with `stream: true`",
            ));
        }
        let sampling = SamplingParams {
            temperature: temperature.or(defaults.temperature).unwrap_or(1.0),
            top_p: top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k: top_k.or(defaults.top_k).unwrap_or(0),
            min_p: min_p.or(defaults.min_p).unwrap_or(0.0),
            presence_penalty: presence.unwrap_or(0.0),
            frequency_penalty: frequency.unwrap_or(0.0),
            repetition_penalty: repetition.or(defaults.repetition_penalty).unwrap_or(1.0),
            // Every request is seeded so a recomputed one samples the same.
            seed: self.seed.map(|s| s as u64).unwrap_or_else(rand::random),
            logprobs,
            // The token rules come from `structured::ConstraintFields`.
            ..SamplingParams::default()
        };
        Ok(Resolved {
            sampling,
            max_tokens,
            n,
            stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            guide: None,
        })
    }
}

/// Flattens OpenAI message content (a string, or a list of text parts) to
/// the plain string chat templates expect, and checks roles.
pub fn normalize_messages(messages: &[Json]) -> Result<Vec<Json>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let obj = m
                .as_object()
                .ok_or_else(|| ApiError::param("messages", format!("messages[{i}] must be an object")))?;
            let role = obj.get("role").and_then(Json::as_str).ok_or_else(|| {
                ApiError::param("messages", format!("messages[{i}].role must be a string"))
            })?;
            if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
                return Err(ApiError::param("messages", format!("messages[{i}].role `{role}` is not a known role")));
            }
            let content = match obj.get("content") {
                None | Some(Json::Null) => String::new(),
                Some(Json::String(s)) => s.clone(),
                Some(Json::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Json::as_str), p.get("text").and_then(Json::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::param(
                                    "messages",
                                    format!(
                                        "messages[{i}]: content part of type {} is not supported by this model (text only)",
                                        kind.unwrap_or("?")
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(ApiError::param("messages", format!("messages[{i}].content must be a string or a list of parts")))
                }
            };
            let mut out = obj.clone();
            out.insert("content".into(), Json::String(content));
            Ok(Json::Object(out))
        })
        .collect()
}
