// Fused residual add and RMSNorm, one thread block per token:
//   residual <- residual + x           (the new residual stream, in place)
//   out      <- residual * rsqrt(mean(residual^2) + eps) * weight
// With `x` null it is a plain RMSNorm of `residual` (the first layer).
// CPU reference: strata_kernels::reference::add_rms_norm.
#include "common.cuh"

template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, T* __restrict__ residual,
                             const T* __restrict__ weight, T* __restrict__ out, int hidden,
                             float eps) {
    const int64_t row = (int64_t)blockIdx.x * hidden;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = to_f32(residual[row + i]);
        if (x != nullptr) {
            v += to_f32(x[row + i]);
            residual[row + i] = from_f32<T>(v);
        }
        sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sq) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        // Re-read the stored (rounded) residual so out matches what the next
        // layer adds to.
        const float v = to_f32(residual[row + i]);
        out[row + i] = from_f32<T>(v * inv * to_f32(weight[i]));
    }
}

#define INSTANTIATE(T, NAME)                                                                 \
    extern "C" __global__ void add_rms_norm_##NAME(const T* x, T* residual, const T* weight, \
                                                   T* out, int hidden, float eps) {         \
        add_rms_norm<T>(x, residual, weight, out, hidden, eps);                              \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
