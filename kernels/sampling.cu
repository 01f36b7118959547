// The greedy choice of each row of logits ([rows, cols], contiguous): the
// first index of the row's largest value, NaN counted as -inf. That is the
// CPU sampler's rule, ties included, so a greedy token is the same on either
// device; only the chosen ids leave the device, not the logits.
// Grid (rows); blockDim a multiple of 32, at most 1024.
// CPU reference: strata_kernels::reference::argmax_rows.
#include "common.cuh"

// (v, i) beats (w, j) when larger, or equal and earlier.
__device__ __forceinline__ void keep_best(float& v, uint32_t& i, float w, uint32_t j) {
    if (w > v || (w == v && j < i)) {
        v = w;
        i = j;
    }
}

template <typename T>
__device__ void argmax_rows(const T* __restrict__ x, int64_t cols, uint32_t* __restrict__ out) {
    __shared__ float best_v[32];
    __shared__ uint32_t best_i[32];
    const T* row = x + blockIdx.x * cols;
    float v = -INFINITY;
    uint32_t i = 0xffffffffu;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float w = to_f32(row[c]);
        if (w != w) w = -INFINITY;  // NaN
        keep_best(v, i, w, (uint32_t)c);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        keep_best(v, i, __shfl_xor_sync(0xffffffff, v, o), __shfl_xor_sync(0xffffffff, i, o));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? best_v[lane] : -INFINITY;
        i = lane < warps ? best_i[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            keep_best(v, i, __shfl_xor_sync(0xffffffff, v, o), __shfl_xor_sync(0xffffffff, i, o));
        if (lane == 0) out[blockIdx.x] = i;
    }
}

#define INSTANTIATE(T, NAME)                                                                \
    extern "C" __global__ void argmax_rows_##NAME(const T* x, int64_t cols, uint32_t* out) { \
        argmax_rows<T>(x, cols, out);                                                       \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
