//! The physical KV cache of one stage, in one of two layouts:
//! - host: for each layer, K and V as `[num_blocks, BLOCK_SIZE, num_kv_heads,
//!   head_dim]` f32 vectors, read by the CPU attention in `attention.rs`;
//! - device: for each layer, one `[2, slots, num_kv_heads, head_dim]` tensor
//!   (keys, then values) in the activation dtype, written and read by
//!   strata's kernels (`strata_kernels::{write_kv, paged_attention}`).
//!
//! CUDA always takes the device layout; the CPU takes the host one, or the
//! device one when a test runs the GPU code path on the CPU.

use candle_core::{DType, Device, Tensor};
use strata_types::BLOCK_SIZE;

use crate::error::Result;

#[derive(Debug)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

#[derive(Debug)]
enum Store {
    Host(Vec<LayerKv>),
    Device(Vec<Tensor>),
}

/// One layer's cache, as the attention sees it.
pub(crate) enum LayerCache<'a> {
    Host(&'a mut LayerKv),
    Device(&'a Tensor),
}

#[derive(Debug)]
pub struct KvCache {
    store: Store,
    num_blocks: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// Bytes one block takes across `num_layers` layers at `dtype_bytes` per element.
    pub fn bytes_per_block(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype_bytes: usize,
    ) -> usize {
        2 * num_layers * BLOCK_SIZE * num_kv_heads * head_dim * dtype_bytes
    }

    /// The host layout (f32), written through at once, as llama.cpp clears
    /// its cache: the whole budget is resident from the start, so memory
    /// does not creep up as traffic first reaches blocks (it looks like a
    /// leak), and a budget the machine cannot hold fails now, not under load.
    pub fn new(num_layers: usize, num_blocks: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        let n = num_blocks * BLOCK_SIZE * num_kv_heads * head_dim;
        let resident = || {
            // Not `vec![0.0; n]`: that maps zero pages the OS fills on first write.
            let mut v = Vec::with_capacity(n);
            v.resize(n, 0.0f32);
            v
        };
        let layers = (0..num_layers)
            .map(|_| LayerKv {
                k: resident(),
                v: resident(),
            })
            .collect();
        Self {
            store: Store::Host(layers),
            num_blocks,
            num_kv_heads,
            head_dim,
        }
    }

    /// The device layout on `device`, in `dtype`.
    pub fn new_on_device(
        num_layers: usize,
        num_blocks: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (2, num_blocks * BLOCK_SIZE, num_kv_heads, head_dim);
        let layers = (0..num_layers)
            .map(|_| Tensor::zeros(shape, dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            store: Store::Device(layers),
            num_blocks,
            num_kv_heads,
            head_dim,
        })
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
    pub fn num_layers(&self) -> usize {
        match &self.store {
            Store::Host(l) => l.len(),
            Store::Device(l) => l.len(),
        }
    }

    /// The cache of the stage's `i`-th layer (local index, not global).
    pub(crate) fn layer(&mut self, i: usize) -> LayerCache<'_> {
        match &mut self.store {
            Store::Host(l) => LayerCache::Host(&mut l[i]),
            Store::Device(l) => LayerCache::Device(&l[i]),
        }
    }
}
