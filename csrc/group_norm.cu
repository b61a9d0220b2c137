// GroupNorm + modulation + SiLU, per (sample, group): xh = (x - mean) * rstd, a = weight * xh + bias,
// h = a * (1 + scale) + shift, y = h * sigmoid(h); tangent dy from dx, dscale, dshift (DESIGN 4.3).
// Memory floor: read x (and dx) once, write y (and dy) once; one block per (sample, group), whose slice of
// x is contiguous, so the second and third passes over it are served from L2.
#include "common.cuh"

namespace imf {
namespace {

constexpr int kThreads = 256;

// Per-channel modulation, read as fp32 (absent parameters are the identity).
struct ChannelAffine {
  float weight, bias, one_plus_scale, shift;
};

__device__ __forceinline__ ChannelAffine load_affine(const float* weight, const float* bias, const float* scale,
                                                     const float* shift, int64_t channel, int64_t sample_channel) {
  ChannelAffine affine;
  affine.weight = weight != nullptr ? weight[channel] : 1.f;
  affine.bias = bias != nullptr ? bias[channel] : 0.f;
  affine.one_plus_scale = 1.f + (scale != nullptr ? scale[sample_channel] : 0.f);
  affine.shift = shift != nullptr ? shift[sample_channel] : 0.f;
  return affine;
}

// One block per (sample, group); the group's elements are chunks of kWidth (a chunk never crosses a channel:
// the vector path needs hw % kWidth == 0). Pass 1: sums of x and dx; pass 2: centred moments
// sum (x - mean)^2 and sum (x - mean) dx; pass 3: normalise, modulate, activate and write.
template <typename T, int kWidth, bool kTangent>
__global__ void __launch_bounds__(kThreads) group_norm_act_fwd_kernel(const GroupNormFwdParams p) {
  __shared__ float scratch[2 * kWarpSize];
  const int64_t group_index = blockIdx.x;  // n * G + g
  const int64_t n = group_index / p.groups;
  const int64_t g = group_index % p.groups;
  const int64_t channels_per_group = p.channels / p.groups;
  const int64_t group_size = channels_per_group * p.hw;
  const int64_t offset = group_index * group_size;  // (n, g*cpg, 0) of the contiguous (B, C, HW) tensor
  const T* x = static_cast<const T*>(p.x) + offset;
  const T* dx = kTangent ? static_cast<const T*>(p.dx) + offset : nullptr;
  const int64_t num_chunks = group_size / kWidth;

  float sums[2] = {0.f, 0.f};
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
    float xv[kWidth];
    load_as_float<T, kWidth>(x + chunk * kWidth, xv);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) sums[0] += xv[i];
    if constexpr (kTangent) {
      float dxv[kWidth];
      load_as_float<T, kWidth>(dx + chunk * kWidth, dxv);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) sums[1] += dxv[i];
    }
  }
  block_sum(sums, scratch);
  const float inv_size = 1.f / static_cast<float>(group_size);
  const float mean = sums[0] * inv_size;
  const float mean_dx = sums[1] * inv_size;

  float moments[2] = {0.f, 0.f};
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
    float xv[kWidth];
    load_as_float<T, kWidth>(x + chunk * kWidth, xv);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) moments[0] += (xv[i] - mean) * (xv[i] - mean);
    if constexpr (kTangent) {
      float dxv[kWidth];
      load_as_float<T, kWidth>(dx + chunk * kWidth, dxv);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) moments[1] += (xv[i] - mean) * dxv[i];
    }
  }
  block_sum(moments, scratch);
  const float rstd = rsqrtf(moments[0] * inv_size + p.eps);
  const float mean_xh_dx = moments[1] * inv_size * rstd;  // mean_g(xh * dx)
  if (threadIdx.x == 0) {
    p.mean[group_index] = mean;
    p.rstd[group_index] = rstd;
  }

  T* y = static_cast<T*>(p.y) + offset;
  T* dy = kTangent ? static_cast<T*>(p.dy) + offset : nullptr;
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
    const int64_t channel = g * channels_per_group + chunk * kWidth / p.hw;
    const int64_t sample_channel = n * p.channels + channel;
    const ChannelAffine affine = load_affine(p.weight, p.bias, p.scale, p.shift, channel, sample_channel);
    float xv[kWidth], yv[kWidth];
    load_as_float<T, kWidth>(x + chunk * kWidth, xv);
    if constexpr (kTangent) {
      const float dscale = p.dscale != nullptr ? p.dscale[sample_channel] : 0.f;
      const float dshift = p.dshift != nullptr ? p.dshift[sample_channel] : 0.f;
      float dxv[kWidth], dyv[kWidth];
      load_as_float<T, kWidth>(dx + chunk * kWidth, dxv);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) {
        const float xh = (xv[i] - mean) * rstd;
        const float a = affine.weight * xh + affine.bias;
        const float h = a * affine.one_plus_scale + affine.shift;
        // dxh = rstd * (dx - mean_g(dx) - xh * mean_g(xh * dx)); dh = weight * dxh * (1 + s) + a * ds + db
        const float dxh = rstd * (dxv[i] - mean_dx - xh * mean_xh_dx);
        const float dh = affine.weight * dxh * affine.one_plus_scale + a * dscale + dshift;
        if (p.silu) {
          const float sig = sigmoid(h);
          yv[i] = h * sig;
          dyv[i] = dh * silu_grad(h, sig);
        } else {
          yv[i] = h;
          dyv[i] = dh;
        }
      }
      store_from_float<T, kWidth>(dy + chunk * kWidth, dyv);
    } else {
#pragma unroll
      for (int i = 0; i < kWidth; ++i) {
        const float xh = (xv[i] - mean) * rstd;
        const float h = (affine.weight * xh + affine.bias) * affine.one_plus_scale + affine.shift;
        yv[i] = p.silu ? h * sigmoid(h) : h;
      }
    }
    store_from_float<T, kWidth>(y + chunk * kWidth, yv);
  }
}

// One block per (sample, group). Phase 1, one warp per channel: gh = grad_y * act'(h) and the channel sums
// sum gh, sum gh * xh. Phase 2: group means of gxh = weight (1 + s) gh and of gxh * xh from those sums.
// Phase 3: grad_x = rstd * (gxh - mean_g(gxh) - xh * mean_g(gxh * xh)).
template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads) group_norm_act_bwd_kernel(const GroupNormBwdParams p) {
  IMF_DYNAMIC_SMEM(float, channel_sums);  // [cpg]: weight (1 + s) sum gh, then [cpg]: weight (1 + s) sum gh xh
  __shared__ float scratch[2 * kWarpSize];
  const int64_t group_index = blockIdx.x;
  const int64_t n = group_index / p.groups;
  const int64_t g = group_index % p.groups;
  const int64_t channels_per_group = p.channels / p.groups;
  const int64_t group_size = channels_per_group * p.hw;
  const int64_t offset = group_index * group_size;
  const T* x = static_cast<const T*>(p.x) + offset;
  const T* grad_y = static_cast<const T*>(p.grad_y) + offset;
  const float mean = p.mean[group_index];
  const float rstd = p.rstd[group_index];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t chunks_per_channel = p.hw / kWidth;

  for (int64_t local_channel = warp; local_channel < channels_per_group; local_channel += kThreads / kWarpSize) {
    const int64_t channel = g * channels_per_group + local_channel;
    const int64_t sample_channel = n * p.channels + channel;
    const ChannelAffine affine = load_affine(p.weight, p.bias, p.scale, p.shift, channel, sample_channel);
    float sum_gh = 0.f, sum_gh_xh = 0.f;
    for (int64_t chunk = lane; chunk < chunks_per_channel; chunk += kWarpSize) {
      const int64_t index = local_channel * p.hw + chunk * kWidth;
      float xv[kWidth], gyv[kWidth];
      load_as_float<T, kWidth>(x + index, xv);
      load_as_float<T, kWidth>(grad_y + index, gyv);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) {
        const float xh = (xv[i] - mean) * rstd;
        float gh = gyv[i];
        if (p.silu) {
          const float h = (affine.weight * xh + affine.bias) * affine.one_plus_scale + affine.shift;
          gh *= silu_grad(h, sigmoid(h));
        }
        sum_gh += gh;
        sum_gh_xh += gh * xh;
      }
    }
    sum_gh = warp_sum(sum_gh);
    sum_gh_xh = warp_sum(sum_gh_xh);
    if (lane == 0) {
      p.sum_gh[sample_channel] = sum_gh;
      p.sum_gh_xh[sample_channel] = sum_gh_xh;
      const float gain = affine.weight * affine.one_plus_scale;  // gxh = gain * gh
      channel_sums[local_channel] = gain * sum_gh;
      channel_sums[channels_per_group + local_channel] = gain * sum_gh_xh;
    }
  }
  __syncthreads();

  float group_sums[2] = {0.f, 0.f};
  for (int64_t local_channel = threadIdx.x; local_channel < channels_per_group; local_channel += kThreads) {
    group_sums[0] += channel_sums[local_channel];
    group_sums[1] += channel_sums[channels_per_group + local_channel];
  }
  block_sum(group_sums, scratch);
  const float inv_size = 1.f / static_cast<float>(group_size);
  const float mean_gxh = group_sums[0] * inv_size;
  const float mean_gxh_xh = group_sums[1] * inv_size;

  T* grad_x = static_cast<T*>(p.grad_x) + offset;
  const int64_t num_chunks = group_size / kWidth;
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
    const int64_t channel = g * channels_per_group + chunk * kWidth / p.hw;
    const int64_t sample_channel = n * p.channels + channel;
    const ChannelAffine affine = load_affine(p.weight, p.bias, p.scale, p.shift, channel, sample_channel);
    const float gain = affine.weight * affine.one_plus_scale;
    float xv[kWidth], gyv[kWidth], gxv[kWidth];
    load_as_float<T, kWidth>(x + chunk * kWidth, xv);
    load_as_float<T, kWidth>(grad_y + chunk * kWidth, gyv);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      const float xh = (xv[i] - mean) * rstd;
      float gh = gyv[i];
      if (p.silu) {
        const float h = (affine.weight * xh + affine.bias) * affine.one_plus_scale + affine.shift;
        gh *= silu_grad(h, sigmoid(h));
      }
      gxv[i] = rstd * (gain * gh - mean_gxh - xh * mean_gxh_xh);
    }
    store_from_float<T, kWidth>(grad_x + chunk * kWidth, gxv);
  }
}

}  // namespace

int64_t group_norm_bwd_smem_bytes(int64_t channels_per_group) {
  return 2 * channels_per_group * static_cast<int64_t>(sizeof(float));
}

void group_norm_act_fwd(const GroupNormFwdParams& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.batch * params.groups));
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kVec16<T>;
    auto launch = [&](auto kernel) {
      IMF_LAUNCH(kernel, grid, kThreads, 0, stream)(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (params.dx != nullptr) {
      if (params.vectorized) {
        launch(group_norm_act_fwd_kernel<T, kVec, true>);
      } else {
        launch(group_norm_act_fwd_kernel<T, 1, true>);
      }
    } else if (params.vectorized) {
      launch(group_norm_act_fwd_kernel<T, kVec, false>);
    } else {
      launch(group_norm_act_fwd_kernel<T, 1, false>);
    }
  });
}

void group_norm_act_bwd(const GroupNormBwdParams& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.batch * params.groups));
  const size_t smem = static_cast<size_t>(group_norm_bwd_smem_bytes(params.channels / params.groups));
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      IMF_LAUNCH(kernel, grid, kThreads, smem, stream)(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (params.vectorized) {
      launch(group_norm_act_bwd_kernel<T, kVec16<T>>);
    } else {
      launch(group_norm_act_bwd_kernel<T, 1>);
    }
  });
}

}  // namespace imf
