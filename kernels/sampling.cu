// The greedy choice of each row of logits ([rows, cols], contiguous): the
// first index of the row's largest value, NaN counted as -inf. That is the
// CPU sampler's rule, ties included, so a greedy token is the same on either
// device; only the chosen ids leave the device, not the logits.
// Grid (rows); blockDim a multiple of 32, at most 1024.
// Values are compared as order-preserving integer keys: nvcc's fast math
// flushes subnormals to zero in float comparisons, which the CPU does not.
// CPU reference: strata_kernels::reference::argmax.
#include "common.cuh"

// A key whose unsigned order is the float order, with NaN as -inf and -0 as +0.
__device__ __forceinline__ uint32_t order_key(float x) {
    uint32_t b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) b = 0xff800000u;  // NaN -> -inf
    if (b == 0x80000000u) b = 0u;                          // -0 -> +0
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

// (v, i) beats (w, j) when larger, or equal and earlier.
__device__ __forceinline__ void keep_best(uint32_t& v, uint32_t& i, uint32_t w, uint32_t j) {
    if (w > v || (w == v && j < i)) {
        v = w;
        i = j;
    }
}

template <typename T>
__device__ void argmax_rows(const T* __restrict__ x, int64_t cols, uint32_t* __restrict__ out) {
    __shared__ uint32_t best_v[32];
    __shared__ uint32_t best_i[32];
    const T* row = x + blockIdx.x * cols;
    uint32_t v = 0u, i = 0xffffffffu;  // below every key (-inf's is 0x007fffff)
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
        keep_best(v, i, order_key(to_f32(row[c])), (uint32_t)c);
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
        v = lane < warps ? best_v[lane] : 0u;
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
