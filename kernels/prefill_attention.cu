// Causal attention over the paged KV cache for prefill chunks, on tensor
// cores (WMMA, 16x16x16, f32 accumulation); f16 and bf16 only, head_dim a
// multiple of 16 up to 128. paged_attention.cu reads the whole context once
// per query token and head; here 16 consecutive tokens of one sequence share
// each read, and the products run on tensor cores.
//
// Arguments: paged_attention.cu's leading ones, then the tiles. Grid
// (tiles, ceil(heads / PF_WARPS)); each warp takes one query head of one
// tile: `tiles` is [n, 2] (first token of the tile in the flattened batch,
// rows <= 16), every row of a tile from the same sequence, at consecutive
// positions. Key tiles are the sequence's cache blocks (16 positions each).
// Two passes over the keys: the first finds each row's softmax max and sum,
// the second adds exp(s - max) / sum times the values into accumulators that
// never need rescaling, so they stay in tensor-core fragments. The scores are
// computed twice; that is cheaper than moving the output through shared
// memory on every key tile.
//
// Rounding: the rotated, scaled query and the probabilities are rounded to
// the cache's dtype before their products (as FlashAttention does); sums are
// f32. CPU reference: strata_kernels::reference::paged_attention.
#include "common.cuh"
#include <mma.h>

// bf16 tensor-core fragments need sm_80 or newer; for an older
// CUDA_COMPUTE_CAP the kernels are empty and the launcher never uses them.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PF_TENSOR_CORES 1
#endif

#define PF_WARPS 4
#define PF_MAX_HEAD_DIM 128
#define PF_TILE 16
// Per warp: the query tile (T), scores (f32) and probabilities (T), later
// reused for the f32 output tile.
#define PF_WARP_BYTES (PF_TILE * PF_MAX_HEAD_DIM * 4)

using namespace nvcuda;

#ifdef PF_TENSOR_CORES
template <typename T>
__device__ void prefill_attention(const T* __restrict__ q, int64_t q_stride,
                                  const T* __restrict__ kv_cache, int64_t num_slots,
                                  const uint32_t* __restrict__ positions,
                                  const uint32_t* __restrict__ token_seq,
                                  const uint32_t* __restrict__ block_tables, int max_blocks,
                                  const float* __restrict__ cos, const float* __restrict__ sin,
                                  T* __restrict__ out, int heads, int kv_heads, int head_dim,
                                  int style, const uint32_t* __restrict__ tiles) {
    __shared__ __align__(128) unsigned char smem[PF_WARPS][PF_WARP_BYTES];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int h = blockIdx.y * PF_WARPS + warp;
    if (h >= heads) return;  // no block-wide barrier below
    const int64_t t0 = tiles[2 * blockIdx.x];
    const int n = (int)tiles[2 * blockIdx.x + 1];
    const int64_t p0 = positions[t0];
    const int d = head_dim, half = d / 2, ksteps = d / 16;
    const float scale = rsqrtf((float)d);

    T* q_s = reinterpret_cast<T*>(smem[warp]);                                  // [16, d]
    float* s_s = reinterpret_cast<float*>(smem[warp] + PF_TILE * PF_MAX_HEAD_DIM * 2);  // [16, 16]
    T* p_s = reinterpret_cast<T*>(smem[warp] + PF_TILE * PF_MAX_HEAD_DIM * 2 +
                                  PF_TILE * PF_TILE * 4);                          // [16, 16]
    float* o_s = reinterpret_cast<float*>(smem[warp]);                          // [16, d], at the end

    // The rotated, scaled queries; rows past the tile are zero.
    for (int idx = lane; idx < PF_TILE * half; idx += 32) {
        const int r = idx / half, i = idx % half;
        int ia, ib;
        pair_index(style, i, half, ia, ib);
        float a = 0.0f, b = 0.0f;
        if (r < n) {
            const T* qh = q + (t0 + r) * q_stride + (int64_t)h * d;
            const int64_t pos = p0 + r;
            a = to_f32(qh[ia]);
            b = to_f32(qh[ib]);
            rotate(a, b, cos[pos * half + i], sin[pos * half + i]);
        }
        q_s[r * d + ia] = from_f32<T>(a * scale);
        q_s[r * d + ib] = from_f32<T>(b * scale);
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa[PF_MAX_HEAD_DIM / 16];
#pragma unroll
    for (int k = 0; k < PF_MAX_HEAD_DIM / 16; k++)
        if (k < ksteps) wmma::load_matrix_sync(qa[k], q_s + k * 16, d);

    const int64_t kv_row = (int64_t)kv_heads * d;
    const int64_t kv_off = (int64_t)(h / (heads / kv_heads)) * d;
    const T* k_cache = kv_cache + kv_off;
    const T* v_cache = kv_cache + num_slots * kv_row + kv_off;
    const uint32_t* table = block_tables + (int64_t)token_seq[t0] * max_blocks;
    const int key_blocks = (int)((p0 + n - 1) / STRATA_BLOCK_SIZE) + 1;
    // Softmax state: two lanes per row, eight columns each. Padding rows
    // attend as the first row does, so every row has a key.
    const int row = lane / 2, col0 = (lane % 2) * 8;
    const int64_t last = p0 + (row < n ? row : 0);

    // S = Q K^T for key block j into s_s.
    auto scores = [&](int j) {
        const T* kp = k_cache + (int64_t)table[j] * STRATA_BLOCK_SIZE * kv_row;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
        wmma::fill_fragment(s, 0.0f);
#pragma unroll
        for (int k = 0; k < PF_MAX_HEAD_DIM / 16; k++) {
            if (k < ksteps) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;
                wmma::load_matrix_sync(kb, kp + k * 16, (unsigned)kv_row);
                wmma::mma_sync(s, qa[k], kb, s);
            }
        }
        __syncwarp();
        wmma::store_matrix_sync(s_s, s, 16, wmma::mem_row_major);
        __syncwarp();
    };

    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < key_blocks; j++) {
        scores(j);
        float mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < 8; c++)
            if ((int64_t)j * STRATA_BLOCK_SIZE + col0 + c <= last)
                mx = fmaxf(mx, s_s[row * 16 + col0 + c]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        const float m_new = fmaxf(m, mx);
        float sum = 0.0f;
        if (m_new > -INFINITY) {
#pragma unroll
            for (int c = 0; c < 8; c++)
                if ((int64_t)j * STRATA_BLOCK_SIZE + col0 + c <= last)
                    sum += __expf(s_s[row * 16 + col0 + c] - m_new);
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        l = (m > -INFINITY ? l * __expf(m - m_new) : 0.0f) + sum;
        m = m_new;
    }
    const float inv_l = 1.0f / l;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[PF_MAX_HEAD_DIM / 16];
#pragma unroll
    for (int k = 0; k < PF_MAX_HEAD_DIM / 16; k++) wmma::fill_fragment(o[k], 0.0f);
    for (int j = 0; j < key_blocks; j++) {
        scores(j);
#pragma unroll
        for (int c = 0; c < 8; c++) {
            const bool seen = (int64_t)j * STRATA_BLOCK_SIZE + col0 + c <= last;
            const float p = seen ? __expf(s_s[row * 16 + col0 + c] - m) * inv_l : 0.0f;
            p_s[row * 16 + col0 + c] = from_f32<T>(p);
        }
        __syncwarp();
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
        wmma::load_matrix_sync(pa, p_s, 16);
        const T* vp = v_cache + (int64_t)table[j] * STRATA_BLOCK_SIZE * kv_row;
        unsigned ldv = (unsigned)kv_row;
        if (j == key_blocks - 1) {
            // The last block's slots past the tile were never written for
            // this sequence (a freed block keeps its last owner's values):
            // their probability is 0, but 0 * NaN is NaN on tensor cores, so
            // they are read as zeros, through the free query tile.
            const int written = (int)(p0 + n - (int64_t)j * STRATA_BLOCK_SIZE);
            for (int idx = lane; idx < PF_TILE * d; idx += 32) {
                const int r = idx / d, e = idx % d;
                q_s[idx] = r < written ? vp[r * kv_row + e] : from_f32<T>(0.0f);
            }
            __syncwarp();
            vp = q_s;
            ldv = (unsigned)d;
        }
#pragma unroll
        for (int k = 0; k < PF_MAX_HEAD_DIM / 16; k++) {
            if (k < ksteps) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
                wmma::load_matrix_sync(vb, vp + k * 16, ldv);
                wmma::mma_sync(o[k], pa, vb, o[k]);
            }
        }
    }

    // Through shared memory (the query tile is no longer needed) to the rows.
    __syncwarp();
#pragma unroll
    for (int k = 0; k < PF_MAX_HEAD_DIM / 16; k++)
        if (k < ksteps) wmma::store_matrix_sync(o_s + k * 16, o[k], d, wmma::mem_row_major);
    __syncwarp();
    for (int idx = lane; idx < n * d; idx += 32) {
        const int r = idx / d, e = idx % d;
        out[((t0 + r) * heads + h) * d + e] = from_f32<T>(o_s[r * d + e]);
    }
}
#define PF_BODY(T)                                                                            \
    prefill_attention<T>(q, q_stride, kv_cache, num_slots, positions, token_seq,              \
                         block_tables, max_blocks, cos, sin, out, heads, kv_heads, head_dim,  \
                         style, tiles)
#else
#define PF_BODY(T)
#endif

#define INSTANTIATE(T, NAME)                                                                      \
    extern "C" __global__ void __launch_bounds__(PF_WARPS * 32) prefill_attention_##NAME(         \
        const T* q, int64_t q_stride, const T* kv_cache, int64_t num_slots,                       \
        const uint32_t* positions, const uint32_t* token_seq, const uint32_t* block_tables,       \
        int max_blocks, const float* cos, const float* sin, T* out, int heads, int kv_heads,      \
        int head_dim, int style, const uint32_t* tiles) {                                         \
        PF_BODY(T);                                                                               \
    }
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
