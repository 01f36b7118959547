//! Pieces of `config.json` and GGUF metadata that several architectures
//! read the same way. Each architecture resolves the rest itself.

use serde::Deserialize;

use crate::arch::GgufMetadata;
use crate::error::{Error, Result};
use crate::rope::{yarn_mscale, RopeScaling};

/// Rope settings as Hugging Face writes them: `rope_scaling` (transformers
/// < 5) or `rope_parameters` (transformers >= 5, which holds `rope_theta`
/// too).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct HfRope {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f32>,
    pub factor: Option<f32>,
    pub low_freq_factor: Option<f32>,
    pub high_freq_factor: Option<f32>,
    pub original_max_position_embeddings: Option<usize>,
    pub beta_fast: Option<f32>,
    pub beta_slow: Option<f32>,
    pub mscale: Option<f32>,
    pub mscale_all_dim: Option<f32>,
    pub attention_factor: Option<f32>,
    pub truncate: Option<bool>,
}

/// The fields every config spells the same way, for rope.
#[derive(Debug, Deserialize)]
pub(crate) struct HfRopeFields {
    pub rope_theta: Option<f32>,
    pub rope_scaling: Option<HfRope>,
    pub rope_parameters: Option<HfRope>,
}

impl HfRopeFields {
    /// `(theta, scaling)`; a scaling type strata does not implement is refused.
    pub fn resolve(&self) -> Result<(f32, Option<RopeScaling>)> {
        let rope = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = self
            .rope_theta
            .or_else(|| rope.and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let scaling = match rope.and_then(|r| r.rope_type.as_deref().map(|t| (t, r))) {
            None | Some(("default", _)) => None,
            Some((kind @ ("llama3" | "yarn"), r)) => {
                let need = |v: Option<f32>, name: &str| {
                    v.ok_or_else(|| Error::Config(format!("{kind} rope scaling needs `{name}`")))
                };
                let original = r.original_max_position_embeddings.ok_or_else(|| {
                    Error::Config(format!(
                        "{kind} rope scaling needs `original_max_position_embeddings`"
                    ))
                })?;
                let factor = need(r.factor, "factor")?;
                Some(if kind == "llama3" {
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
                        high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
                        original_max_position_embeddings: original,
                    }
                } else {
                    let attention_factor =
                        r.attention_factor
                            .unwrap_or(match (r.mscale, r.mscale_all_dim) {
                                (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                                }
                                _ => yarn_mscale(factor, 1.0),
                            });
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: original,
                        beta_fast: r.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0),
                        beta_slow: r.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0),
                        truncate: r.truncate.unwrap_or(true),
                        attention_factor,
                    }
                })
            }
            Some((other, _)) => {
                return Err(Error::Unsupported(format!(
                    "rope scaling type `{other}` (supported: llama3, yarn)"
                )))
            }
        };
        Ok((theta, scaling))
    }
}

/// Reads `{prefix}.{key}` from GGUF metadata.
pub(crate) struct GgufKeys<'a> {
    pub md: &'a GgufMetadata,
    pub prefix: &'a str,
}

impl GgufKeys<'_> {
    pub fn usize(&self, key: &str) -> Result<usize> {
        let k = format!("{}.{key}", self.prefix);
        self.md
            .get(&k)
            .ok_or_else(|| Error::Config(format!("GGUF metadata lacks {k}")))
            .and_then(|v| {
                v.to_u64()
                    .map(|x| x as usize)
                    .or_else(|_| v.to_u32().map(|x| x as usize))
                    .map_err(|e| Error::Config(format!("{k}: {e}")))
            })
    }

    pub fn f32(&self, key: &str) -> Option<f32> {
        self.md
            .get(&format!("{}.{key}", self.prefix))
            .and_then(|v| v.to_f32().ok())
    }

    /// The vocabulary size: stated, or the tokenizer's token count.
    pub fn vocab_size(&self) -> Result<usize> {
        self.usize("vocab_size").or_else(|_| {
            self.md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| Error::Config("GGUF metadata has no vocabulary size".into()))
        })
    }
}

/// The largest size that divides both (tensor-parallel sizes a model's
/// dimensions split evenly by).
pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
