//! `tool_choice: "auto"`: the model decides, and a parser chosen by
//! `--tool-call-parser` (vLLM's names) reads its calls out of the text in
//! its family's own format. Output that does not parse stays text.

use serde_json::Value as Json;

use crate::response::ToolCall;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    /// Qwen2.5/Qwen3, Hermes: `<tool_call>{"name": …, "arguments": …}</tool_call>`.
    Hermes,
    /// Llama 3.1+: `{"name": …, "parameters": …}`, several joined by `;`,
    /// possibly after `<|python_tag|>`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS][{"name": …, "arguments": …}]`, or (v11
    /// tokenizers) `[TOOL_CALLS]name[ARGS]{…}` per call.
    Mistral,
    /// DeepSeek-V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name`
    /// then the arguments in a json code block, `<｜tool▁call▁end｜>`…
    DeepSeekV3,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";

impl ToolParser {
    pub const NAMES: &'static [&'static str] = &["hermes", "llama3_json", "mistral", "deepseek_v3"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            "mistral" => Some(Self::Mistral),
            "deepseek_v3" => Some(Self::DeepSeekV3),
            _ => None,
        }
    }

    /// The text that opens the calls.
    fn marker(&self) -> &'static str {
        match self {
            Self::Hermes => HERMES_OPEN,
            Self::Llama3Json => "{",
            Self::Mistral => MISTRAL_CALLS,
            Self::DeepSeekV3 => DS_CALLS_BEGIN,
        }
    }

    /// Where the calls begin in `text`, if they do. Llama's JSON calls
    /// are the whole answer, so they can only begin it.
    pub fn calls_start(&self, text: &str) -> Option<usize> {
        match self {
            Self::Llama3Json => {
                let t = text.trim_start();
                let at = text.len() - t.len();
                (t.starts_with(PYTHON_TAG) || t.starts_with('{')).then_some(at)
            }
            _ => text.find(self.marker()),
        }
    }

    /// How many bytes at the end of `text` may be the start of the marker
    /// (held back while streaming, until the next piece tells).
    pub fn partial_marker(&self, text: &str) -> usize {
        let marker = match self {
            // Only a start that is still all whitespace or `<|python_…`.
            Self::Llama3Json => {
                let t = text.trim_start();
                return if PYTHON_TAG.starts_with(t) {
                    text.len()
                } else {
                    0
                };
            }
            m => m.marker(),
        };
        (1..marker.len().min(text.len() + 1))
            .rev()
            .find(|&n| {
                text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
            })
            .unwrap_or(0)
    }

    /// A complete output's text before the calls, and the calls; output
    /// whose calls do not parse is all text.
    pub fn parse(&self, text: &str) -> (String, Vec<ToolCall>) {
        let Some(at) = self.calls_start(text) else {
            return (text.to_string(), Vec::new());
        };
        let calls = match self {
            Self::Hermes => hermes(&text[at..]),
            Self::Llama3Json => llama3(text[at..].trim_start().trim_start_matches(PYTHON_TAG)),
            Self::Mistral => mistral(&text[at + MISTRAL_CALLS.len()..]),
            Self::DeepSeekV3 => deepseek_v3(&text[at..]),
        };
        match calls {
            // Only whitespace before the calls says nothing.
            Some(calls) if !calls.is_empty() => {
                let before = &text[..at];
                let before = if before.trim().is_empty() { "" } else { before };
                (before.to_string(), calls)
            }
            _ => (text.to_string(), Vec::new()),
        }
    }

    /// Mistral's templates check that call ids are nine letters or digits.
    fn call(&self, name: String, arguments: &Json) -> ToolCall {
        let mut call = ToolCall::new(name, arguments.to_string());
        if *self == Self::Mistral {
            call.id = call
                .id
                .chars()
                .rev()
                .filter(char::is_ascii_alphanumeric)
                .take(9)
                .collect();
        }
        call
    }
}

/// `{"name": …, "arguments"|"parameters": {…}}` as a call.
fn json_call(parser: ToolParser, v: &Json) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters"))?;
    // Some models write the arguments as a JSON string.
    let args = match args {
        Json::String(s) => serde_json::from_str(s).ok()?,
        a => a.clone(),
    };
    args.is_object().then(|| parser.call(name, &args))
}

fn hermes(mut s: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    while let Some(open) = s.find(HERMES_OPEN) {
        let body = &s[open + HERMES_OPEN.len()..];
        // The last call may lack its closing tag (the model stopped there).
        let (inner, rest) = match body.find(HERMES_CLOSE) {
            Some(close) => (&body[..close], &body[close + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(json_call(
            ToolParser::Hermes,
            &serde_json::from_str(inner.trim()).ok()?,
        )?);
        s = rest;
    }
    Some(calls)
}

fn llama3(s: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Json>();
        calls.push(json_call(ToolParser::Llama3Json, &values.next()?.ok()?)?);
        // Calls are joined by `;`.
        let after = rest[values.byte_offset()..].trim_start();
        rest = after.strip_prefix(';').unwrap_or(after).trim_start();
    }
    Some(calls)
}

fn mistral(s: &str) -> Option<Vec<ToolCall>> {
    let s = s.trim_start();
    if s.starts_with('[') {
        let list: Vec<Json> = serde_json::from_str(s.trim_end()).ok()?;
        return list
            .iter()
            .map(|v| json_call(ToolParser::Mistral, v))
            .collect();
    }
    s.split(MISTRAL_CALLS)
        .map(|one| {
            let (name, args) = one.split_once(MISTRAL_ARGS)?;
            let args: Json = serde_json::from_str(args.trim()).ok()?;
            args.is_object()
                .then(|| ToolParser::Mistral.call(name.trim().to_string(), &args))
        })
        .collect()
}

fn deepseek_v3(s: &str) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = s;
    while let Some(begin) = rest.find(DS_CALL_BEGIN) {
        let body = &rest[begin + DS_CALL_BEGIN.len()..];
        let end = body.find(DS_CALL_END)?;
        let (head, args) = body[..end]
            .split_once(DS_SEP)
            .and_then(|(_, tail)| tail.split_once('\n'))?;
        let args = args
            .trim()
            .trim_start_matches("```json")
            .trim_end_matches("```")
            .trim();
        let args: Json = serde_json::from_str(args).ok()?;
        if !args.is_object() {
            return None;
        }
        calls.push(ToolParser::DeepSeekV3.call(head.trim().to_string(), &args));
        rest = &body[end + DS_CALL_END.len()..];
    }
    Some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_and_args(calls: &[ToolCall]) -> Vec<(String, Json)> {
        calls
            .iter()
            .map(|c| {
                (
                    c.function.name.clone(),
                    serde_json::from_str(&c.function.arguments).unwrap(),
                )
            })
            .collect()
    }

    fn check(parser: ToolParser, text: &str, content: &str, want: &[(&str, Json)]) {
        let (c, calls) = parser.parse(text);
        assert_eq!(c, content, "{parser:?}: {text}");
        let want: Vec<(String, Json)> = want
            .iter()
            .map(|(n, a)| (n.to_string(), a.clone()))
            .collect();
        assert_eq!(names_and_args(&calls), want, "{parser:?}: {text}");
    }

    #[test]
    fn hermes_as_qwen_writes_it() {
        use serde_json::json;
        let p = ToolParser::Hermes;
        check(p, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", "",
            &[("get_weather", json!({"city": "Paris"}))]);
        check(p, "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"x\": 1}}\n</tool_call>",
            "", &[("a", json!({})), ("b", json!({"x": 1}))]);
        check(p, "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"é\"}}\n</tool_call>", "Let me check.\n",
            &[("a", json!({"q": "é"}))]);
        // Malformed: all text.
        let bad = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": }\n</tool_call>";
        check(p, bad, bad, &[]);
        check(p, "No tools needed.", "No tools needed.", &[]);
    }

    #[test]
    fn llama3_json_as_llama_writes_it() {
        use serde_json::json;
        let p = ToolParser::Llama3Json;
        check(
            p,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
            "",
            &[("get_weather", json!({"city": "Paris"}))],
        );
        check(p, "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"n\": 2}}", "",
            &[("a", json!({})), ("b", json!({"n": 2}))]);
        // Text first: Llama answers in text, never a call after it.
        let text = "The weather is nice. {\"name\": \"a\", \"parameters\": {}}";
        check(p, text, text, &[]);
        let bad = "{\"name\": \"a\", \"parameters\": {\"x\": 1}";
        check(p, bad, bad, &[]);
    }

    #[test]
    fn mistral_in_both_formats() {
        use serde_json::json;
        let p = ToolParser::Mistral;
        check(
            p,
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
            "",
            &[("get_weather", json!({"city": "Paris"}))],
        );
        check(p, "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"k\": true}}]", "",
            &[("a", json!({})), ("b", json!({"k": true}))]);
        check(
            p,
            "Sure.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Rome\"}[TOOL_CALLS]get_time[ARGS]{}",
            "Sure.",
            &[
                ("get_weather", json!({"city": "Rome"})),
                ("get_time", json!({})),
            ],
        );
        let bad = "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}";
        check(p, bad, bad, &[]);
        let (_, calls) = p.parse("[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {}}]");
        assert_eq!(calls[0].id.len(), 9);
        assert!(calls[0].id.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn deepseek_v3_as_deepseek_writes_it() {
        use serde_json::json;
        let p = ToolParser::DeepSeekV3;
        let one = |name: &str, args: &str| {
            format!("<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>")
        };
        let text = format!(
            "<｜tool▁calls▁begin｜>{}<｜tool▁calls▁end｜>",
            one("get_weather", "{\"city\": \"Paris\"}")
        );
        check(p, &text, "", &[("get_weather", json!({"city": "Paris"}))]);
        let two = format!(
            "I'll look both up.<｜tool▁calls▁begin｜>{}\n{}<｜tool▁calls▁end｜>",
            one("a", "{}"),
            one("b", "{\"x\": [1, 2]}")
        );
        check(
            p,
            &two,
            "I'll look both up.",
            &[("a", json!({})), ("b", json!({"x": [1, 2]}))],
        );
        let bad = format!(
            "<｜tool▁calls▁begin｜>{}",
            one("a", "{\"x\": ").replace("<｜tool▁call▁end｜>", "")
        );
        check(p, &bad, &bad, &[]);
    }

    #[test]
    fn markers_split_across_pieces_are_held_back() {
        assert_eq!(
            ToolParser::Hermes.partial_marker("Hi <tool_"),
            "<tool_".len()
        );
        assert_eq!(ToolParser::Hermes.partial_marker("Hi <b>"), 0);
        assert_eq!(
            ToolParser::DeepSeekV3.partial_marker("x<｜tool▁"),
            "<｜tool▁".len()
        );
        assert_eq!(
            ToolParser::Llama3Json.partial_marker("  <|pyth"),
            "  <|pyth".len()
        );
        assert_eq!(ToolParser::Llama3Json.partial_marker("Hello"), 0);
        assert_eq!(ToolParser::Llama3Json.calls_start("  {\"name\""), Some(2));
    }
}
