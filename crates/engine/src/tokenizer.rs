//! The tokenizer, its special tokens and the chat template, from a Hugging
//! Face folder (tokenizer.json, tokenizer_config.json) or from GGUF metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use strata_types::TokenId;

use crate::chat::ChatTemplate;
use crate::error::{EngineError, Result};

/// How the vocabulary's pieces spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceSpelling {
    /// GPT-2's byte-to-character table (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` a raw byte.
    SentencePiece,
    /// Anything else: decode the token on its own.
    Plain,
}

/// Text ↔ ids, plus what the engine needs to know about special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    spelling: PieceSpelling,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation (eos, end-of-turn).
    pub eos_token_ids: Vec<TokenId>,
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        Ok(self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// The exact bytes one token stands for, even when they are not valid
    /// UTF-8 on their own (OpenAI's logprob `bytes`).
    pub fn token_bytes(&self, id: TokenId) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        match self.spelling {
            PieceSpelling::ByteLevel => piece
                .chars()
                .map(byte_level_byte)
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| piece.into_bytes()),
            PieceSpelling::SentencePiece => {
                let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) if piece.len() == 6 => vec![b],
                    _ => piece.replace('\u{2581}', " ").into_bytes(),
                }
            }
            PieceSpelling::Plain => self.decode(&[id], false).unwrap_or_default().into_bytes(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of the special tokens (control tokens that text never spells).
    pub fn special_token_ids(&self) -> Vec<TokenId> {
        let mut ids: Vec<TokenId> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The text of a token as the vocabulary spells it (`<|im_end|>`).
    pub fn id_to_token(&self, id: TokenId) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.inner.token_to_id(token)
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` from a folder.
    pub fn from_hf_dir(dir: &Path, extra_eos: &[TokenId]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: Json = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let token_str = |v: &Json| -> Option<String> {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content").and_then(Json::as_str).map(str::to_string))
        };
        let bos_token = token_str(&cfg["bos_token"]);
        let eos_token = token_str(&cfg["eos_token"]);
        // Newer transformers save the template beside the config.
        let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => match &cfg["chat_template"] {
                Json::String(s) => Some(s.clone()),
                // A list of named templates: take "default".
                Json::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or(list.first())
                    .and_then(|t| t["template"].as_str().map(str::to_string)),
                _ => None,
            },
        };
        let mut eos_token_ids: Vec<TokenId> = extra_eos.to_vec();
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_token_ids.push(id);
        }
        Self::assemble(inner, bos_token, eos_token, eos_token_ids, template)
    }

    /// Builds the tokenizer that llama.cpp would use from GGUF metadata alone.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let u = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let b = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
        let strings = |k: &str| -> Result<Vec<String>> {
            let v = md
                .get(k)
                .ok_or_else(|| EngineError::Tokenizer(format!("GGUF metadata lacks {k}")))?;
            v.to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|x| x.to_string().cloned().map_err(tok_err))
                .collect()
        };
        let numbers = |k: &str, f: fn(&Value) -> Option<f64>| -> Result<Option<Vec<f64>>> {
            md.get(k)
                .map(|v| {
                    Ok(v.to_vec()
                        .map_err(tok_err)?
                        .iter()
                        .map(|x| f(x).unwrap_or(0.0))
                        .collect())
                })
                .transpose()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = numbers("tokenizer.ggml.token_type", |x| {
            x.to_i32().ok().map(f64::from)
        })?
        .map(|v| v.into_iter().map(|t| t as i32).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // Control (3) and user-defined (4) tokens are matched whole in text.
        let added: Vec<Json> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
            .map(|(i, (t, ty))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": *ty == 3})
            })
            .collect();
        let model = s("tokenizer.ggml.model").unwrap_or_default();
        let (normalizer, pre_tokenizer, decoder, bpe) = match model.as_str() {
            // Byte-level BPE (GPT-2, Llama 3, SmolLM): merges are stored.
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = s("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
                (
                    Json::Null,
                    byte_level_pre_tokenizer(&pre),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    json!({"unk_token": null, "fuse_unk": false, "byte_fallback": false, "merges": merges}),
                )
            }
            // SentencePiece BPE (Llama 2, Mistral): spaces become `▁`, unknown
            // characters fall back to `<0xXX>` byte tokens, and merges follow
            // the scores of the pieces they produce.
            "llama" => {
                let scores = numbers("tokenizer.ggml.scores", |x| x.to_f32().ok().map(f64::from))?
                    .ok_or_else(|| {
                        EngineError::Tokenizer("GGUF metadata lacks tokenizer.ggml.scores".into())
                    })?;
                let prefix = b("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let replace =
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
                let normalizer = if prefix {
                    json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
                } else {
                    replace
                };
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                let unk = u("tokenizer.ggml.unknown_token_id")
                    .and_then(|i| tokens.get(i as usize).cloned());
                (
                    normalizer,
                    Json::Null,
                    json!({"type": "Sequence", "decoders": decoders}),
                    json!({"unk_token": unk, "fuse_unk": true, "byte_fallback": true,
                           "merges": merges_from_scores(&tokens, &scores)}),
                )
            }
            other => {
                return Err(EngineError::Tokenizer(format!(
                "GGUF tokenizer model `{other}` is not supported (supported: gpt2 byte-level BPE, \
                     llama SentencePiece BPE); use the Hugging Face folder instead"
            )))
            }
        };
        let mut model_spec = json!({"type": "BPE", "dropout": null, "continuing_subword_prefix": null,
                                    "end_of_word_suffix": null, "ignore_merges": false, "vocab": vocab});
        model_spec
            .as_object_mut()
            .expect("an object")
            .extend(bpe.as_object().expect("an object").clone());
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": decoder,
            "model": model_spec,
        });
        let mut inner =
            tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec).map_err(tok_err)?)
                .map_err(tok_err)?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned();
        let bos_id = u("tokenizer.ggml.bos_token_id");
        let bos_token = name(bos_id);
        let eos_token = name(u("tokenizer.ggml.eos_token_id"));
        if b("tokenizer.ggml.add_bos_token").unwrap_or(false) {
            if let (Some(bos), Some(id)) = (&bos_token, bos_id) {
                let post = json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos.as_str(): {"id": bos, "ids": [id], "tokens": [bos]}}});
                let post: tokenizers::PostProcessorWrapper =
                    serde_json::from_value(post).map_err(tok_err)?;
                inner.with_post_processor(Some(post));
            }
        }
        let eos_token_ids: Vec<TokenId> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
                .iter()
                .filter_map(|k| u(k))
                .collect();
        let template = s("tokenizer.chat_template");
        Self::assemble(inner, bos_token, eos_token, eos_token_ids, template)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        mut eos_token_ids: Vec<TokenId>,
        template: Option<String>,
    ) -> Result<Self> {
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        let decoder = serde_json::to_string(&inner.get_decoder()).unwrap_or_default();
        let spelling = if decoder.contains("\"ByteLevel\"") {
            PieceSpelling::ByteLevel
        } else if decoder.contains("\"ByteFallback\"") {
            PieceSpelling::SentencePiece
        } else {
            PieceSpelling::Plain
        };
        let chat_template = template
            .map(|t| ChatTemplate::new(t, bos_token.clone(), eos_token.clone()))
            .transpose()?;
        Ok(Self {
            inner,
            spelling,
            bos_token,
            eos_token,
            eos_token_ids,
            chat_template,
        })
    }
}

/// The byte a character of GPT-2's byte-level alphabet stands for: printable
/// Latin-1 maps to itself, the other 68 bytes to U+0100 onwards in order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if printable(cp) {
        return Some(cp as u8);
    }
    let n = cp.checked_sub(256)?;
    (0..=255u32)
        .filter(|b| !printable(*b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// A regex split, then bytes mapped to GPT-2's printable characters.
fn split_then_bytes(pattern: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
}

/// The pre-tokenizer llama.cpp uses for a byte-level BPE vocabulary.
fn byte_level_pre_tokenizer(pre: &str) -> Json {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    match pre {
        // llama.cpp's `smollm`: digits one by one, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "llama-bpe" | "llama3" => split_then_bytes(LLAMA3_SPLIT),
        // Qwen2/2.5/3: Llama 3's split with digits one by one.
        "qwen2" => split_then_bytes(QWEN2_SPLIT),
        "gpt2" | "default" => byte_level,
        other => {
            tracing::warn!("GGUF pre-tokenizer `{other}` is unknown; using GPT-2's split");
            byte_level
        }
    }
}

/// BPE merges for a SentencePiece vocabulary, which stores scores instead:
/// every split of a piece into two pieces of the vocabulary is a merge, ranked
/// by the score of the piece it makes (as transformers' converter does).
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((score, li, ri, l, r));
            }
        }
    }
    // Highest score first; ties by the ids of the parts.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Reads an optional JSON file: `Ok(None)` when it does not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Model(format!("{}: invalid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::Model(format!("{}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{PreTokenizedString, PreTokenizer, PreTokenizerWrapper};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let p: PreTokenizerWrapper = serde_json::from_value(byte_level_pre_tokenizer(pre)).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(piece, _, _)| piece.to_string())
        .collect()
    }

    #[test]
    fn qwen_splits_digits_one_by_one_where_llama3_takes_three() {
        assert_eq!(pieces("llama-bpe", "12345 ok"), ["123", "45", "Ġok"]);
        assert_eq!(
            pieces("qwen2", "12345 ok"),
            ["1", "2", "3", "4", "5", "Ġok"]
        );
    }
}
