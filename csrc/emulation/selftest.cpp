// Kernels that pin down what the emulator does (tests/test_cuda_emulated.py): the warp operations' exact results,
// and each misuse it must refuse (a deadlock, divergent warp operations, shared memory beyond the limit) or expose
// (a read of shared memory another thread writes with no barrier in between).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cuda_emulation.h"

namespace {

// out[t] = sum over the warp of the lane ids (496) by a butterfly, then + the lane's shfl_down(1) neighbour.
__global__ void warp_ops_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float sum = static_cast<float>(lane);
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const float next = __shfl_down_sync(0xffffffffu, static_cast<float>(lane), 1);  // lane 31: its own id
  const float first = __shfl_sync(0xffffffffu, static_cast<float>(lane) * 2.f, 0);
  out[threadIdx.x] = sum + 1000.f * next + 100000.f * first;
}

// out[t] = t-th thread's view of its neighbour's slot: with the barrier, (t + 1) % n; without, what the turn
// order leaves (the emulator fills dynamic shared memory with NaN before each block).
__global__ void neighbour_kernel(float* out, bool barrier) {
  float* slots = imf_emu::dynamic_smem<float>();
  const unsigned t = threadIdx.x;
  slots[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  out[t] = slots[(t + 1) % blockDim.x];
}

// Each warp sums its lane ids (thread ids) by a butterfly, writes the sum to its threads' slots, and each thread reads
// the slot of the thread 32 away (in the other warp): with __syncthreads() in between the other warp's sum, without
// it what the warp that runs ahead finds there (NaN: the other warp has not written yet).
__global__ void cross_warp_kernel(float* out, bool barrier) {
  float* slots = imf_emu::dynamic_smem<float>();
  float sum = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  slots[threadIdx.x] = sum;
  if (barrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 32) % blockDim.x];
}

// Thread 0 waits at __syncthreads() while lanes 1-31 of its warp wait at __syncwarp(): neither can complete.
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// Half of a warp shuffles while the other half waits at __syncwarp().
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else {
    __syncwarp();
  }
}

__global__ void smem_kernel(float* out) {
  float* slots = imf_emu::dynamic_smem<float>();
  slots[threadIdx.x] = 1.f;
  out[threadIdx.x] = slots[threadIdx.x];
}

std::vector<float> warp_ops(unsigned threads) {
  std::vector<float> out(threads, -1.f);
  float* data = out.data();
  imf_emu::Launch(warp_ops_kernel, dim3(1), dim3(threads), 0)(data);
  return out;
}

std::vector<float> neighbour(unsigned threads, bool barrier) {
  std::vector<float> out(threads, -1.f);
  float* data = out.data();
  imf_emu::Launch(neighbour_kernel, dim3(1), dim3(threads), threads * sizeof(float))(data, barrier);
  return out;
}

std::vector<float> cross_warp(bool barrier) {
  std::vector<float> out(64, -1.f);
  float* data = out.data();
  imf_emu::Launch(cross_warp_kernel, dim3(1), dim3(64), 64 * sizeof(float))(data, barrier);
  return out;
}

void deadlock() { imf_emu::Launch(deadlock_kernel, dim3(2), dim3(64), 0)(); }

void divergent() {
  std::vector<float> out(32);
  float* data = out.data();
  imf_emu::Launch(divergent_kernel, dim3(1), dim3(32), 0)(data);
}

std::vector<float> shared_memory(size_t bytes, size_t allowed) {
  std::vector<float> out(32, -1.f);
  float* data = out.data();
  // 0: the default limit (48 KiB), as a kernel that never called cudaFuncSetAttribute
  const size_t limit = allowed > 0 ? allowed : imf_emu::kDefaultDynamicSmem;
  imf_emu::allow_dynamic_smem(reinterpret_cast<const void*>(smem_kernel), limit);
  imf_emu::Launch(smem_kernel, dim3(1), dim3(32), bytes)(data);
  return out;
}

// (grid.x, grid.y, block.x, dynamic shared memory bytes) of every launch since the last call, which clears them.
std::vector<std::vector<int64_t>> launches() {
  std::vector<std::vector<int64_t>> out;
  for (const auto& record : imf_emu::emulator().launches)
    out.push_back({record.grid.x, record.grid.y, record.block.x, static_cast<int64_t>(record.smem)});
  imf_emu::emulator().launches.clear();
  return out;
}

}  // namespace

void register_emulator_selftests(pybind11::module_& m) {
  m.def("emulator_warp_ops", &warp_ops, pybind11::arg("threads"));
  m.def("emulator_neighbour", &neighbour, pybind11::arg("threads"), pybind11::arg("barrier"));
  m.def("emulator_cross_warp", &cross_warp, pybind11::arg("barrier"));
  m.def("emulator_deadlock", &deadlock);
  m.def("emulator_launches", &launches);
  m.def("emulator_divergent", &divergent);
  m.def("emulator_shared_memory", &shared_memory, pybind11::arg("bytes"), pybind11::arg("allowed"));
}
