//! The physical KV cache of one stage. What a token keeps per layer is the
//! model's [`KvLayout`]; where it lives is one of two layouts:
//! - host: for each layer, two planes of `[num_blocks, BLOCK_SIZE, width]`
//!   in f32 or bf16 (`--kv-cache-dtype`; bf16 halves the bytes decode
//!   attention reads), read by the CPU attention: for attention heads, keys and values
//!   (`width = num_kv_heads * head_dim` each); for a latent (MLA), one plane
//!   of latent and rope key side by side and an empty second one;
//! - device: for each layer, one `[2, slots, num_kv_heads, head_dim]` tensor
//!   (keys, then values) in the activation dtype, written and read by
//!   strata's kernels (`strata_kernels::{write_kv, paged_attention}`).
//!
//! CUDA always takes the device layout; the CPU takes the host one, or the
//! device one when a test runs the GPU code path on the CPU.

use candle_core::{DType, Device, Tensor};
use half::bf16;
use strata_types::{KvLayout, BLOCK_SIZE};

use crate::error::{Error, Result};
use crate::pages::filled;

/// One layer's host planes (see the module docs for what each holds).
#[derive(Debug)]
pub struct LayerKv {
    pub k: Plane,
    pub v: Plane,
}

/// The values of one host plane.
#[derive(Debug)]
pub enum Plane {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Plane {
    fn bytes(&self) -> usize {
        match self {
            Plane::F32(v) => 4 * v.len(),
            Plane::Bf16(v) => 2 * v.len(),
        }
    }
}

/// A value type the host planes hold: what attention reads and writes.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
    /// Eight values from `p`, as f32 in one register.
    ///
    /// # Safety
    /// The CPU must have AVX2; `p` must point at eight values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        x
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvElem for bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        // A shift the compiler vectorises (bf16 is f32's upper half).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
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
    layout: KvLayout,
}

/// Floats per slot of the two host planes.
fn plane_widths(layout: KvLayout) -> (usize, usize) {
    match layout {
        KvLayout::Heads {
            num_kv_heads,
            head_dim,
        } => (num_kv_heads * head_dim, num_kv_heads * head_dim),
        KvLayout::Latent {
            kv_lora_rank,
            rope_head_dim,
        } => (kv_lora_rank + rope_head_dim, 0),
    }
}

impl KvCache {
    /// Bytes one block takes across `num_layers` layers of `layout` (one
    /// rank's) at `dtype_bytes` per element.
    pub fn bytes_per_block(num_layers: usize, layout: KvLayout, dtype_bytes: usize) -> usize {
        num_layers * BLOCK_SIZE * layout.values_per_token() * dtype_bytes
    }

    /// The host layout in `dtype` (f32 or bf16), written through at once,
    /// as llama.cpp clears its cache: the whole budget is resident from the
    /// start, so memory does not creep up as traffic first reaches blocks
    /// (it looks like a leak), and a budget the machine cannot hold fails
    /// now, not under load.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        layout: KvLayout,
        dtype: DType,
    ) -> Result<Self> {
        let (kw, vw) = plane_widths(layout);
        // `filled`, not `vec![0; n]`: the planes are written through now,
        // where zeroed pages would be mapped on first write, under load.
        let resident = |w: usize| match dtype {
            DType::BF16 => Ok(Plane::Bf16(filled(num_blocks * BLOCK_SIZE * w, bf16::ZERO))),
            DType::F32 => Ok(Plane::F32(filled(num_blocks * BLOCK_SIZE * w, 0.0f32))),
            other => Err(Error::Unsupported(format!(
                "a {other:?} KV cache on the CPU (float32 or bfloat16)"
            ))),
        };
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: resident(kw)?,
                    v: resident(vw)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            store: Store::Host(layers),
            num_blocks,
            layout,
        })
    }

    /// The device layout on `device`, in `dtype` (attention heads only: the
    /// kernels have no latent layout yet).
    pub fn new_on_device(
        num_layers: usize,
        num_blocks: usize,
        layout: KvLayout,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let KvLayout::Heads {
            num_kv_heads,
            head_dim,
        } = layout
        else {
            return Err(Error::Unsupported(format!(
                "a {layout:?} KV cache in the kernels' layout"
            )));
        };
        let shape = (2, num_blocks * BLOCK_SIZE, num_kv_heads, head_dim);
        let layers = (0..num_layers)
            .map(|_| Tensor::zeros(shape, dtype, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            store: Store::Device(layers),
            num_blocks,
            layout,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// What each token keeps per layer (this rank's share).
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    pub fn num_layers(&self) -> usize {
        match &self.store {
            Store::Host(l) => l.len(),
            Store::Device(l) => l.len(),
        }
    }

    /// Bytes the cache holds (for tests and reports).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Host(l) => l.iter().map(|l| l.k.bytes() + l.v.bytes()).sum(),
            Store::Device(l) => l
                .iter()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
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
