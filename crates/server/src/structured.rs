//! The request fields that constrain what may be sampled: structured
//! outputs in their three spellings (OpenAI's `response_format`, vLLM's
//! `structured_outputs` object and its older `guided_*` fields), and the
//! token rules `logit_bias`, `allowed_token_ids`, `bad_words`, `min_tokens`.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value as Json;
use strata_engine::{Constraint, Guide, JsonStyle, StructuredOutputs, Tokenizer};
use strata_types::{SamplingParams, TokenId};

use crate::error::ApiError;

/// vLLM's `structured_outputs` object: exactly one kind, plus options.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputsParams {
    pub json: Option<Json>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
    pub disable_any_whitespace: Option<bool>,
    // Accepted from vLLM's clients, with nothing to choose: llguidance is
    // the one backend.
    #[allow(dead_code)]
    pub disable_fallback: Option<bool>,
    #[allow(dead_code)]
    pub disable_additional_properties: Option<bool>,
    #[allow(dead_code)]
    pub whitespace_pattern: Option<String>,
    #[allow(dead_code)]
    pub backend: Option<String>,
}

/// Every field of a request body that constrains sampling.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConstraintFields {
    pub response_format: Option<Json>,
    pub structured_outputs: Option<StructuredOutputsParams>,
    pub guided_json: Option<Json>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub allowed_token_ids: Option<Vec<TokenId>>,
    pub bad_words: Option<Vec<String>>,
    pub min_tokens: Option<i64>,
}

/// A JSON schema given as an object, or as a string holding one (vLLM
/// accepts both for `guided_json` and `structured_outputs.json`).
fn schema(field: &str, v: &Json) -> Result<Json, ApiError> {
    let v = match v {
        Json::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::param(field, format!("`{field}` is not a JSON schema: {e}")))?,
        v => v.clone(),
    };
    if !v.is_object() && !v.is_boolean() {
        return Err(ApiError::param(
            field,
            format!("`{field}` must be a JSON schema object"),
        ));
    }
    Ok(v)
}

fn choices(field: &str, c: &[String]) -> Result<Constraint, ApiError> {
    if c.is_empty() {
        return Err(ApiError::param(
            field,
            format!("`{field}` must name at least one choice"),
        ));
    }
    Ok(Constraint::Choice(c.to_vec()))
}

impl ConstraintFields {
    /// The one constraint the request asks for, with the field that asked
    /// (for errors), and how JSON may be spelled.
    pub fn constraint(
        &self,
        server_style: JsonStyle,
    ) -> Result<Option<(String, Constraint, JsonStyle)>, ApiError> {
        let mut found: Vec<(String, Constraint)> = Vec::new();
        let mut style = server_style;
        if let Some(rf) = &self.response_format {
            let kind = rf.get("type").and_then(Json::as_str).ok_or_else(|| {
                ApiError::param(
                    "response_format",
                    "`response_format.type` must be `text`, `json_object` or `json_schema`",
                )
            })?;
            match kind {
                "text" => {}
                "json_object" => found.push(("response_format".into(), Constraint::json_object())),
                "json_schema" => {
                    let s = rf
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .ok_or_else(|| {
                            ApiError::param(
                                "response_format",
                                "`response_format.json_schema.schema` is required",
                            )
                        })?;
                    found.push((
                        "response_format".into(),
                        Constraint::JsonSchema(schema("response_format", s)?),
                    ));
                }
                other => {
                    return Err(ApiError::param(
                        "response_format",
                        format!("`response_format.type` `{other}` is not supported (use `text`, `json_object` or `json_schema`)"),
                    ))
                }
            }
        }
        if let Some(so) = &self.structured_outputs {
            let f = "structured_outputs";
            let mut kinds: Vec<Constraint> = Vec::new();
            if let Some(j) = &so.json {
                kinds.push(Constraint::JsonSchema(schema(f, j)?));
            }
            if let Some(r) = &so.regex {
                kinds.push(Constraint::Regex(r.clone()));
            }
            if let Some(c) = &so.choice {
                kinds.push(choices(f, c)?);
            }
            if let Some(g) = &so.grammar {
                kinds.push(Constraint::Lark(g.clone()));
            }
            if so.json_object == Some(true) {
                kinds.push(Constraint::json_object());
            }
            if kinds.len() > 1 {
                return Err(ApiError::param(
                    f,
                    "`structured_outputs` takes exactly one of `json`, `regex`, `choice`, `grammar` or `json_object`",
                ));
            }
            if let Some(d) = so.disable_any_whitespace {
                style.any_whitespace = !d;
            }
            found.extend(kinds.into_iter().map(|c| (f.to_string(), c)));
        }
        if let Some(j) = &self.guided_json {
            found.push((
                "guided_json".into(),
                Constraint::JsonSchema(schema("guided_json", j)?),
            ));
        }
        if let Some(r) = &self.guided_regex {
            found.push(("guided_regex".into(), Constraint::Regex(r.clone())));
        }
        if let Some(c) = &self.guided_choice {
            found.push(("guided_choice".into(), choices("guided_choice", c)?));
        }
        if let Some(g) = &self.guided_grammar {
            found.push(("guided_grammar".into(), Constraint::Lark(g.clone())));
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
            return Err(ApiError::param(
                found[1].0.clone(),
                format!(
                    "give one structured output, not several ({})",
                    names.join(", ")
                ),
            ));
        }
        Ok(found.pop().map(|(f, c)| (f, c, style)))
    }

    /// Compiles the request's constraint, if any: a 400 naming the field
    /// when the schema, regex or grammar is invalid.
    pub fn guide(&self, so: &StructuredOutputs) -> Result<Option<Guide>, ApiError> {
        let Some((field, c, style)) = self.constraint(so.default_style())? else {
            return Ok(None);
        };
        let what = match c {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Regex(_) => "regex",
            Constraint::Choice(_) => "choice",
            Constraint::Lark(_) => "grammar",
        };
        so.compile(&c, style).map(Some).map_err(|e| {
            ApiError::param(field.clone(), format!("invalid {what} in `{field}`: {e}"))
        })
    }

    /// Adds the token rules to `sampling`, checking each against the vocabulary.
    pub fn apply_token_rules(
        &self,
        sampling: &mut SamplingParams,
        tok: &Tokenizer,
        vocab_size: usize,
    ) -> Result<(), ApiError> {
        let in_vocab = |field: &str, t: TokenId| {
            if (t as usize) < vocab_size {
                Ok(t)
            } else {
                Err(ApiError::param(
                    field,
                    format!("`{field}`: token id {t} is outside the vocabulary of {vocab_size}"),
                ))
            }
        };
        if let Some(bias) = &self.logit_bias {
            let mut rules = Vec::with_capacity(bias.len());
            for (k, &b) in bias {
                let t: TokenId = k.parse().map_err(|_| {
                    ApiError::param(
                        "logit_bias",
                        format!("`logit_bias` keys are token ids, got `{k}`"),
                    )
                })?;
                if !(-100.0..=100.0).contains(&b) {
                    return Err(ApiError::param(
                        "logit_bias",
                        format!("`logit_bias` values must be between -100 and 100, got {b} for token {k}"),
                    ));
                }
                rules.push((in_vocab("logit_bias", t)?, b as f32));
            }
            rules.sort_by_key(|r| r.0);
            sampling.logit_bias = rules;
        }
        if let Some(ids) = &self.allowed_token_ids {
            if ids.is_empty() {
                return Err(ApiError::param(
                    "allowed_token_ids",
                    "`allowed_token_ids` must not be empty",
                ));
            }
            sampling.allowed_token_ids = Some(
                ids.iter()
                    .map(|&t| in_vocab("allowed_token_ids", t))
                    .collect::<Result<_, _>>()?,
            );
        }
        if let Some(words) = &self.bad_words {
            // vLLM's reading: the word as it would appear mid-text (after a
            // space) and at the start.
            for w in words {
                if w.is_empty() {
                    return Err(ApiError::param(
                        "bad_words",
                        "`bad_words` must not hold an empty word",
                    ));
                }
                for spelling in [w.clone(), format!(" {w}")] {
                    let ids = tok.encode(&spelling, false)?;
                    if !ids.is_empty() && !sampling.bad_words.contains(&ids) {
                        sampling.bad_words.push(ids);
                    }
                }
            }
        }
        if let Some(m) = self.min_tokens {
            if m < 0 {
                return Err(ApiError::param(
                    "min_tokens",
                    format!("`min_tokens` must be at least 0, got {m}"),
                ));
            }
            sampling.min_tokens = m as usize;
        }
        Ok(())
    }
}
