// Causal attention over the paged KV cache for a flattened batch: token t of
// sequence token_seq[t] attends to positions 0..=positions[t] through that
// sequence's block table (block_tables is [seqs, max_blocks]); `kv_cache` is
// one layer's [2, num_slots, kv_heads * head_dim], keys then values. Query heads
// share KV heads in groups (GQA). Query rows are q_stride elements apart (a
// column slice of the fused qkv output). The query is rotated here, as the CPU path
// does. Decode tokens and prefill tokens take the same path, so it serves
// both; long prefills are bounded by one pass over the context per token.
//
// Grid (heads, tokens), or (heads, rows) with a row list (`has_rows`: the
// rows prefill_attention.cu does not take); ATTN_WARPS warps per block. Each warp walks every
// ATTN_WARPS-th position with an online softmax (running max, sum and
// weighted values, lane j holding elements j, j+32, ...); the warps' states
// are merged at the end. No bound on the context length.
// CPU reference: strata_model::paged_attention.
#include "common.cuh"

// 16 warps: a decode step has one block per head and sequence, so at batch 1
// each block's warps are all the parallelism there is over the context.
#define ATTN_WARPS 16
#define MAX_HEAD_DIM 256
#define PER_LANE (MAX_HEAD_DIM / 32)

template <typename T>
__device__ void paged_attention(const T* __restrict__ q, int64_t q_stride,
                                const T* __restrict__ kv_cache, int64_t num_slots,
                                const uint32_t* __restrict__ positions,
                                const uint32_t* __restrict__ token_seq,
                                const uint32_t* __restrict__ block_tables, int max_blocks,
                                const float* __restrict__ cos, const float* __restrict__ sin,
                                T* __restrict__ out, int heads, int kv_heads, int head_dim,
                                int style, const uint32_t* __restrict__ rows, int has_rows) {
    __shared__ float qs[MAX_HEAD_DIM];
    __shared__ float warp_m[ATTN_WARPS], warp_s[ATTN_WARPS];
    __shared__ float warp_acc[ATTN_WARPS][MAX_HEAD_DIM];
    const int h = blockIdx.x;
    const int64_t t = has_rows ? rows[blockIdx.y] : blockIdx.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int half = head_dim / 2;
    const int64_t pos = positions[t];
    const float scale = rsqrtf((float)head_dim);

    // The rotated, scaled query.
    const T* qh = q + t * q_stride + (int64_t)h * head_dim;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        int ia, ib;
        pair_index(style, i, half, ia, ib);
        float a = to_f32(qh[ia]), b = to_f32(qh[ib]);
        rotate(a, b, cos[pos * half + i], sin[pos * half + i]);
        qs[ia] = a * scale;
        qs[ib] = b * scale;
    }
    __syncthreads();

    const int64_t kv_row = (int64_t)kv_heads * head_dim;
    const T* k_cache = kv_cache;
    const T* v_cache = kv_cache + num_slots * kv_row;
    const int64_t kv_off = (int64_t)(h / (heads / kv_heads)) * head_dim;
    const uint32_t* table = block_tables + (int64_t)token_seq[t] * max_blocks;
    float m = -INFINITY, s = 0.0f, acc[PER_LANE];
#pragma unroll
    for (int k = 0; k < PER_LANE; k++) acc[k] = 0.0f;
    for (int64_t p = warp; p <= pos; p += ATTN_WARPS) {
        const int64_t slot =
            (int64_t)table[p / STRATA_BLOCK_SIZE] * STRATA_BLOCK_SIZE + p % STRATA_BLOCK_SIZE;
        const T* kp = k_cache + slot * kv_row + kv_off;
        const T* vp = v_cache + slot * kv_row + kv_off;
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            const int e = lane + 32 * k;
            if (e < head_dim) dot += qs[e] * to_f32(kp[e]);
        }
        dot = warp_sum(dot);
        const float m_new = fmaxf(m, dot);
        const float keep = __expf(m - m_new), w = __expf(dot - m_new);
        s = s * keep + w;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            const int e = lane + 32 * k;
            if (e < head_dim) acc[k] = acc[k] * keep + w * to_f32(vp[e]);
        }
        m = m_new;
    }
    if (lane == 0) {
        warp_m[warp] = m;
        warp_s[warp] = s;
    }
#pragma unroll
    for (int k = 0; k < PER_LANE; k++) {
        const int e = lane + 32 * k;
        if (e < head_dim) warp_acc[warp][e] = acc[k];
    }
    __syncthreads();

    // Merge the warps' partial softmaxes (a warp that saw no position has
    // m = -inf and weighs nothing).
    float big = -INFINITY;
    for (int w = 0; w < ATTN_WARPS; w++) big = fmaxf(big, warp_m[w]);
    float total = 0.0f;
    for (int w = 0; w < ATTN_WARPS; w++) total += warp_s[w] * __expf(warp_m[w] - big);
    T* oh = out + (t * heads + h) * head_dim;
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) a += warp_acc[w][e] * __expf(warp_m[w] - big);
        oh[e] = from_f32<T>(a / total);
    }
}

#define INSTANTIATE(T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32) paged_attention_##NAME(        \
        const T* q, int64_t q_stride, const T* kv_cache, int64_t num_slots, const uint32_t* positions,               \
        const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks, const float* cos, \
        const float* sin, T* out, int heads, int kv_heads, int head_dim, int style,              \
        const uint32_t* rows, int has_rows) {                                                     \
        paged_attention<T>(q, q_stride, kv_cache, num_slots, positions, token_seq, block_tables, max_blocks,  \
                           cos, sin, out, heads, kv_heads, head_dim, style, rows, has_rows);     \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
