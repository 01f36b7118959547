//! Pieces of `config.json` and GGUF metadata that several architectures
//! read the same way. Each architecture resolves the rest itself.

use serde::Deserialize;

use crate::arch::GgufMetadata;
use crate::error::{Error, Result};
use crate::rope::RopeScaling;

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
        let req = |v: Option<f32>, name: &str| {
            v.ok_or_else(|| Error::Config(format!("llama3 rope scaling needs `{name}`")))
        };
        let scaling = match rope.and_then(|r| r.rope_type.as_deref().map(|t| (t, r))) {
            None | Some(("default", _)) => None,
            Some(("llama3", r)) => Some(RopeScaling {
                factor: req(r.factor, "factor")?,
                low_freq_factor: req(r.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: req(r.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: r.original_max_position_embeddings.ok_or_else(
                    || {
                        Error::Config(
                            "llama3 rope scaling needs `original_max_position_embeddings`".into(),
                        )
                    },
                )?,
            }),
            Some((other, _)) => {
                return Err(Error::Unsupported(format!(
                    "rope scaling type `{other}` (supported: llama3)"
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
