//! One chat choice's generated text, shaped into the message OpenAI clients
//! read: reasoning split off (`--reasoning-parser`), and tool calls read out
//! when the request asked for them. The same shaping serves whole responses
//! and streams, so both say the same thing.

use std::sync::Arc;

use strata_types::FinishReason;

use crate::reasoning::ReasoningSplitter;
use crate::response::{finish_str, ChatDelta, ChatMessage, ToolCall, ToolCallDelta};
use crate::tools::{ToolChoice, Tools};

#[derive(Clone)]
pub struct ChatOutput {
    splitter: Option<ReasoningSplitter>,
    /// Set when the answer is tool calls.
    tools: Option<Arc<Tools>>,
    /// The answer so far, while it is calls that stream as a whole.
    held: String,
    /// A named function's call, once opened in the stream.
    opened: bool,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// `finish_reason`: `tool_calls` when the answer ended as calls.
fn finish(reason: Option<FinishReason>, calls: bool) -> Option<&'static str> {
    match reason {
        Some(FinishReason::Stop) if calls => Some("tool_calls"),
        r => finish_str(r),
    }
}

impl ChatOutput {
    pub fn new(splitter: Option<ReasoningSplitter>, tools: Option<Arc<Tools>>) -> Self {
        Self {
            splitter,
            tools: tools.filter(|t| t.calls()),
            held: String::new(),
            opened: false,
        }
    }

    /// (reasoning, answer) of the next piece.
    fn split(&mut self, text: &str, last: bool) -> (Option<String>, String) {
        match &mut self.splitter {
            None => (None, text.to_string()),
            Some(s) => {
                let parts = s.push(text, last);
                (non_empty(parts.reasoning), parts.content)
            }
        }
    }

    /// A whole response's message and finish reason.
    pub fn whole(
        mut self,
        text: &str,
        reason: Option<FinishReason>,
    ) -> (ChatMessage, Option<&'static str>) {
        let (reasoning, answer) = self.split(text, true);
        let calls = self.tools.as_ref().and_then(|t| t.parse(&answer));
        let message = ChatMessage {
            role: "assistant",
            content: match (&calls, &self.splitter) {
                (Some(_), _) => None,
                (None, None) => Some(answer),
                (None, Some(_)) => non_empty(answer),
            },
            reasoning_content: reasoning,
            tool_calls: calls.clone().unwrap_or_default(),
        };
        (message, finish(reason, calls.is_some()))
    }

    /// A stream's next delta (`None` when it adds nothing) and, on the last
    /// piece, the finish reason.
    pub fn delta(
        &mut self,
        text: &str,
        reason: Option<FinishReason>,
    ) -> (Option<ChatDelta>, Option<&'static str>) {
        let last = reason.is_some();
        let (reasoning, answer) = self.split(text, last);
        let mut delta = ChatDelta {
            reasoning_content: reasoning,
            ..Default::default()
        };
        let mut calls = false;
        match self.tools.clone() {
            None => delta.content = Some(answer),
            Some(tools) => match &tools.choice {
                // A named function's output is its arguments: stream them.
                ToolChoice::Named(name) => {
                    calls = true;
                    if !self.opened && !answer.is_empty() {
                        self.opened = true;
                        let call = ToolCall::new(name.clone(), answer);
                        delta.tool_calls.push(ToolCallDelta::open(0, &call));
                    } else if !answer.is_empty() {
                        delta.tool_calls.push(ToolCallDelta::arguments(0, answer));
                    }
                }
                // A list of calls is sent once it is complete.
                _ => {
                    self.held.push_str(&answer);
                    if last {
                        match tools.parse(&self.held) {
                            Some(list) => {
                                calls = true;
                                delta.tool_calls = list
                                    .iter()
                                    .enumerate()
                                    .map(|(i, c)| ToolCallDelta::open(i, c))
                                    .collect();
                            }
                            None => delta.content = Some(std::mem::take(&mut self.held)),
                        }
                    }
                }
            },
        }
        let says_something = delta.reasoning_content.is_some()
            || delta.content.as_deref().is_some_and(|c| !c.is_empty())
            || !delta.tool_calls.is_empty();
        (
            says_something.then_some(delta),
            last.then(|| finish(reason, calls)).flatten(),
        )
    }
}
