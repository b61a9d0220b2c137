// Short-context cross-attention: s_j = scale q.k_j, p = softmax(s), o = sum_j p_j v_j; tangent
// do = sum_j p_j ds_j v_j - (sum_j p_j ds_j) o + sum_j p_j dv_j, ds_j = scale (dq.k_j + q.dk_j).
// The context (Lk <= 64 tokens: K, V, dK, dV) sits in shared memory, so the memory floor is one read of q
// (and dq) and one write of o (and do, lse) per query row; no KV loop (DESIGN 4.3). The forward takes
// 4 query rows per warp at once (2 at D = 128), so each shared-memory read of a key or value feeds every one.

#include "common.cuh"

namespace imf {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxKeys = kAttentionMaxKeys;  // two keys per lane
constexpr int kRowsPerBlock = 64;            // forward: query rows of one block, kRowsPerBlock / kWarps per warp
// forward: query rows a warp takes at once (2 at D = 128, so that Lk = 64 with every tangent fits an A100's 163 KiB)
__host__ __device__ constexpr int row_tile(int head_dim) { return head_dim >= 128 ? 2 : 4; }
constexpr int kTileRows = 16;                // backward: query rows staged in shared memory at a time

// Shared-memory rows (K, V, dK, dV, staged query rows) are padded to D + 4 floats: 16-byte aligned for 4-float
// reads, and the 8 lanes of a quarter warp reading rows j..j+7 at one column land on distinct banks ((4 j + d) % 32).
__host__ __device__ constexpr int smem_stride(int head_dim) { return head_dim + 4; }
// The context rows staged, rounded up to a multiple of 4 (zeros past Lk where a loop reads them), so loops over keys
// read 4 probabilities at once.
__host__ __device__ constexpr int staged_keys(int lk) { return (lk + 3) / 4 * 4; }

__host__ __device__ constexpr int64_t fwd_warp_floats(int head_dim, bool tangent) {
  // row_tile q rows and probabilities p (and dq rows, p * ds for the tangent)
  return row_tile(head_dim) * (tangent ? 2 * head_dim + 2 * kMaxKeys : head_dim + kMaxKeys);
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

// Zero rows [rows, padded_rows) of a staged context (stride `stride`), so reads past Lk see 0, not stale values.
__device__ __forceinline__ void zero_rows(float* dst, int rows, int padded_rows, int stride) {
  for (int index = rows * stride + threadIdx.x; index < padded_rows * stride; index += kThreads) dst[index] = 0.f;
}

// Copies `rows` (<= row_tile(D)) query rows of D elements into a warp's shared buffer (row stride D), zeros for the
// rows of the tile past the end. The 32 lanes of a warp take part.
template <typename T, int kWidth, int D>
__device__ __forceinline__ void stage_tile_warp(const T* src, int rows, float* dst, int lane) {
  for (int chunk = lane; chunk < row_tile(D) * D / kWidth; chunk += kWarpSize) {
    const int row = chunk * kWidth / D;
    float values[kWidth];
    if (row < rows) {
      load_as_float<T, kWidth>(src + chunk * kWidth, values);
    } else {
#pragma unroll
      for (int i = 0; i < kWidth; ++i) values[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < kWidth; ++i) dst[chunk * kWidth + i] = values[i];
  }
}

__device__ __forceinline__ float4 load4(const float* src) { return *reinterpret_cast<const float4*>(src); }
// Component i (0..3) of a float4 (i is a constant after unrolling).
__device__ __forceinline__ float component(const float4& a, int i) {
  return i == 0 ? a.x : i == 1 ? a.y : i == 2 ? a.z : a.w;
}
__device__ __forceinline__ float dot4(const float4& a, const float4& b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// grid (BH, ceil(Lq / kRowsPerBlock)); each warp takes kRowTile = row_tile(D) query rows at a time. Scores: lane j
// holds keys j and j + 32 (two slots) and forms s[row][slot] for the tile's rows from 16-byte shared-memory reads,
// one read of k_j per 4 dimensions for kRowTile rows. Values: lane l owns output columns l, l + 32, ... and reads p
// (4 keys at once) and v_j once for kRowTile rows.
template <typename T, int D, int kWidth, bool kTangent>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttentionFwdParams p) {
  IMF_DYNAMIC_SMEM(float, smem);
  constexpr int kStride = smem_stride(D);
  constexpr int kCols = D / kWarpSize;  // output columns per lane
  constexpr int kRowTile = row_tile(D);
  const int lk = p.lk;
  const int context_rows = staged_keys(lk);
  const int64_t bh = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const bool has_dk = kTangent && p.dk != nullptr;
  const bool has_dv = kTangent && p.dv != nullptr;

  float* k_s = smem;
  float* v_s = k_s + context_rows * kStride;
  float* dk_s = v_s + context_rows * kStride;
  float* dv_s = dk_s + (has_dk ? context_rows * kStride : 0);
  float* q_tile = dv_s + (has_dv ? context_rows * kStride : 0) + warp * fwd_warp_floats(D, kTangent);
  float* prob = q_tile + kRowTile * D;     // [kRowTile][kMaxKeys]
  float* dq_tile = prob + kRowTile * kMaxKeys;  // tangent: [kRowTile][D]
  float* prob_ds = dq_tile + kRowTile * D;      // tangent: [kRowTile][kMaxKeys]

  const int64_t kv_offset = bh * lk * D;
  stage_rows<T, kWidth>(static_cast<const T*>(p.k) + kv_offset, lk, D, k_s, kStride);
  stage_rows<T, kWidth>(static_cast<const T*>(p.v) + kv_offset, lk, D, v_s, kStride);
  zero_rows(v_s, lk, context_rows, kStride);
  if (has_dk) stage_rows<T, kWidth>(static_cast<const T*>(p.dk) + kv_offset, lk, D, dk_s, kStride);
  if (has_dv) {
    stage_rows<T, kWidth>(static_cast<const T*>(p.dv) + kv_offset, lk, D, dv_s, kStride);
    zero_rows(dv_s, lk, context_rows, kStride);
  }
  __syncthreads();

  const int64_t row_end = min(p.lq, static_cast<int64_t>(blockIdx.y + 1) * kRowsPerBlock);
  for (int64_t tile = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + warp * kRowTile; tile < row_end;
       tile += kWarps * kRowTile) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kRowTile), row_end - tile));
    const int64_t tile_offset = (bh * p.lq + tile) * D;
    stage_tile_warp<T, kWidth, D>(static_cast<const T*>(p.q) + tile_offset, rows, q_tile, lane);
    if constexpr (kTangent) {
      stage_tile_warp<T, kWidth, D>(static_cast<const T*>(p.dq) + tile_offset, rows, dq_tile, lane);
    }
    __syncwarp();

    float s[kRowTile][2], ds[kRowTile][2];
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      const int j = lane + slot * kWarpSize;
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) s[r][slot] = ds[r][slot] = 0.f;
      if (j >= lk) continue;
      const float* k_row = k_s + j * kStride;
      const float* dk_row = dk_s + j * kStride;
      for (int d = 0; d < D; d += 4) {
        const float4 k4 = load4(k_row + d);
        float4 dk4 = {0.f, 0.f, 0.f, 0.f};
        if (has_dk) dk4 = load4(dk_row + d);
#pragma unroll
        for (int r = 0; r < kRowTile; ++r) {
          const float4 q4 = load4(q_tile + r * D + d);
          s[r][slot] += dot4(q4, k4);
          if constexpr (kTangent) {
            ds[r][slot] += dot4(load4(dq_tile + r * D + d), k4);
            if (has_dk) ds[r][slot] += dot4(q4, dk4);
          }
        }
      }
    }

    float m[kRowTile], l[kRowTile], rs[kRowTile];
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      float e[2];
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) s[r][slot] = lane + slot * kWarpSize < lk ? p.scale * s[r][slot] : -INFINITY;
      m[r] = warp_max(fmaxf(s[r][0], s[r][1]));
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) e[slot] = lane + slot * kWarpSize < lk ? expf(s[r][slot] - m[r]) : 0.f;
      l[r] = warp_sum(e[0] + e[1]);
      const float inv_l = 1.f / l[r];
      rs[r] = 0.f;  // sum_j p_j ds_j
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        prob[r * kMaxKeys + lane + slot * kWarpSize] = e[slot] * inv_l;  // 0 past Lk
        if constexpr (kTangent) {
          const float prob_ds_j = e[slot] * inv_l * p.scale * ds[r][slot];
          prob_ds[r * kMaxKeys + lane + slot * kWarpSize] = prob_ds_j;
          rs[r] += prob_ds_j;
        }
      }
      if constexpr (kTangent) rs[r] = warp_sum(rs[r]);
    }
    __syncwarp();

    float acc[kRowTile][kCols], acc_dsv[kRowTile][kCols], acc_dv[kRowTile][kCols];
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] = acc_dsv[r][c] = acc_dv[r][c] = 0.f;
    }
    for (int j = 0; j < context_rows; j += 4) {
      float4 p4[kRowTile], pds4[kRowTile];
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) {
        p4[r] = load4(prob + r * kMaxKeys + j);
        if constexpr (kTangent) pds4[r] = load4(prob_ds + r * kMaxKeys + j);
      }
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int col = lane + c * kWarpSize;
          const float value = v_s[(j + jj) * kStride + col];
          const float dvalue = has_dv ? dv_s[(j + jj) * kStride + col] : 0.f;
#pragma unroll
          for (int r = 0; r < kRowTile; ++r) {
            const float pj = component(p4[r], jj);
            acc[r][c] += pj * value;
            if constexpr (kTangent) {
              const float pdsj = component(pds4[r], jj);
              acc_dsv[r][c] += pdsj * value;
              acc_dv[r][c] += pj * dvalue;
            }
          }
        }
      }
    }

#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      if (r >= rows) break;
      const int64_t row_offset = tile_offset + r * D;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = lane + c * kWarpSize;
        static_cast<T*>(p.o)[row_offset + col] = from_float<T>(acc[r][c]);
        if constexpr (kTangent)
          static_cast<T*>(p.d_o)[row_offset + col] = from_float<T>(acc_dv[r][c] + acc_dsv[r][c] - rs[r] * acc[r][c]);
      }
      if (lane == 0) p.lse[bh * p.lq + tile + r] = m[r] + logf(l[r]);
    }
    __syncwarp();  // the tile buffers and probabilities are rewritten for the next tile
  }
}

// grid (BH, num_splits); a block takes a contiguous slice of query rows, kTileRows at a time (staged as fp32 in
// shared memory, rows padded to D + 4 floats). Per row: P_ij = exp(s_ij - lse_i), dP_ij = grad_o_i.v_j,
// Delta_i = sum_j P_ij dP_ij, dS_ij = P_ij (dP_ij - Delta_i), grad_q_i = scale sum_j dS_ij k_j: each warp takes
// kBwdRowTile rows at once (lane j holds keys j and j + 32) with 16-byte shared-memory reads, so a read of k_j or
// v_j feeds every row of the warp's tile. Then each thread owns kQuads (key, 4 columns) quads and accumulates
// grad_v_j += P_ij grad_o_i, grad_k_j += scale dS_ij q_i over the tile's rows in registers, reading 4 columns of
// grad_o_i and q_i at once (no atomics: the split's partial sums are written once and summed by the caller).
// Launch bounds (kThreads, 1) let ptxas use up to 255 registers: with the default it capped some D = 32
// instantiations at 64 and spilled.
constexpr int kBwdRowTile = kTileRows / kWarps;  // 2

template <typename T, int D, int kWidth>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_kernel(const AttentionBwdParams p) {
  IMF_DYNAMIC_SMEM(float, smem);
  constexpr int kStride = smem_stride(D);
  constexpr int kCols = D / kWarpSize;              // grad_q columns per lane
  constexpr int kQuads = kMaxKeys * D / 4 / kThreads;  // (key, 4 columns) quads per thread
  const int lk = p.lk;
  const int context_rows = staged_keys(lk);
  const int64_t bh = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  float* k_s = smem;
  float* v_s = k_s + context_rows * kStride;
  float* q_tile = v_s + context_rows * kStride;  // [kTileRows][kStride]
  float* go_tile = q_tile + kTileRows * kStride;   // [kTileRows][kStride]
  float* prob_tile = go_tile + kTileRows * kStride;  // [kTileRows][kMaxKeys]
  float* ds_tile = prob_tile + kTileRows * kMaxKeys;

  const int64_t kv_offset = bh * lk * D;
  stage_rows<T, kWidth>(static_cast<const T*>(p.k) + kv_offset, lk, D, k_s, kStride);
  zero_rows(k_s, lk, context_rows, kStride);
  stage_rows<T, kWidth>(static_cast<const T*>(p.v) + kv_offset, lk, D, v_s, kStride);

  const int64_t rows_per_split = (p.lq + p.num_splits - 1) / p.num_splits;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = min(p.lq, row_begin + rows_per_split);

  float grad_k_acc[kQuads][4], grad_v_acc[kQuads][4];
#pragma unroll
  for (int quad = 0; quad < kQuads; ++quad) {
#pragma unroll
    for (int i = 0; i < 4; ++i) grad_k_acc[quad][i] = grad_v_acc[quad][i] = 0.f;
  }

  for (int64_t tile_begin = row_begin; tile_begin < row_end; tile_begin += kTileRows) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), row_end - tile_begin));
    const int64_t tile_offset = (bh * p.lq + tile_begin) * D;
    stage_rows<T, kWidth>(static_cast<const T*>(p.q) + tile_offset, rows, D, q_tile, kStride);
    stage_rows<T, kWidth>(static_cast<const T*>(p.grad_o) + tile_offset, rows, D, go_tile, kStride);
    zero_rows(q_tile, rows, kTileRows, kStride);  // the rows past the slice's end count for nothing
    zero_rows(go_tile, rows, kTileRows, kStride);
    __syncthreads();  // also covers the K/V staging before the first tile

    const int first = warp * kBwdRowTile;  // this warp's rows of the tile
    float prob[kBwdRowTile][2], dprob[kBwdRowTile][2];
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      const int j = lane + slot * kWarpSize;
#pragma unroll
      for (int r = 0; r < kBwdRowTile; ++r) prob[r][slot] = dprob[r][slot] = 0.f;
      if (j >= lk) continue;
#pragma unroll 4
      for (int d = 0; d < D; d += 4) {
        const float4 k4 = load4(k_s + j * kStride + d);
        const float4 v4 = load4(v_s + j * kStride + d);
#pragma unroll
        for (int r = 0; r < kBwdRowTile; ++r) {
          prob[r][slot] += dot4(load4(q_tile + (first + r) * kStride + d), k4);
          dprob[r][slot] += dot4(load4(go_tile + (first + r) * kStride + d), v4);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kBwdRowTile; ++r) {
      const int i = first + r;
      const float lse = i < rows ? p.lse[bh * p.lq + tile_begin + i] : 0.f;
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        const bool key = lane + slot * kWarpSize < lk && i < rows;
        prob[r][slot] = key ? expf(p.scale * prob[r][slot] - lse) : 0.f;
      }
      const float delta = warp_sum(prob[r][0] * dprob[r][0] + prob[r][1] * dprob[r][1]);
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        prob_tile[i * kMaxKeys + lane + slot * kWarpSize] = prob[r][slot];
        ds_tile[i * kMaxKeys + lane + slot * kWarpSize] = prob[r][slot] * (dprob[r][slot] - delta);
      }
    }
    __syncwarp();

    // grad_q_i = scale sum_j dS_ij k_j: lane l owns columns l, l + 32, ...; 4 keys of dS read at once
    float gq[kBwdRowTile][kCols];
#pragma unroll
    for (int r = 0; r < kBwdRowTile; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) gq[r][c] = 0.f;
    }
    for (int j = 0; j < context_rows; j += 4) {
      float4 ds4[kBwdRowTile];
#pragma unroll
      for (int r = 0; r < kBwdRowTile; ++r) ds4[r] = load4(ds_tile + (first + r) * kMaxKeys + j);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const float key = k_s[(j + jj) * kStride + lane + c * kWarpSize];
#pragma unroll
          for (int r = 0; r < kBwdRowTile; ++r) {
            const float dsj = component(ds4[r], jj);
            gq[r][c] += dsj * key;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kBwdRowTile; ++r) {
      if (first + r >= rows) break;
      T* grad_q = static_cast<T*>(p.grad_q) + tile_offset + (first + r) * D;
#pragma unroll
      for (int c = 0; c < kCols; ++c) grad_q[lane + c * kWarpSize] = from_float<T>(p.scale * gq[r][c]);
    }
    __syncthreads();  // every row's P and dS are in shared memory

#pragma unroll
    for (int quad = 0; quad < kQuads; ++quad) {
      const int index = threadIdx.x + quad * kThreads;  // quad index: key j, columns 4 * (index % (D / 4)) + 0..3
      const int j = index / (D / 4);
      const int col = index % (D / 4) * 4;
      if (j >= lk) continue;
      for (int i = 0; i < rows; ++i) {
        const float pij = prob_tile[i * kMaxKeys + j];
        const float dsij = ds_tile[i * kMaxKeys + j];
        const float4 go4 = load4(go_tile + i * kStride + col);
        const float4 q4 = load4(q_tile + i * kStride + col);
        grad_v_acc[quad][0] += pij * go4.x;
        grad_v_acc[quad][1] += pij * go4.y;
        grad_v_acc[quad][2] += pij * go4.z;
        grad_v_acc[quad][3] += pij * go4.w;
        grad_k_acc[quad][0] += dsij * q4.x;
        grad_k_acc[quad][1] += dsij * q4.y;
        grad_k_acc[quad][2] += dsij * q4.z;
        grad_k_acc[quad][3] += dsij * q4.w;
      }
    }
    __syncthreads();  // the tiles are overwritten by the next iteration
  }

  const int64_t partial_offset = (bh * p.num_splits + blockIdx.y) * lk * D;
#pragma unroll
  for (int quad = 0; quad < kQuads; ++quad) {
    const int index = threadIdx.x + quad * kThreads;
    const int j = index / (D / 4);
    if (j >= lk) continue;
    const int64_t out = partial_offset + static_cast<int64_t>(j) * D + index % (D / 4) * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      p.grad_k_partial[out + i] = p.scale * grad_k_acc[quad][i];
      p.grad_v_partial[out + i] = grad_v_acc[quad][i];
    }
  }
}

}  // namespace

int64_t attention_fwd_smem_bytes(int lk, int head_dim, bool tangent, bool has_dk, bool has_dv) {
  const int64_t context_rows =
      staged_keys(lk) * (2 + (tangent && has_dk ? 1 : 0) + (tangent && has_dv ? 1 : 0));
  const int64_t floats = context_rows * smem_stride(head_dim) + kWarps * fwd_warp_floats(head_dim, tangent);
  return floats * static_cast<int64_t>(sizeof(float));
}

int64_t attention_bwd_smem_bytes(int lk, int head_dim) {
  const int64_t floats = 2 * static_cast<int64_t>(staged_keys(lk)) * smem_stride(head_dim) +
                         2 * kTileRows * smem_stride(head_dim) + 2 * kTileRows * kMaxKeys;
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
    dispatch_int<32, 64, 128>(params.head_dim, [&](auto head_dim) {
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

namespace {

// The backward's second launch: grad_k, grad_v = the sums of their per-split float32 partials in split order, four
// consecutive elements (16 bytes of each partial) per thread; Lk * D is a multiple of 4 (D is).
constexpr int kReduceThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) attention_bwd_reduce_kernel(const AttentionBwdParams p) {
  const int64_t per_head = static_cast<int64_t>(p.lk) * p.head_dim;
  const int64_t quad = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (quad * 4 >= p.batch_heads * per_head) return;
  const int64_t head = quad * 4 / per_head, within = quad * 4 % per_head;
  const float* partials[2] = {p.grad_k_partial, p.grad_v_partial};
  void* outputs[2] = {p.grad_k, p.grad_v};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    float sums[4] = {0.f, 0.f, 0.f, 0.f};
    for (int split = 0; split < p.num_splits; ++split) {
      const float4 part =
          *reinterpret_cast<const float4*>(partials[k] + (head * p.num_splits + split) * per_head + within);
      sums[0] += part.x;
      sums[1] += part.y;
      sums[2] += part.z;
      sums[3] += part.w;
    }
    T* out = static_cast<T*>(outputs[k]) + quad * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = from_float<T>(sums[i]);
  }
}

}  // namespace

void attention_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  const int64_t smem = attention_bwd_smem_bytes(params.lk, params.head_dim);
  const dim3 grid(static_cast<unsigned>(params.batch_heads), static_cast<unsigned>(params.num_splits));
  dispatch_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_int<32, 64, 128>(params.head_dim, [&](auto head_dim) {
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
    const int64_t quads = params.batch_heads * params.lk * params.head_dim / 4;
    const dim3 reduce_grid(static_cast<unsigned>((quads + kReduceThreads - 1) / kReduceThreads));
    IMF_LAUNCH(attention_bwd_reduce_kernel<T>, reduce_grid, kReduceThreads, 0, stream)(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace imf
