// Fused iMF / MeanFlow losses, per sample: loss_u = sum (u + coef du - v_target)^2 with coef = t - r (iMF:
// V = u + (t - r) du) or clip(t - r, 0, 1) (MF: u - u_tgt), loss_v = sum (v - v_target)^2, w = (L + c)^-p.
// Memory floor: forward reads u, du, v, v_target once; backward reads them once and writes grad_u, grad_v.
// Forward: two launches (per-sample sums and weights, then the batch totals); backward: one.
#include <algorithm>

#include "common.cuh"

namespace imf {
namespace {

constexpr int kThreads = 256;
constexpr int kChunksPerThread = 4;  // backward: vector chunks per thread, sets the number of blocks per sample

__device__ __forceinline__ float residual_coef(const LossFwdParams& p, int64_t n) {
  const float h = p.t[n] - p.r[n];
  return p.meanflow ? fminf(fmaxf(h, 0.f), 1.f) : h;
}

// One block per sample: both sums in one pass, then the weights.
template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads) loss_fwd_kernel(const LossFwdParams p) {
  __shared__ float scratch[2 * kWarpSize];
  const int64_t n = blockIdx.x;
  const int64_t offset = n * p.numel;
  const float coef = residual_coef(p, n);
  const T* u = static_cast<const T*>(p.u) + offset;
  const T* du = static_cast<const T*>(p.du) + offset;
  const T* v_target = static_cast<const T*>(p.v_target) + offset;
  const T* v = p.meanflow ? nullptr : static_cast<const T*>(p.v) + offset;

  float sums[2] = {0.f, 0.f};
  const int64_t num_chunks = p.numel / kWidth;
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
    float uv[kWidth], duv[kWidth], tv[kWidth];
    load_as_float<T, kWidth>(u + chunk * kWidth, uv);
    load_as_float<T, kWidth>(du + chunk * kWidth, duv);
    load_as_float<T, kWidth>(v_target + chunk * kWidth, tv);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      const float residual = uv[i] + coef * duv[i] - tv[i];
      sums[0] += residual * residual;
    }
    if (v != nullptr) {
      float vv[kWidth];
      load_as_float<T, kWidth>(v + chunk * kWidth, vv);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) sums[1] += (vv[i] - tv[i]) * (vv[i] - tv[i]);
    }
  }
  block_sum(sums, scratch);
  if (threadIdx.x == 0) {
    p.loss_u[n] = sums[0];
    p.w_u[n] = powf(sums[0] + p.c, -p.power);
    if (!p.meanflow) {
      p.loss_v[n] = sums[1];
      p.w_v[n] = powf(sums[1] + p.c, -p.power);
    }
  }
}

// One block: the batch totals [mean_b(w_u L_u + w_v L_v), mean_b L_u (, mean_b L_v)] from the per-sample values,
// summed in double in a fixed order (the same result every run).
__global__ void __launch_bounds__(kThreads) loss_totals_kernel(const LossFwdParams p) {
  __shared__ double partials[3][kThreads];
  double sums[3] = {0.0, 0.0, 0.0};
  for (int64_t n = threadIdx.x; n < p.batch; n += kThreads) {
    const double loss_u = p.loss_u[n];
    sums[0] += static_cast<double>(p.w_u[n]) * loss_u;
    sums[1] += loss_u;
    if (!p.meanflow) {
      const double loss_v = p.loss_v[n];
      sums[0] += static_cast<double>(p.w_v[n]) * loss_v;
      sums[2] += loss_v;
    }
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) partials[k][threadIdx.x] = sums[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
#pragma unroll
      for (int k = 0; k < 3; ++k) partials[k][threadIdx.x] += partials[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int totals = p.meanflow ? 2 : 3;
    for (int k = 0; k < totals; ++k) p.totals[k] = static_cast<float>(partials[k][0] / static_cast<double>(p.batch));
  }
}

// grid (B, blocks per sample): grad_u = grad_total * 2 w_u (u + coef du - v_target) / B and
// grad_v = grad_total * 2 w_v (v - v_target) / B, elementwise.
template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads) loss_bwd_kernel(const LossBwdParams p) {
  const int64_t n = blockIdx.x;
  const int64_t offset = n * p.numel;
  const float h = p.t[n] - p.r[n];
  const float coef = p.meanflow ? fminf(fmaxf(h, 0.f), 1.f) : h;
  const float gain = 2.f * p.grad_total[0] / static_cast<float>(p.batch);
  const float gain_u = gain * p.w_u[n];
  const float gain_v = p.meanflow ? 0.f : gain * p.w_v[n];
  const T* u = static_cast<const T*>(p.u) + offset;
  const T* du = static_cast<const T*>(p.du) + offset;
  const T* v_target = static_cast<const T*>(p.v_target) + offset;
  T* grad_u = static_cast<T*>(p.grad_u) + offset;

  const int64_t num_chunks = p.numel / kWidth;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; chunk < num_chunks;
       chunk += static_cast<int64_t>(gridDim.y) * kThreads) {
    float uv[kWidth], duv[kWidth], tv[kWidth], gu[kWidth];
    load_as_float<T, kWidth>(u + chunk * kWidth, uv);
    load_as_float<T, kWidth>(du + chunk * kWidth, duv);
    load_as_float<T, kWidth>(v_target + chunk * kWidth, tv);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) gu[i] = gain_u * (uv[i] + coef * duv[i] - tv[i]);
    store_from_float<T, kWidth>(grad_u + chunk * kWidth, gu);
    if (!p.meanflow) {
      float vv[kWidth], gv[kWidth];
      load_as_float<T, kWidth>(static_cast<const T*>(p.v) + offset + chunk * kWidth, vv);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) gv[i] = gain_v * (vv[i] - tv[i]);
      store_from_float<T, kWidth>(static_cast<T*>(p.grad_v) + offset + chunk * kWidth, gv);
    }
  }
}

}  // namespace

void loss_fwd(const LossFwdParams& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.batch));
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      IMF_LAUNCH(kernel, grid, kThreads, 0, stream)(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (params.vectorized) {
      launch(loss_fwd_kernel<T, kVec16<T>>);
    } else {
      launch(loss_fwd_kernel<T, 1>);
    }
  });
  IMF_LAUNCH(loss_totals_kernel, dim3(1), kThreads, 0, stream)(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void loss_bwd(const LossBwdParams& params, cudaStream_t stream) {
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int width = params.vectorized ? kVec16<T> : 1;
    const int64_t chunks = params.numel / width;
    const int64_t per_block = static_cast<int64_t>(kThreads) * kChunksPerThread;
    const int64_t blocks_per_sample =
        std::min<int64_t>(std::max<int64_t>((chunks + per_block - 1) / per_block, 1), 65535);
    const dim3 grid(static_cast<unsigned>(params.batch), static_cast<unsigned>(blocks_per_sample));
    auto launch = [&](auto kernel) {
      IMF_LAUNCH(kernel, grid, kThreads, 0, stream)(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (params.vectorized) {
      launch(loss_bwd_kernel<T, kVec16<T>>);
    } else {
      launch(loss_bwd_kernel<T, 1>);
    }
  });
}

}  // namespace imf
