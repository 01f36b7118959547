// Writes each token's key (rotated for its position) and value into the paged
// cache slot slot_mapping[t] = block * STRATA_BLOCK_SIZE + offset. `k`, `v` are
// [tokens, kv_heads * head_dim]; the caches are [slots, kv_heads * head_dim].
// One thread block per token.
// CPU reference: strata_model::write_kv.
#include "common.cuh"

template <typename T>
__device__ void write_kv(const T* __restrict__ k, const T* __restrict__ v,
                         const uint32_t* __restrict__ positions,
                         const uint32_t* __restrict__ slot_mapping, const float* __restrict__ cos,
                         const float* __restrict__ sin, T* __restrict__ k_cache,
                         T* __restrict__ v_cache, int kv_heads, int head_dim, int style) {
    const int64_t t = blockIdx.x;
    const int64_t row = (int64_t)kv_heads * head_dim;
    const int64_t slot = slot_mapping[t];
    const int64_t pos = positions[t];
    const int half = head_dim / 2;
    for (int j = threadIdx.x; j < kv_heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        int ia, ib;
        pair_index(style, i, half, ia, ib);
        const T* src = k + t * row + h * head_dim;
        float a = to_f32(src[ia]), b = to_f32(src[ib]);
        rotate(a, b, cos[pos * half + i], sin[pos * half + i]);
        T* dst = k_cache + slot * row + h * head_dim;
        dst[ia] = from_f32<T>(a);
        dst[ib] = from_f32<T>(b);
    }
    for (int j = threadIdx.x; j < row; j += blockDim.x) v_cache[slot * row + j] = v[t * row + j];
}

#define INSTANTIATE(T, NAME)                                                                    \
    extern "C" __global__ void write_kv_##NAME(                                                 \
        const T* k, const T* v, const uint32_t* positions, const uint32_t* slot_mapping,       \
        const float* cos, const float* sin, T* k_cache, T* v_cache, int kv_heads, int head_dim, \
        int style) {                                                                            \
        write_kv<T>(k, v, positions, slot_mapping, cos, sin, k_cache, v_cache, kv_heads,        \
                    head_dim, style);                                                           \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
