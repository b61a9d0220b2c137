// Device helpers shared by the kernels: fp32 conversions, 16-byte vector loads/stores, warp and block
// reductions in fp32, and the host-side dtype switch.
#pragma once

#ifdef IMF_EMULATE
// tests/cuda_emulator.py compiles the kernels with g++ against an emulator of the CUDA builtins (csrc/emulation/)
#include "emulation/cuda_emulation.h"
#define IMF_LAUNCH(kernel, grid, block, smem, stream) ::imf_emu::Launch(kernel, grid, block, smem)
#define IMF_ALLOW_DYNAMIC_SMEM(kernel, bytes) \
  ::imf_emu::allow_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<size_t>(bytes))
#define IMF_DYNAMIC_SMEM(type, name) type* name = ::imf_emu::dynamic_smem<type>()
#define C10_CUDA_KERNEL_LAUNCH_CHECK()
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// IMF_LAUNCH(kernel, grid, block, smem, stream)(args...) is kernel<<<grid, block, smem, stream>>>(args...);
// `kernel` is one name (a function pointer), never a template-id with commas.
#define IMF_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define IMF_ALLOW_DYNAMIC_SMEM(kernel, bytes) \
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)))
// 16-byte aligned: the attention kernels read it as float4
#define IMF_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

#include <cstdint>
#include <type_traits>

#include "launchers.h"

namespace imf {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

// Elements of T in one 16-byte vector: 4 (fp32) or 8 (fp16/bf16).
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Pack16 {
  T val[kVec16<T>];
};

// Loads `kWidth` consecutive elements as fp32: one 16-byte load (LDG.E.128) when kWidth is a full vector,
// else scalar loads. A full vector needs a 16-byte aligned `src`.
template <typename T, int kWidth>
__device__ __forceinline__ void load_as_float(const T* src, float (&out)[kWidth]) {
  if constexpr (kWidth == kVec16<T>) {
    const Pack16<T> pack = *reinterpret_cast<const Pack16<T>*>(src);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = to_float(pack.val[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = to_float(src[i]);
  }
}

template <typename T, int kWidth>
__device__ __forceinline__ void store_from_float(T* dst, const float (&in)[kWidth]) {
  if constexpr (kWidth == kVec16<T>) {
    Pack16<T> pack;
#pragma unroll
    for (int i = 0; i < kWidth; ++i) pack.val[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack16<T>*>(dst) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) dst[i] = from_float<T>(in[i]);
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// Sums each of the N values over the whole block and returns the totals to every thread, in the same
// (deterministic) order on every thread. blockDim.x is a multiple of 32; `scratch` holds N * 32 floats and
// may be reused by the next call (the leading barrier keeps a later call from overwriting unread totals).
template <int N>
__device__ __forceinline__ void block_sum(float (&values)[N], float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int n = 0; n < N; ++n) values[n] = warp_sum(values[n]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) scratch[n * kWarpSize + warp] = values[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    float total = 0.f;
    for (int w = 0; w < num_warps; ++w) total += scratch[n * kWarpSize + w];
    values[n] = total;
  }
}

// y = h * sigmoid(h) and its derivative sigmoid(h) * (1 + h * (1 - sigmoid(h))).
__device__ __forceinline__ float sigmoid(float h) { return 1.f / (1.f + expf(-h)); }
__device__ __forceinline__ float silu_grad(float h, float sig) { return sig * (1.f + h * (1.f - sig)); }

// Calls `launch(std::integral_constant<int, V>{})` for the V among `Values` that equals `value` (none: no call): a
// runtime size as the template argument of a kernel instantiated for each of `Values`.
template <int... Values, typename Launch>
void dispatch_int(int value, Launch&& launch) {
  ((value == Values ? (launch(std::integral_constant<int, Values>{}), true) : false) || ...);
}

// Calls `launch(T{})` with T the element type of `dtype`.
template <typename Launch>
void dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::Float32:
      launch(float{});
      break;
    case DType::Float16:
      launch(__half{});
      break;
    case DType::BFloat16:
      launch(__nv_bfloat16{});
      break;
  }
}

}  // namespace imf
