//! Attention over the paged KV cache, on the CPU.
//!
//! Rotary embeddings are applied here: to keys as they are written into the
//! cache, and to each query head as it is read, so no pass over the
//! activations is spent on them.

use candle_core::{Storage, Tensor};
use rayon::prelude::*;
use strata_kernels::reference::fast_exp;
use strata_types::BLOCK_SIZE;

pub use strata_kernels::Heads;

use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::kv_cache::{with_plane, with_planes, KvElem, LayerCache, LayerKv};
use crate::rope::Rope;

/// Attention over heads that keep keys and values of their own (multi-head,
/// grouped-query, multi-query): the backend picks the code for the layout
/// the cache has, the CPU's own or the kernels'.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadAttention {
    pub heads: Heads,
}

impl HeadAttention {
    /// `q [tokens, heads * head_dim]`, `k` and `v [tokens, kv_heads *
    /// head_dim]`, all before rope: writes this batch's keys and values
    /// into `cache`, then attends. Returns `[tokens, heads * head_dim]`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &Batch,
        rope: &Rope,
        cache: LayerCache,
    ) -> Result<Tensor> {
        let heads = self.heads;
        match cache {
            LayerCache::Host(kv) => {
                let tokens = q.dim(0)?;
                let mut out = vec![0f32; tokens * heads.num_heads * heads.head_dim];
                let input = batch.input;
                with_f32(k, |k| {
                    with_f32(v, |v| {
                        write_kv(kv, k, v, input.positions, input.slot_mapping, rope, heads)
                    })
                })??;
                with_f32(q, |q| {
                    paged_attention(
                        q,
                        kv,
                        input.positions,
                        &batch.token_seq,
                        &batch.block_tables,
                        rope,
                        heads,
                        &mut out,
                    )
                })?;
                Ok(Tensor::from_vec(
                    out,
                    (tokens, heads.num_heads * heads.head_dim),
                    q.device(),
                )?)
            }
            LayerCache::Device(kv) => {
                let d = batch
                    .device
                    .as_ref()
                    .expect("built for a device-layout cache");
                let tables = rope.tables(q.device())?;
                strata_kernels::write_kv(kv, k, v, &d.positions, &d.slots, tables)?;
                Ok(strata_kernels::paged_attention(
                    q,
                    kv,
                    &d.positions,
                    &d.token_seq,
                    &d.block_tables,
                    tables,
                    heads.num_heads,
                    d.prefill.as_ref(),
                )?)
            }
        }
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&data[start..start + layout.shape().elem_count()]))
        }
        _ => Err(Error::Unsupported(
            "the host KV-cache layout is read on the CPU only".into(),
        )),
    }
}

/// Writes each token's rotated key and its value into the cache slot given by
/// `slot_mapping` (`block * BLOCK_SIZE + offset`).
pub fn write_kv(
    cache: &mut LayerKv,
    k: &[f32],
    v: &[f32],
    positions: &[u32],
    slot_mapping: &[u32],
    rope: &Rope,
    heads: Heads,
) {
    with_planes!(&mut cache.k, &mut cache.v, (kc, vc) => {
        write_kv_in(kc, vc, k, v, positions, slot_mapping, rope, heads)
    })
}

#[allow(clippy::too_many_arguments)]
fn write_kv_in<E: KvElem>(
    kc: &mut [E],
    vc: &mut [E],
    k: &[f32],
    v: &[f32],
    positions: &[u32],
    slot_mapping: &[u32],
    rope: &Rope,
    heads: Heads,
) {
    let (row, d) = (heads.num_kv_heads * heads.head_dim, heads.head_dim);
    let mut rotated = vec![0f32; d];
    for (t, (&pos, &slot)) in positions.iter().zip(slot_mapping).enumerate() {
        let dst = slot as usize * row;
        for g in 0..heads.num_kv_heads {
            let o = g * d;
            rope.apply(&k[t * row + o..t * row + o + d], pos as usize, &mut rotated);
            for (c, &x) in kc[dst + o..dst + o + d].iter_mut().zip(&rotated) {
                *c = E::put(x);
            }
        }
        for (c, &x) in vc[dst..dst + row]
            .iter_mut()
            .zip(&v[t * row..(t + 1) * row])
        {
            *c = E::put(x);
        }
    }
}

/// Causal attention for a flattened batch. `q` is `[tokens, num_heads *
/// head_dim]` before rope; token `t` belongs to sequence `token_seq[t]` and
/// attends to positions `0..=positions[t]` of that sequence through its block
/// table. The KV of every token in the batch must already be written.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    cache: &LayerKv,
    positions: &[u32],
    token_seq: &[u32],
    block_tables: &[&[u32]],
    rope: &Rope,
    heads: Heads,
    out: &mut [f32],
) {
    paged_attention_spans(
        q,
        cache,
        positions,
        token_seq,
        block_tables,
        rope,
        heads,
        SPAN_BLOCKS,
        None,
        out,
    )
}

/// Cache blocks per span: a query attends to the cache a span (1,024
/// positions) at a time, each span a work item of its own, and the spans'
/// softmax states are merged in order. One long sequence then keeps every
/// thread busy, and how a query's sums go depends on its position alone,
/// never on the batch around it.
const SPAN_BLOCKS: usize = 64;

/// [`paged_attention`] with spans of `span_blocks` blocks, and work items
/// of `kv_per_item` KV heads each (`None`: as the batch's size suggests).
/// A query's bits depend on neither choice of items.
#[allow(clippy::too_many_arguments)]
fn paged_attention_spans(
    q: &[f32],
    cache: &LayerKv,
    positions: &[u32],
    token_seq: &[u32],
    block_tables: &[&[u32]],
    rope: &Rope,
    heads: Heads,
    span_blocks: usize,
    kv_per_item: Option<usize>,
    out: &mut [f32],
) {
    with_planes!(&cache.k, &cache.v, (k, v) => paged_attention_in(
        q,
        k,
        v,
        positions,
        token_seq,
        block_tables,
        rope,
        heads,
        span_blocks,
        kv_per_item,
        out,
    ))
}

#[allow(clippy::too_many_arguments)]
fn paged_attention_in<E: KvElem>(
    q: &[f32],
    kc: &[E],
    vc: &[E],
    positions: &[u32],
    token_seq: &[u32],
    block_tables: &[&[u32]],
    rope: &Rope,
    heads: Heads,
    span_blocks: usize,
    kv_per_item: Option<usize>,
    out: &mut [f32],
) {
    let d = heads.head_dim;
    let kv_heads = heads.num_kv_heads;
    let group = heads.num_heads / kv_heads;
    let kv_row = kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let simd = crate::quant::has_avx2();
    // Tiles: up to `TILE_TOKENS` consecutive tokens of one sequence, whose
    // queries attend together, reading each cache row once for all of them.
    const TILE_TOKENS: usize = 8;
    let mut tiles = Vec::new();
    let mut start = 0;
    for t in 1..=positions.len() {
        let run_ends = t == positions.len()
            || token_seq[t] != token_seq[start]
            || positions[t] != positions[t - 1] + 1
            || t - start == TILE_TOKENS;
        if run_ends {
            tiles.push(start..t);
            start = t;
        }
    }
    let span_tokens = span_blocks * BLOCK_SIZE;
    // A tile's positions rise, so its last sees the most spans.
    let spans = |tile: &std::ops::Range<usize>| positions[tile.end - 1] as usize / span_tokens + 1;
    // Work items: a tile × some of its KV heads × one span of the cache.
    // Every KV head of a tile in one item reads whole cache rows, each
    // block's rows staying in L1 for all the heads: a head alone reads a
    // third of each row of SmolLM2's cache, and memory delivers the whole
    // row anyway. Items split by KV head only when there are too few tiles
    // and spans to keep the threads busy.
    let per = kv_per_item.unwrap_or_else(|| {
        let items: usize = tiles.iter().map(spans).sum();
        if items >= 2 * rayon::current_num_threads() {
            kv_heads
        } else {
            1
        }
    });
    let items: Vec<_> = tiles
        .iter()
        .enumerate()
        .flat_map(|(i, tile)| {
            (0..spans(tile)).flat_map(move |s| {
                (0..kv_heads)
                    .step_by(per)
                    .map(move |g| (i, g..(g + per).min(kv_heads), s))
            })
        })
        .collect();
    // Tiles over several spans park each (KV head, span)'s softmax state
    // here: `[queries, d]` unnormalized outputs, then `[queries]` maxima
    // and sums; KV head `g`'s span `s` at `parked[tile] + (g * spans + s)
    // * state`.
    let state = |tile: &std::ops::Range<usize>| tile.len() * group * (d + 2);
    let mut parked = Vec::with_capacity(tiles.len());
    let mut total = 0;
    for tile in &tiles {
        parked.push((spans(tile) > 1).then_some(total));
        if spans(tile) > 1 {
            total += kv_heads * spans(tile) * state(tile);
        }
    }
    let mut partials = vec![0f32; total];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let part_ptr = SendPtr(partials.as_mut_ptr());
    items.par_iter().for_each_init(
        || -> Vec<Tile> {
            (0..per)
                .map(|_| Tile::new(TILE_TOKENS * group, d, d))
                .collect()
        },
        |scratch, (i, kvs, span)| {
            let tokens = &tiles[*i];
            let table = block_tables[token_seq[tokens.start] as usize];
            let head = |n: usize| {
                let g = kvs.start + n;
                KvHead {
                    k: kc,
                    v: vc,
                    table,
                    k_offset: g * d,
                    v_offset: g * d,
                    k_row: kv_row,
                    v_row: kv_row,
                }
            };
            let scratch = &mut scratch[..kvs.len()];
            for (tile, g) in scratch.iter_mut().zip(kvs.clone()) {
                tile.clear();
                for t in tokens.clone() {
                    let pos = positions[t] as usize;
                    for h in g * group..(g + 1) * group {
                        let i = t * heads.num_heads + h;
                        let qr = tile.push(pos);
                        rope.apply(&q[i * d..(i + 1) * d], pos, qr);
                        qr.iter_mut().for_each(|x| *x *= scale);
                    }
                }
            }
            let blocks = span * span_blocks..(span + 1) * span_blocks;
            attend_tiles_on(simd, scratch, head, blocks);
            for (tile, g) in scratch.iter_mut().zip(kvs.clone()) {
                if let Some(at) = parked[*i] {
                    let n = tile.pos.len();
                    let dst = at + (g * spans(tokens) + span) * state(tokens);
                    // SAFETY: item (tile, KV heads, span) alone writes this state.
                    unsafe {
                        let p = part_ptr.at(dst);
                        std::ptr::copy_nonoverlapping(tile.out.as_ptr(), p, n * d);
                        std::ptr::copy_nonoverlapping(tile.max.as_ptr(), p.add(n * d), n);
                        std::ptr::copy_nonoverlapping(tile.sum.as_ptr(), p.add(n * d + n), n);
                    }
                    continue;
                }
                normalize(&mut tile.out, &tile.sum, d);
                // The tile's outputs: per token, its heads side by side.
                let w = group * d;
                for (n, t) in tokens.clone().enumerate() {
                    let dst = (t * heads.num_heads + g * group) * d;
                    let src = &tile.out[n * w..(n + 1) * w];
                    // SAFETY: item (tile, KV heads) alone writes these heads of these tokens.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out_ptr.at(dst), w) };
                }
            }
        },
    );
    if total == 0 {
        return;
    }
    // Merge the spans of each parked (tile, KV head), in span order.
    let merges: Vec<(usize, usize)> = (0..tiles.len())
        .filter(|&i| parked[i].is_some())
        .flat_map(|i| (0..kv_heads).map(move |g| (i, g)))
        .collect();
    merges.par_iter().for_each(|&(i, g)| {
        let tokens = &tiles[i];
        let size = state(tokens);
        let at = parked[i].expect("parked") + g * spans(tokens) * size;
        let n = tokens.len() * group;
        let states: Vec<&[f32]> = (0..spans(tokens))
            .map(|s| &partials[at + s * size..at + (s + 1) * size])
            .collect();
        let mut merged = vec![0f32; n * d];
        let mut sums = vec![0f32; n];
        for i in 0..n {
            let max = |s: &[f32]| s[n * d + i];
            let top = states
                .iter()
                .map(|s| max(s))
                .fold(f32::NEG_INFINITY, f32::max);
            for s in &states {
                let sum = s[n * d + n + i];
                if sum == 0.0 {
                    continue; // a span this query does not reach
                }
                let c = fast_exp(max(s) - top);
                sums[i] += sum * c;
                for (a, x) in merged[i * d..(i + 1) * d].iter_mut().zip(&s[i * d..]) {
                    *a += x * c;
                }
            }
        }
        normalize(&mut merged, &sums, d);
        let w = group * d;
        for (k, t) in tokens.clone().enumerate() {
            let dst = (t * heads.num_heads + g * group) * d;
            // SAFETY: this (tile, KV head) alone writes these heads of these tokens.
            unsafe { std::ptr::copy_nonoverlapping(merged[k * w..].as_ptr(), out_ptr.at(dst), w) };
        }
    });
}

/// Divides each query's weighted values by its softmax sum.
fn normalize(out: &mut [f32], sum: &[f32], d: usize) {
    for (row, s) in out.chunks_mut(d).zip(sum) {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|a| *a *= inv);
    }
}

struct SendPtr(*mut f32);
// SAFETY: work items write disjoint parts of the output through it.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `i` is inside the buffer, and no one else writes where this is used.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// The queries of one work item and their running softmax state.
struct Tile {
    /// Width of a query and key, and of a value and output.
    d: usize,
    dv: usize,
    /// `[queries, d]`: rotated, scaled queries.
    q: Vec<f32>,
    pos: Vec<usize>,
    /// `[queries, dv]`: each query's weighted sum of values.
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    /// `[queries, BLOCK_SIZE]`: one cache block's scores.
    scores: Vec<[f32; BLOCK_SIZE]>,
    /// One block's keys `[BLOCK_SIZE, d]` and values `[BLOCK_SIZE, dv]` in
    /// f32, for the vector kernel.
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl Tile {
    fn new(capacity: usize, d: usize, dv: usize) -> Self {
        Self {
            d,
            dv,
            q: Vec::with_capacity(capacity * d),
            pos: Vec::with_capacity(capacity),
            out: Vec::with_capacity(capacity * dv),
            max: Vec::with_capacity(capacity),
            sum: Vec::with_capacity(capacity),
            scores: Vec::with_capacity(capacity),
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.q.clear();
        self.pos.clear();
    }

    /// Empties the softmax state of the tile's queries for a pass.
    fn start(&mut self) {
        let n = self.pos.len();
        self.out.clear();
        self.out.resize(n * self.dv, 0.0);
        self.max.clear();
        self.max.resize(n, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(n, 0.0);
        self.scores.resize(n, [0.0; BLOCK_SIZE]);
    }

    /// Adds a query at `pos`; returns its row to fill.
    fn push(&mut self, pos: usize) -> &mut [f32] {
        self.pos.push(pos);
        let at = self.q.len();
        self.q.resize(at + self.d, 0.0);
        &mut self.q[at..]
    }
}

/// [`attend_tile`] for each of `tiles`, tile `n` over the KV head
/// `head(n)`, all of them over the same tokens. Where the CPU has AVX2 and
/// FMA (`simd`) and the widths are whole vectors, [`attend_tiles_fma`]
/// takes them a cache block at a time.
fn attend_tiles_on<'a, E: KvElem>(
    simd: bool,
    tiles: &mut [Tile],
    head: impl Fn(usize) -> KvHead<'a, E>,
    blocks: std::ops::Range<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the caller checked that the CPU has AVX2 and FMA.
        unsafe {
            if tiles[0].d.is_multiple_of(8) && tiles[0].dv.is_multiple_of(8) {
                return attend_tiles_fma(tiles, head, blocks);
            }
            for (n, tile) in tiles.iter_mut().enumerate() {
                attend_tile_avx2(tile, &head(n), blocks.clone());
            }
            return;
        }
    }
    let _ = simd;
    for (n, tile) in tiles.iter_mut().enumerate() {
        attend_tile(tile, &head(n), blocks.clone());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_tile_avx2<E: KvElem>(
    tile: &mut Tile,
    head: &KvHead<E>,
    blocks: std::ops::Range<usize>,
) {
    // The same code, compiled with 8-wide vectors.
    attend_tile(tile, head, blocks)
}

/// Online-softmax attention of all of a tile's queries over the cache
/// blocks `blocks` (of the table): each key and value row is read once for
/// every query that sees it, and each query goes through the operations it
/// would go through alone, so its state does not depend on the tile it
/// falls in. Leaves each query's unnormalized output, running max and sum
/// (0 for a query that sees none of the blocks) in the tile.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // rows `j` index every query's scores
fn attend_tile<E: KvElem>(tile: &mut Tile, head: &KvHead<E>, blocks: std::ops::Range<usize>) {
    tile.start();
    let (d, dv, n) = (tile.d, tile.dv, tile.pos.len());
    let Tile {
        q,
        pos,
        out,
        max,
        sum,
        scores,
        ..
    } = tile;
    for block in cache_blocks(pos, head, blocks) {
        let CacheBlock {
            rows,
            k_base,
            v_base,
            ..
        } = block;
        let seen = |i: usize| block.seen(pos[i]);
        for j in 0..rows {
            let off = k_base + j * head.k_row;
            let k = &head.k[off..off + d];
            for i in 0..n {
                if j < seen(i) {
                    scores[i][j] = dot(&q[i * d..(i + 1) * d], k);
                }
            }
        }
        for i in 0..n {
            let cnt = seen(i);
            if cnt > 0 {
                let o = &mut out[i * dv..(i + 1) * dv];
                softmax_block(&mut scores[i][..cnt], &mut max[i], &mut sum[i], o);
            }
        }
        for j in 0..rows {
            let off = v_base + j * head.v_row;
            let v = &head.v[off..off + dv];
            for i in 0..n {
                if j < seen(i) {
                    let w = scores[i][j];
                    for (a, x) in out[i * dv..(i + 1) * dv].iter_mut().zip(v) {
                        *a += w * x.get();
                    }
                }
            }
        }
    }
}

/// One cache block of a tile's pass: its first position, how many of its
/// rows the tile's latest query sees, and where its rows start in each
/// plane.
#[derive(Clone, Copy)]
struct CacheBlock {
    first: usize,
    rows: usize,
    k_base: usize,
    v_base: usize,
}

impl CacheBlock {
    /// How many of the block's positions a query at `pos` sees (0: none).
    fn seen(&self, pos: usize) -> usize {
        (pos + 1).saturating_sub(self.first).min(BLOCK_SIZE)
    }
}

/// The blocks of `blocks` (of the table) that some query at `pos` reaches.
fn cache_blocks<'a, E>(
    pos: &[usize],
    head: &'a KvHead<E>,
    blocks: std::ops::Range<usize>,
) -> impl Iterator<Item = CacheBlock> + 'a {
    let (last, reached) = reached(pos, blocks);
    reached.map(move |b| head.block(b, last))
}

/// The last of the positions `pos`, and the blocks of `blocks` (of the
/// table) a query at it reaches.
fn reached(pos: &[usize], blocks: std::ops::Range<usize>) -> (usize, std::ops::Range<usize>) {
    let last = pos.iter().copied().max().unwrap_or(0);
    (last, blocks.start..blocks.end.min(last / BLOCK_SIZE + 1))
}

/// One query's online-softmax step over a block's scores `s`: rescales its
/// output and sum when the block raises its max, then turns `s` into
/// weights and adds them to the sum. The max, the exponentials and the sum
/// all vectorise: the max and the sum go through eight lanes, then a fixed
/// tree (one running scalar each would be a chain of 16 dependent
/// instructions a block, as long as the block's products). Every path calls
/// this, so a query's bits do not depend on the path.
#[inline(always)]
fn softmax_block(s: &mut [f32], max: &mut f32, sum: &mut f32, out: &mut [f32]) {
    let block_max = across_8(s, f32::NEG_INFINITY, |a, x| if x > a { x } else { a });
    if block_max > *max {
        let c = fast_exp(*max - block_max);
        *sum *= c;
        out.iter_mut().for_each(|a| *a *= c);
        *max = block_max;
    }
    let m = *max;
    s.iter_mut().for_each(|x| *x = fast_exp(*x - m));
    *sum += across_8(s, 0.0, |a, x| a + x);
}

/// `xs` folded by `f` in eight lanes (element `i` into lane `i % 8`, each
/// lane from `init`), the lanes then combined pairwise: 0+4, 2+6, 1+5, 3+7,
/// and so on. The order is fixed, so the result does not depend on how the
/// compiler vectorises it.
#[inline(always)]
fn across_8(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] = f(lanes[l], c[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        lanes[l] = f(lanes[l], x);
    }
    let q: [f32; 4] = std::array::from_fn(|l| f(lanes[l], lanes[l + 4]));
    f(f(q[0], q[2]), f(q[1], q[3]))
}

/// [`attend_tile`] in AVX2 and FMA intrinsics for each of `tiles` (tile
/// `n` over KV head `head(n)`, all over the same tokens), for widths that
/// are whole 8-float vectors, a cache block at a time for all the tiles: a
/// block's rows, every KV head's part of them, are then read together. Each
/// block's keys and values are widened to f32 once for all of a tile's
/// queries (a small tile reads them in place). A query's scores come eight
/// rows at a time: eight running vectors of products, summed across in one
/// shuffle tree, with no horizontal sum per row. Its output stays in
/// registers while the block's weighted values are added in row order. With
/// AVX-512's registers, the query heads of one token (up to three) go
/// together, each loaded row serving them all: a 512-token prefill chunk's
/// attention took 10% less time than a query at a time. A query still goes
/// through the same operations in any tile or group, so its bits depend on
/// its position alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_tiles_fma<'a, E: KvElem>(
    tiles: &mut [Tile],
    head: impl Fn(usize) -> KvHead<'a, E>,
    blocks: std::ops::Range<usize>,
) {
    // A small tile (a decode: one token's queries of a KV head) reads the
    // cache rows where they are: widening each block to f32 first would
    // cost more than its few queries' products. A bigger one widens each
    // block once and runs the same kernels over the widened rows. Both
    // ways give the same bits. The kernels hold three queries' sums in
    // registers, which takes AVX-512's 32; with AVX2's 16, a query at a
    // time.
    let grouped = avx512vl();
    let direct = tiles[0].pos.len() <= 6 && grouped;
    for tile in tiles.iter_mut() {
        tile.start();
        // Rows past a block's last position are scored too, and ignored.
        tile.keys.resize(BLOCK_SIZE * tile.d, 0.0);
        tile.values.resize(BLOCK_SIZE * tile.dv, 0.0);
    }
    let (last, reached) = reached(&tiles[0].pos, blocks);
    let end = reached.end;
    for b in reached {
        for (n, tile) in tiles.iter_mut().enumerate() {
            let head = head(n);
            if direct && b + 1 < end {
                prefetch_rows(&head, &head.block(b + 1, last), tile.d, tile.dv);
            }
            attend_block_fma(tile, &head, head.block(b, last), direct, grouped);
        }
    }
}

/// One cache block of [`attend_tiles_fma`] for one tile: in place
/// (`direct`) or widened first, and with `grouped` (AVX-512) kernels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // rows `j` index every query's scores
unsafe fn attend_block_fma<E: KvElem>(
    tile: &mut Tile,
    head: &KvHead<E>,
    block: CacheBlock,
    direct: bool,
    grouped: bool,
) {
    let (d, dv, n) = (tile.d, tile.dv, tile.pos.len());
    let Tile {
        q,
        pos,
        out,
        max,
        sum,
        scores,
        keys,
        values,
        ..
    } = tile;
    let CacheBlock {
        rows,
        k_base,
        v_base,
        ..
    } = block;
    let seen = |i: usize| block.seen(pos[i]);
    let state = QueryState {
        q: &q[..],
        pos: &pos[..],
        out: &mut out[..],
        max: &mut max[..],
        sum: &mut sum[..],
        scores: &mut scores[..],
        d,
        dv,
    };
    if direct {
        let at = DirectBlock {
            k: head.k[k_base..].as_ptr(),
            v: head.v[v_base..].as_ptr(),
            k_row: head.k_row,
            v_row: head.v_row,
            block,
        };
        return attend_block_grouped(at, state);
    }
    for j in 0..rows {
        let k = &head.k[k_base + j * head.k_row..][..d];
        for (w, x) in keys[j * d..(j + 1) * d].iter_mut().zip(k) {
            *w = x.get();
        }
        let v = &head.v[v_base + j * head.v_row..][..dv];
        for (w, x) in values[j * dv..(j + 1) * dv].iter_mut().zip(v) {
            *w = x.get();
        }
    }
    if grouped {
        let at = DirectBlock {
            k: keys.as_ptr(),
            v: values.as_ptr(),
            k_row: d,
            v_row: dv,
            block,
        };
        return attend_block_grouped(at, state);
    }
    for i in 0..n {
        let qi = q[i * d..].as_ptr();
        for g in (0..seen(i)).step_by(8) {
            let s = dot_8_rows(qi, keys[g * d..].as_ptr(), d);
            _mm256_storeu_ps(scores[i][g..].as_mut_ptr(), s);
        }
    }
    for i in 0..n {
        let cnt = seen(i);
        if cnt == 0 {
            continue;
        }
        let s = &mut scores[i][..cnt];
        softmax_block(s, &mut max[i], &mut sum[i], &mut out[i * dv..(i + 1) * dv]);
        let o = out[i * dv..(i + 1) * dv].as_mut_ptr();
        let mut c = 0;
        while c + 64 <= dv {
            add_weighted_rows::<8>(o.add(c), s, values[c..].as_ptr(), dv);
            c += 64;
        }
        while c < dv {
            add_weighted_rows::<1>(o.add(c), s, values[c..].as_ptr(), dv);
            c += 8;
        }
    }
}

/// Asks for `block`'s rows of this head while the current block computes.
/// A decode reads each row once, and a sequence's blocks lie anywhere in
/// the cache: the hardware prefetcher follows the rows within a block but
/// not the jump to the next, so without this each block started with
/// misses to memory. `attention_bench`, medians of seven alternating runs,
/// ms a layer: 16 streams at 512 positions 0.943 → 0.792, 64 streams at
/// 128 0.912 → 0.846. Where one layer's cache stays in the CPU's caches
/// (one stream at 1,024 positions, a layer timed alone) the prefetches are
/// extra loads: 0.041 → 0.050; through the server one stream's decode did
/// not move and 16 streams went 658 → 838 tok/s (medians of four
/// alternating runs).
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_rows<E>(head: &KvHead<E>, block: &CacheBlock, d: usize, dv: usize) {
    let size = std::mem::size_of::<E>();
    for j in 0..block.rows {
        let k = head.k.as_ptr().wrapping_add(block.k_base + j * head.k_row);
        let v = head.v.as_ptr().wrapping_add(block.v_base + j * head.v_row);
        for (row, bytes) in [(k as usize, d * size), (v as usize, dv * size)] {
            // Each line the row touches, once: a second prefetch of a line
            // costs as much as the first and brings nothing.
            for line in (row & !63..=(row + bytes - 1) & !63).step_by(64) {
                // SAFETY: a prefetch reads nothing and cannot fault.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            }
        }
    }
}

/// One block for every query of a tile, up to three queries of one
/// position at a time (they see the same rows), each row widened once in a
/// register for them all.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn attend_block_grouped<E: KvElem>(at: DirectBlock<E>, mut s: QueryState<'_>) {
    let n = s.pos.len();
    let mut i = 0;
    while i < n {
        let mut group = 1;
        while group < 3 && i + group < n && s.pos[i + group] == s.pos[i] {
            group += 1;
        }
        let rows = at.block.seen(s.pos[i]);
        if rows > 0 {
            match group {
                1 => attend_block_direct::<E, 1>(at, rows, &mut s, i),
                2 => attend_block_direct::<E, 2>(at, rows, &mut s, i),
                _ => attend_block_direct::<E, 3>(at, rows, &mut s, i),
            }
        }
        i += group;
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
fn avx512vl() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
}

/// Where a block's rows start, in the cache or widened, for the direct
/// kernels.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct DirectBlock<E> {
    k: *const E,
    v: *const E,
    k_row: usize,
    v_row: usize,
    block: CacheBlock,
}

/// The tile's per-query state, for the direct kernels.
#[cfg(target_arch = "x86_64")]
struct QueryState<'a> {
    q: &'a [f32],
    pos: &'a [usize],
    out: &'a mut [f32],
    max: &'a mut [f32],
    sum: &'a mut [f32],
    scores: &'a mut [[f32; BLOCK_SIZE]],
    d: usize,
    dv: usize,
}

/// One block's first `rows` rows for queries `i..i + Q` of one position:
/// the scores as [`dot_8_rows`] makes them, the softmax step, and the
/// weighted values as [`add_weighted_rows`] adds them, so each query's bits
/// are those of the one-query path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn attend_block_direct<E: KvElem, const Q: usize>(
    at: DirectBlock<E>,
    rows: usize,
    s: &mut QueryState<'_>,
    i: usize,
) {
    let (d, dv) = (s.d, s.dv);
    let qs: [*const f32; Q] = std::array::from_fn(|j| s.q[(i + j) * d..].as_ptr());
    for g in (0..rows).step_by(8) {
        let dots = dot_8_rows_direct::<E, Q>(qs, at.k.add(g * at.k_row), at.k_row, d);
        for (j, v) in dots.into_iter().enumerate() {
            _mm256_storeu_ps(s.scores[i + j][g..].as_mut_ptr(), v);
        }
    }
    for j in i..i + Q {
        let o = &mut s.out[j * dv..(j + 1) * dv];
        softmax_block(&mut s.scores[j][..rows], &mut s.max[j], &mut s.sum[j], o);
    }
    let w: [&[f32]; Q] = std::array::from_fn(|j| &s.scores[i + j][..rows]);
    let base = s.out.as_mut_ptr();
    let mut c = 0;
    while c + 64 <= dv {
        let o = std::array::from_fn(|j| base.add((i + j) * dv + c));
        add_weighted_rows_direct::<E, Q, 8>(o, w, at.v.add(c), at.v_row);
        c += 64;
    }
    while c < dv {
        let o = std::array::from_fn(|j| base.add((i + j) * dv + c));
        add_weighted_rows_direct::<E, Q, 1>(o, w, at.v.add(c), at.v_row);
        c += 8;
    }
}

/// [`dot_8_rows`] for `Q` queries, with rows `stride` values apart in the
/// cache: each row's 8 values are widened once for every query.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
#[inline]
unsafe fn dot_8_rows_direct<E: KvElem, const Q: usize>(
    q: [*const f32; Q],
    k: *const E,
    stride: usize,
    d: usize,
) -> [__m256; Q] {
    let mut acc = [[_mm256_setzero_ps(); 8]; Q];
    for c in (0..d).step_by(8) {
        for r in 0..8 {
            let row = E::load8(k.add(r * stride + c));
            for (a, q) in acc.iter_mut().zip(&q) {
                a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), row, a[r]);
            }
        }
    }
    acc.map(|a| sum_8_rows(a))
}

/// [`add_weighted_rows`] for `Q` queries, with value rows `stride` values
/// apart in the cache, each widened once for every query.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
#[inline]
unsafe fn add_weighted_rows_direct<E: KvElem, const Q: usize, const L: usize>(
    out: [*mut f32; Q],
    w: [&[f32]; Q],
    v: *const E,
    stride: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); L]; Q];
    for (a, o) in acc.iter_mut().zip(&out) {
        for (l, a) in a.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(o.add(8 * l));
        }
    }
    for j in 0..w[0].len() {
        let row = v.add(j * stride);
        for l in 0..L {
            let x = E::load8(row.add(8 * l));
            for (a, w) in acc.iter_mut().zip(&w) {
                a[l] = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), x, a[l]);
            }
        }
    }
    for (a, o) in acc.iter().zip(&out) {
        for (l, a) in a.iter().enumerate() {
            _mm256_storeu_ps(o.add(8 * l), *a);
        }
    }
}

/// The dot products of `q` with 8 consecutive rows of `d` floats at `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_8_rows(q: *const f32, k: *const f32, d: usize) -> __m256 {
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        let x = _mm256_loadu_ps(q.add(c));
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(k.add(r * d + c)), *a);
        }
    }
    sum_8_rows(acc)
}

/// Each of 8 vectors summed across, as one vector: pairs, quads, then the
/// two halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sum_8_rows(acc: [__m256; 8]) -> __m256 {
    let p01 = _mm256_hadd_ps(acc[0], acc[1]);
    let p23 = _mm256_hadd_ps(acc[2], acc[3]);
    let p45 = _mm256_hadd_ps(acc[4], acc[5]);
    let p67 = _mm256_hadd_ps(acc[6], acc[7]);
    let q0123 = _mm256_hadd_ps(p01, p23);
    let q4567 = _mm256_hadd_ps(p45, p67);
    let lo = _mm256_permute2f128_ps(q0123, q4567, 0x20);
    let hi = _mm256_permute2f128_ps(q0123, q4567, 0x31);
    _mm256_add_ps(lo, hi)
}

/// `out[..8·L] += Σ_j w[j] · v[j][..8·L]`, rows `stride` floats apart, in
/// row order, the `L` vectors of the output held in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn add_weighted_rows<const L: usize>(
    out: *mut f32,
    w: &[f32],
    v: *const f32,
    stride: usize,
) {
    let mut acc = [_mm256_setzero_ps(); L];
    for (l, a) in acc.iter_mut().enumerate() {
        *a = _mm256_loadu_ps(out.add(8 * l));
    }
    for (j, &wj) in w.iter().enumerate() {
        let x = _mm256_set1_ps(wj);
        let row = v.add(j * stride);
        for (l, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(row.add(8 * l)), *a);
        }
    }
    for (l, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(8 * l), *a);
    }
}

/// Writes each token's latent (`[tokens, rank]`) and its rotated rope key
/// (`[tokens, rope_dim]`, before rope) side by side into the slot given by
/// `slot_mapping`: the one cache row multi-head latent attention keeps.
pub fn write_latent(
    cache: &mut LayerKv,
    latent: &[f32],
    k_rope: &[f32],
    positions: &[u32],
    slot_mapping: &[u32],
    rope: &Rope,
) {
    with_plane!(&mut cache.k, c => {
        write_latent_in(c, latent, k_rope, positions, slot_mapping, rope)
    })
}

fn write_latent_in<E: KvElem>(
    cache: &mut [E],
    latent: &[f32],
    k_rope: &[f32],
    positions: &[u32],
    slot_mapping: &[u32],
    rope: &Rope,
) {
    let rope_dim = k_rope.len() / positions.len().max(1);
    let rank = latent.len() / positions.len().max(1);
    let row = rank + rope_dim;
    let mut rotated = vec![0f32; rope_dim];
    for (t, (&pos, &slot)) in positions.iter().zip(slot_mapping).enumerate() {
        let dst = &mut cache[slot as usize * row..(slot as usize + 1) * row];
        for (c, &x) in dst[..rank]
            .iter_mut()
            .zip(&latent[t * rank..(t + 1) * rank])
        {
            *c = E::put(x);
        }
        rope.apply(
            &k_rope[t * rope_dim..(t + 1) * rope_dim],
            pos as usize,
            &mut rotated,
        );
        for (c, &x) in dst[rank..].iter_mut().zip(&rotated) {
            *c = E::put(x);
        }
    }
}

/// Multi-head latent attention over the cache [`write_latent`] fills, in
/// its absorbed form: `q` is `[tokens, num_heads, rank + rope_dim]`, each
/// head's latent query (its no-rope query through `W_UK`) beside its
/// rotated rope query, already scaled. Every head attends to the same rows
/// (keys: the whole row; values: the latent). `out` is `[tokens, num_heads,
/// rank]`, still to go through `W_UV`.
#[allow(clippy::too_many_arguments)]
pub fn latent_attention(
    q: &[f32],
    cache: &LayerKv,
    positions: &[u32],
    token_seq: &[u32],
    block_tables: &[&[u32]],
    num_heads: usize,
    rank: usize,
    out: &mut [f32],
) {
    with_plane!(&cache.k, c => latent_attention_in(
        q,
        c,
        positions,
        token_seq,
        block_tables,
        num_heads,
        rank,
        out,
    ))
}

#[allow(clippy::too_many_arguments)]
fn latent_attention_in<E: KvElem>(
    q: &[f32],
    cache: &[E],
    positions: &[u32],
    token_seq: &[u32],
    block_tables: &[&[u32]],
    num_heads: usize,
    rank: usize,
    out: &mut [f32],
) {
    let row = q.len() / (positions.len() * num_heads).max(1);
    let simd = crate::quant::has_avx2();
    out.par_chunks_mut(rank)
        .enumerate()
        .with_min_len(2)
        .for_each_init(
            || Tile::new(1, row, rank),
            |tile, (i, acc)| {
                let t = i / num_heads;
                let head = KvHead {
                    k: cache,
                    v: cache,
                    table: block_tables[token_seq[t] as usize],
                    k_offset: 0,
                    v_offset: 0,
                    k_row: row,
                    v_row: row,
                };
                // One query, over every block up to its position.
                let pos = positions[t] as usize;
                tile.clear();
                tile.push(pos).copy_from_slice(&q[i * row..(i + 1) * row]);
                let tiles = std::slice::from_mut(tile);
                attend_tiles_on(simd, tiles, |_| head, 0..pos / BLOCK_SIZE + 1);
                normalize(&mut tile.out, &tile.sum, rank);
                acc.copy_from_slice(&tile.out);
            },
        );
}

/// One KV head of one sequence, read through its block table: keys and
/// values at an offset inside the rows of their planes.
#[derive(Clone, Copy)]
struct KvHead<'a, E> {
    k: &'a [E],
    v: &'a [E],
    table: &'a [u32],
    /// Where this head's key and value start inside a cache row.
    k_offset: usize,
    v_offset: usize,
    /// Floats per cache row of each plane (every KV head of one token).
    k_row: usize,
    v_row: usize,
}

impl<E> KvHead<'_, E> {
    /// Table entry `b`, for queries up to position `last`.
    fn block(&self, b: usize, last: usize) -> CacheBlock {
        let block = self.table[b] as usize;
        let first = b * BLOCK_SIZE;
        CacheBlock {
            first,
            rows: (last + 1 - first).min(BLOCK_SIZE),
            k_base: block * BLOCK_SIZE * self.k_row + self.k_offset,
            v_base: block * BLOCK_SIZE * self.v_row + self.v_offset,
        }
    }
}

#[inline(always)]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    // Eight independent lanes let the compiler vectorise the loop.
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i].get();
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y.get()).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::Fp8;
    use crate::kv_cache::Plane;

    /// Zeroed planes of `n` values, of each type the host cache keeps.
    fn f32_plane(n: usize) -> Plane {
        Plane::F32(vec![0.0; n])
    }
    fn bf16_plane(n: usize) -> Plane {
        Plane::Bf16(vec![half::bf16::ZERO; n])
    }
    fn fp8_plane(n: usize) -> Plane {
        Plane::Fp8(vec![Fp8(0); n])
    }

    fn rope(d: usize) -> Rope {
        let cfg = crate::rope::RopeConfig {
            dim: d,
            theta: 10_000.0,
            scaling: None,
            style: strata_types::RopeStyle::Half,
        };
        Rope::new(&cfg, None, 64)
    }

    /// Plain softmax attention over contiguous, already rotated K/V.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>]) -> Vec<f32> {
        let d = q.len();
        let s: Vec<f32> = k
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt())
            .collect();
        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..d)
            .map(|j| e.iter().zip(v).map(|(w, v)| w * v[j]).sum::<f32>() / z)
            .collect()
    }

    /// `paged_attention` over a cache of planes `plane(n)` against dense
    /// attention of the unrounded keys and values, to `tol`.
    fn check_paged_attention(plane: fn(usize) -> Plane, tol: f32) {
        let d = 8;
        let heads = Heads {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: d,
        };
        let r = rope(d);
        let n = 20; // spans two blocks
        let table = [3u32, 1]; // deliberately out of order
        let mut cache = LayerKv {
            k: plane(4 * BLOCK_SIZE * d),
            v: plane(4 * BLOCK_SIZE * d),
        };
        let val = |t: usize, j: usize, s: f32| ((t * 31 + j * 7) as f32 * s).sin();
        let k: Vec<f32> = (0..n * d).map(|i| val(i / d, i % d, 0.37)).collect();
        let v: Vec<f32> = (0..n * d).map(|i| val(i / d, i % d, 0.11)).collect();
        let positions: Vec<u32> = (0..n as u32).collect();
        let slots: Vec<u32> = positions
            .iter()
            .map(|&p| table[p as usize / BLOCK_SIZE] * BLOCK_SIZE as u32 + p % BLOCK_SIZE as u32)
            .collect();
        write_kv(&mut cache, &k, &v, &positions, &slots, &r, heads);
        // Query the last two positions, both heads.
        let q: Vec<f32> = (0..2 * 2 * d).map(|i| val(i, 3, 0.53)).collect();
        let qpos = [18u32, 19];
        // Over the cache whole, and a block (a span) at a time, merged.
        for span_blocks in [SPAN_BLOCKS, 1] {
            let mut out = vec![0.0; q.len()];
            let tables = [&table[..]];
            paged_attention_spans(
                &q,
                &cache,
                &qpos,
                &[0, 0],
                &tables,
                &r,
                heads,
                span_blocks,
                None,
                &mut out,
            );
            check_against_dense(&q, &k, &v, &qpos, &out, &r, d, tol);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_against_dense(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        qpos: &[u32],
        out: &[f32],
        r: &Rope,
        d: usize,
        tol: f32,
    ) {
        for (t, &p) in qpos.iter().enumerate() {
            let rk: Vec<Vec<f32>> = (0..=p as usize)
                .map(|i| {
                    let mut o = vec![0.0; d];
                    r.apply(&k[i * d..(i + 1) * d], i, &mut o);
                    o
                })
                .collect();
            let rv: Vec<Vec<f32>> = (0..=p as usize)
                .map(|i| v[i * d..(i + 1) * d].to_vec())
                .collect();
            for h in 0..2 {
                let qi = &q[(t * 2 + h) * d..(t * 2 + h + 1) * d];
                let mut rq = vec![0.0; d];
                r.apply(qi, p as usize, &mut rq);
                let want = reference(&rq, &rk, &rv);
                let got = &out[(t * 2 + h) * d..(t * 2 + h + 1) * d];
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < tol, "{got:?} vs {want:?}");
                }
            }
        }
    }

    #[test]
    fn paged_attention_matches_dense_attention_across_scattered_blocks() {
        check_paged_attention(f32_plane, 1e-5);
    }

    #[test]
    fn a_bf16_cache_attends_within_bf16_rounding() {
        // bf16 keeps 8 bits of mantissa: keys and values are off by up to
        // 2^-9 relative, and the outputs (convex sums of values) with them.
        check_paged_attention(bf16_plane, 8e-3);
    }

    #[test]
    fn an_fp8_cache_attends_within_fp8_rounding() {
        // fp8 (e4m3) keeps 3 bits of mantissa: keys and values are off by
        // up to 2^-4 relative, and the outputs, weighted averages of many
        // values, by less.
        check_paged_attention(fp8_plane, 0.03);
    }

    #[test]
    fn the_vector_kernel_matches_the_plain_one() {
        if !crate::quant::has_avx2() {
            return; // only the plain kernel runs on this CPU
        }
        vector_kernel_matches_plain::<f32>();
        vector_kernel_matches_plain::<half::bf16>();
        vector_kernel_matches_plain::<Fp8>();
    }

    fn vector_kernel_matches_plain<E: KvElem>() {
        // Keys 16 wide, values 72 (one 64-float chunk and one 8-float
        // vector), over 2.5 blocks scattered in the cache; queries see
        // whole and partial blocks.
        let (d, dv) = (16, 72);
        let val = |i: usize, s: f32| ((i * 37 % 101) as f32 * s).sin();
        let k: Vec<E> = (0..4 * BLOCK_SIZE * d)
            .map(|i| E::put(val(i, 0.31)))
            .collect();
        let v: Vec<E> = (0..4 * BLOCK_SIZE * dv)
            .map(|i| E::put(val(i, 0.17)))
            .collect();
        let table = [2u32, 0, 3];
        let head = KvHead {
            k: &k[..],
            v: &v[..],
            table: &table,
            k_offset: 0,
            v_offset: 0,
            k_row: d,
            v_row: dv,
        };
        let run = |fma: bool| {
            let mut tile = Tile::new(5, d, dv);
            for (i, p) in [3usize, 15, 16, 30, 39].into_iter().enumerate() {
                let qr = tile.push(p);
                for (c, x) in qr.iter_mut().enumerate() {
                    *x = val(i * d + c, 0.71);
                }
            }
            if fma {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { attend_tiles_fma(std::slice::from_mut(&mut tile), |_| head, 0..3) };
            } else {
                attend_tile(&mut tile, &head, 0..3);
            }
            normalize(&mut tile.out, &tile.sum, dv);
            tile.out
        };
        let (plain, fma) = (run(false), run(true));
        for (i, (a, b)) in plain.iter().zip(&fma).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{i}: {a} against {b}"
            );
        }
    }

    #[test]
    fn a_query_attends_the_same_bits_alone_as_in_any_tile() {
        // Two sequences, three query heads per KV head: a prefill chunk of
        // eleven tokens (tiles of 8 and 3) beside one decoding token.
        // Widths of 16 and 80: the kernels' one-vector and 64-wide value
        // chunks. A token alone (three queries) reads the cache directly
        // where the CPU has AVX-512; tiles of 8 and 3 tokens widen it.
        for d in [16, 80] {
            for (name, plane) in [
                ("bf16", bf16_plane as fn(usize) -> Plane),
                ("fp8", fp8_plane),
            ] {
                same_bits_alone_as_in_any_tile(d, name, plane);
            }
        }
    }

    fn same_bits_alone_as_in_any_tile(d: usize, name: &str, plane: fn(usize) -> Plane) {
        let heads = Heads {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: d,
        };
        let r = rope(d);
        let row = heads.num_kv_heads * d;
        let tables: [&[u32]; 2] = [&[2, 0], &[1, 3]];
        let mut cache = LayerKv {
            k: plane(4 * BLOCK_SIZE * row),
            v: plane(4 * BLOCK_SIZE * row),
        };
        let val = |i: usize, s: f32| ((i * 37 % 101) as f32 * s).sin();
        // Sequence 0 holds positions 0..25, sequence 1 positions 0..20.
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for (seq, len) in [(0usize, 25u32), (1, 20)] {
            for p in 0..len {
                positions.push(p);
                let b = tables[seq][p as usize / BLOCK_SIZE];
                slots.push(b * BLOCK_SIZE as u32 + p % BLOCK_SIZE as u32);
            }
        }
        let n = positions.len();
        let k: Vec<f32> = (0..n * row).map(|i| val(i, 0.31)).collect();
        let v: Vec<f32> = (0..n * row).map(|i| val(i, 0.17)).collect();
        write_kv(&mut cache, &k, &v, &positions, &slots, &r, heads);
        // The step: sequence 0's positions 14..25, sequence 1's position 19.
        let qpos: Vec<u32> = (14..25).chain([19]).collect();
        let seqs: Vec<u32> = vec![0; 11].into_iter().chain([1]).collect();
        let width = heads.num_heads * d;
        let q: Vec<f32> = (0..qpos.len() * width).map(|i| val(i, 0.71)).collect();
        // Spans of one block, so tiles straddle them; work items of one KV
        // head each (a token alone: three queries of one head), and of both.
        for span_blocks in [SPAN_BLOCKS, 1] {
            for kv_per_item in [1, 2] {
                let mut together = vec![0.0; q.len()];
                paged_attention_spans(
                    &q,
                    &cache,
                    &qpos,
                    &seqs,
                    &tables,
                    &r,
                    heads,
                    span_blocks,
                    Some(kv_per_item),
                    &mut together,
                );
                for t in 0..qpos.len() {
                    let mut alone = vec![0.0; width];
                    paged_attention_spans(
                        &q[t * width..(t + 1) * width],
                        &cache,
                        &qpos[t..t + 1],
                        &[0],
                        &[tables[seqs[t] as usize]],
                        &r,
                        heads,
                        span_blocks,
                        Some(1),
                        &mut alone,
                    );
                    let got = &together[t * width..(t + 1) * width];
                    assert_eq!(
                        alone, got,
                        "{name}, d {d}, token {t}, spans of {span_blocks} blocks, \
                         {kv_per_item} KV heads an item"
                    );
                }
            }
        }
    }
}
