// RMSNorm, alone or fused with the residual add before it; one thread block
// per token.
//   add_rms_norm: residual_out <- residual + x
//                 out          <- residual_out * rsqrt(mean(residual_out^2) + eps) * weight
//   rms_norm:     out          <- residual * rsqrt(mean(residual^2) + eps) * weight
// CPU reference: strata_kernels::reference::add_rms_norm.
#include "common.cuh"

template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ residual,
                             T* __restrict__ residual_out, const T* __restrict__ weight,
                             T* __restrict__ out, int hidden, float eps) {
    const int64_t row = (int64_t)blockIdx.x * hidden;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = to_f32(residual[row + i]);
        if (x != nullptr) {
            // Round as stored, so `out` normalizes exactly what the next
            // layer adds to.
            const T r = from_f32<T>(v + to_f32(x[row + i]));
            residual_out[row + i] = r;
            v = to_f32(r);
        }
        sq += v * v;
    }
    const float inv = rsqrtf(block_sum(sq) / hidden + eps);
    const T* src = x != nullptr ? residual_out : residual;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[row + i] = from_f32<T>(to_f32(src[row + i]) * inv * to_f32(weight[i]));
    }
}

#define INSTANTIATE(T, NAME)                                                                  \
    extern "C" __global__ void add_rms_norm_##NAME(const T* x, const T* residual,             \
                                                   T* residual_out, const T* weight, T* out,  \
                                                   int hidden, float eps) {                   \
        add_rms_norm<T>(x, residual, residual_out, weight, out, hidden, eps);                 \
    }                                                                                         \
    extern "C" __global__ void rms_norm_##NAME(const T* residual, const T* weight, T* out,    \
                                               int hidden, float eps) {                       \
        add_rms_norm<T>(nullptr, residual, nullptr, weight, out, hidden, eps);                \
    }
STRATA_FOR_EACH_DTYPE(INSTANTIATE)
