//! Reading a model's architecture from `config.json` or GGUF metadata into
//! one resolved [`ModelConfig`].

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;
use strata_types::{ModelConfig, RopeScaling, RopeStyle};

use crate::error::{Error, Result};

const SUPPORTED: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM"];

/// `config.json` as Hugging Face writes it for the Llama family.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    /// transformers < 5
    rope_scaling: Option<HfRope>,
    /// transformers >= 5 (holds `rope_theta` too)
    rope_parameters: Option<HfRope>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

#[derive(Debug, Deserialize)]
struct HfRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

/// Resolves a Hugging Face `config.json`.
pub fn config_from_hf_json(text: &str) -> Result<ModelConfig> {
    let c: HfConfig =
        serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
    let architecture = c
        .architectures
        .first()
        .cloned()
        .unwrap_or_else(|| "LlamaForCausalLM".into());
    if !SUPPORTED.contains(&architecture.as_str()) {
        return Err(Error::Unsupported(format!(
            "architecture {architecture}; strata supports {}",
            SUPPORTED.join(", ")
        )));
    }
    let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
    let rope_theta = c
        .rope_theta
        .or_else(|| rope.and_then(|r| r.rope_theta))
        .unwrap_or(10_000.0);
    let rope_scaling = match rope.and_then(|r| r.rope_type.as_deref().map(|t| (t, r))) {
        None | Some(("default", _)) => None,
        Some(("llama3", r)) => Some(RopeScaling {
            factor: req(r.factor, "factor")?,
            low_freq_factor: req(r.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: req(r.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: req(
                r.original_max_position_embeddings,
                "original_max_position_embeddings",
            )?,
        }),
        Some((other, _)) => {
            return Err(Error::Unsupported(format!(
                "rope scaling type `{other}` (supported: llama3)"
            )))
        }
    };
    let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
    let cfg = ModelConfig {
        architecture,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        num_kv_heads,
        head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
        rms_norm_eps: c.rms_norm_eps,
        rope_theta,
        rope_scaling,
        rope_style: RopeStyle::Half,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
        attention_bias: c.attention_bias,
    };
    validate(&cfg)?;
    Ok(cfg)
}

fn req<T>(v: Option<T>, name: &str) -> Result<T> {
    v.ok_or_else(|| Error::Config(format!("llama3 rope scaling needs `{name}`")))
}

/// Resolves GGUF metadata (`general.architecture` = `llama`). GGUF files from
/// llama.cpp's converter store q/k permuted for interleaved rope.
pub fn config_from_gguf(
    md: &HashMap<String, Value>,
    has_output_weight: bool,
) -> Result<ModelConfig> {
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(Error::Unsupported(format!(
            "GGUF architecture `{arch}` (supported: llama)"
        )));
    }
    let u = |k: &str| -> Result<usize> {
        md.get(&format!("llama.{k}"))
            .ok_or_else(|| Error::Config(format!("GGUF metadata lacks llama.{k}")))
            .and_then(|v| {
                v.to_u64()
                    .map(|x| x as usize)
                    .or_else(|_| v.to_u32().map(|x| x as usize))
                    .map_err(|e| Error::Config(format!("llama.{k}: {e}")))
            })
    };
    let f = |k: &str| md.get(&format!("llama.{k}")).and_then(|v| v.to_f32().ok());
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let vocab = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| Error::Config("GGUF metadata has no vocabulary size".into()))?,
    };
    let cfg = ModelConfig {
        architecture: "LlamaForCausalLM".into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: u("attention.head_count_kv").unwrap_or(heads),
        head_dim: u("rope.dimension_count")
            .or_else(|_| u("attention.key_length"))
            .unwrap_or(hidden / heads),
        rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
        rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
        // Llama 3 GGUFs carry the scaling as a `rope_freqs` tensor instead.
        rope_scaling: None,
        rope_style: RopeStyle::Interleaved,
        max_position_embeddings: u("context_length").unwrap_or(2048),
        tie_word_embeddings: !has_output_weight,
        attention_bias: false,
    };
    validate(&cfg)?;
    Ok(cfg)
}

fn validate(c: &ModelConfig) -> Result<()> {
    if c.num_heads == 0 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return Err(Error::Config(format!(
            "{} attention heads do not group evenly over {} KV heads",
            c.num_heads, c.num_kv_heads
        )));
    }
    if !c.head_dim.is_multiple_of(2) {
        return Err(Error::Config(format!("head_dim {} is odd", c.head_dim)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_is_read_from_either_spelling() {
        let old = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":64}}"#;
        let new = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":64}}"#;
        let a = config_from_hf_json(old).unwrap();
        let b = config_from_hf_json(new).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling.unwrap().factor, 8.0);
        assert_eq!(a.head_dim, 4);
    }

    #[test]
    fn unsupported_architectures_are_named() {
        let c = r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#;
        let e = config_from_hf_json(c).unwrap_err().to_string();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
    }
}
