//! The HTTP handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};

use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use strata_engine::{EngineError, Tokenizer};
use strata_types::{Logprobs, TokenId};

use crate::error::ApiError;
use crate::generate::{self, total_usage, Delta, Usage};
use crate::protocol::{
    normalize_messages, parse, ChatRequest, CommonParams, CompletionRequest, Prompt, MAX_LOGPROBS,
};
use crate::AppState;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| ApiError {
        status: r.status(),
        message: if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".into()
        } else {
            r.body_text()
        },
        kind: "invalid_request_error",
        param: None,
        code: None,
    })
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.served_model_name => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

fn token_text(tok: &Tokenizer, id: TokenId) -> String {
    String::from_utf8_lossy(&tok.token_bytes(id)).into_owned()
}

/// Chat logprobs entries (`choices[].logprobs.content`).
fn chat_logprobs(tok: &Tokenizer, ids: &[TokenId], lps: &[Logprobs], top_n: usize) -> Value {
    let entry = |id: TokenId, lp: f32| {
        let bytes = tok.token_bytes(id);
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes})
    };
    let content: Vec<Value> = ids
        .iter()
        .zip(lps)
        .map(|(&id, lp)| {
            let mut e = entry(id, lp.logprob);
            e["top_logprobs"] = lp
                .top
                .iter()
                .take(top_n)
                .map(|&(t, l)| entry(t, l))
                .collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completions logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
fn completion_logprobs(
    tok: &Tokenizer,
    ids: &[TokenId],
    lps: &[Logprobs],
    top_n: usize,
    offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut text_offset = Vec::new();
    let mut at = offset;
    for (&id, lp) in ids.iter().zip(lps) {
        let t = token_text(tok, id);
        text_offset.push(at);
        at += t.len();
        tokens.push(t);
        token_logprobs.push(lp.logprob);
        let m: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .take(top_n)
            .map(|&(t, l)| (token_text(tok, t), json!(l)))
            .collect();
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset})
}

fn sse_data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// The SSE tail: an error chunk if a choice failed, the usage chunk when
/// asked, then `[DONE]`.
fn sse_response<S>(chunks: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let done = stream::once(async { Ok::<_, Infallible>(Event::default().data("[DONE]")) });
    Sse::new(chunks.chain(done)).into_response()
}

/// The framing streamed chat and completion responses share: every chunk
/// carries the id, object, creation time and model (and `usage: null` when
/// usage was asked for); the usage chunk follows the last choice to finish.
struct StreamFrame {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    include_usage: bool,
    num_choices: usize,
    finished: usize,
    usage: HashMap<usize, (usize, Usage)>,
}

impl StreamFrame {
    fn new(
        id: String,
        object: &'static str,
        created: u64,
        model: String,
        include_usage: bool,
        num_choices: usize,
    ) -> Self {
        Self {
            id,
            object,
            created,
            model,
            include_usage,
            num_choices,
            finished: 0,
            usage: HashMap::new(),
        }
    }

    fn chunk(&self, choices: Value, usage: Value) -> Value {
        let mut c = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices});
        if self.include_usage {
            c["usage"] = usage;
        }
        c
    }

    fn event(&self, choices: Value) -> Result<Event, Infallible> {
        sse_data(&self.chunk(choices, Value::Null))
    }

    /// Notes a choice's latest counts; returns the usage chunk once every
    /// choice has finished, if the client asked for it.
    fn record(&mut self, d: &Delta, finished: bool) -> Option<Result<Event, Infallible>> {
        self.usage.insert(d.index, (d.prompt_index, d.usage));
        self.finished += usize::from(finished);
        (self.include_usage && finished && self.finished == self.num_choices).then(|| {
            let total = total_usage(self.usage.iter().map(|(&c, &(p, u))| (c, p, u)));
            sse_data(&self.chunk(json!([]), total.to_json()))
        })
    }
}

/// A non-streamed response: every choice at once, with the usage.
fn whole_response(
    id: &str,
    object: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    usage: Usage,
) -> Response {
    axum::Json(json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": choices, "usage": usage.to_json(),
    }))
    .into_response()
}

/// An error in the middle of a stream, shaped as OpenAI's error body; the
/// stream then ends with `[DONE]`.
fn error_event(e: &EngineError) -> Result<Event, Infallible> {
    sse_data(&ApiError::from(e).to_json())
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let common: CommonParams = parse(&body)?;
    let req: ChatRequest = parse(&body)?;
    check_model(&state, common.model.as_deref())?;
    let top_logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(n)) if !(0..=MAX_LOGPROBS).contains(&n) => {
            return Err(ApiError::param(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_LOGPROBS}, got {n}"),
            ))
        }
        (Some(true), n) => Some(n.unwrap_or(0) as usize),
        (_, Some(_)) => {
            return Err(ApiError::param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        _ => None,
    };
    let r = common.resolve(
        req.max_completion_tokens.or(common.max_tokens),
        top_logprobs,
        &state.info.defaults,
    )?;
    let messages = normalize_messages(&req.messages)?;
    let tok = state.engine.tokenizer();
    let template = tok
        .chat_template
        .as_ref()
        .ok_or(strata_engine::EngineError::NoChatTemplate)?;
    let prompt = template.render(&messages, req.add_generation_prompt.unwrap_or(true))?;
    let ids = tok.encode(&prompt, false)?;
    let choices = generate::start(&state.engine, &[ids], &r)?;
    let id = format!("chatcmpl-{:032x}", rand::random::<u128>());
    let created = now();
    let model = state.served_model_name.clone();
    let top_n = top_logprobs.unwrap_or(0);

    if !r.stream {
        let done = generate::collect(choices).await?;
        let usage = total_usage(done.iter().map(|f| (f.index, f.prompt_index, f.usage)));
        let choices: Vec<Value> = done
            .iter()
            .map(|f| {
                json!({
                    "index": f.index,
                    "message": {"role": "assistant", "content": f.text},
                    "logprobs": top_logprobs.map(|_| chat_logprobs(tok, &f.token_ids, &f.logprobs, top_n)),
                    "finish_reason": f.finish.map(|r| r.as_str()),
                })
            })
            .collect();
        return Ok(whole_response(
            &id,
            "chat.completion",
            created,
            &model,
            choices,
            usage,
        ));
    }

    let mut frame = StreamFrame::new(
        id,
        "chat.completion.chunk",
        created,
        model,
        r.include_usage,
        choices.len(),
    );
    let first: Vec<Result<Event, Infallible>> = (0..choices.len())
        .map(|i| {
            frame.event(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]))
        })
        .collect();
    let engine = state.engine.clone();
    let body = generate::merge(choices).flat_map(move |d: Delta| {
        let mut events = Vec::new();
        match &d.output {
            Err(e) => events.push(error_event(e)),
            Ok(o) => {
                if !o.text.is_empty() || !o.logprobs.is_empty() {
                    let lp = top_logprobs.map(|_| chat_logprobs(engine.tokenizer(), &o.token_ids, &o.logprobs, top_n));
                    events.push(frame.event(
                        json!([{"index": d.index, "delta": {"content": o.text}, "logprobs": lp, "finish_reason": null}]),
                    ));
                }
                if let Some(f) = o.finish {
                    events.push(frame.event(
                        json!([{"index": d.index, "delta": {}, "logprobs": null, "finish_reason": f.as_str()}]),
                    ));
                }
                events.extend(frame.record(&d, o.finish.is_some()));
            }
        }
        stream::iter(events)
    });
    Ok(sse_response(stream::iter(first).chain(body)))
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(body)?;
    let common: CommonParams = parse(&body)?;
    let req: CompletionRequest = parse(&body)?;
    check_model(&state, common.model.as_deref())?;
    if req.suffix.is_some() {
        return Err(ApiError::param("suffix", "`suffix` is not supported"));
    }
    if let Some(b) = req.best_of {
        if b != common.n.unwrap_or(1) {
            return Err(ApiError::param(
                "best_of",
                "`best_of` must equal `n` (strata returns every sequence)",
            ));
        }
    }
    let logprobs = match req.logprobs {
        Some(n) if !(0..=MAX_LOGPROBS).contains(&n) => {
            return Err(ApiError::param(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {n}"),
            ))
        }
        n => n.map(|n| n as usize),
    };
    // OpenAI's default for completions.
    let r = common.resolve(
        Some(common.max_tokens.unwrap_or(16)),
        logprobs,
        &state.info.defaults,
    )?;
    let tok = state.engine.tokenizer();
    let prompts: Vec<Vec<TokenId>> = match &req.prompt {
        Prompt::Text(t) => vec![tok.encode(t, true)?],
        Prompt::Texts(ts) => ts
            .iter()
            .map(|t| tok.encode(t, true))
            .collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(l) => l.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::param("prompt", "`prompt` must not be empty"));
    }
    let echo = req.echo.unwrap_or(false);
    let prompt_texts: Vec<String> = if echo {
        prompts
            .iter()
            .map(|p| tok.decode(p, false))
            .collect::<Result<_, _>>()?
    } else {
        vec![String::new(); prompts.len()]
    };
    let choices = generate::start(&state.engine, &prompts, &r)?;
    let id = format!("cmpl-{:032x}", rand::random::<u128>());
    let created = now();
    let model = state.served_model_name.clone();
    let top_n = logprobs.unwrap_or(0);

    if !r.stream {
        let done = generate::collect(choices).await?;
        let usage = total_usage(done.iter().map(|f| (f.index, f.prompt_index, f.usage)));
        let choices: Vec<Value> = done
            .iter()
            .map(|f| {
                let prefix = &prompt_texts[f.prompt_index];
                json!({
                    "index": f.index,
                    "text": format!("{prefix}{}", f.text),
                    "logprobs": logprobs.map(|_| completion_logprobs(tok, &f.token_ids, &f.logprobs, top_n, prefix.len())),
                    "finish_reason": f.finish.map(|r| r.as_str()),
                })
            })
            .collect();
        return Ok(whole_response(
            &id,
            "text_completion",
            created,
            &model,
            choices,
            usage,
        ));
    }

    let mut frame = StreamFrame::new(
        id,
        "text_completion",
        created,
        model,
        r.include_usage,
        choices.len(),
    );
    let engine = state.engine.clone();
    let mut offsets: HashMap<usize, usize> = HashMap::new();
    let body = generate::merge(choices).flat_map(move |d: Delta| {
        let mut events = Vec::new();
        match &d.output {
            Err(e) => events.push(error_event(e)),
            Ok(o) => {
                let offset = offsets.entry(d.index).or_insert(0);
                let mut text = o.text.clone();
                if *offset == 0 && echo {
                    text.insert_str(0, &prompt_texts[d.prompt_index]);
                }
                let lp = logprobs.map(|_| {
                    completion_logprobs(engine.tokenizer(), &o.token_ids, &o.logprobs, top_n, *offset + text.len() - o.text.len())
                });
                *offset += text.len();
                if !text.is_empty() || o.finish.is_some() || !o.logprobs.is_empty() {
                    events.push(frame.event(
                        json!([{"index": d.index, "text": text, "logprobs": lp, "finish_reason": o.finish.map(|f| f.as_str())}]),
                    ));
                }
                events.extend(frame.record(&d, o.finish.is_some()));
            }
        }
        stream::iter(events)
    });
    Ok(sse_response(body))
}

pub async fn models(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [{
        "id": state.served_model_name, "object": "model", "created": state.started, "owned_by": "strata",
        "root": state.info.path.display().to_string(), "max_model_len": state.info.max_model_len,
    }]}))
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        // Out of the Service's endpoints while requests in flight finish.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    let mut missing = state.cluster.problems();
    if !state.engine.is_alive() {
        missing.push("engine: the engine thread has stopped".into());
    }
    health_response(missing)
}

/// Liveness: the leader cannot recover from a stopped engine thread (a
/// restart can); a missing or lost worker it can wait for.
pub async fn liveness(State(state): State<Arc<AppState>>) -> Response {
    live_response((!state.engine.is_alive()).then_some("the engine thread has stopped"))
}

/// 200 `{"status":"alive"}`, or 503 with why the process should be restarted.
pub fn live_response(dead: Option<&str>) -> Response {
    match dead {
        None => (StatusCode::OK, axum::Json(json!({"status": "alive"}))).into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "dead", "reason": why})),
        )
            .into_response(),
    }
}

/// 200 when nothing is missing; otherwise 503 naming what is.
pub fn health_response(missing: Vec<String>) -> Response {
    if missing.is_empty() {
        (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "missing": missing})),
        )
            .into_response()
    }
}

pub async fn version() -> axum::Json<Value> {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

#[derive(Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let req: TokenizeRequest = parse(&body_of(body)?)?;
    check_model(&state, req.model.as_deref())?;
    let tok = state.engine.tokenizer();
    let ids = match (req.prompt, req.messages) {
        (Some(p), None) => tok.encode(&p, req.add_special_tokens.unwrap_or(true))?,
        (None, Some(m)) => {
            let template = tok
                .chat_template
                .as_ref()
                .ok_or(strata_engine::EngineError::NoChatTemplate)?;
            let text = template.render(
                &normalize_messages(&m)?,
                req.add_generation_prompt.unwrap_or(true),
            )?;
            tok.encode(&text, req.add_special_tokens.unwrap_or(false))?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `prompt` or `messages`",
            ))
        }
    };
    Ok(axum::Json(
        json!({"count": ids.len(), "max_model_len": state.info.max_model_len, "tokens": ids}),
    ))
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse(&body_of(body)?)?;
    check_model(&state, req.model.as_deref())?;
    let vocab = state.info.config.vocab_size as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::param(
            "tokens",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(axum::Json(
        json!({"prompt": state.engine.tokenizer().decode(&req.tokens, false)?}),
    ))
}
