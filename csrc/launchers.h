// Host launchers of the CUDA kernels, called by bindings.cpp with raw pointers and the caller's stream.
// The .cu files see no ATen: they compile in seconds, and bindings.cpp owns every torch-level check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace imf {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// group_norm.cu. x: (B, C, HW) of `dtype`; weight/bias: (C,), scale/shift/dscale/dshift: (B, C), all of `dtype`
// (read as they are: no conversion launches) and null when absent. dx null selects the primal kernel.
// mean/rstd: (B, G) float32.
struct GroupNormFwdParams {
  DType dtype;
  int64_t batch, channels, groups, hw;
  float eps;
  bool silu;
  bool vectorized;  // 16-byte loads: hw % (16 / sizeof(T)) == 0 and every tensor pointer 16-byte aligned
  int kernel;       // the kind asked for: group_norm_launch's `kernel` (0: its rule)
  const void* x;
  const void* dx;
  const void* weight;
  const void* bias;
  const void* scale;
  const void* shift;
  const void* dscale;
  const void* dshift;
  void* y;
  void* dy;
  float* mean;
  float* rstd;
};

// Writes grad_x and every parameter gradient (null where the parameter is absent), all of `dtype` but the partials.
// With gh the gradient at h (before the activation) and its per-(sample, channel) sums S1 = sum_hw gh,
// S3 = sum_hw gh * xh: grad_shift = S1, grad_scale = weight S3 + bias S1 (B, C); the first kernel writes
// (1 + scale) S3 and (1 + scale) S1 to grad_weight_partial / grad_bias_partial ((B, C) float32), a second one sums
// them over the batch in a fixed order into grad_weight / grad_bias (C,): two launches, deterministic.
struct GroupNormBwdParams {
  DType dtype;
  int64_t batch, channels, groups, hw;
  bool silu;
  bool vectorized;
  int kernel;  // as GroupNormFwdParams::kernel
  const void* grad_y;
  const void* x;
  const void* weight;
  const void* bias;
  const void* scale;
  const void* shift;
  const float* mean;
  const float* rstd;
  const void* grad_residual;  // nullptr, or x's shape: a residual branch's gradient of x, added into grad_x
  void* grad_x;
  void* grad_scale;
  void* grad_shift;
  float* grad_weight_partial;
  float* grad_bias_partial;
  void* grad_weight;
  void* grad_bias;
};

// Which GroupNorm kernels a launch runs. The resident ones (items > 0: each thread holds `items` 16-byte chunks of
// its group in registers) take the vector path where a channel holds a power-of-two number of chunks and a group
// at most 2048 chunks: a group of at most 128 chunks to a warp (groups_per_block = 8 on 256 threads, items the
// fewest of 1, 2, 4 that hold it), a larger one to a block (groups_per_block = 1; items the fewest of 1, 2, 4 that
// keep it within 256 threads, else within 512). Every other group runs the looped kernels (items = 0, 256 threads).
// `kernel` asks for one kind: 0 the rule's, 1 looped, 2 resident with a block per group, 3 resident with a warp per
// group; items = -1 when the group does not fit the kind asked for.
struct GroupNormLaunch {
  int items = 0;
  int threads = 0;
  int groups_per_block = 1;
};
GroupNormLaunch group_norm_launch(int64_t hw, int64_t channels_per_group, int64_t element_size, bool vectorized,
                                  int kernel = 0);

void group_norm_act_fwd(const GroupNormFwdParams& params, cudaStream_t stream);
void group_norm_act_bwd(const GroupNormBwdParams& params, cudaStream_t stream);
// Dynamic shared memory of the backward kernel (two floats per channel of a group).
int64_t group_norm_bwd_smem_bytes(int64_t channels_per_group);

// attention.cu. q: (BH, Lq, D), k, v: (BH, Lk, D), Lk <= kMaxKeys, D in {32, 64, 128}; tangents null when
// absent (dq null selects the primal kernel); lse: (BH, Lq) float32.
constexpr int kAttentionMaxKeys = 64;

struct AttentionFwdParams {
  DType dtype;
  int64_t batch_heads, lq;
  int lk, head_dim;
  float scale;
  bool vectorized;
  const void* q;
  const void* k;
  const void* v;
  const void* dq;
  const void* dk;
  const void* dv;
  void* o;
  void* d_o;
  float* lse;
};

// grad_k_partial, grad_v_partial: (BH, num_splits, Lk, D) float32, one slice per block of query rows, which a
// second launch sums over the split axis in order into grad_k, grad_v (BH, Lk, D) of `dtype` (deterministic).
struct AttentionBwdParams {
  DType dtype;
  int64_t batch_heads, lq;
  int lk, head_dim, num_splits;
  float scale;
  bool vectorized;
  const void* grad_o;
  const void* q;
  const void* k;
  const void* v;
  const float* lse;
  void* grad_q;
  float* grad_k_partial;
  float* grad_v_partial;
  void* grad_k;
  void* grad_v;
};

void attention_fwd(const AttentionFwdParams& params, cudaStream_t stream);
void attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);
int64_t attention_fwd_smem_bytes(int lk, int head_dim, bool tangent, bool has_dk, bool has_dv);
int64_t attention_bwd_smem_bytes(int lk, int head_dim);

// loss.cu. u, du, v, v_target: (B, N) of `dtype`; t, r: (B,) float32. The residual of the u-head is
// u + coef * du - v_target, coef = t - r (iMF) or clip(t - r, 0, 1) (MeanFlow, where v and the v-head terms
// are absent: v, loss_v, w_v, grad_v are null).
struct LossFwdParams {
  DType dtype;
  int64_t batch, numel;
  float c, power;  // w = (L + c)^-power
  bool meanflow;
  bool vectorized;
  const void* u;
  const void* du;
  const void* v;
  const void* v_target;
  const float* t;
  const float* r;
  float* loss_u;
  float* loss_v;
  float* w_u;
  float* w_v;
  float* totals;  // (3,) iMF [mean_b(w_u L_u + w_v L_v), mean_b L_u, mean_b L_v], (2,) MeanFlow [mean_b(w L), mean_b L]
};

struct LossBwdParams {
  DType dtype;
  int64_t batch, numel;
  bool meanflow;
  bool vectorized;
  const float* grad_total;  // 0-d, read on the device: no host synchronisation
  const void* u;
  const void* du;
  const void* v;
  const void* v_target;
  const float* t;
  const float* r;
  const float* w_u;
  const float* w_v;
  void* grad_u;
  void* grad_v;
};

void loss_fwd(const LossFwdParams& params, cudaStream_t stream);
void loss_bwd(const LossBwdParams& params, cudaStream_t stream);

}  // namespace imf
