// Host emulation of the CUDA features the mobileops kernels use, so that csrc/ compiles with a
// plain C++ compiler and its kernels run on the CPU in tests: every block runs in turn, each of
// its threads is a std::thread, __syncthreads() is a std::barrier, __shared__ memory is static
// storage (blocks never overlap). Slow; only for tiny shapes. Launches `k<<<g, b, s, st>>>(args);`
// become `emu_launcher(g, b, s, st)([&] { k(args); });` (tests/cuda_emulation/build.py).
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;
inline std::vector<unsigned char> emu_dynamic_smem(1 << 16);
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

// Warp shuffles: every thread of the block must call them together (the mobileops reductions
// do); the value is exchanged through the block with two barriers.
inline uint64_t emu_exchange[1024];
template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffled value fits 8 bytes");
  const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  emu_exchange[t] = raw;
  __syncthreads();
  raw = emu_exchange[(t & ~31u) | ((t & 31u) ^ unsigned(mask))];
  __syncthreads();
  T out;
  std::memcpy(&out, &raw, sizeof(T));
  return out;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(n)
#define __shared__ static

using std::exp;
using std::min;
using std::max;
using std::sqrt;

// fp16 / bf16 with round-to-nearest-even conversions (what the device intrinsics do).
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
template <typename T> inline void __stwb(T* p, T v) { *p = v; }

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* c) { *c = 1; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }

template <typename F>
void emu_run(dim3 grid, dim3 block, F body) {
  // One OS thread per CUDA thread of a block, created once per launch; together they walk the
  // blocks in order, meeting at a barrier after each block (its __shared__ storage is static,
  // so the next block may only start once every thread has left this one).
  gridDim = grid;
  blockDim = block;
  std::barrier<> barrier(block.x * block.y * block.z);
  emu_barrier = &barrier;
  std::vector<std::thread> threads;
  for (unsigned tz = 0; tz < block.z; ++tz)
    for (unsigned ty = 0; ty < block.y; ++ty)
      for (unsigned tx = 0; tx < block.x; ++tx)
        threads.emplace_back([=, &barrier] {
          threadIdx = dim3(tx, ty, tz);
          for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
              for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = dim3(bx, by, bz);
                body();
                barrier.arrive_and_wait();
              }
        });
  for (auto& t : threads) t.join();
}



// The launches made, by their source text, for tests (read through ctypes: build.launches).
inline std::mutex emu_log_mutex;
inline std::string emu_log;
inline void emu_record(const char* kernel) {
  std::lock_guard<std::mutex> lock(emu_log_mutex);
  if (!emu_log.empty()) emu_log += "\n";
  emu_log += kernel;
}
extern "C" __attribute__((visibility("default"), used)) inline const char* emu_launch_log() { return emu_log.c_str(); }
extern "C" __attribute__((visibility("default"), used)) inline void emu_clear_launch_log() { emu_log.clear(); }

struct EmuLauncher {
  dim3 grid, block;
  template <typename F> void operator()(F body) const { emu_run(grid, block, body); }
};
inline EmuLauncher emu_launcher(dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return EmuLauncher{grid, block};
}
