//! The API's response bodies, typed: chat and completions, whole and as
//! stream chunks, and the logprobs and usage they carry.

use std::collections::BTreeMap;

use serde::Serialize;
use strata_engine::Tokenizer;
use strata_types::{FinishReason, Logprobs, TokenId};

/// The envelope every response and chunk shares.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    /// Whole responses always carry it; chunks carry `null` when the client
    /// asked for usage (and the last chunk the totals), else nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

pub fn finish_str(f: Option<FinishReason>) -> Option<&'static str> {
    f.map(|f| f.as_str())
}

/// A chat choice of a whole response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: Option<String>,
    /// The model's thinking, split off by `--reasoning-parser`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON string, as OpenAI sends them.
    pub arguments: String,
}

/// A piece of a streamed tool call: the first carries its id and name,
/// the rest add to its arguments.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl ToolCallDelta {
    /// A call's opening piece.
    pub fn open(index: usize, call: &ToolCall) -> Self {
        Self {
            index,
            id: Some(call.id.clone()),
            kind: Some(call.kind),
            function: FunctionCallDelta {
                name: Some(call.function.name.clone()),
                arguments: Some(call.function.arguments.clone()),
            },
        }
    }

    /// More arguments for call `index`.
    pub fn arguments(index: usize, arguments: String) -> Self {
        Self {
            index,
            id: None,
            kind: None,
            function: FunctionCallDelta {
                name: None,
                arguments: Some(arguments),
            },
        }
    }
}

/// A chat choice of a stream chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to a chat message; absent fields add nothing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A completion choice, of a whole response or of a chunk (the same shape).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// Chat logprobs (`choices[].logprobs.content`).
#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// The top alternatives; absent on the alternatives themselves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<TokenLogprob>>,
}

impl ChatLogprobs {
    pub fn new(tok: &Tokenizer, ids: &[TokenId], lps: &[Logprobs], top_n: usize) -> Self {
        let entry = |id: TokenId, logprob: f32| {
            let bytes = tok.token_bytes(id);
            TokenLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                logprob,
                bytes,
                top_logprobs: None,
            }
        };
        let content = ids
            .iter()
            .zip(lps)
            .map(|(&id, lp)| TokenLogprob {
                top_logprobs: Some(
                    lp.top
                        .iter()
                        .take(top_n)
                        .map(|&(t, l)| entry(t, l))
                        .collect(),
                ),
                ..entry(id, lp.logprob)
            })
            .collect();
        Self { content }
    }
}

/// Completions logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// `offset`: where the first token starts in the choice's text.
    pub fn new(
        tok: &Tokenizer,
        ids: &[TokenId],
        lps: &[Logprobs],
        top_n: usize,
        offset: usize,
    ) -> Self {
        let text = |id| String::from_utf8_lossy(&tok.token_bytes(id)).into_owned();
        let mut out = Self::default();
        let mut at = offset;
        for (&id, lp) in ids.iter().zip(lps) {
            let t = text(id);
            out.text_offset.push(at);
            at += t.len();
            out.tokens.push(t);
            out.token_logprobs.push(lp.logprob);
            out.top_logprobs.push(
                lp.top
                    .iter()
                    .take(top_n)
                    .map(|&(t, l)| (text(t), l))
                    .collect(),
            );
        }
        out
    }
}
