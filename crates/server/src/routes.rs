//! The HTTP handlers.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use serde::Deserialize;
use serde_json::{json, Value};
use strata_engine::{RequestOutput, Tokenizer};
use strata_types::{Logprobs, TokenId};

use crate::chat_output::ChatOutput;
use crate::error::ApiError;
use crate::generate::{self, total_usage};
use crate::protocol::{
    normalize_messages, parse, ChatRequest, CommonParams, CompletionRequest, Prompt, Resolved,
    MAX_LOGPROBS,
};
use crate::reasoning::{ReasoningSplitter, THINK_END};
use crate::response::{
    finish_str, ChatChoice, ChatChunkChoice, ChatDelta, ChatLogprobs, CompletionChoice,
    CompletionLogprobs,
};
use crate::sse::Frame;
use crate::structured::ConstraintFields;
use crate::tools::{arguments_as_objects, ToolChoice, ToolFields};
use crate::AppState;

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

/// Reads the body's sampling constraints into `r`: token rules, and the
/// structured output compiled (a 400 naming the field if it is invalid).
fn constrain(state: &AppState, body: &[u8], mut r: Resolved) -> Result<Resolved, ApiError> {
    let fields: ConstraintFields = parse(body)?;
    let tok = state.engine.tokenizer();
    fields.apply_token_rules(&mut r.sampling, tok, state.info.config.vocab_size)?;
    if let Some(max) = r.max_tokens {
        if r.sampling.min_tokens > max {
            return Err(ApiError::param(
                "min_tokens",
                format!(
                    "`min_tokens` ({}) must not exceed `max_tokens` ({max})",
                    r.sampling.min_tokens
                ),
            ));
        }
    }
    // Compiling a schema (and, the first time, indexing the vocabulary)
    // is CPU work: keep it off the threads that serve other connections.
    r.guide = tokio::task::block_in_place(|| fields.guide(&state.structured))?;
    Ok(r)
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
    let mut r = constrain(&state, &body, r)?;
    let tools = ToolFields::resolve(&parse(&body)?, state.tool_parser)?.map(Arc::new);
    if tools
        .as_ref()
        .is_some_and(|t| matches!(t.choice, ToolChoice::Auto(_)))
    {
        // The parsers read markers that may be special tokens.
        r.skip_special_tokens = false;
    }
    if let Some(c) = tools.as_ref().and_then(|t| t.constraint()) {
        if r.guide.is_some() {
            return Err(ApiError::param(
                "tool_choice",
                "a required or named `tool_choice` is itself a structured output: leave out `response_format` and the like",
            ));
        }
        let style = state.structured.default_style();
        let guide = tokio::task::block_in_place(|| state.structured.compile(&c, style));
        r.guide = Some(guide.map_err(|e| {
            ApiError::param(
                "tools",
                format!("a tool's parameters are not a usable JSON schema: {e}"),
            )
        })?);
    }
    let mut messages = normalize_messages(&req.messages)?;
    arguments_as_objects(&mut messages);
    let tok = state.engine.tokenizer();
    let template = state.chat_template()?;
    let mut kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(t) = &tools {
        kwargs.insert("tools".into(), Value::Array(t.raw.clone()));
    }
    let prompt = template.render_with(
        &messages,
        req.add_generation_prompt.unwrap_or(true),
        &Value::Object(kwargs),
    )?;
    let ids = tok.encode(&prompt, false)?;
    // The reasoning parser starts in the answer when the template already
    // closed the thinking (Qwen3 with thinking off).
    let closed = prompt.trim_end().ends_with(THINK_END);
    let splitter = state.reasoning.map(|p| ReasoningSplitter::new(p, closed));
    if let (Some(_), false, Some(end)) = (splitter.as_ref(), closed, tok.token_to_id(THINK_END)) {
        // A structured output constrains the answer, after the thinking.
        r.guide = r.guide.map(|g| g.after(end));
    }
    let shape = ChatOutput::new(splitter, tools);
    let choices = generate::start(&state.engine, &[ids], &r)?;
    let frame = Frame::new("chatcmpl", state.served_model_name.clone());
    let top_n = top_logprobs.unwrap_or(0);
    let logprobs = move |tok: &Tokenizer, ids: &[TokenId], lps: &[Logprobs]| {
        top_logprobs.map(|_| ChatLogprobs::new(tok, ids, lps, top_n))
    };

    if !r.stream {
        let done = generate::collect(choices).await?;
        let usage = total_usage(done.iter().map(|f| (f.index, f.prompt_index, f.usage)));
        let choices = done
            .into_iter()
            .map(|f| {
                let (message, finish_reason) = shape.clone().whole(&f.text, f.finish);
                ChatChoice {
                    index: f.index,
                    logprobs: logprobs(tok, &f.token_ids, &f.logprobs),
                    message,
                    finish_reason,
                }
            })
            .collect();
        return Ok(frame.whole("chat.completion", choices, usage));
    }

    // Every choice opens with the assistant's role.
    let opening = (0..choices.len())
        .map(|index| ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..Default::default()
            },
            logprobs: None,
            finish_reason: None,
        })
        .collect();
    let engine = state.engine.clone();
    let mut shapes: HashMap<usize, ChatOutput> = HashMap::new();
    let render = move |index: usize, _prompt: usize, o: &RequestOutput| {
        let mut chunks = Vec::new();
        let shape = shapes.entry(index).or_insert_with(|| shape.clone());
        let (delta, finish_reason) = shape.delta(&o.text, o.finish);
        let lps = logprobs(engine.tokenizer(), &o.token_ids, &o.logprobs);
        if delta.is_some() || lps.is_some() && !o.logprobs.is_empty() {
            chunks.push(ChatChunkChoice {
                index,
                delta: delta.unwrap_or(ChatDelta {
                    content: Some(String::new()),
                    ..Default::default()
                }),
                logprobs: lps,
                finish_reason: None,
            });
        }
        if finish_reason.is_some() {
            chunks.push(ChatChunkChoice {
                index,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason,
            });
        }
        chunks
    };
    Ok(frame.stream(
        "chat.completion.chunk",
        r.include_usage,
        choices,
        opening,
        render,
    ))
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
    let r = constrain(&state, &body, r)?;
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
    let frame = Frame::new("cmpl", state.served_model_name.clone());
    let top_n = logprobs.unwrap_or(0);
    let logprobs = move |tok: &Tokenizer, ids: &[TokenId], lps: &[Logprobs], offset| {
        logprobs.map(|_| CompletionLogprobs::new(tok, ids, lps, top_n, offset))
    };

    if !r.stream {
        let done = generate::collect(choices).await?;
        let usage = total_usage(done.iter().map(|f| (f.index, f.prompt_index, f.usage)));
        let choices = done
            .into_iter()
            .map(|f| {
                let prefix = &prompt_texts[f.prompt_index];
                CompletionChoice {
                    index: f.index,
                    logprobs: logprobs(tok, &f.token_ids, &f.logprobs, prefix.len()),
                    text: format!("{prefix}{}", f.text),
                    finish_reason: finish_str(f.finish),
                }
            })
            .collect();
        return Ok(frame.whole("text_completion", choices, usage));
    }

    let engine = state.engine.clone();
    // Each choice's text so far, for the logprobs' offsets.
    let mut offsets: HashMap<usize, usize> = HashMap::new();
    let render = move |index: usize, prompt_index: usize, o: &RequestOutput| {
        let offset = offsets.entry(index).or_insert(0);
        let mut text = o.text.clone();
        if *offset == 0 && echo {
            text.insert_str(0, &prompt_texts[prompt_index]);
        }
        let lps = logprobs(
            engine.tokenizer(),
            &o.token_ids,
            &o.logprobs,
            *offset + text.len() - o.text.len(),
        );
        *offset += text.len();
        if text.is_empty() && o.finish.is_none() && o.logprobs.is_empty() {
            return Vec::new();
        }
        vec![CompletionChoice {
            index,
            text,
            logprobs: lps,
            finish_reason: finish_str(o.finish),
        }]
    };
    Ok(frame.stream(
        "text_completion",
        r.include_usage,
        choices,
        Vec::new(),
        render,
    ))
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
            let template = state.chat_template()?;
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
