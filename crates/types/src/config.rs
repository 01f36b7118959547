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

/// Llama 3 frequency-dependent rope scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The resolved architecture of a Llama-family model, whatever file it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_style: RopeStyle,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
}

impl ModelConfig {
    /// The lm_head's matmul per token, in units of one decoder layer's: the
    /// work the last pipeline stage does beyond its layers.
    pub fn head_cost_in_layers(&self) -> f64 {
        let h = self.hidden_size;
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size;
        (self.vocab_size * h) as f64 / layer.max(1) as f64
    }

    /// Bytes of KV cache one token takes in `layers` layers, at `dtype_bytes` per element.
    pub fn kv_bytes_per_token(&self, layers: usize, dtype_bytes: usize) -> usize {
        2 * layers * self.num_kv_heads * self.head_dim * dtype_bytes
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
