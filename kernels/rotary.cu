// Rotary embedding in place on `x` = [tokens, heads, head_dim] (contiguous),
// token t at position positions[t]; `cos`/`sin` are [max_positions,
// head_dim / 2] (f32, llama3 scaling and GGUF frequency factors already
// folded in). One thread block per token, one thread per (head, pair).
// The model rotates inside write_kv and paged_attention instead; this kernel
// is the stand-alone form of the same rotation.
// CPU reference: strata_kernels::reference::rotary (held to strata_model::Rope::apply).
#include "common.cuh"

template <typename T>
__device__ void rotary(T* __restrict__ x, const uint32_t* __restrict__ positions,
                       const float* __restrict__ cos, const float* __restrict__ sin, int heads,
                       int head_dim, int style) {
    const int half = head_dim / 2;
    const int64_t t = blockIdx.x;
    const int64_t pos = positions[t];
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        int ia, ib;
        pair_index(style, i, half, ia, ib);
        T* head = x + (t * heads + h) * head_dim;
        float a = to_f32(head[ia]), b = to_f32(head[ib]);
        rotate(a, b, cos[pos * half + i], sin[pos * half + i]);
        head[ia] = from_f32<T>(a);
        head[ib] = from_f32<T>(b);
    }
}

#define INSTANTIATE(T, NAME)                                                                \
    extern "C" __global__ void rotary_##NAME(T* x, const uint32_t* positions, const float* cos, \
                                             const float* sin, int heads, int head_dim,         \
                                             int style) {                                       \
        rotary<T>(x, positions, cos, sin, heads, head_dim, style);                              \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
