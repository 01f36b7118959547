//! Speculative decoding's configuration and its n-gram proposer (vLLM's
//! `ngram` method): the leader proposes draft tokens from each sequence's
//! own tokens. A draft model (vLLM's `draft_model`) proposes on the last
//! stage instead, which returns its drafts with each step's tokens. Either
//! way the last stage verifies all drafts in one forward pass and keeps the
//! longest prefix the model agrees with, plus one token of its own.

use std::path::PathBuf;

use strata_types::TokenId;

/// `--speculative-config`, in vLLM's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeConfig {
    /// Draft tokens proposed per sequence and step (`num_speculative_tokens`).
    pub num_speculative_tokens: usize,
    pub proposer: Proposer,
    /// No drafts while this many sequences or more run: a full batch has no
    /// idle compute for tokens that may be thrown away (`disable_by_batch_size`).
    pub disable_by_batch_size: Option<usize>,
}

/// Where draft tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proposer {
    /// Prompt lookup: the shortest and longest suffix looked up in the
    /// sequence's earlier tokens (`prompt_lookup_min`, `prompt_lookup_max`);
    /// longer is tried first.
    Ngram {
        prompt_lookup_min: usize,
        prompt_lookup_max: usize,
    },
    /// A smaller model with the target's vocabulary (`"model": path`, a
    /// `.gguf` file or a Hugging Face folder), run greedily on the last
    /// stage with a KV cache of its own.
    DraftModel(PathBuf),
}

impl SpeculativeConfig {
    /// N-gram prompt lookup with `k` drafts and suffixes of `min..=max` tokens.
    pub fn ngram(k: usize, min: usize, max: usize) -> Self {
        Self {
            num_speculative_tokens: k,
            proposer: Proposer::Ngram {
                prompt_lookup_min: min,
                prompt_lookup_max: max,
            },
            disable_by_batch_size: None,
        }
    }

    /// The draft model's path, when one proposes.
    pub fn draft_model(&self) -> Option<&PathBuf> {
        match &self.proposer {
            Proposer::DraftModel(p) => Some(p),
            Proposer::Ngram { .. } => None,
        }
    }

    /// Reads vLLM's `--speculative-config` JSON: `ngram` (also spelled
    /// `"model": "[ngram]"`) or `draft_model` (a `model` path, with or
    /// without the method). Other methods are refused with the reason.
    pub fn from_json(s: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| format!("not a JSON object: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let count = |key: &str| -> Result<Option<usize>, String> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| format!("`{key}` must be a non-negative integer, not {v}")),
            }
        };
        let method = match obj.get("method") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(m)) => Some(m.as_str()),
            Some(v) => return Err(format!("`method` must be a string, not {v}")),
        };
        let model = match obj.get("model") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(m)) => Some(m.as_str()),
            Some(v) => return Err(format!("`model` must be a path, not {v}")),
        };
        let ngram = match (method, model) {
            (Some("ngram"), _) | (None, Some("[ngram]")) => true,
            (Some("draft_model") | None, Some(_)) => false,
            (Some("draft_model"), None) => {
                return Err("`draft_model` needs `model`: the draft model's path".into())
            }
            (Some(m), _) => {
                return Err(format!(
                    "method `{m}` is not supported; strata speculates with `ngram` \
                     (prompt lookup) or `draft_model`"
                ))
            }
            (None, None) => {
                return Err(
                    "needs `\"method\": \"ngram\"` or a draft model's path in `model`".into(),
                )
            }
        };
        const KNOWN: [&str; 6] = [
            "method",
            "model",
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "disable_by_batch_size",
        ];
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("unknown key `{k}` (known: {})", KNOWN.join(", ")));
        }
        let k = count("num_speculative_tokens")?
            .ok_or("needs `num_speculative_tokens` (draft tokens per step, e.g. 4)")?;
        if !(1..=32).contains(&k) {
            return Err(format!("`num_speculative_tokens` must be 1 to 32, not {k}"));
        }
        let lookup = (count("prompt_lookup_min")?, count("prompt_lookup_max")?);
        let proposer = if ngram {
            // vLLM's defaults: one bound stands for both; neither means 5.
            let (min, max) = match lookup {
                (None, None) => (5, 5),
                (Some(n), None) | (None, Some(n)) => (n, n),
                (Some(a), Some(b)) => (a, b),
            };
            if min == 0 || min > max {
                return Err(format!(
                    "`prompt_lookup_min` ({min}) must be at least 1 and at most \
                     `prompt_lookup_max` ({max})"
                ));
            }
            Proposer::Ngram {
                prompt_lookup_min: min,
                prompt_lookup_max: max,
            }
        } else {
            if lookup != (None, None) {
                return Err("`prompt_lookup_min` and `prompt_lookup_max` belong to the \
                            `ngram` method, not to a draft model"
                    .into());
            }
            Proposer::DraftModel(PathBuf::from(model.expect("a draft model has a path")))
        };
        let disable_by_batch_size = count("disable_by_batch_size")?;
        if disable_by_batch_size == Some(0) {
            return Err("`disable_by_batch_size` must be at least 1".into());
        }
        Ok(Self {
            num_speculative_tokens: k,
            proposer,
            disable_by_batch_size,
        })
    }
}

/// Up to `k` tokens that followed the latest earlier occurrence of the
/// sequence's last n tokens, for the longest n in `min..=max` that occurs;
/// none when no suffix recurs.
pub fn ngram_propose(tokens: &[TokenId], k: usize, min: usize, max: usize) -> Vec<TokenId> {
    let len = tokens.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (min..=max.min(len - 1)).rev() {
        let suffix = &tokens[len - n..];
        // The latest occurrence: in text that repeats itself, what came
        // last is what is being repeated.
        if let Some(start) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix) {
            let from = start + n;
            return tokens[from..(from + k).min(len)].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ngram(k: usize, min: usize, max: usize) -> SpeculativeConfig {
        SpeculativeConfig::ngram(k, min, max)
    }

    #[test]
    fn the_longest_recurring_suffix_proposes_what_followed_it_last() {
        struct C(usize, usize);
        impl C {
            fn propose(&self, tokens: &[TokenId], limit: usize) -> Vec<TokenId> {
                ngram_propose(tokens, 3.min(limit), self.0, self.1)
            }
        }
        let c = C(1, 3);
        // "7 8 9" recurs at the end: what followed its earlier occurrence.
        assert_eq!(c.propose(&[1, 7, 8, 9, 4, 5, 6, 2, 7, 8, 9], 8), [4, 5, 6]);
        // Of two occurrences, the later one's continuation wins.
        assert_eq!(c.propose(&[7, 8, 1, 1, 7, 8, 2, 2, 7, 8], 8), [2, 2, 7]);
        // A shorter suffix is tried when the longer ones do not recur.
        assert_eq!(c.propose(&[5, 6, 1, 2, 3, 6], 8), [1, 2, 3]);
        // The continuation stops at the sequence's end, and at the limit.
        assert_eq!(c.propose(&[1, 2, 3, 1, 2], 8), [3, 1, 2]);
        assert_eq!(c.propose(&[1, 2, 3, 1, 2], 1), [3]);
        assert!(c.propose(&[1, 2, 3, 1, 2], 0).is_empty());
        // Nothing recurs, or the sequence is too short to look up.
        assert!(c.propose(&[1, 2, 3, 4], 8).is_empty());
        assert!(c.propose(&[1], 8).is_empty());
        assert!(C(2, 3).propose(&[5, 6, 1, 2, 3, 6], 8).is_empty());
    }

    #[test]
    fn the_config_reads_vllm_json_and_refuses_what_it_cannot_do() {
        let c = SpeculativeConfig::from_json(
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}"#,
        )
        .unwrap();
        assert_eq!(c, ngram(4, 3, 3));
        let c = SpeculativeConfig::from_json(
            r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
                "prompt_lookup_max": 4, "disable_by_batch_size": 8}"#,
        )
        .unwrap();
        assert_eq!(
            c.proposer,
            Proposer::Ngram {
                prompt_lookup_min: 1,
                prompt_lookup_max: 4
            }
        );
        assert_eq!(c.disable_by_batch_size, Some(8));
        // vLLM's older spelling of the method.
        let c =
            SpeculativeConfig::from_json(r#"{"model": "[ngram]", "num_speculative_tokens": 5}"#)
                .unwrap();
        assert_eq!(c, ngram(5, 5, 5));
        // A draft model, with or without vLLM's method name.
        for json in [
            r#"{"model": "/m/draft.gguf", "num_speculative_tokens": 3}"#,
            r#"{"method": "draft_model", "model": "/m/draft.gguf", "num_speculative_tokens": 3}"#,
        ] {
            let c = SpeculativeConfig::from_json(json).unwrap();
            assert_eq!(c.num_speculative_tokens, 3);
            assert_eq!(c.draft_model(), Some(&PathBuf::from("/m/draft.gguf")));
        }
        for (json, why) in [
            ("[]", "not a JSON object"),
            (r#"{"method": "ngram"}"#, "needs `num_speculative_tokens`"),
            (
                r#"{"method": "eagle", "num_speculative_tokens": 2}"#,
                "method `eagle`",
            ),
            (
                r#"{"method": "draft_model", "num_speculative_tokens": 2}"#,
                "needs `model`",
            ),
            (
                r#"{"model": "/m/draft", "num_speculative_tokens": 2, "prompt_lookup_max": 3}"#,
                "belong to the `ngram` method",
            ),
            (
                r#"{"model": 7, "num_speculative_tokens": 2}"#,
                "must be a path",
            ),
            (r#"{"num_speculative_tokens": 2}"#, "needs `\"method\""),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 0}"#,
                "1 to 32",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}"#,
                "at most",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": -1}"#,
                "non-negative",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "k": 1}"#,
                "unknown key `k`",
            ),
        ] {
            let e = SpeculativeConfig::from_json(json).unwrap_err();
            assert!(e.contains(why), "{json}: {e}");
        }
    }
}
