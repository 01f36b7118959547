//! The physical KV cache of one stage. What a token keeps per layer is the
//! model's [`KvLayout`]; where it lives is one of two layouts:
//! - host: for each layer, two planes of `[num_blocks, BLOCK_SIZE, width]`
//!   in f32, bf16 or fp8 (`--kv-cache-dtype`; bf16 halves the bytes decode
//!   attention reads, fp8 halves them again), read by the CPU attention:
//!   for attention heads, keys and values (`width = num_kv_heads *
//!   head_dim` each); for a latent (MLA), one plane of latent and rope key
//!   side by side and an empty second one;
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
use crate::fp8::{Fp8, FP8_UNBIAS};
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
    Fp8(Vec<Fp8>),
}

/// Runs `$body` with `$x` bound to the values of `$plane` (a `&Plane` or
/// `&mut Plane`), whatever their type: code generic over [`KvElem`] is
/// written once for every plane type.
macro_rules! with_plane {
    ($plane:expr, $x:ident => $body:expr) => {
        match $plane {
            $crate::kv_cache::Plane::F32($x) => $body,
            $crate::kv_cache::Plane::Bf16($x) => $body,
            $crate::kv_cache::Plane::Fp8($x) => $body,
        }
    };
}

/// [`with_plane!`] for a layer's two planes, which share one type.
macro_rules! with_planes {
    ($k:expr, $v:expr, ($kx:ident, $vx:ident) => $body:expr) => {
        match ($k, $v) {
            ($crate::kv_cache::Plane::F32($kx), $crate::kv_cache::Plane::F32($vx)) => $body,
            ($crate::kv_cache::Plane::Bf16($kx), $crate::kv_cache::Plane::Bf16($vx)) => $body,
            ($crate::kv_cache::Plane::Fp8($kx), $crate::kv_cache::Plane::Fp8($vx)) => $body,
            _ => unreachable!("a layer's planes share one type"),
        }
    };
}
pub(crate) use {with_plane, with_planes};

impl Plane {
    fn bytes(&self) -> usize {
        with_plane!(self, v => std::mem::size_of_val(v.as_slice()))
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

/// vLLM's `fp8` cache: values stored unscaled (its default `k_scale` and
/// `v_scale` of 1), so keys and values beyond ±448 saturate there.
impl KvElem for Fp8 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        Fp8::from_f32(x)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // Each byte sign-extended to its lane and shifted: the magnitude
        // lands at bits 20–26 and copies of the sign above it, which the
        // mask clears but for bit 31. The bits `get` builds, and the same
        // multiply.
        let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let placed = _mm256_slli_epi32(b, 20);
        let bits = _mm256_and_si256(placed, _mm256_set1_epi32(0x87F0_0000u32 as i32));
        _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(FP8_UNBIAS))
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
            DType::F8E4M3 => Ok(Plane::Fp8(filled(num_blocks * BLOCK_SIZE * w, Fp8(0)))),
            other => Err(Error::Unsupported(format!(
                "a {other:?} KV cache on the CPU (float32, bfloat16 or fp8)"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fp8_vector_loads_decode_as_the_scalar_one() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let bytes: Vec<Fp8> = (0..=255u8).map(Fp8).collect();
        for chunk in bytes.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2; the chunk holds eight values.
            unsafe {
                std::arch::x86_64::_mm256_storeu_ps(got.as_mut_ptr(), Fp8::load8(chunk.as_ptr()))
            };
            for (g, b) in got.iter().zip(chunk) {
                assert_eq!(g.to_bits(), b.get().to_bits(), "byte {:#04x}", b.0);
            }
        }
    }

    #[test]
    fn an_fp8_cache_takes_a_byte_a_value() {
        let layout = KvLayout::Heads {
            num_kv_heads: 3,
            head_dim: 64,
        };
        let cache = KvCache::new(2, 4, layout, DType::F8E4M3).unwrap();
        assert_eq!(cache.bytes(), 2 * 4 * BLOCK_SIZE * 2 * 3 * 64);
        assert_eq!(
            KvCache::bytes_per_block(2, layout, DType::F8E4M3.size_in_bytes()) * 4,
            cache.bytes()
        );
    }
}
