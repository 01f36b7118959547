//! Tool calling: the request's `tools` and `tool_choice`, checked; the
//! structured output that makes `required` and a named function always give
//! calls that parse and fit their parameters; and the calls read back out of
//! the generated text.

use serde::Deserialize;
use serde_json::{json, Value as Json};
use strata_engine::Constraint;

use crate::error::ApiError;
use crate::response::{FunctionCall, ToolCall};
use crate::tool_parsers::ToolParser;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ToolFields {
    pub tools: Option<Vec<Json>>,
    pub tool_choice: Option<Json>,
    pub parallel_tool_calls: Option<bool>,
}

/// One function the model may call.
#[derive(Debug, Clone, Deserialize)]
pub struct Function {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Json>,
}

/// How the model must answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Text only (the tools are still shown to the template).
    None,
    /// One or more calls, of any of the tools.
    Required,
    /// One call of this function.
    Named(String),
    /// Text or calls, as the model decides, read by this parser.
    Auto(ToolParser),
}

/// A request's tools, checked.
#[derive(Debug, Clone)]
pub struct Tools {
    /// As given, for the chat template.
    pub raw: Vec<Json>,
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

fn bad(field: &str, msg: impl Into<String>) -> ApiError {
    ApiError::param(field, msg)
}

impl ToolFields {
    /// The request's tools, or `None` without any. `auto` (the default when
    /// tools are given) needs the server's tool-call parser (`auto_parser`,
    /// from `--enable-auto-tool-choice --tool-call-parser`).
    pub fn resolve(&self, auto_parser: Option<ToolParser>) -> Result<Option<Tools>, ApiError> {
        let Some(raw) = &self.tools else {
            if self.tool_choice.as_ref().is_some_and(|c| c != "none") {
                return Err(bad("tool_choice", "`tool_choice` needs `tools`"));
            }
            return Ok(None);
        };
        let mut functions = Vec::with_capacity(raw.len());
        for (i, t) in raw.iter().enumerate() {
            if t.get("type").and_then(Json::as_str) != Some("function") {
                return Err(bad("tools", format!("tools[{i}].type must be `function`")));
            }
            let f: Function = t
                .get("function")
                .cloned()
                .and_then(|f| serde_json::from_value(f).ok())
                .ok_or_else(|| bad("tools", format!("tools[{i}].function needs a `name`")))?;
            if let Some(p) = &f.parameters {
                if !p.is_object() {
                    return Err(bad(
                        "tools",
                        format!("tools[{i}].function.parameters must be a JSON schema object"),
                    ));
                }
            }
            functions.push(f);
        }
        let choice = match &self.tool_choice {
            Some(Json::String(s)) if s == "none" => ToolChoice::None,
            Some(Json::String(s)) if s == "required" => ToolChoice::Required,
            None => match auto_parser {
                Some(p) => ToolChoice::Auto(p),
                None => return Err(bad(
                    "tool_choice",
                    "`tool_choice` `auto` (the default with `tools`) needs the server started with --enable-auto-tool-choice and --tool-call-parser; or give `required`, `none` or a named function",
                )),
            },
            Some(Json::String(s)) if s == "auto" => match auto_parser {
                Some(p) => ToolChoice::Auto(p),
                None => return Err(bad(
                    "tool_choice",
                    "`tool_choice` `auto` needs the server started with --enable-auto-tool-choice and --tool-call-parser",
                )),
            },
            Some(c) => {
                let name = c
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Json::as_str)
                    .filter(|_| c.get("type").and_then(Json::as_str) == Some("function"))
                    .ok_or_else(|| {
                        bad(
                            "tool_choice",
                            "`tool_choice` must be `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !functions.iter().any(|f| f.name == name) {
                    return Err(bad("tool_choice", format!("`tool_choice` names `{name}`, which is not in `tools`")));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        Ok(Some(Tools {
            raw: raw.clone(),
            functions,
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true),
        }))
    }
}

fn parameters(f: &Function) -> Json {
    f.parameters
        .clone()
        .unwrap_or_else(|| json!({"type": "object"}))
}

impl Tools {
    /// The structured output the choice asks for: a named function's
    /// arguments, or a list of `{name, parameters}` calls.
    pub fn constraint(&self) -> Option<Constraint> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto(_) => None,
            ToolChoice::Named(name) => {
                let f = self.functions.iter().find(|f| &f.name == name)?;
                Some(Constraint::JsonSchema(parameters(f)))
            }
            ToolChoice::Required => {
                let calls: Vec<Json> = self
                    .functions
                    .iter()
                    .map(|f| {
                        json!({"type": "object", "additionalProperties": false,
                            "properties": {"name": {"const": f.name}, "parameters": parameters(f)},
                            "required": ["name", "parameters"]})
                    })
                    .collect();
                let mut list = json!({"type": "array", "items": {"anyOf": calls}, "minItems": 1});
                if !self.parallel {
                    list["maxItems"] = json!(1);
                }
                Some(Constraint::JsonSchema(list))
            }
        }
    }

    /// A complete output's text (before its calls) and calls. Calls that
    /// do not parse (as when max_tokens cut them short) leave it all text.
    pub fn parse(&self, text: &str) -> (String, Vec<ToolCall>) {
        let calls = match &self.choice {
            ToolChoice::None => None,
            ToolChoice::Auto(p) => return p.parse(text),
            ToolChoice::Named(name) => serde_json::from_str::<Json>(text)
                .ok()
                .map(|_| vec![ToolCall::new(name.clone(), text.to_string())]),
            ToolChoice::Required => serde_json::from_str::<Vec<Json>>(text)
                .ok()
                .and_then(|list| {
                    list.into_iter()
                        .map(|c| {
                            let name = c.get("name")?.as_str()?.to_string();
                            Some(ToolCall::new(name, c.get("parameters")?.to_string()))
                        })
                        .collect()
                }),
        };
        match calls {
            Some(calls) => (String::new(), calls),
            None => (text.to_string(), Vec::new()),
        }
    }
}

/// OpenAI messages as chat templates expect them: a tool call's arguments
/// (a JSON string on the wire) become an object, as transformers' templates
/// read them (`tool_call.arguments | tojson`).
pub fn arguments_as_objects(messages: &mut [Json]) {
    for m in messages {
        let Some(calls) = m.get_mut("tool_calls").and_then(Json::as_array_mut) else {
            continue;
        };
        for c in calls {
            let Some(f) = c.get_mut("function") else {
                continue;
            };
            if let Some(args) = f.get("arguments").and_then(Json::as_str) {
                if let Ok(obj) = serde_json::from_str::<Json>(args) {
                    f["arguments"] = obj;
                }
            }
        }
    }
}

impl ToolCall {
    pub fn new(name: String, arguments: String) -> Self {
        Self {
            id: format!("chatcmpl-tool-{:032x}", rand::random::<u128>()),
            kind: "function",
            function: FunctionCall { name, arguments },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Json) -> ToolFields {
        serde_json::from_value(v).unwrap()
    }

    fn weather() -> Json {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_resolve_and_bad_ones_name_the_field() {
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = fields(json!({"tools": weather(), "tool_choice": named}))
            .resolve(None)
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        for (v, field) in [
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (
                json!({"tools": weather(), "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [{"type": "retrieval"}], "tool_choice": "required"}),
                "tools",
            ),
            (json!({"tools": weather()}), "tool_choice"),
        ] {
            let e = fields(v.clone()).resolve(None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{v}: {}", e.message);
        }
        assert!(fields(json!({"tool_choice": "none"}))
            .resolve(None)
            .unwrap()
            .is_none());
        // With a parser, `auto` is the default.
        let auto = fields(json!({"tools": weather()}))
            .resolve(Some(ToolParser::Hermes))
            .unwrap()
            .unwrap();
        assert_eq!(auto.choice, ToolChoice::Auto(ToolParser::Hermes));
        assert!(auto.constraint().is_none());
    }

    #[test]
    fn outputs_become_calls() {
        let required = fields(json!({"tools": weather(), "tool_choice": "required"}))
            .resolve(None)
            .unwrap()
            .unwrap();
        let (text, calls) = required
            .parse(r#"[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]"#);
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].function.name, "get_weather");
        assert_eq!(calls[1].function.arguments, r#"{"city":"Rome"}"#);
        assert_ne!(calls[0].id, calls[1].id);
        assert!(
            required.parse(r#"[{"name": "get_weather""#).1.is_empty(),
            "cut short"
        );
        let Some(Constraint::JsonSchema(s)) = required.constraint() else {
            panic!()
        };
        assert_eq!(s["minItems"], 1);
    }

    #[test]
    fn history_arguments_become_objects_for_the_template() {
        let mut m = vec![json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]})];
        arguments_as_objects(&mut m);
        assert_eq!(m[0]["tool_calls"][0]["function"]["arguments"]["a"], 1);
    }
}
