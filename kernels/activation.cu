// SiLU-and-mul over the fused gate/up projection: `gate_up` is
// [tokens, 2 * inter] with the gate first; out[t, i] = silu(gate) * up.
// CPU reference: strata_kernels::reference::silu_and_mul.
#include "common.cuh"

// One thread per output element, a token's row over `chunks` blocks: a
// decode step has a single token, and one block looping over its 14k-wide
// row was bound by the latency of its serial loads.
template <typename T>
__device__ void silu_and_mul(const T* __restrict__ gate_up, T* __restrict__ out, int inter) {
    const int chunks = (inter + blockDim.x - 1) / blockDim.x;
    const int64_t t = blockIdx.x / chunks;
    const int i = (blockIdx.x % chunks) * blockDim.x + threadIdx.x;
    if (i >= inter) return;
    const T* g = gate_up + t * 2 * inter;
    const float x = to_f32(g[i]);
    out[t * inter + i] = from_f32<T>(x / (1.0f + __expf(-x)) * to_f32(g[inter + i]));
}

#define INSTANTIATE(T, NAME)                                                         \
    extern "C" __global__ void silu_and_mul_##NAME(const T* gate_up, T* out, int inter) { \
        silu_and_mul<T>(gate_up, out, inter);                                        \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
