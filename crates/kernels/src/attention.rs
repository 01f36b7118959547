//! The KV-cache write and paged attention as candle ops. One layer's cache is
//! a `[2, num_slots, kv_heads, head_dim]` tensor (keys, then values), slot
//! `block * BLOCK_SIZE + offset`; sequences address it through block tables.

use candle_core::{CpuStorage, CustomOp2, Device, InplaceOp3, Layout, Result, Shape, Tensor};
use strata_types::RopeStyle;

use crate::ops::{cpu_f32, cpu_f32_mut, rows};
use crate::reference::Rotation;
use crate::{err, reference, Heads};

/// Rotary cos/sin tables (`[max_positions, head_dim / 2]`, f32) on the
/// device the kernels run on.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub style: RopeStyle,
}

impl RopeTables {
    pub fn new(
        cos: &[f32],
        sin: &[f32],
        half: usize,
        style: RopeStyle,
        device: &Device,
    ) -> Result<Self> {
        let rows = cos.len() / half.max(1);
        Ok(Self {
            cos: Tensor::from_slice(cos, (rows, half), device)?,
            sin: Tensor::from_slice(sin, (rows, half), device)?,
            style,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The tables on the host (CPU paths).
    pub(crate) fn host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((
            self.cos.flatten_all()?.to_vec1()?,
            self.sin.flatten_all()?.to_vec1()?,
        ))
    }

    pub(crate) fn rotation<'a>(&self, cos: &'a [f32], sin: &'a [f32]) -> Rotation<'a> {
        Rotation {
            cos,
            sin,
            style: self.style,
        }
    }

    /// `style` as the kernels take it (`pair_index` in common.cuh).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn style_code(&self) -> i32 {
        match self.style {
            RopeStyle::Half => 0,
            RopeStyle::Interleaved => 1,
        }
    }
}

/// Slots, KV heads and head size of a `[2, slots, kv_heads, head_dim]` cache.
fn cache_dims(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        [2, s, h, d] if l.is_contiguous() => Ok((*s, *h, *d)),
        d => Err(err(format!(
            "a KV cache is a contiguous [2, slots, kv_heads, head_dim], got {d:?}"
        ))),
    }
}

/// Writes token `t`'s key, rotated for `positions[t]`, and its value into
/// slot `slots[t]` of `cache`. `k` and `v` are `[tokens, kv_heads * head_dim]`
/// with contiguous rows (column slices of the fused qkv output are fine);
/// `positions` and `slots` are u32 on the cache's device.
pub fn write_kv(
    cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &Tensor,
    slots: &Tensor,
    rope: &RopeTables,
) -> Result<()> {
    cache.inplace_op3(
        k,
        v,
        &WriteKv {
            positions,
            slots,
            rope,
        },
    )
}

struct WriteKv<'a> {
    positions: &'a Tensor,
    slots: &'a Tensor,
    rope: &'a RopeTables,
}

impl WriteKv<'_> {
    /// `(tokens, heads, k stride, v stride, num_slots)` after checking shapes.
    fn dims(
        &self,
        cl: &Layout,
        kl: &Layout,
        vl: &Layout,
    ) -> Result<(usize, Heads, usize, usize, usize)> {
        let (num_slots, kv_heads, head_dim) = cache_dims(cl)?;
        let (t, kw, ks) = rows(kl, "write_kv's keys")?;
        let (tv, vw, vs) = rows(vl, "write_kv's values")?;
        let row = kv_heads * head_dim;
        if kw != row
            || vw != row
            || tv != t
            || self.positions.elem_count() != t
            || self.slots.elem_count() != t
        {
            return Err(err(format!(
                "write_kv: keys [{t}, {kw}], values [{tv}, {vw}], {} positions and {} slots for a cache row of {row}",
                self.positions.elem_count(),
                self.slots.elem_count()
            )));
        }
        let heads = Heads {
            num_heads: kv_heads,
            num_kv_heads: kv_heads,
            head_dim,
        };
        Ok((t, heads, ks, vs, num_slots))
    }
}

impl InplaceOp3 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "write_kv"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (_, heads, ks, vs, num_slots) = self.dims(dl, kl, vl)?;
        let positions = self.positions.to_vec1::<u32>()?;
        let slots = self.slots.to_vec1::<u32>()?;
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= num_slots) {
            return Err(err(format!(
                "write_kv: slot {bad} outside the cache's {num_slots}"
            )));
        }
        let (cos, sin) = self.rope.host()?;
        let (k, v) = (cpu_f32(k, kl, "write_kv")?, cpu_f32(v, vl, "write_kv")?);
        let n = num_slots * heads.num_kv_heads * heads.head_dim;
        let cache = &mut cpu_f32_mut(dst, dl, "write_kv")?[..2 * n];
        let (kc, vc) = cache.split_at_mut(n);
        reference::write_kv(
            k,
            ks,
            v,
            vs,
            &positions,
            &slots,
            self.rope.rotation(&cos, &sin),
            heads,
            kc,
            vc,
        );
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        use crate::cuda::{by_dtype, cuda, load, per_token, view, KernelType};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::{CudaStorage, WrapErr};

        #[allow(clippy::too_many_arguments)]
        fn run<T: KernelType>(
            op: &WriteKv,
            dst: &mut CudaStorage,
            dl: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<()> {
            let (t, heads, ks, vs, num_slots) = op.dims(dl, kl, vl)?;
            if t == 0 {
                return Ok(());
            }
            let dev = dst.device().clone();
            let f = load(
                &dev,
                "write_kv",
                dst.dtype(),
                "kv_cache",
                crate::ptx::KV_CACHE,
            )?;
            let (ps, pl) = op.positions.storage_and_layout();
            let pos = view::<u32>(cuda(&ps, "positions")?, pl)?;
            let (ss, sl) = op.slots.storage_and_layout();
            let slots = view::<u32>(cuda(&ss, "the slot mapping")?, sl)?;
            let (cs, cl) = op.rope.cos.storage_and_layout();
            let cos = view::<f32>(cuda(&cs, "the rotary tables")?, cl)?;
            let (sn, snl) = op.rope.sin.storage_and_layout();
            let sin = view::<f32>(cuda(&sn, "the rotary tables")?, snl)?;
            let (kv, vv) = (view::<T>(k, kl)?, view::<T>(v, vl)?);
            let mut cache = dst.as_cuda_slice_mut::<T>()?.slice_mut(dl.start_offset()..);
            let (ks, vs, slots_arg) = (ks as i64, vs as i64, num_slots as i64);
            let (kv_heads, head_dim, style) = (
                heads.num_kv_heads as i32,
                heads.head_dim as i32,
                op.rope.style_code(),
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&kv)
                .arg(&ks)
                .arg(&vv)
                .arg(&vs)
                .arg(&pos)
                .arg(&slots)
                .arg(&cos)
                .arg(&sin)
                .arg(&mut cache)
                .arg(&slots_arg)
                .arg(&kv_heads)
                .arg(&head_dim)
                .arg(&style);
            let cfg = per_token(t, 256);
            // SAFETY: the arguments match write_kv in kv_cache.cu; slots were
            // given out by the block pool, inside the cache.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }
        by_dtype!(dst.dtype(), run(self, dst, dl, k, kl, v, vl))
    }
}

/// Query rows per tile of the tensor-core prefill kernel.
pub const PREFILL_TILE: usize = 16;

/// How a batch's rows split between the two attention kernels: sequences
/// with at least [`PREFILL_TILE`] new tokens go to the tensor-core prefill
/// kernel in tiles of up to 16 consecutive tokens, the rest (decodes, short
/// chunks, speculative verifies) to the per-token kernel. Only the CUDA path
/// of 16-bit caches with head_dim a multiple of 16 up to 128 uses it; every
/// other path attends to every row the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefillPlan {
    /// `(first token, rows)` of each tile.
    pub tiles: Vec<[u32; 2]>,
    /// The rows of the per-token kernel.
    pub others: Vec<u32>,
}

impl PrefillPlan {
    /// The plan for sequences of `query_lens` new tokens, laid out one after
    /// another; `None` when no sequence is long enough.
    pub fn new(query_lens: &[usize]) -> Option<Self> {
        if query_lens.iter().all(|&n| n < PREFILL_TILE) {
            return None;
        }
        let (mut tiles, mut others, mut start) = (Vec::new(), Vec::new(), 0u32);
        for &n in query_lens {
            let n = n as u32;
            if n as usize >= PREFILL_TILE {
                let tile = PREFILL_TILE as u32;
                tiles.extend(
                    (0..n.div_ceil(tile)).map(|i| [start + i * tile, tile.min(n - i * tile)]),
                );
            } else {
                others.extend(start..start + n);
            }
            start += n;
        }
        Some(Self { tiles, others })
    }

    /// The plan as the kernels read it, on `device`.
    pub fn upload(&self, device: &Device) -> Result<PrefillTiles> {
        let flat: Vec<u32> = self.tiles.iter().flatten().copied().collect();
        Ok(PrefillTiles {
            tiles: Tensor::from_vec(flat, (self.tiles.len(), 2), device)?,
            others: match self.others.is_empty() {
                true => None,
                false => Some(Tensor::new(self.others.as_slice(), device)?),
            },
        })
    }
}

/// A [`PrefillPlan`] on the device: `tiles` `[n, 2]` and `others` (none
/// when every row is in a tile), u32.
#[derive(Debug, Clone)]
pub struct PrefillTiles {
    pub tiles: Tensor,
    pub others: Option<Tensor>,
}

/// Causal attention for a flattened batch over the paged cache. `q` is
/// `[tokens, ≥ num_heads * head_dim]` before rope (its first `num_heads *
/// head_dim` columns are read, so a slice of the qkv output is fine); token
/// `t` belongs to sequence `token_seq[t]` and attends to positions
/// `0..=positions[t]` through row `token_seq[t]` of `block_tables`
/// (`[seqs, max_blocks]`, u32). `prefill` sends long chunks to the
/// tensor-core kernel where it applies ([`PrefillPlan`]). Returns `[tokens,
/// num_heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &Tensor,
    cache: &Tensor,
    positions: &Tensor,
    token_seq: &Tensor,
    block_tables: &Tensor,
    rope: &RopeTables,
    num_heads: usize,
    prefill: Option<&PrefillTiles>,
) -> Result<Tensor> {
    q.apply_op2_no_bwd(
        cache,
        &PagedAttention {
            positions,
            token_seq,
            block_tables,
            rope,
            num_heads,
            prefill,
        },
    )
}

struct PagedAttention<'a> {
    positions: &'a Tensor,
    token_seq: &'a Tensor,
    block_tables: &'a Tensor,
    rope: &'a RopeTables,
    num_heads: usize,
    /// Only the CUDA path reads it: the CPU attends to every row the same way.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    prefill: Option<&'a PrefillTiles>,
}

impl PagedAttention<'_> {
    /// `(tokens, heads, q stride, num_slots, max_blocks)` after checking shapes.
    fn dims(&self, ql: &Layout, cl: &Layout) -> Result<(usize, Heads, usize, usize, usize)> {
        let (num_slots, kv_heads, head_dim) = cache_dims(cl)?;
        let (t, width, qs) = rows(ql, "paged_attention's queries")?;
        let heads = Heads {
            num_heads: self.num_heads,
            num_kv_heads: kv_heads,
            head_dim,
        };
        let max_blocks = match self.block_tables.dims() {
            [_, m] => *m,
            d => {
                return Err(err(format!(
                    "block tables are [seqs, max_blocks], got {d:?}"
                )))
            }
        };
        if width < self.num_heads * head_dim
            || !self.num_heads.is_multiple_of(kv_heads)
            || head_dim % 2 != 0
            || head_dim > 256
            || self.positions.elem_count() != t
            || self.token_seq.elem_count() != t
        {
            return Err(err(format!(
                "paged_attention: queries [{t}, {width}] for {} heads over {kv_heads} KV heads of {head_dim} \
                 (even, at most 256), {} positions, {} sequence ids",
                self.num_heads,
                self.positions.elem_count(),
                self.token_seq.elem_count()
            )));
        }
        Ok((t, heads, qs, num_slots, max_blocks))
    }
}

impl CustomOp2 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged_attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        c: &CpuStorage,
        cl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, heads, qs, num_slots, max_blocks) = self.dims(ql, cl)?;
        let positions = self.positions.to_vec1::<u32>()?;
        let token_seq = self.token_seq.to_vec1::<u32>()?;
        let tables = self.block_tables.flatten_all()?.to_vec1::<u32>()?;
        let (cos, sin) = self.rope.host()?;
        let n = num_slots * heads.num_kv_heads * heads.head_dim;
        let cache = &cpu_f32(c, cl, "paged_attention")?[..2 * n];
        let (kc, vc) = cache.split_at(n);
        let width = heads.num_heads * heads.head_dim;
        let mut out = vec![0f32; t * width];
        reference::paged_attention(
            cpu_f32(q, ql, "paged_attention")?,
            qs,
            kc,
            vc,
            &positions,
            &token_seq,
            &tables,
            max_blocks,
            self.rope.rotation(&cos, &sin),
            heads,
            &mut out,
        );
        Ok((CpuStorage::F32(out), Shape::from((t, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        c: &candle_core::CudaStorage,
        cl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{by_dtype, cuda, load, view, KernelType};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaStorage, WrapErr};

        fn run<T: KernelType>(
            op: &PagedAttention,
            q: &CudaStorage,
            ql: &Layout,
            c: &CudaStorage,
            cl: &Layout,
        ) -> Result<CudaStorage> {
            let (t, heads, qs, num_slots, max_blocks) = op.dims(ql, cl)?;
            if t > 65_535 {
                return Err(err(format!(
                    "paged_attention takes at most 65535 tokens a step, got {t} (lower --max-num-batched-tokens)"
                )));
            }
            let dev = q.device().clone();
            let width = heads.num_heads * heads.head_dim;
            // SAFETY: the kernels write every element before anything reads it
            // (the tiles and `others` cover every row).
            let out = unsafe { dev.alloc::<T>((t * width).max(1)) }?;
            if t == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev));
            }
            // Tensor cores take bf16 from sm_80 on (prefill_attention.cu).
            let tiled = match op.prefill {
                Some(p)
                    if q.dtype() != candle_core::DType::F32
                        && heads.head_dim % 16 == 0
                        && heads.head_dim <= 128
                        && dev.cuda_stream().context().compute_capability().w()?.0 >= 8 =>
                {
                    Some(p)
                }
                _ => None,
            };
            // The per-token kernel's rows: all, or those outside the tiles.
            let (rows, others) = match tiled {
                None => (t, None),
                Some(p) => match &p.others {
                    Some(o) => (o.elem_count(), Some(o.storage_and_layout())),
                    None => (0, None),
                },
            };
            let others = match &others {
                Some((s, l)) => Some(view::<u32>(cuda(s, "the per-token rows")?, l)?),
                None => None,
            };
            let f = load(
                &dev,
                "paged_attention",
                q.dtype(),
                "paged_attention",
                crate::ptx::PAGED_ATTENTION,
            )?;
            let (ps, pl) = op.positions.storage_and_layout();
            let pos = view::<u32>(cuda(&ps, "positions")?, pl)?;
            let (ts, tl) = op.token_seq.storage_and_layout();
            let seq = view::<u32>(cuda(&ts, "token_seq")?, tl)?;
            let block_tables = op.block_tables.contiguous()?;
            let (bs, bl) = block_tables.storage_and_layout();
            let tables = view::<u32>(cuda(&bs, "block tables")?, bl)?;
            let (cs, csl) = op.rope.cos.storage_and_layout();
            let cos = view::<f32>(cuda(&cs, "the rotary tables")?, csl)?;
            let (sn, snl) = op.rope.sin.storage_and_layout();
            let sin = view::<f32>(cuda(&sn, "the rotary tables")?, snl)?;
            let (qv, cache) = (view::<T>(q, ql)?, view::<T>(c, cl)?);
            let (qs, slots, max_blocks) = (qs as i64, num_slots as i64, max_blocks as i32);
            let (nh, nkv, hd, style) = (
                heads.num_heads as i32,
                heads.num_kv_heads as i32,
                heads.head_dim as i32,
                op.rope.style_code(),
            );
            let stream = dev.cuda_stream();
            // The arguments both kernels start with, in their order.
            macro_rules! geometry {
                ($b:expr) => {
                    $b.arg(&qv)
                        .arg(&qs)
                        .arg(&cache)
                        .arg(&slots)
                        .arg(&pos)
                        .arg(&seq)
                        .arg(&tables)
                        .arg(&max_blocks)
                        .arg(&cos)
                        .arg(&sin)
                        .arg(&out)
                        .arg(&nh)
                        .arg(&nkv)
                        .arg(&hd)
                        .arg(&style)
                };
            }
            if rows > 0 {
                let has_rows = i32::from(tiled.is_some());
                let mut b = stream.launch_builder(&f);
                geometry!(b);
                // Without a row list the kernel ignores this argument.
                match &others {
                    Some(rows) => b.arg(rows),
                    None => b.arg(&pos),
                };
                b.arg(&has_rows);
                let cfg = LaunchConfig {
                    grid_dim: (heads.num_heads as u32, rows as u32, 1),
                    // ATTN_WARPS warps (paged_attention.cu).
                    block_dim: (16 * 32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match paged_attention in paged_attention.cu;
                // block tables only name blocks inside the cache, `others`
                // only rows of the batch.
                unsafe { b.launch(cfg) }.w()?;
            }
            if let Some(p) = tiled {
                let n = p.tiles.dims()[0];
                if n > 0 {
                    let f = load(
                        &dev,
                        "prefill_attention",
                        q.dtype(),
                        "prefill_attention",
                        crate::ptx::PREFILL_ATTENTION,
                    )?;
                    let (ts, tl) = p.tiles.storage_and_layout();
                    let tiles = view::<u32>(cuda(&ts, "the prefill tiles")?, tl)?;
                    let mut b = stream.launch_builder(&f);
                    geometry!(b).arg(&tiles);
                    let cfg = LaunchConfig {
                        // PF_WARPS heads per block (prefill_attention.cu).
                        grid_dim: (n as u32, heads.num_heads.div_ceil(4) as u32, 1),
                        block_dim: (4 * 32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the arguments match prefill_attention in
                    // prefill_attention.cu; each tile is consecutive rows of
                    // one sequence (PrefillPlan), cached up to its positions.
                    unsafe { b.launch(cfg) }.w()?;
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let (t, heads, ..) = self.dims(ql, cl)?;
        let out = by_dtype!(q.dtype(), run(self, q, ql, c, cl))?;
        Ok((out, Shape::from((t, heads.num_heads * heads.head_dim))))
    }
}

#[cfg(test)]
mod tests {
    use super::PrefillPlan;

    #[test]
    fn long_chunks_go_in_tiles_of_16_and_the_rest_row_by_row() {
        assert_eq!(PrefillPlan::new(&[1, 15, 3]), None);
        let p = PrefillPlan::new(&[1, 37, 2, 16]).unwrap();
        assert_eq!(p.tiles, vec![[1, 16], [17, 16], [33, 5], [40, 16]]);
        assert_eq!(p.others, vec![0, 38, 39]);
        // Every row of the batch is in exactly one of them.
        let mut rows: Vec<u32> = p.tiles.iter().flat_map(|&[s, n]| s..s + n).collect();
        rows.extend(&p.others);
        rows.sort();
        assert_eq!(rows, (0..56).collect::<Vec<_>>());
    }
}
