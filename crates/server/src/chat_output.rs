//! One chat choice's generated text, shaped into the message OpenAI clients
//! read: reasoning split off (`--reasoning-parser`), and tool calls read out
//! when the request asked for them. The same shaping serves whole responses
//! and streams, so both say the same thing.

use std::sync::Arc;

use strata_types::FinishReason;

use crate::reasoning::ReasoningSplitter;
use crate::response::{finish_str, ChatDelta, ChatMessage, ToolCall, ToolCallDelta};
use crate::tool_parsers::ToolParser;
use crate::tools::{ToolChoice, Tools};

#[derive(Clone)]
pub struct ChatOutput {
    splitter: Option<ReasoningSplitter>,
    /// Set when the answer may be tool calls.
    tools: Option<Arc<Tools>>,
    /// Streaming: the answer held back (calls sent once complete, or the
    /// start of a marker not yet told apart from text).
    held: String,
    /// Streaming: the held text is calls (a marker was seen).
    in_calls: bool,
    /// Streaming: text was sent (Llama's calls can only open the answer).
    said_text: bool,
    /// Streaming: a named function's call was opened.
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
            tools: tools.filter(|t| t.choice != ToolChoice::None),
            held: String::new(),
            in_calls: false,
            said_text: false,
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
        let (content, calls) = match &self.tools {
            Some(t) => t.parse(&answer),
            None => (answer, Vec::new()),
        };
        // Without a parser involved, content is always there (maybe empty).
        let plain = self.splitter.is_none() && self.tools.is_none();
        let message = ChatMessage {
            role: "assistant",
            content: if plain {
                Some(content)
            } else {
                non_empty(content)
            },
            reasoning_content: reasoning,
            tool_calls: calls.clone(),
        };
        (message, finish(reason, !calls.is_empty()))
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
                    if !answer.is_empty() {
                        delta.tool_calls.push(if self.opened {
                            ToolCallDelta::arguments(0, answer)
                        } else {
                            self.opened = true;
                            ToolCallDelta::open(0, &ToolCall::new(name.clone(), answer))
                        });
                    }
                }
                // Text streams until a call begins; calls are sent whole.
                ToolChoice::Auto(parser) => {
                    self.held.push_str(&answer);
                    if !self.in_calls {
                        let start = match parser {
                            ToolParser::Llama3Json if self.said_text => None,
                            p => p.calls_start(&self.held),
                        };
                        let text_end = match start {
                            Some(at) => {
                                self.in_calls = true;
                                at
                            }
                            None if last => self.held.len(),
                            None if *parser == ToolParser::Llama3Json && self.said_text => {
                                self.held.len()
                            }
                            None => self.held.len() - parser.partial_marker(&self.held),
                        };
                        let text: String = self.held.drain(..text_end).collect();
                        self.said_text |= !text.trim().is_empty();
                        // Only whitespace before the calls says nothing.
                        if !(self.in_calls && text.trim().is_empty()) {
                            delta.content = non_empty(text);
                        }
                    }
                    if self.in_calls && last {
                        calls = self.send_calls(&tools, &mut delta);
                    }
                }
                // A list of calls is sent once it is complete.
                _ => {
                    self.held.push_str(&answer);
                    if last {
                        calls = self.send_calls(&tools, &mut delta);
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

    /// Parses the held calls into `delta` (or, if they do not parse, sends
    /// them as text); true when they were calls.
    fn send_calls(&mut self, tools: &Tools, delta: &mut ChatDelta) -> bool {
        let held = std::mem::take(&mut self.held);
        let (text, calls) = tools.parse(&held);
        let text = delta.content.take().unwrap_or_default() + &text;
        delta.content = non_empty(text);
        delta.tool_calls = calls
            .iter()
            .enumerate()
            .map(|(i, c)| ToolCallDelta::open(i, c))
            .collect();
        !calls.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::ToolFields;

    fn auto(parser: ToolParser) -> ChatOutput {
        let fields: ToolFields = serde_json::from_value(serde_json::json!({"tools": [
            {"type": "function", "function": {"name": "a"}}]}))
        .unwrap();
        ChatOutput::new(None, fields.resolve(Some(parser)).unwrap().map(Arc::new))
    }

    /// Streams `pieces`: (text sent, call names, finish reason).
    fn stream(mut out: ChatOutput, pieces: &[&str]) -> (String, Vec<String>, Option<&'static str>) {
        let (mut text, mut names, mut reason) = (String::new(), Vec::new(), None);
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let (d, f) = out.delta(p, last.then_some(FinishReason::Stop));
            if let Some(d) = d {
                text += d.content.as_deref().unwrap_or("");
                names.extend(d.tool_calls.iter().filter_map(|c| c.function.name.clone()));
            }
            reason = reason.or(f);
        }
        (text, names, reason)
    }

    #[test]
    fn auto_calls_stream_after_their_text_and_match_the_whole_answer() {
        let pieces = [
            "Let me check.",
            "\n<tool",
            "_call>\n{\"name\": \"a\", ",
            "\"arguments\": {}}\n</tool_call>",
        ];
        let (text, names, reason) = stream(auto(ToolParser::Hermes), &pieces);
        assert_eq!(
            (text.as_str(), names, reason),
            ("Let me check.\n", vec!["a".to_string()], Some("tool_calls"))
        );
        let (m, f) = auto(ToolParser::Hermes).whole(&pieces.concat(), Some(FinishReason::Stop));
        assert_eq!(m.content.as_deref(), Some("Let me check.\n"));
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(f, Some("tool_calls"));
        // A `<` that opens no call is text, as is a call that does not parse.
        let (text, names, reason) = stream(auto(ToolParser::Hermes), &["a <", "b> c"]);
        assert_eq!(
            (text.as_str(), names.len(), reason),
            ("a <b> c", 0, Some("stop"))
        );
        let broken = ["<tool_call>{\"name\": ", "\"a\""];
        let (text, names, _) = stream(auto(ToolParser::Hermes), &broken);
        assert_eq!((text, names.len()), (broken.concat(), 0));
        // Llama's calls only open the answer: JSON after text is text.
        let (text, names, _) = stream(
            auto(ToolParser::Llama3Json),
            &["Use ", "{\"name\": \"a\", \"parameters\": {}}"],
        );
        assert_eq!(
            (text.as_str(), names.len()),
            ("Use {\"name\": \"a\", \"parameters\": {}}", 0)
        );
        let (text, names, _) = stream(
            auto(ToolParser::Llama3Json),
            &[" {\"name\"", ": \"a\", \"parameters\": {}}"],
        );
        assert_eq!((text.as_str(), names), ("", vec!["a".to_string()]));
    }
}
