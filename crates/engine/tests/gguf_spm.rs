//! The SentencePiece ("llama") tokenizer rebuilt from GGUF metadata alone
//! (tests/fixtures/spm, made by make_spm_reference.py) against SentencePiece
//! itself and llama.cpp's special-token parsing.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use strata_engine::Tokenizer;

fn fixture(name: &str) -> Json {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/spm")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The JSON export of the GGUF keys, typed as a GGUF file would hold them.
fn metadata() -> HashMap<String, Value> {
    let j = fixture("tokenizer_gguf.json");
    j.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let value = match (k.as_str(), v) {
                (_, Json::String(s)) => Value::String(s.clone()),
                (_, Json::Bool(b)) => Value::Bool(*b),
                ("tokenizer.ggml.scores", Json::Array(a)) => Value::Array(
                    a.iter()
                        .map(|x| Value::F32(x.as_f64().unwrap() as f32))
                        .collect(),
                ),
                ("tokenizer.ggml.token_type", Json::Array(a)) => Value::Array(
                    a.iter()
                        .map(|x| Value::I32(x.as_i64().unwrap() as i32))
                        .collect(),
                ),
                (_, Json::Array(a)) => Value::Array(
                    a.iter()
                        .map(|x| Value::String(x.as_str().unwrap().to_string()))
                        .collect(),
                ),
                (_, Json::Number(n)) => Value::U32(n.as_u64().unwrap() as u32),
                other => panic!("unexpected metadata {other:?}"),
            };
            (k.clone(), value)
        })
        .collect()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn sentencepiece_vocabularies_tokenize_like_sentencepiece() {
    let tok = Tokenizer::from_gguf(&metadata()).unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
    assert_eq!(tok.eos_token_ids, vec![2]);
    let cases = fixture("reference.json");
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // `<s>` and `</s>` written in text are special tokens, as llama.cpp
        // parses them (SentencePiece alone spells them out).
        let want = ids(&case["parse_special_ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        if !text.contains("<s>") && !text.contains("</s>") {
            let plain = ids(&case["ids"]);
            assert_eq!(
                want[1..],
                plain[..],
                "{text:?}: BOS then SentencePiece's ids"
            );
            assert_eq!(
                tok.decode(&plain, true).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{text:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12);
}

#[test]
fn sentencepiece_token_bytes_spell_spaces_and_byte_fallback() {
    let tok = Tokenizer::from_gguf(&metadata()).unwrap();
    let text = "emoji 🦀 done";
    let ids = tok.encode(text, false).unwrap();
    let bytes: Vec<u8> = ids.iter().flat_map(|&i| tok.token_bytes(i)).collect();
    // The leading `▁` SentencePiece adds comes back as a space.
    assert_eq!(bytes, format!(" {text}").as_bytes());
}

/// Structured outputs index a SentencePiece vocabulary by its bytes (`▁` as
/// a space, byte-fallback pieces as their byte): the tokens a regex allows
/// first are exactly those whose bytes start a match.
#[test]
fn structured_outputs_read_a_sentencepiece_vocabulary_by_bytes() {
    let tok = std::sync::Arc::new(Tokenizer::from_gguf(&metadata()).unwrap());
    let so = strata_engine::StructuredOutputs::new(tok.clone(), Default::default());
    let rx = strata_engine::Constraint::Regex(" ?[a-z]{1,3}".into());
    let mut guide = so.compile(&rx, Default::default()).unwrap();
    let mask = guide.mask();
    let fits = |b: &[u8]| {
        let word = b.strip_prefix(b" ").unwrap_or(b);
        !b.is_empty() && word.len() <= 3 && word.iter().all(u8::is_ascii_lowercase)
    };
    let special = tok.special_token_ids();
    let mut allowed = 0;
    for id in 0..tok.vocab_size() as u32 {
        if special.contains(&id) {
            assert!(!mask.allows(id), "special token {id} allowed");
            continue;
        }
        let bytes = tok.token_bytes(id);
        assert_eq!(
            mask.allows(id),
            fits(&bytes),
            "token {id} {:?}",
            String::from_utf8_lossy(&bytes)
        );
        allowed += usize::from(mask.allows(id));
    }
    assert!(allowed > 10, "{allowed}");
}
