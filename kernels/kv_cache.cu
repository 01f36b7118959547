// Writes each token's key (rotated for its position) and value into the paged
// cache slot slot_mapping[t] = block * STRATA_BLOCK_SIZE + offset. Rows of `k`
// and `v` are kv_heads * head_dim wide and k_stride / v_stride elements apart
// (they are column slices of the fused qkv output); `kv_cache` is one layer's
// [2, num_slots, kv_heads * head_dim], keys then values. One thread block per
// token.
// CPU reference: strata_kernels::reference::write_kv (held to strata_model::write_kv).
#include "common.cuh"

template <typename T>
__device__ void write_kv(const T* __restrict__ k, int64_t k_stride, const T* __restrict__ v,
                         int64_t v_stride, const uint32_t* __restrict__ positions,
                         const uint32_t* __restrict__ slot_mapping, const float* __restrict__ cos,
                         const float* __restrict__ sin, T* __restrict__ kv_cache,
                         int64_t num_slots, int kv_heads, int head_dim, int style) {
    const int64_t t = blockIdx.x;
    const int64_t row = (int64_t)kv_heads * head_dim;
    T* k_cache = kv_cache;
    T* v_cache = kv_cache + num_slots * row;
    const int64_t slot = slot_mapping[t];
    const int64_t pos = positions[t];
    const int half = head_dim / 2;
    for (int j = threadIdx.x; j < kv_heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        int ia, ib;
        pair_index(style, i, half, ia, ib);
        const T* src = k + t * k_stride + h * head_dim;
        float a = to_f32(src[ia]), b = to_f32(src[ib]);
        rotate(a, b, cos[pos * half + i], sin[pos * half + i]);
        T* dst = k_cache + slot * row + h * head_dim;
        dst[ia] = from_f32<T>(a);
        dst[ib] = from_f32<T>(b);
    }
    for (int j = threadIdx.x; j < row; j += blockDim.x)
        v_cache[slot * row + j] = v[t * v_stride + j];
}

#define INSTANTIATE(T, NAME)                                                                \
    extern "C" __global__ void write_kv_##NAME(                                             \
        const T* k, int64_t k_stride, const T* v, int64_t v_stride, const uint32_t* positions, \
        const uint32_t* slot_mapping, const float* cos, const float* sin, T* kv_cache,      \
        int64_t num_slots, int kv_heads, int head_dim, int style) {                         \
        write_kv<T>(k, k_stride, v, v_stride, positions, slot_mapping, cos, sin, kv_cache,  \
                    num_slots, kv_heads, head_dim, style);                                    \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
