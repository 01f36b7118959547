use serde::{Deserialize, Serialize};

/// A contiguous range of decoder layers `[start, end)`: one pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
}

impl LayerRange {
    pub fn new(start: usize, end: usize) -> Self {
        assert!(start <= end, "layer range [{start}, {end}) is reversed");
        Self { start, end }
    }
    pub fn full(num_layers: usize) -> Self {
        Self::new(0, num_layers)
    }
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    pub fn contains(&self, layer: usize) -> bool {
        (self.start..self.end).contains(&layer)
    }
    /// `num_layers` cut into `parts` contiguous stages of about equal cost,
    /// where the last stage also pays `tail_cost` layers' worth of work (the
    /// lm_head and sampling): a pipeline runs at the pace of its slowest stage.
    pub fn split(num_layers: usize, parts: usize, tail_cost: f64) -> Vec<LayerRange> {
        assert!(
            parts > 0 && parts <= num_layers,
            "cannot cut {num_layers} layers into {parts} stages"
        );
        let per_stage = (num_layers as f64 + tail_cost.max(0.0)) / parts as f64;
        let mut start = 0;
        (0..parts)
            .map(|i| {
                let end = if i + 1 == parts {
                    num_layers
                } else {
                    // At least one layer here and one for each later stage.
                    let ideal = ((i + 1) as f64 * per_stage).floor() as usize;
                    ideal.clamp(start + 1, num_layers - (parts - 1 - i))
                };
                let r = LayerRange::new(start, end);
                start = end;
                r
            })
            .collect()
    }

    /// The first stage holds the token embedding.
    pub fn is_first(&self) -> bool {
        self.start == 0
    }
    /// The last stage holds the final norm, the lm_head and the sampler.
    pub fn is_last(&self, num_layers: usize) -> bool {
        self.end == num_layers
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// HF Llama: dimension `i` pairs with `i + head_dim/2` (`rotate_half`).
    Half,
    /// GGUF (llama.cpp permutes q/k at conversion): dimension `2i` pairs with `2i + 1`.
    Interleaved,
}

/// What the KV cache keeps per token and layer: the model decides, the
/// engine sizes and splits by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvLayout {
    /// A key and a value vector per KV head (multi-head and grouped-query
    /// attention); tensor parallelism splits the heads.
    Heads {
        num_kv_heads: usize,
        head_dim: usize,
    },
    /// Multi-head latent attention (DeepSeek): one compressed latent and one
    /// rope key shared by every head; each tensor-parallel rank keeps all of
    /// it, as vLLM does.
    Latent {
        kv_lora_rank: usize,
        rope_head_dim: usize,
    },
}

impl KvLayout {
    /// The layout one of `tp` tensor-parallel ranks holds.
    pub fn per_rank(self, tp: usize) -> KvLayout {
        match self {
            KvLayout::Heads {
                num_kv_heads,
                head_dim,
            } => KvLayout::Heads {
                num_kv_heads: num_kv_heads / tp.max(1),
                head_dim,
            },
            latent => latent,
        }
    }

    /// Values one token takes in one layer.
    pub fn values_per_token(self) -> usize {
        match self {
            KvLayout::Heads {
                num_kv_heads,
                head_dim,
            } => 2 * num_kv_heads * head_dim,
            KvLayout::Latent {
                kv_lora_rank,
                rope_head_dim,
            } => kv_lora_rank + rope_head_dim,
        }
    }

    /// KV heads, or `None` for a latent cache (for reports).
    pub fn num_kv_heads(self) -> Option<usize> {
        match self {
            KvLayout::Heads { num_kv_heads, .. } => Some(num_kv_heads),
            KvLayout::Latent { .. } => None,
        }
    }
}

/// What the engine, the planner and the scheduler need to know about a
/// model, whatever its architecture. Each architecture in `strata-model`
/// resolves its own full config and summarises it here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The Hugging Face class name (`LlamaForCausalLM`, ...).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The MLP width a token passes through (for an MoE, its active experts' together).
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub kv: KvLayout,
    pub max_position_embeddings: usize,
    /// The lm_head's matmul per token, in units of one decoder layer's: the
    /// work the last pipeline stage does beyond its layers.
    pub head_cost_in_layers: f64,
    /// Tensor-parallel sizes the model accepts divide this (the KV heads for
    /// Llama).
    pub tensor_parallel_unit: usize,
}

impl ModelConfig {
    /// Bytes of KV cache one token takes in `layers` layers of the whole
    /// model (before any tensor-parallel split), at `dtype_bytes` per element.
    pub fn kv_bytes_per_token(&self, layers: usize, dtype_bytes: usize) -> usize {
        layers * self.kv.values_per_token() * dtype_bytes
    }

    /// Refuses a tensor-parallel size the model cannot be split by.
    pub fn check_tensor_parallel(&self, tp: usize) -> Result<(), String> {
        if tp == 0 || !self.tensor_parallel_unit.is_multiple_of(tp) {
            let what = match self.kv {
                KvLayout::Heads { num_kv_heads, .. }
                    if num_kv_heads == self.tensor_parallel_unit =>
                {
                    format!("the model's {num_kv_heads} KV heads")
                }
                _ => format!(
                    "{} (what {} splits evenly by)",
                    self.tensor_parallel_unit, self.architecture
                ),
            };
            return Err(format!("--tensor-parallel-size {tp} must divide {what}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_every_layer_once_as_evenly_as_the_cost_allows() {
        let r = LayerRange::split(30, 4, 0.0);
        assert_eq!(
            r.iter().map(LayerRange::len).collect::<Vec<_>>(),
            vec![7, 8, 7, 8]
        );
        assert_eq!((r[0].start, r[3].end), (0, 30));
        assert!(r.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(LayerRange::split(3, 1, 5.0), vec![LayerRange::new(0, 3)]);
        // A head worth 4 layers: 30 + 4 = 34 split in two, 17 each.
        let r = LayerRange::split(30, 2, 4.0);
        assert_eq!((r[0].len(), r[1].len()), (17, 13));
    }
}
