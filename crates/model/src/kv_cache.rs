//! The physical KV cache of one stage: for each of its layers, K and V as
//! `[num_blocks, BLOCK_SIZE, num_kv_heads, head_dim]` f32 on the CPU.

use strata_types::BLOCK_SIZE;

#[derive(Debug)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    num_blocks: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// Bytes one block takes across `num_layers` layers.
    pub fn bytes_per_block(num_layers: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * BLOCK_SIZE * num_kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    /// Zeroed buffers; the OS maps their pages on first write.
    pub fn new(num_layers: usize, num_blocks: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        let n = num_blocks * BLOCK_SIZE * num_kv_heads * head_dim;
        let layers = (0..num_layers)
            .map(|_| LayerKv {
                k: vec![0.0; n],
                v: vec![0.0; n],
            })
            .collect();
        Self {
            layers,
            num_blocks,
            num_kv_heads,
            head_dim,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// The cache of the stage's `i`-th layer (local index, not global).
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
