// Short-context cross-attention, one query row per warp: s_j = scale q.k_j, p = softmax(s), o = sum_j p_j v_j;
// tangent do = sum_j p_j ds_j v_j - (sum_j p_j ds_j) o + sum_j p_j dv_j, ds_j = scale (dq.k_j + q.dk_j).
// The context (Lk <= 64 tokens: K, V, dK, dV) sits in shared memory, so the memory floor is one read of q
// (and dq) and one write of o (and do, lse) per query row; no KV loop (DESIGN 4.3).
#include <type_traits>

#include "common.cuh"

namespace imf {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxKeys = kAttentionMaxKeys;  // two keys per lane
constexpr int kRowsPerBlock = 64;            // forward: query rows of one block, kRowsPerBlock / kWarps per warp
constexpr int kTileRows = 16;                // backward: query rows staged in shared memory at a time

// Shared-memory rows of K/V are padded to D + 1 floats: lane j reading k_j[d] then hits bank (j + d) % 32.
__host__ __device__ constexpr int padded(int head_dim) { return head_dim + 1; }

__host__ __device__ constexpr int64_t fwd_warp_floats(int head_dim, bool tangent) {
  // q row, probabilities p (and dq row, p * ds for the tangent)
  return tangent ? 2 * head_dim + 2 * kMaxKeys : head_dim + kMaxKeys;
}

// Copies rows x[0:rows, 0:D] (row stride D, dtype T) into shared memory as fp32 with row stride `stride`,
// 16-byte loads when kWidth is a full vector. All threads of the block take part.
template <typename T, int kWidth>
__device__ __forceinline__ void stage_rows(const T* src, int64_t rows, int head_dim, float* dst, int stride) {
  const int64_t chunks = rows * head_dim / kWidth;
  for (int64_t chunk = threadIdx.x; chunk < chunks; chunk += kThreads) {
    const int64_t row = chunk * kWidth / head_dim;
    const int64_t col = chunk * kWidth % head_dim;
    float values[kWidth];
    load_as_float<T, kWidth>(src + chunk * kWidth, values);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) dst[row * stride + col + i] = values[i];
  }
}

// Same for one row, by the 32 lanes of a warp.
template <typename T, int kWidth, int D>
__device__ __forceinline__ void stage_row_warp(const T* src, float* dst, int lane) {
  for (int chunk = lane; chunk < D / kWidth; chunk += kWarpSize) {
    float values[kWidth];
    load_as_float<T, kWidth>(src + chunk * kWidth, values);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) dst[chunk * kWidth + i] = values[i];
  }
}

template <int D>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
  float sum = 0.f;
#pragma unroll 8
  for (int d = 0; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

// grid (BH, ceil(Lq / kRowsPerBlock)); lane j holds keys j and j + 32 while scoring, then lane l owns output
// columns l, l + 32, ... while mixing the values.
template <typename T, int D, int kWidth, bool kTangent>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionFwdParams p) {
  IMF_DYNAMIC_SMEM(float, smem);
  constexpr int kStride = padded(D);
  const int lk = p.lk;
  const int64_t bh = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const bool has_dk = kTangent && p.dk != nullptr;
  const bool has_dv = kTangent && p.dv != nullptr;

  float* k_s = smem;
  float* v_s = k_s + lk * kStride;
  float* dk_s = v_s + lk * kStride;
  float* dv_s = dk_s + (has_dk ? lk * kStride : 0);
  float* warp_buffer = dv_s + (has_dv ? lk * kStride : 0) + warp * fwd_warp_floats(D, kTangent);
  float* q_row = warp_buffer;
  float* prob = q_row + D;
  float* dq_row = prob + kMaxKeys;
  float* prob_ds = dq_row + D;

  const int64_t kv_offset = bh * lk * D;
  stage_rows<T, kWidth>(static_cast<const T*>(p.k) + kv_offset, lk, D, k_s, kStride);
  stage_rows<T, kWidth>(static_cast<const T*>(p.v) + kv_offset, lk, D, v_s, kStride);
  if (has_dk) stage_rows<T, kWidth>(static_cast<const T*>(p.dk) + kv_offset, lk, D, dk_s, kStride);
  if (has_dv) stage_rows<T, kWidth>(static_cast<const T*>(p.dv) + kv_offset, lk, D, dv_s, kStride);
  __syncthreads();

  const int64_t row_end = min(p.lq, static_cast<int64_t>(blockIdx.y + 1) * kRowsPerBlock);
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + warp; row < row_end; row += kWarps) {
    const int64_t row_offset = (bh * p.lq + row) * D;
    stage_row_warp<T, kWidth, D>(static_cast<const T*>(p.q) + row_offset, q_row, lane);
    if constexpr (kTangent) stage_row_warp<T, kWidth, D>(static_cast<const T*>(p.dq) + row_offset, dq_row, lane);
    __syncwarp();

    float s[2], ds[2] = {0.f, 0.f};
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      const int j = lane + slot * kWarpSize;
      s[slot] = -INFINITY;
      if (j < lk) {
        s[slot] = p.scale * dot_row<D>(q_row, k_s + j * kStride);
        if constexpr (kTangent) {
          float tangent = dot_row<D>(dq_row, k_s + j * kStride);
          if (has_dk) tangent += dot_row<D>(q_row, dk_s + j * kStride);
          ds[slot] = p.scale * tangent;
        }
      }
    }
    const float m = warp_max(fmaxf(s[0], s[1]));
    float e[2];
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) e[slot] = lane + slot * kWarpSize < lk ? expf(s[slot] - m) : 0.f;
    const float l = warp_sum(e[0] + e[1]);
    const float inv_l = 1.f / l;
    float rs = 0.f;  // sum_j p_j ds_j
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      prob[lane + slot * kWarpSize] = e[slot] * inv_l;
      if constexpr (kTangent) {
        prob_ds[lane + slot * kWarpSize] = e[slot] * inv_l * ds[slot];
        rs += e[slot] * inv_l * ds[slot];
      }
    }
    if constexpr (kTangent) rs = warp_sum(rs);
    __syncwarp();

    T* o = static_cast<T*>(p.o) + row_offset;
#pragma unroll
    for (int col = lane; col < D; col += kWarpSize) {
      float acc = 0.f, acc_dsv = 0.f, acc_dv = 0.f;
      for (int j = 0; j < lk; ++j) {
        const float value = v_s[j * kStride + col];
        acc += prob[j] * value;
        if constexpr (kTangent) {
          acc_dsv += prob_ds[j] * value;
          if (has_dv) acc_dv += prob[j] * dv_s[j * kStride + col];
        }
      }
      o[col] = from_float<T>(acc);
      if constexpr (kTangent) static_cast<T*>(p.d_o)[row_offset + col] = from_float<T>(acc_dv + acc_dsv - rs * acc);
    }
    if (lane == 0) p.lse[bh * p.lq + row] = m + logf(l);
    __syncwarp();  // q_row and prob are rewritten for the next row
  }
}

// grid (BH, num_splits); a block takes a contiguous slice of query rows, kTileRows at a time. Per row (one
// warp): P_ij = exp(s_ij - lse_i), dP_ij = grad_o_i.v_j, Delta_i = sum_j P_ij dP_ij, dS_ij = P_ij (dP_ij -
// Delta_i), grad_q_i = scale sum_j dS_ij k_j. Per tile, each thread owns D / 4 (key, column) pairs and
// accumulates grad_v_j += P_ij grad_o_i, grad_k_j += scale dS_ij q_i into registers (no atomics: the
// split's partial sums are written once and summed by the caller). Launch bounds (kThreads, 1) let ptxas use
// up to 255 registers: with the default it capped some D = 32 instantiations at 64 and spilled.
template <typename T, int D, int kWidth>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_kernel(const AttentionBwdParams p) {
  IMF_DYNAMIC_SMEM(float, smem);
  constexpr int kStride = padded(D);
  constexpr int kPairs = kMaxKeys * D / kThreads;
  const int lk = p.lk;
  const int64_t bh = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  float* k_s = smem;
  float* v_s = k_s + lk * kStride;
  float* q_tile = v_s + lk * kStride;     // [kTileRows][D]
  float* go_tile = q_tile + kTileRows * D;  // [kTileRows][D]
  float* prob_tile = go_tile + kTileRows * D;  // [kTileRows][kMaxKeys]
  float* ds_tile = prob_tile + kTileRows * kMaxKeys;

  const int64_t kv_offset = bh * lk * D;
  stage_rows<T, kWidth>(static_cast<const T*>(p.k) + kv_offset, lk, D, k_s, kStride);
  stage_rows<T, kWidth>(static_cast<const T*>(p.v) + kv_offset, lk, D, v_s, kStride);

  const int64_t rows_per_split = (p.lq + p.num_splits - 1) / p.num_splits;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = min(p.lq, row_begin + rows_per_split);

  float grad_k_acc[kPairs], grad_v_acc[kPairs];
#pragma unroll
  for (int pair = 0; pair < kPairs; ++pair) grad_k_acc[pair] = grad_v_acc[pair] = 0.f;

  for (int64_t tile_begin = row_begin; tile_begin < row_end; tile_begin += kTileRows) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), row_end - tile_begin));
    const int64_t tile_offset = (bh * p.lq + tile_begin) * D;
    stage_rows<T, kWidth>(static_cast<const T*>(p.q) + tile_offset, rows, D, q_tile, D);
    stage_rows<T, kWidth>(static_cast<const T*>(p.grad_o) + tile_offset, rows, D, go_tile, D);
    __syncthreads();  // also covers the K/V staging before the first tile

    for (int i = warp; i < rows; i += kWarps) {
      const float lse = p.lse[bh * p.lq + tile_begin + i];
      float prob[2] = {0.f, 0.f}, dprob[2] = {0.f, 0.f};
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        const int j = lane + slot * kWarpSize;
        if (j < lk) {
          prob[slot] = expf(p.scale * dot_row<D>(q_tile + i * D, k_s + j * kStride) - lse);
          dprob[slot] = dot_row<D>(go_tile + i * D, v_s + j * kStride);
        }
      }
      const float delta = warp_sum(prob[0] * dprob[0] + prob[1] * dprob[1]);
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        prob_tile[i * kMaxKeys + lane + slot * kWarpSize] = prob[slot];
        ds_tile[i * kMaxKeys + lane + slot * kWarpSize] = prob[slot] * (dprob[slot] - delta);
      }
      __syncwarp();
      T* grad_q = static_cast<T*>(p.grad_q) + tile_offset + i * D;
#pragma unroll
      for (int col = lane; col < D; col += kWarpSize) {
        float acc = 0.f;
        for (int j = 0; j < lk; ++j) acc += ds_tile[i * kMaxKeys + j] * k_s[j * kStride + col];
        grad_q[col] = from_float<T>(p.scale * acc);
      }
    }
    __syncthreads();

#pragma unroll
    for (int pair = 0; pair < kPairs; ++pair) {
      const int index = threadIdx.x + pair * kThreads;
      const int j = index / D;
      const int col = index % D;
      if (j < lk) {
        for (int i = 0; i < rows; ++i) {
          grad_v_acc[pair] += prob_tile[i * kMaxKeys + j] * go_tile[i * D + col];
          grad_k_acc[pair] += ds_tile[i * kMaxKeys + j] * q_tile[i * D + col];
        }
      }
    }
    __syncthreads();  // the tiles are overwritten by the next iteration
  }

  const int64_t partial_offset = (bh * p.num_splits + blockIdx.y) * lk * D;
#pragma unroll
  for (int pair = 0; pair < kPairs; ++pair) {
    const int index = threadIdx.x + pair * kThreads;
    if (index / D < lk) {
      p.grad_k_partial[partial_offset + index] = p.scale * grad_k_acc[pair];
      p.grad_v_partial[partial_offset + index] = grad_v_acc[pair];
    }
  }
}

// Calls `launch(std::integral_constant<int, D>{})` for the supported head dims.
template <typename Launch>
void dispatch_head_dim(int head_dim, Launch&& launch) {
  switch (head_dim) {
    case 32:
      launch(std::integral_constant<int, 32>{});
      break;
    case 64:
      launch(std::integral_constant<int, 64>{});
      break;
    case 128:
      launch(std::integral_constant<int, 128>{});
      break;
  }
}

}  // namespace

int64_t attention_fwd_smem_bytes(int lk, int head_dim, bool tangent, bool has_dk, bool has_dv) {
  const int64_t context_rows = lk * (2 + (tangent && has_dk ? 1 : 0) + (tangent && has_dv ? 1 : 0));
  const int64_t floats = context_rows * padded(head_dim) + kWarps * fwd_warp_floats(head_dim, tangent);
  return floats * static_cast<int64_t>(sizeof(float));
}

int64_t attention_bwd_smem_bytes(int lk, int head_dim) {
  const int64_t floats =
      2 * static_cast<int64_t>(lk) * padded(head_dim) + 2 * kTileRows * head_dim + 2 * kTileRows * kMaxKeys;
  return floats * static_cast<int64_t>(sizeof(float));
}

void attention_fwd(const AttentionFwdParams& params, cudaStream_t stream) {
  const bool tangent = params.dq != nullptr;
  const int64_t smem =
      attention_fwd_smem_bytes(params.lk, params.head_dim, tangent, params.dk != nullptr, params.dv != nullptr);
  const dim3 grid(static_cast<unsigned>(params.batch_heads),
                  static_cast<unsigned>((params.lq + kRowsPerBlock - 1) / kRowsPerBlock));
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(params.head_dim, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      auto launch = [&](auto kernel) {
        IMF_ALLOW_DYNAMIC_SMEM(kernel, smem);
        IMF_LAUNCH(kernel, grid, kThreads, smem, stream)(params);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (tangent) {
        if (params.vectorized) {
          launch(attention_fwd_kernel<T, D, kVec16<T>, true>);
        } else {
          launch(attention_fwd_kernel<T, D, 1, true>);
        }
      } else if (params.vectorized) {
        launch(attention_fwd_kernel<T, D, kVec16<T>, false>);
      } else {
        launch(attention_fwd_kernel<T, D, 1, false>);
      }
    });
  });
}

void attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  const int64_t smem = attention_bwd_smem_bytes(params.lk, params.head_dim);
  const dim3 grid(static_cast<unsigned>(params.batch_heads), static_cast<unsigned>(params.num_splits));
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(params.head_dim, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      auto launch = [&](auto kernel) {
        IMF_ALLOW_DYNAMIC_SMEM(kernel, smem);
        IMF_LAUNCH(kernel, grid, kThreads, smem, stream)(params);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (params.vectorized) {
        launch(attention_bwd_kernel<T, D, kVec16<T>>);
      } else {
        launch(attention_bwd_kernel<T, D, 1>);
      }
    });
  });
}

}  // namespace imf
