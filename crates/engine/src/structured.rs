//! Structured outputs: what a request's output must match (a JSON schema, a
//! regex, a choice of strings, a Lark grammar), compiled by llguidance into
//! a matcher per sequence. The engine asks each matcher for the tokens it
//! allows next while the step's forward pass runs; the sampling stage masks
//! the logits with them.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value as Json;
use strata_types::{TokenId, TokenMask};

use crate::tokenizer::Tokenizer;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON schema (`{"type": "object"}` for any object).
    JsonSchema(Json),
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

/// How JSON may be spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonStyle {
    /// Whitespace between tokens (vLLM's default), as [`JSON_WHITESPACE`]
    /// allows it; off: compact JSON only (`disable_any_whitespace`).
    pub any_whitespace: bool,
}

/// The whitespace JSON may have between tokens: a space, or one or two line
/// breaks and up to 20 spaces or tabs of indent (llama.cpp's JSON grammar
/// allows the same). Unbounded whitespace lets a small model emit line
/// breaks until max_tokens cuts the JSON short.
pub const JSON_WHITESPACE: &str = r"(?: |\n{1,2}[ \t]{0,20})";

impl Default for JsonStyle {
    fn default() -> Self {
        Self {
            any_whitespace: true,
        }
    }
}

impl Constraint {
    /// The same JSON schema whatever the request said: `json_object` asks for an object.
    pub fn json_object() -> Self {
        Self::JsonSchema(serde_json::json!({"type": "object"}))
    }

    fn grammar(&self, style: JsonStyle) -> TopLevelGrammar {
        match self {
            Self::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    // llguidance reads its JSON options from the schema itself.
                    obj.entry("x-guidance").or_insert_with(|| {
                        serde_json::json!({
                            "whitespace_flexible": style.any_whitespace,
                            "whitespace_pattern": style.any_whitespace.then_some(JSON_WHITESPACE),
                        })
                    });
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(choices) => {
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            Self::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// The vocabulary as llguidance sees it: each token's bytes, special tokens
/// marked so no text ever matches them.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles constraints against one tokenizer. llguidance's parser factory
/// (a trie over the vocabulary) is built on first use, so servers that
/// never see a constrained request do not pay for it.
pub struct StructuredOutputs {
    tokenizer: Arc<Tokenizer>,
    style: JsonStyle,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl StructuredOutputs {
    /// `style`: the server's default JSON spelling.
    pub fn new(tokenizer: Arc<Tokenizer>, style: JsonStyle) -> Self {
        Self {
            tokenizer,
            style,
            factory: OnceLock::new(),
        }
    }

    pub fn default_style(&self) -> JsonStyle {
        self.style
    }

    fn factory(&self) -> Result<&ParserFactory, String> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Compiles `c` into a fresh matcher. The error says what is wrong
    /// with the schema, regex or grammar.
    pub fn compile(&self, c: &Constraint, style: JsonStyle) -> Result<Guide, String> {
        let factory = self.factory()?;
        let parser = factory
            .create_parser(c.grammar(style))
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Guide {
            matcher: Box::new(matcher),
            gate: None,
        })
    }
}

fn build_factory(tokenizer: &Arc<Tokenizer>) -> Result<ParserFactory, String> {
    let n = tokenizer.vocab_size();
    let special = tokenizer.special_token_ids();
    let words: Vec<Vec<u8>> = (0..n as TokenId)
        .map(|id| {
            if special.binary_search(&id).is_ok() {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend(tokenizer.id_to_token(id).unwrap_or_default().into_bytes());
                w
            } else {
                tokenizer.token_bytes(id)
            }
        })
        .collect();
    let eos = tokenizer
        .eos_token_ids
        .first()
        .copied()
        .ok_or("the tokenizer names no end-of-sequence token, which structured outputs need")?;
    let trie = TokTrie::from(&TokRxInfo::new(n as u32, eos), &words);
    let env: TokEnv = Arc::new(Vocabulary {
        trie,
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new(
        &env,
        InferenceCapabilities::default(),
        &llguidance::earley::SlicedBiasComputer::general_slices(),
    )
    .map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

/// One sequence's matcher: which tokens it allows next, advanced by each
/// token sampled.
pub struct Guide {
    /// Boxed: a matcher is large, and requests move through channels.
    matcher: Box<Matcher>,
    /// The token that must be sampled before the constraint applies (the
    /// end of a reasoning model's thinking).
    gate: Option<TokenId>,
}

impl Clone for Guide {
    fn clone(&self) -> Self {
        Self {
            matcher: Box::new(self.matcher.deep_clone()),
            gate: self.gate,
        }
    }
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Guide {
    /// Leaves the output free until `token` is sampled: structured outputs
    /// apply to a reasoning model's answer, after its thinking.
    pub fn after(mut self, token: TokenId) -> Self {
        self.gate = Some(token);
        self
    }

    /// Whether the constraint applies to the next token.
    pub fn is_active(&self) -> bool {
        self.gate.is_none()
    }

    /// The tokens allowed next; only end-of-sequence once the grammar is
    /// complete. A matcher in error allows only end-of-sequence too, so the
    /// sequence ends rather than wanders.
    pub fn mask(&mut self) -> TokenMask {
        match self.matcher.compute_mask_or_eos() {
            Ok(v) => TokenMask::from_words(v.as_slice().to_vec()),
            Err(e) => {
                tracing::warn!("structured output matcher: {e}");
                let eos = self.matcher.tok_env().map(|env| env.tok_trie().eos_token());
                TokenMask::only(eos.unwrap_or(0))
            }
        }
    }

    /// Takes the sampled token; true once the output is complete (nothing
    /// but end-of-sequence may follow).
    pub fn advance(&mut self, token: TokenId) -> bool {
        if let Some(gate) = self.gate {
            if token == gate {
                self.gate = None;
            }
            return false;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!("structured output matcher refused token {token}: {e}");
            return true;
        }
        self.matcher.is_stopped()
    }
}
