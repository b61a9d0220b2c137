// A CUDA emulator for the kernels of csrc/, so that CI (no GPU) runs them on CPU tensors against the same
// float64 references as on a GPU. Built only by tests/cuda_emulator.py (-DIMF_EMULATE, g++), never by setup.py.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; the blocks of a grid run one after
// another, the fibers of a block in turn on one OS thread, each until it blocks:
// - __syncthreads() waits until every live (not yet returned) thread of the block is at a barrier;
// - warp operations (__shfl_*_sync, __syncwarp) wait until every live lane of the warp is at one, and must be
//   the same operation on each (else: a divergence error, which a GPU would answer with undefined results); one
//   warp's operation completes at a time, so warps drift apart between barriers;
// - a barrier that some live threads cannot reach (they wait on another one) is a deadlock error.
// Turns alternate between ascending and descending thread order, so that a read of another thread's shared
// memory write with no barrier in between sees the stale value in one of the two orders, and fails a test (within
// a warp; between warps, the warp that runs ahead does).
// Dynamic shared memory is filled with NaN before each block (a read of a slot nobody wrote shows up), and a
// launch needing more than 48 KiB must have opted in (IMF_ALLOW_DYNAMIC_SMEM), as on a GPU, up to 227 KiB.
// Static __shared__ arrays are function-local statics: one per kernel instantiation, reused by each block.
// Not emulated: warp-synchronous code without a warp operation, memory ordering between blocks, atomics.
#pragma once

// Defined before CUDA's headers, which then leave them alone (crt/host_defines.h defines each only if absent).
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#undef __forceinline__
#define __forceinline__ inline

namespace imf_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // H100 / H200 opt-in limit per block
constexpr unsigned kMaxThreadsPerBlock = 1024;

enum class State { Ready, AtBarrier, AtWarpOp, Done };
enum class WarpOp { None, Sync, Shuffle };

struct Fiber {
  ucontext_t context;
  uint3 thread;
  State state = State::Ready;
  WarpOp op = WarpOp::None;
  double value = 0;  // the shuffled value (every shuffled type fits a double exactly)
  int source = 0;    // the lane it reads
  double result = 0;
};

struct Emulator {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stack_count = 0;
  size_t page = 4096;
  ucontext_t scheduler;
  int current = -1;
  dim3 grid, block;
  uint3 block_index;
  std::vector<float> dynamic_smem;  // floats, so the buffer is 16-byte aligned enough for any element type
  const std::function<void()>* body = nullptr;
  std::string error;
  std::map<const void*, size_t> allowed_smem;
  std::mutex lock;  // one launch at a time: the fibers of a launch run on the thread that launched it
  struct Record {
    dim3 grid, block;
    size_t smem;
  };
  std::vector<Record> launches;  // every launch since the last clear, for tests of the launch rules

  ~Emulator() {
    if (stacks != nullptr) munmap(stacks, stack_count * (kStackBytes + page));
  }

  // Stacks with a PROT_NONE guard page below each, so an overflow faults instead of corrupting a neighbour.
  void reserve_stacks(size_t count) {
    if (count <= stack_count) return;
    if (stacks != nullptr) munmap(stacks, stack_count * (kStackBytes + page));
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = count * (kStackBytes + page);
    void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) throw std::runtime_error("cuda emulator: cannot map fiber stacks");
    stacks = static_cast<char*>(memory);
    stack_count = count;
    for (size_t i = 0; i < count; ++i) mprotect(stacks + i * (kStackBytes + page), page, PROT_NONE);
  }

  Fiber& fiber() { return fibers[static_cast<size_t>(current)]; }

  // Back to the scheduler; returns when this fiber is resumed.
  void yield() { swapcontext(&fiber().context, &scheduler); }

  // A misuse found inside a fiber: recorded, the fiber parks for good and the launch fails after the block.
  void fail(const std::string& message) {
    if (error.empty()) error = message;
    fiber().state = State::Done;
    yield();
  }
};

inline Emulator& emulator() {
  static Emulator instance;
  return instance;
}

inline void fiber_main() {
  Emulator& emu = emulator();
  (*emu.body)();
  emu.fiber().state = State::Done;
  // returning resumes uc_link, the scheduler
}

inline std::string where(const Emulator& emu, int index) {
  const Fiber& f = emu.fibers[static_cast<size_t>(index)];
  const unsigned thread = f.thread.x + emu.block.x * (f.thread.y + emu.block.y * f.thread.z);
  return "block (" + std::to_string(emu.block_index.x) + ", " + std::to_string(emu.block_index.y) + ", " +
         std::to_string(emu.block_index.z) + ") thread " + std::to_string(thread);
}

// Completes the warp operation of one warp whose live lanes have all arrived (the lowest such warp, or the
// highest when `ascending` is false); true if there was one. One warp at a time: warps then drift apart, as on a
// GPU, and a warp reading what another writes without a __syncthreads() in between reads it too early.
inline bool release_warps(Emulator& emu, bool ascending) {
  const int count = static_cast<int>(emu.fibers.size());
  const int warps = (count + kWarpSize - 1) / kWarpSize;
  for (int step = 0; step < warps; ++step) {
    const int first = (ascending ? step : warps - 1 - step) * kWarpSize;
    const int last = std::min(first + kWarpSize, count);
    int waiting = 0, live = 0;
    WarpOp op = WarpOp::None;
    for (int i = first; i < last; ++i) {
      const Fiber& f = emu.fibers[static_cast<size_t>(i)];
      if (f.state == State::Done) continue;
      ++live;
      if (f.state == State::AtWarpOp) {
        ++waiting;
        if (op != WarpOp::None && f.op != op)
          throw std::runtime_error("cuda emulator: lanes of one warp wait at different warp operations (" +
                                   where(emu, i) + ")");
        op = f.op;
      }
    }
    if (waiting == 0 || waiting != live) continue;
    for (int i = first; i < last && op == WarpOp::Shuffle; ++i) {  // every result before any lane moves on
      Fiber& f = emu.fibers[static_cast<size_t>(i)];
      if (f.state == State::AtWarpOp) {
        const int source = first + f.source;
        const bool valid = f.source >= 0 && f.source < kWarpSize && source < last &&
                           emu.fibers[static_cast<size_t>(source)].state == State::AtWarpOp;
        // reading an exited or absent lane is undefined on a GPU: NaN here, so that it cannot pass a test
        f.result = valid ? emu.fibers[static_cast<size_t>(source)].value : std::numeric_limits<double>::quiet_NaN();
      }
    }
    for (int i = first; i < last; ++i) {
      Fiber& f = emu.fibers[static_cast<size_t>(i)];
      if (f.state != State::AtWarpOp) continue;
      f.state = State::Ready;
      f.op = WarpOp::None;
    }
    return true;
  }
  return false;
}

// Runs one block to completion.
inline void run_block(Emulator& emu) {
  const int count = static_cast<int>(emu.fibers.size());
  for (int i = 0; i < count; ++i) {
    Fiber& f = emu.fibers[static_cast<size_t>(i)];
    f.state = State::Ready;
    f.op = WarpOp::None;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = emu.stacks + static_cast<size_t>(i) * (kStackBytes + emu.page) + emu.page;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &emu.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  bool ascending = true;
  for (;;) {
    for (int step = 0; step < count; ++step) {
      const int i = ascending ? step : count - 1 - step;
      if (emu.fibers[static_cast<size_t>(i)].state != State::Ready) continue;
      emu.current = i;
      swapcontext(&emu.scheduler, &emu.fibers[static_cast<size_t>(i)].context);
      emu.current = -1;
    }
    if (!emu.error.empty()) throw std::runtime_error("cuda emulator: " + emu.error);
    const bool released = release_warps(emu, ascending);
    ascending = !ascending;
    if (released) continue;
    int live = 0, at_barrier = 0, stuck = -1;
    for (int i = 0; i < count; ++i) {
      const State state = emu.fibers[static_cast<size_t>(i)].state;
      if (state == State::Done) continue;
      ++live;
      if (state == State::AtBarrier) {
        ++at_barrier;
      } else if (stuck < 0) {
        stuck = i;
      }
    }
    if (live == 0) return;
    if (at_barrier != live)
      throw std::runtime_error("cuda emulator: deadlock: " + where(emu, stuck) +
                               " waits at a warp operation its warp's other lanes do not reach, while others wait "
                               "at __syncthreads()");
    for (Fiber& f : emu.fibers) {
      if (f.state == State::AtBarrier) f.state = State::Ready;
    }
  }
}

inline void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  static thread_local bool launching = false;  // this thread is running a launch's fibers
  if (launching) throw std::runtime_error("cuda emulator: a kernel launched from inside a kernel");
  Emulator& emu = emulator();
  const std::lock_guard<std::mutex> guard(emu.lock);
  launching = true;
  struct Done {
    ~Done() { launching = false; }
  } done;
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock)
    throw std::runtime_error("cuda emulator: invalid block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("cuda emulator: invalid grid (" + std::to_string(grid.x) + ", " +
                             std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  const auto allowed = emu.allowed_smem.find(kernel);
  const size_t limit = allowed == emu.allowed_smem.end() ? kDefaultDynamicSmem : allowed->second;
  if (smem > limit)
    throw std::runtime_error("cuda emulator: " + std::to_string(smem) +
                             " bytes of dynamic shared memory, the kernel may use " + std::to_string(limit) +
                             " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  emu.launches.push_back({grid, block, smem});
  emu.reserve_stacks(threads);
  emu.fibers.assign(threads, Fiber{});
  for (unsigned i = 0; i < threads; ++i)
    emu.fibers[i].thread = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  emu.grid = grid;
  emu.block = block;
  emu.body = &body;
  emu.error.clear();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        emu.block_index = uint3{x, y, z};
        emu.dynamic_smem.assign((smem + sizeof(float) - 1) / sizeof(float), std::numeric_limits<float>::quiet_NaN());
        run_block(emu);
      }
    }
  }
  emu.body = nullptr;
}

inline void allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes > kMaxDynamicSmem)
    throw std::runtime_error("cuda emulator: cudaFuncSetAttribute: " + std::to_string(bytes) +
                             " bytes of dynamic shared memory, more than the " + std::to_string(kMaxDynamicSmem) +
                             " an H100 allows");
  Emulator& emu = emulator();
  const std::lock_guard<std::mutex> guard(emu.lock);
  emu.allowed_smem[kernel] = bytes;
}

// `kernel<<<grid, block, smem, stream>>>(args...)` as Launch(kernel, grid, block, smem)(args...).
template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  Launch(Kernel k, dim3 g, dim3 b, size_t s) : kernel(k), grid(g), block(b), smem(s) {}
  template <typename... Args>
  void operator()(const Args&... args) const {
    const Kernel fn = kernel;
    const std::function<void()> body = [fn, args...]() { fn(args...); };
    launch(reinterpret_cast<const void*>(fn), grid, block, smem, body);
  }
};

inline Fiber& this_fiber() {
  Emulator& emu = emulator();
  if (emu.current < 0) throw std::runtime_error("cuda emulator: a device builtin used outside a kernel");
  return emu.fiber();
}

inline void sync_block() {
  this_fiber().state = State::AtBarrier;
  emulator().yield();
}

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) emulator().fail("warp operations with a partial mask are not emulated");
}

inline void sync_warp(unsigned mask) {
  check_mask(mask);
  Fiber& f = this_fiber();
  f.state = State::AtWarpOp;
  f.op = WarpOp::Sync;
  emulator().yield();
}

template <typename T>
inline T shuffle(unsigned mask, T value, int source) {
  static_assert(std::is_arithmetic_v<T>, "shuffles of arithmetic types only");
  check_mask(mask);
  Fiber& f = this_fiber();
  f.state = State::AtWarpOp;
  f.op = WarpOp::Shuffle;
  f.value = static_cast<double>(value);
  f.source = source;
  emulator().yield();
  return static_cast<T>(this_fiber().result);
}

inline int lane() {
  const uint3 t = this_fiber().thread;
  const dim3 b = emulator().block;
  return static_cast<int>((t.x + b.x * (t.y + b.y * t.z)) % kWarpSize);
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(emulator().dynamic_smem.data());
}

}  // namespace imf_emu

// The builtins the kernels use.
#define threadIdx (::imf_emu::this_fiber().thread)
#define blockIdx (::imf_emu::emulator().block_index)
#define blockDim (::imf_emu::emulator().block)
#define gridDim (::imf_emu::emulator().grid)

inline void __syncthreads() { ::imf_emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::imf_emu::sync_warp(mask); }

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source, int width = 32) {
  if (width != 32) ::imf_emu::emulator().fail("shuffles of width < 32 are not emulated");
  return ::imf_emu::shuffle(mask, value, source);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  if (width != 32) ::imf_emu::emulator().fail("shuffles of width < 32 are not emulated");
  return ::imf_emu::shuffle(mask, value, ::imf_emu::lane() ^ lane_mask);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  if (width != 32) ::imf_emu::emulator().fail("shuffles of width < 32 are not emulated");
  const int lane = ::imf_emu::lane();
  const int source = lane + static_cast<int>(delta);
  return ::imf_emu::shuffle(mask, value, source < 32 ? source : lane);  // out of range: the lane's own value
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// CUDA's min / max take mixed integer types (device overloads); the kernels call them unqualified.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
