// GroupNorm + modulation + SiLU, per (sample, group): xh = (x - mean) * rstd, a = weight * xh + bias,
// h = a * (1 + scale) + shift, y = h * sigmoid(h); tangent dy from dx, dscale, dshift (DESIGN 4.3).
// Memory floor: read x (and dx) once, write y (and dy) once; one block per (sample, group), whose slice of x is
// contiguous. Two kernel kinds: "resident" (groups of up to 2048 16-byte chunks whose channels hold a power-of-two
// number of chunks; the launch rule takes them up to 512, kResidentAutoMaxChunks) keeps each thread's chunks in
// registers, so x is read once and the statistics are block reductions of registers; "looped" (any other group)
// re-reads the group from L2 per pass.
#include <algorithm>

#include "common.cuh"

namespace imf {
namespace {

constexpr int kThreads = 256;            // looped kernels
// resident kernels: launch bounds (512, 1) allow 128 registers per thread (without the 1, ptxas held the primal
// 16-bit single-item forward to 40 and spilled)
constexpr int kResidentMaxThreads = 512;
constexpr int kResidentMaxItems = 4;      // chunks per thread
// The launch rule takes the resident kernels for groups of at most this many 16-byte chunks (a "resident" request
// takes them up to kResidentMaxThreads * kResidentMaxItems). An H200 (2026-11-27, bench/tune_gpu.py --families
// cuda_group_norm, bf16, batch 256) timed them faster than the looped kernels up to 512 chunks (C1024 8x8, 256
// chunks: backward 110 against 214 us; C512 16x16, 512 chunks: forward, tangent and backward 398 against 403 us
// together) and slower above (C768 16x16, 768 chunks: forward with tangent 305 against 179 us; C512 32x32, 2048:
// 690 against 411 us): one 512-thread block per multiprocessor keeps too few loads in flight for a large group.
constexpr int64_t kResidentAutoMaxChunks = 512;

// Per-channel modulation as fp32 (absent parameters are the identity).
struct ChannelAffine {
  float weight, bias, one_plus_scale, shift;
};

// parameters[index] of the element type T as fp32, or `absent` for a null parameter
template <typename T>
__device__ __forceinline__ float param_or(const void* parameters, int64_t index, float absent) {
  return parameters != nullptr ? to_float(static_cast<const T*>(parameters)[index]) : absent;
}

template <typename T>
__device__ __forceinline__ ChannelAffine load_affine(const void* weight, const void* bias, const void* scale,
                                                     const void* shift, int64_t channel, int64_t sample_channel) {
  ChannelAffine affine;
  affine.weight = param_or<T>(weight, channel, 1.f);
  affine.bias = param_or<T>(bias, channel, 0.f);
  affine.one_plus_scale = 1.f + param_or<T>(scale, sample_channel, 0.f);
  affine.shift = param_or<T>(shift, sample_channel, 0.f);
  return affine;
}

// Normalise, modulate and activate one chunk of kWidth elements of `channel` (a chunk never crosses a channel) and
// write y (and dy): dxh = rstd (dx - mean_g(dx) - xh mean_g(xh dx)), dh = weight dxh (1 + s) + a ds + db.
template <typename T, int kWidth, bool kTangent>
__device__ __forceinline__ void write_chunk(const GroupNormFwdParams& p, int64_t n, int64_t channel,
                                            const float (&xv)[kWidth], const float (&dxv)[kWidth], float mean,
                                            float rstd, float mean_dx, float mean_xh_dx, T* y, T* dy) {
  const int64_t sample_channel = n * p.channels + channel;
  const ChannelAffine affine = load_affine<T>(p.weight, p.bias, p.scale, p.shift, channel, sample_channel);
  float yv[kWidth];
  if constexpr (kTangent) {
    const float dscale = param_or<T>(p.dscale, sample_channel, 0.f);
    const float dshift = param_or<T>(p.dshift, sample_channel, 0.f);
    float dyv[kWidth];
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      const float xh = (xv[i] - mean) * rstd;
      const float a = affine.weight * xh + affine.bias;
      const float h = a * affine.one_plus_scale + affine.shift;
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
    store_from_float<T, kWidth>(dy, dyv);
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      const float xh = (xv[i] - mean) * rstd;
      const float h = (affine.weight * xh + affine.bias) * affine.one_plus_scale + affine.shift;
      yv[i] = p.silu ? h * sigmoid(h) : h;
    }
  }
  store_from_float<T, kWidth>(y, yv);
}

// The corrected two-pass moments (Bjorck): from the first mean m0 = sum x / n and the sums over the deviations
// d = x - m0 (sum d^2, sum d dx, sum d), the correction c = sum d / n recovers the rounding of the first sum, which at
// a large mean (|mean| >> std) is most of the error: mean = m0 + c, M2 = sum d^2 - c sum d, and
// sum (x - mean) dx = sum d dx - c sum dx. (The streaming kernel keeps sum d second: with it third, ptxas spilled
// its float32 no-tangent variant.)
struct Moments {
  float mean, rstd, mean_xh_dx;
};
__device__ __forceinline__ Moments corrected_moments(float first_mean, float sum_dx, float sum_d2, float sum_d_dx,
                                                     float sum_d, float inv_size, float eps) {
  const float correction = sum_d * inv_size;
  const float rstd = rsqrtf((sum_d2 - correction * sum_d) * inv_size + eps);
  return {first_mean + correction, rstd, (sum_d_dx - correction * sum_dx) * inv_size * rstd};
}

// One block per (sample, group); the group's elements are chunks of kWidth (a chunk never crosses a channel:
// the vector path needs hw % kWidth == 0). Pass 1: sums of x and dx; pass 2: centred moments
// sum (x - mean)^2 and sum (x - mean) dx (corrected_moments); pass 3: normalise, modulate, activate and write.
template <typename T, int kWidth, bool kTangent>
__global__ void __launch_bounds__(kThreads) group_norm_act_fwd_kernel(const GroupNormFwdParams p) {
  __shared__ float scratch[3 * kWarpSize];
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
  const float first_mean = sums[0] * inv_size;
  const float mean_dx = sums[1] * inv_size;

  float moments[3] = {0.f, 0.f, 0.f};  // sum (x - first_mean)^2, sum (x - first_mean), sum (x - first_mean) dx
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
    float xv[kWidth];
    load_as_float<T, kWidth>(x + chunk * kWidth, xv);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      xv[i] -= first_mean;
      moments[0] += xv[i] * xv[i];
      moments[1] += xv[i];
    }
    if constexpr (kTangent) {
      float dxv[kWidth];
      load_as_float<T, kWidth>(dx + chunk * kWidth, dxv);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) moments[2] += xv[i] * dxv[i];
    }
  }
  block_sum(moments, scratch);
  const Moments stats = corrected_moments(first_mean, sums[1], moments[0], moments[2], moments[1], inv_size, p.eps);
  const float mean = stats.mean, rstd = stats.rstd, mean_xh_dx = stats.mean_xh_dx;  // mean_g(xh * dx)
  if (threadIdx.x == 0) {
    p.mean[group_index] = mean;
    p.rstd[group_index] = rstd;
  }

  T* y = static_cast<T*>(p.y) + offset;
  T* dy = kTangent ? static_cast<T*>(p.dy) + offset : nullptr;
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
    float xv[kWidth], dxv[kWidth];
    load_as_float<T, kWidth>(x + chunk * kWidth, xv);
    if constexpr (kTangent) load_as_float<T, kWidth>(dx + chunk * kWidth, dxv);
    const int64_t channel = g * channels_per_group + chunk * kWidth / p.hw;
    write_chunk<T, kWidth, kTangent>(p, n, channel, xv, dxv, mean, rstd, mean_dx, mean_xh_dx, y + chunk * kWidth,
                                     kTangent ? dy + chunk * kWidth : nullptr);
  }
}

// Where a thread of a resident kernel sits: its (sample, group), its rank among the group's threads and their
// count. kWarp: one warp per group, blockDim.x / 32 groups per block (the warps past the last group have none);
// else one block per group.
template <bool kWarp>
struct GroupThread {
  int64_t group_index, n, g;  // n * G + g, the sample, the group
  int64_t channels_per_group, group_size;
  int64_t offset;  // of the group's first element in the contiguous (B, C, H * W) tensors
  int rank, threads;
  __device__ __forceinline__ GroupThread(int64_t groups, int64_t channels, int64_t hw) {
    if constexpr (kWarp) {
      group_index = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
      rank = threadIdx.x % kWarpSize;
      threads = kWarpSize;
    } else {
      group_index = blockIdx.x;
      rank = threadIdx.x;
      threads = blockDim.x;
    }
    n = group_index / groups;
    g = group_index % groups;
    channels_per_group = channels / groups;
    group_size = channels_per_group * hw;
    offset = group_index * group_size;
  }
};

// Sums N values over a group's threads (a warp's butterfly, or the block's reduction), the totals on every thread.
template <bool kWarp, int N>
__device__ __forceinline__ void group_sum(float (&values)[N], float* scratch) {
  if constexpr (kWarp) {
#pragma unroll
    for (int n = 0; n < N; ++n) values[n] = warp_sum(values[n]);
  } else {
    block_sum(values, scratch);
  }
}

// The resident forward: thread t of a group holds its chunks t + i * threads (i < kItems) of x (and dx) in
// registers. Pass 1 sums x and dx, pass 2 the centred moments sum (x - mean)^2 and sum (x - mean) dx, both over
// registers; pass 3 writes. Chunks past the group's end hold zeros and write nothing. kWarp: a warp per group (small
// groups: the reductions are shuffles, no barrier), else a block.
template <typename T, int kItems, bool kTangent, bool kWarp>
__global__ void __launch_bounds__(kResidentMaxThreads, 1)
    group_norm_act_fwd_resident_kernel(const GroupNormFwdParams p) {
  constexpr int kWidth = kVec16<T>;
  __shared__ float scratch[3 * kWarpSize];
  const GroupThread<kWarp> self(p.groups, p.channels, p.hw);
  if (kWarp && self.group_index >= p.batch * p.groups) return;  // (no block barrier follows in warp mode)
  const int64_t group_index = self.group_index, n = self.n, g = self.g, offset = self.offset;
  const int64_t channels_per_group = self.channels_per_group, group_size = self.group_size;
  const int num_chunks = static_cast<int>(group_size / kWidth);

  float xv[kItems][kWidth], dxv[kTangent ? kItems : 1][kWidth];
  float sums[2] = {0.f, 0.f};
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int chunk = self.rank + item * self.threads;
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      xv[item][i] = 0.f;
      if constexpr (kTangent) dxv[item][i] = 0.f;
    }
    if (chunk < num_chunks) {
      load_as_float<T, kWidth>(static_cast<const T*>(p.x) + offset + chunk * kWidth, xv[item]);
      if constexpr (kTangent) {
        load_as_float<T, kWidth>(static_cast<const T*>(p.dx) + offset + chunk * kWidth, dxv[item]);
      }
    }
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      sums[0] += xv[item][i];
      if constexpr (kTangent) sums[1] += dxv[item][i];
    }
  }
  group_sum<kWarp>(sums, scratch);
  const float inv_size = 1.f / static_cast<float>(group_size);
  const float first_mean = sums[0] * inv_size;
  const float mean_dx = sums[1] * inv_size;

  float moments[3] = {0.f, 0.f, 0.f};  // sum (x - first_mean)^2, sum (x - first_mean) dx, sum (x - first_mean)
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    if (self.rank + item * self.threads >= num_chunks) continue;  // its zeros are not x - mean = 0
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      const float centred = xv[item][i] - first_mean;
      moments[0] += centred * centred;
      moments[2] += centred;
      if constexpr (kTangent) moments[1] += centred * dxv[item][i];
    }
  }
  group_sum<kWarp>(moments, scratch);
  const Moments stats = corrected_moments(first_mean, sums[1], moments[0], moments[1], moments[2], inv_size, p.eps);
  const float mean = stats.mean, rstd = stats.rstd, mean_xh_dx = stats.mean_xh_dx;
  if (self.rank == 0) {
    p.mean[group_index] = mean;
    p.rstd[group_index] = rstd;
  }

#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int chunk = self.rank + item * self.threads;
    if (chunk >= num_chunks) continue;
    const int64_t channel = g * channels_per_group + static_cast<int64_t>(chunk) * kWidth / p.hw;
    // without a tangent, dxv has one row and write_chunk does not read it: x stands in
    write_chunk<T, kWidth, kTangent>(p, n, channel, xv[item], kTangent ? dxv[item] : xv[item], mean, rstd, mean_dx,
                                     mean_xh_dx, static_cast<T*>(p.y) + offset + chunk * kWidth,
                                     kTangent ? static_cast<T*>(p.dy) + offset + chunk * kWidth : nullptr);
  }
}

// gv in: grad_y of one chunk of a channel; out: gh = grad_y * act'(h), the gradient at h. Adds the chunk's
// sum gh and sum gh * xh to the two sums.
template <int kWidth>
__device__ __forceinline__ void grad_at_h(bool silu, const ChannelAffine& affine, const float (&xv)[kWidth],
                                          float (&gv)[kWidth], float mean, float rstd, float& sum_gh,
                                          float& sum_gh_xh) {
#pragma unroll
  for (int i = 0; i < kWidth; ++i) {
    const float xh = (xv[i] - mean) * rstd;
    if (silu) {
      const float h = (affine.weight * xh + affine.bias) * affine.one_plus_scale + affine.shift;
      gv[i] *= silu_grad(h, sigmoid(h));
    }
    sum_gh += gv[i];
    sum_gh_xh += gv[i] * xh;
  }
}

// grad_x = rstd * (gxh - mean_g(gxh) - xh * mean_g(gxh * xh)) with gxh = weight (1 + s) gh, one chunk; plus the
// residual branch's gradient where there is one (`residual`: the chunk's grad_residual, or nullptr), in float.
template <typename T, int kWidth>
__device__ __forceinline__ void write_grad_x(const ChannelAffine& affine, const float (&xv)[kWidth],
                                             const float (&ghv)[kWidth], float mean, float rstd, float mean_gxh,
                                             float mean_gxh_xh, const T* residual, T* grad_x) {
  const float gain = affine.weight * affine.one_plus_scale;
  float gxv[kWidth];
  if (residual != nullptr) {
    load_as_float<T, kWidth>(residual, gxv);
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) gxv[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < kWidth; ++i) {
    const float xh = (xv[i] - mean) * rstd;
    gxv[i] += rstd * (gain * ghv[i] - mean_gxh - xh * mean_gxh_xh);
  }
  store_from_float<T, kWidth>(grad_x, gxv);
}

// The residual gradient's elements from `index` on, or nullptr when the backward has none.
template <typename T>
__device__ __forceinline__ const T* residual_at(const GroupNormBwdParams& p, int64_t index) {
  return p.grad_residual == nullptr ? nullptr : static_cast<const T*>(p.grad_residual) + index;
}

// The per-channel sums S1 = sum gh, S3 = sum gh * xh of one (sample, channel) give its parameter gradients
// (GroupNormBwdParams); their gain-weighted sums are added to the group's sums.
template <typename T>
__device__ __forceinline__ void finish_channel(const GroupNormBwdParams& p, const ChannelAffine& affine,
                                               int64_t sample_channel, float sum_gh, float sum_gh_xh,
                                               float (&group_sums)[2]) {
  if (p.grad_shift != nullptr) static_cast<T*>(p.grad_shift)[sample_channel] = from_float<T>(sum_gh);
  if (p.grad_scale != nullptr) {
    static_cast<T*>(p.grad_scale)[sample_channel] = from_float<T>(affine.weight * sum_gh_xh + affine.bias * sum_gh);
  }
  if (p.grad_weight_partial != nullptr) p.grad_weight_partial[sample_channel] = affine.one_plus_scale * sum_gh_xh;
  if (p.grad_bias_partial != nullptr) p.grad_bias_partial[sample_channel] = affine.one_plus_scale * sum_gh;
  const float gain = affine.weight * affine.one_plus_scale;  // gxh = gain * gh
  group_sums[0] += gain * sum_gh;
  group_sums[1] += gain * sum_gh_xh;
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
    const ChannelAffine affine = load_affine<T>(p.weight, p.bias, p.scale, p.shift, channel, sample_channel);
    float sum_gh = 0.f, sum_gh_xh = 0.f;
    for (int64_t chunk = lane; chunk < chunks_per_channel; chunk += kWarpSize) {
      const int64_t index = local_channel * p.hw + chunk * kWidth;
      float xv[kWidth], gv[kWidth];
      load_as_float<T, kWidth>(x + index, xv);
      load_as_float<T, kWidth>(grad_y + index, gv);
      grad_at_h<kWidth>(p.silu, affine, xv, gv, mean, rstd, sum_gh, sum_gh_xh);
    }
    sum_gh = warp_sum(sum_gh);
    sum_gh_xh = warp_sum(sum_gh_xh);
    if (lane == 0) {
      float sums[2] = {0.f, 0.f};
      finish_channel<T>(p, affine, sample_channel, sum_gh, sum_gh_xh, sums);
      channel_sums[local_channel] = sums[0];
      channel_sums[channels_per_group + local_channel] = sums[1];
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
    const ChannelAffine affine = load_affine<T>(p.weight, p.bias, p.scale, p.shift, channel, n * p.channels + channel);
    float xv[kWidth], gv[kWidth], unused[2] = {0.f, 0.f};
    load_as_float<T, kWidth>(x + chunk * kWidth, xv);
    load_as_float<T, kWidth>(grad_y + chunk * kWidth, gv);
    grad_at_h<kWidth>(p.silu, affine, xv, gv, mean, rstd, unused[0], unused[1]);
    // (the residual pointer from the parameter space in the loop: one held across it spilled the fp16 instance)
    write_grad_x<T, kWidth>(affine, xv, gv, mean, rstd, mean_gxh, mean_gxh_xh,
                            residual_at<T>(p, offset + chunk * kWidth), grad_x + chunk * kWidth);
  }
}

// The resident backward: thread t of a group holds its chunks t + i * threads of x and gh in registers. A channel's
// chunks are consecutive, `segment` = min(chunks per channel, 32) (both powers of two) lanes of one warp per item,
// so its sums are a butterfly within each segment, written per segment to shared memory and added per channel in a
// fixed order (deterministic, no atomics); then the group sums and grad_x from registers. kWarp: a warp per group
// (each with its own shared-memory slice; __syncwarp, no block barrier), else a block.
template <typename T, int kItems, bool kWarp>
__global__ void __launch_bounds__(kResidentMaxThreads, 1)
    group_norm_act_bwd_resident_kernel(const GroupNormBwdParams p) {
  constexpr int kWidth = kVec16<T>;
  IMF_DYNAMIC_SMEM(float, smem);  // per group: [segments] sum gh, then [segments] sum gh * xh
  __shared__ float scratch[2 * kWarpSize];
  const GroupThread<kWarp> self(p.groups, p.channels, p.hw);
  if (kWarp && self.group_index >= p.batch * p.groups) return;  // (no block barrier follows in warp mode)
  const int64_t group_index = self.group_index, n = self.n, g = self.g, offset = self.offset;
  const int channels_per_group = static_cast<int>(self.channels_per_group);
  const int64_t group_size = self.group_size;
  const float mean = p.mean[group_index];
  const float rstd = p.rstd[group_index];
  const int chunks_per_channel = static_cast<int>(p.hw / kWidth);
  const int segment = min(chunks_per_channel, kWarpSize);
  const int num_chunks = channels_per_group * chunks_per_channel;
  const int num_segments = num_chunks / segment;
  const int lane = threadIdx.x % kWarpSize;
  float* segment_sums = smem + (kWarp ? 2 * num_segments * (threadIdx.x / kWarpSize) : 0);

  float xv[kItems][kWidth], gv[kItems][kWidth];
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int chunk = self.rank + item * self.threads;
    float sum_gh = 0.f, sum_gh_xh = 0.f;
    if (chunk < num_chunks) {
      const int64_t channel = g * channels_per_group + chunk / chunks_per_channel;
      const ChannelAffine affine =
          load_affine<T>(p.weight, p.bias, p.scale, p.shift, channel, n * p.channels + channel);
      load_as_float<T, kWidth>(static_cast<const T*>(p.x) + offset + chunk * kWidth, xv[item]);
      load_as_float<T, kWidth>(static_cast<const T*>(p.grad_y) + offset + chunk * kWidth, gv[item]);
      grad_at_h<kWidth>(p.silu, affine, xv[item], gv[item], mean, rstd, sum_gh, sum_gh_xh);
    }
    for (int width = segment / 2; width > 0; width /= 2) {  // every lane takes part (segments never straddle the end)
      sum_gh += __shfl_xor_sync(kFullMask, sum_gh, width);
      sum_gh_xh += __shfl_xor_sync(kFullMask, sum_gh_xh, width);
    }
    if (chunk < num_chunks && lane % segment == 0) {
      segment_sums[chunk / segment] = sum_gh;
      segment_sums[num_segments + chunk / segment] = sum_gh_xh;
    }
  }
  if constexpr (kWarp) {
    __syncwarp();
  } else {
    __syncthreads();
  }

  const int segments_per_channel = chunks_per_channel / segment;
  float group_sums[2] = {0.f, 0.f};
  for (int local_channel = self.rank; local_channel < channels_per_group; local_channel += self.threads) {
    float sum_gh = 0.f, sum_gh_xh = 0.f;
    for (int k = local_channel * segments_per_channel; k < (local_channel + 1) * segments_per_channel; ++k) {
      sum_gh += segment_sums[k];
      sum_gh_xh += segment_sums[num_segments + k];
    }
    const int64_t channel = g * channels_per_group + local_channel;
    const int64_t sample_channel = n * p.channels + channel;
    const ChannelAffine affine = load_affine<T>(p.weight, p.bias, p.scale, p.shift, channel, sample_channel);
    finish_channel<T>(p, affine, sample_channel, sum_gh, sum_gh_xh, group_sums);
  }
  group_sum<kWarp>(group_sums, scratch);
  const float inv_size = 1.f / static_cast<float>(group_size);
  const float mean_gxh = group_sums[0] * inv_size;
  const float mean_gxh_xh = group_sums[1] * inv_size;

#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int chunk = self.rank + item * self.threads;
    if (chunk >= num_chunks) continue;
    const int64_t channel = g * channels_per_group + chunk / chunks_per_channel;
    const ChannelAffine affine = load_affine<T>(p.weight, p.bias, p.scale, p.shift, channel, n * p.channels + channel);
    const int64_t index = offset + chunk * kWidth;
    write_grad_x<T, kWidth>(affine, xv[item], gv[item], mean, rstd, mean_gxh, mean_gxh_xh, residual_at<T>(p, index),
                            static_cast<T*>(p.grad_x) + index);
  }
}

// grad_weight[c] = sum_n grad_weight_partial[n, c] (and grad_bias alike), the backward's second launch: a block
// takes kParamColumns channels; its kParamRows rows of threads each sum every kParamRows-th sample in order, then
// row 0 adds the rows' sums in order (the same result every run). Its data is small (2 B C floats: 512 KiB at
// latent-b's B256 C256), so its time is latency: 8 columns (one 32-byte sector a row) by 32 rows leave a thread 8
// samples of each partial at batch 256, loaded kParamUnroll at a time into registers of their own before any is
// added (summed as they arrived, ptxas waited for each load before issuing the next: sm_90 SASS), where 32 columns
// by 8 rows left a thread 32 (the Triton twin of that shape measured ~10 us at C256 B256; this one not yet timed).
constexpr int kParamColumns = 8, kParamRows = 32, kParamUnroll = 8;

template <typename T>
__global__ void __launch_bounds__(kParamColumns * kParamRows)
    group_norm_param_grads_kernel(const GroupNormBwdParams p) {
  __shared__ float rows[2][kParamRows][kParamColumns];
  const int column = threadIdx.x % kParamColumns, row = threadIdx.x / kParamColumns;
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * kParamColumns + column;
  const float* partials[2] = {p.grad_weight_partial, p.grad_bias_partial};
  float sums[2] = {0.f, 0.f};
  if (channel < p.channels) {
    for (int64_t base = row; base < p.batch; base += kParamRows * kParamUnroll) {
      float values[2][kParamUnroll];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
#pragma unroll
        for (int i = 0; i < kParamUnroll; ++i) {
          const int64_t n = base + static_cast<int64_t>(i) * kParamRows;
          values[k][i] = partials[k] != nullptr && n < p.batch ? partials[k][n * p.channels + channel] : 0.f;
        }
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) {
#pragma unroll
        for (int i = 0; i < kParamUnroll; ++i) sums[k] += values[k][i];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < 2; ++k) rows[k][row][column] = sums[k];
  __syncthreads();
  if (row != 0 || channel >= p.channels) return;
  void* outputs[2] = {p.grad_weight, p.grad_bias};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (outputs[k] == nullptr) continue;
    float total = 0.f;
    for (int r = 0; r < kParamRows; ++r) total += rows[k][r][column];
    static_cast<T*>(outputs[k])[channel] = from_float<T>(total);
  }
}

}  // namespace

int64_t group_norm_bwd_smem_bytes(int64_t channels_per_group) {
  return 2 * channels_per_group * static_cast<int64_t>(sizeof(float));
}

GroupNormLaunch group_norm_launch(int64_t hw, int64_t channels_per_group, int64_t element_size, bool vectorized,
                                  int kernel) {
  const GroupNormLaunch looped{0, kThreads, 1}, refused{-1, 0, 0};
  const int64_t width = 16 / element_size;
  const int64_t chunks_per_channel = hw / width;
  const int64_t num_chunks = channels_per_group * chunks_per_channel;
  const bool resident = vectorized && (chunks_per_channel & (chunks_per_channel - 1)) == 0 &&
                        num_chunks <= static_cast<int64_t>(kResidentMaxThreads) * kResidentMaxItems;
  const bool warp = resident && num_chunks <= static_cast<int64_t>(kWarpSize) * kResidentMaxItems;
  if (kernel == 1 || (kernel == 0 && (!resident || num_chunks > kResidentAutoMaxChunks))) return looped;
  if ((kernel == 2 && !resident) || (kernel == 3 && !warp)) return refused;
  if (kernel == 3 || (kernel == 0 && warp)) {
    int items = 1;
    while (kWarpSize * items < num_chunks) items *= 2;
    return GroupNormLaunch{items, kThreads, kThreads / kWarpSize};
  }
  for (const int limit : {256, kResidentMaxThreads}) {
    for (int items = 1; items <= kResidentMaxItems; items *= 2) {
      const int64_t threads = (num_chunks + items - 1) / items;
      if (threads <= limit) {
        return GroupNormLaunch{items, static_cast<int>((threads + kWarpSize - 1) / kWarpSize * kWarpSize), 1};
      }
    }
  }
  return refused;  // unreachable: `resident` bounds num_chunks
}

void group_norm_act_fwd(const GroupNormFwdParams& params, cudaStream_t stream) {
  const int64_t groups = params.batch * params.groups;
  const int64_t channels_per_group = params.channels / params.groups;
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kVec16<T>;
    const GroupNormLaunch rule = group_norm_launch(params.hw, channels_per_group, static_cast<int64_t>(sizeof(T)),
                                                   params.vectorized, params.kernel);
    const dim3 grid(static_cast<unsigned>((groups + rule.groups_per_block - 1) / rule.groups_per_block));
    auto launch = [&](auto kernel) {
      IMF_LAUNCH(kernel, grid, rule.threads, 0, stream)(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rule.items > 0) {
      dispatch_int<1, 2, 4>(rule.items, [&](auto items) {
        constexpr int kItems = decltype(items)::value;
        const bool tangent = params.dx != nullptr;
        if (rule.groups_per_block > 1) {
          tangent ? launch(group_norm_act_fwd_resident_kernel<T, kItems, true, true>)
                  : launch(group_norm_act_fwd_resident_kernel<T, kItems, false, true>);
        } else {
          tangent ? launch(group_norm_act_fwd_resident_kernel<T, kItems, true, false>)
                  : launch(group_norm_act_fwd_resident_kernel<T, kItems, false, false>);
        }
      });
    } else if (params.dx != nullptr) {
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
  const int64_t groups = params.batch * params.groups;
  const int64_t channels_per_group = params.channels / params.groups;
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kVec16<T>;
    const GroupNormLaunch rule = group_norm_launch(params.hw, channels_per_group, static_cast<int64_t>(sizeof(T)),
                                                   params.vectorized, params.kernel);
    const dim3 grid(static_cast<unsigned>((groups + rule.groups_per_block - 1) / rule.groups_per_block));
    auto launch = [&](auto kernel, size_t smem) {
      IMF_LAUNCH(kernel, grid, rule.threads, smem, stream)(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rule.items > 0) {
      // two floats per warp segment of a channel's chunks, per group of the block: <= 16 KiB (a block per group),
      // <= 8 KiB (8 groups of <= 128 chunks)
      const int64_t chunks_per_channel = params.hw / kVec;
      const int64_t segment = std::min<int64_t>(chunks_per_channel, kWarpSize);
      const int64_t segments = channels_per_group * chunks_per_channel / segment;
      const size_t smem = static_cast<size_t>(2 * segments * rule.groups_per_block) * sizeof(float);
      dispatch_int<1, 2, 4>(rule.items, [&](auto items) {
        constexpr int kItems = decltype(items)::value;
        if (rule.groups_per_block > 1) {
          launch(group_norm_act_bwd_resident_kernel<T, kItems, true>, smem);
        } else {
          launch(group_norm_act_bwd_resident_kernel<T, kItems, false>, smem);
        }
      });
    } else {
      const size_t smem = static_cast<size_t>(group_norm_bwd_smem_bytes(channels_per_group));
      if (params.vectorized) {
        launch(group_norm_act_bwd_kernel<T, kVec>, smem);
      } else {
        launch(group_norm_act_bwd_kernel<T, 1>, smem);
      }
    }
    if (params.grad_weight != nullptr || params.grad_bias != nullptr) {
      const dim3 columns(static_cast<unsigned>((params.channels + kParamColumns - 1) / kParamColumns));
      IMF_LAUNCH(group_norm_param_grads_kernel<T>, columns, kParamColumns * kParamRows, 0, stream)(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace imf
