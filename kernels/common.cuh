// Shared by every kernel: element types to and from f32 (all arithmetic is
// f32), warp reductions, and the instantiation macro that gives each kernel an
// extern "C" name per dtype (`<name>_f32`, `<name>_f16`, `<name>_bf16`), the
// names the Rust launchers load from the PTX.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Tokens per KV-cache block; must equal strata_types::BLOCK_SIZE.
#define STRATA_BLOCK_SIZE 16

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}

// Sum over the whole thread block (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float x) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    x = warp_sum(x);
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    const int warps = blockDim.x / 32;
    x = lane < warps ? partial[lane] : 0.0f;
    x = warp_sum(x);
    __syncthreads();
    return x;
}

// Rotates the pair (a, b) by the angle whose cos/sin are given.
__device__ __forceinline__ void rotate(float& a, float& b, float c, float s) {
    const float ra = a * c - b * s;
    const float rb = a * s + b * c;
    a = ra;
    b = rb;
}

// Index of the i-th rotated pair inside a head: style 0 pairs i with
// i + half (Hugging Face's rotate_half), style 1 pairs 2i with 2i + 1 (GGUF).
__device__ __forceinline__ void pair_index(int style, int i, int half, int& a, int& b) {
    if (style == 0) {
        a = i;
        b = i + half;
    } else {
        a = 2 * i;
        b = 2 * i + 1;
    }
}

#define STRATA_FOR_EACH_DTYPE(M) \
    M(float, f32)                \
    M(__half, f16)               \
    M(__nv_bfloat16, bf16)
