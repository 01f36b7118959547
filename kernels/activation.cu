// SiLU-and-mul over the fused gate/up projection: `gate_up` is
// [tokens, 2 * inter] with the gate first; out[t, i] = silu(gate) * up.
// CPU reference: strata_kernels::reference::silu_and_mul.
#include "common.cuh"

template <typename T>
__device__ void silu_and_mul(const T* __restrict__ gate_up, T* __restrict__ out, int inter) {
    const int64_t t = blockIdx.x;
    const T* g = gate_up + t * 2 * inter;
    const T* u = g + inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) {
        const float x = to_f32(g[i]);
        out[t * inter + i] = from_f32<T>(x / (1.0f + __expf(-x)) * to_f32(u[i]));
    }
}

#define INSTANTIATE(T, NAME)                                                         \
    extern "C" __global__ void silu_and_mul_##NAME(const T* gate_up, T* out, int inter) { \
        silu_and_mul<T>(gate_up, out, inter);                                        \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
