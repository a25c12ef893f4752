// Shared pieces of the mobileops CUDA kernels: dtype traits, activations, strided 4-D
// indexing, deterministic block reductions and the compile-time dispatch switches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ops.h"

#include <array>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace mobileops {

// Accumulation and BN-parameter type: double for double tensors, float otherwise.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A load_as(const T* p) { return static_cast<A>(*p); }
template <> __device__ __forceinline__ float load_as<float, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T, typename A> __device__ __forceinline__ T store_as(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store_as<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// NaN passes through every activation as in PyTorch (fmin/fmax would drop it).
template <typename A> __device__ __forceinline__ A clamp_nan(A v, A lo, A hi) {
  return v != v ? v : (v < lo ? lo : (v > hi ? hi : v));
}

template <typename A> __device__ __forceinline__ A sigmoid(A z) { return A(1) / (A(1) + exp(-z)); }

template <int ACT, typename A> __device__ __forceinline__ A activate(A z) {
  if constexpr (ACT == kRelu) return z != z ? z : (z > A(0) ? z : A(0));
  else if constexpr (ACT == kRelu6) return clamp_nan(z, A(0), A(6));
  else if constexpr (ACT == kHswish) return z * (clamp_nan(z + A(3), A(0), A(6)) / A(6));
  else if constexpr (ACT == kSilu) return z / (A(1) + exp(-z));
  else if constexpr (ACT == kHsigmoid) return clamp_nan(z + A(3), A(0), A(6)) / A(6);
  else if constexpr (ACT == kSigmoid) return sigmoid(z);
  else return z;
}

// d act(z) / dz with PyTorch's conventions at the kinks (as the Triton kernels: hardswish'
// is 0 at -3 and 1 at 3, relu' and relu6' are 0 at the kinks).
template <int ACT, typename A> __device__ __forceinline__ A activate_grad(A z) {
  if constexpr (ACT == kRelu) return z > A(0) ? A(1) : A(0);
  else if constexpr (ACT == kRelu6) return (z > A(0) && z < A(6)) ? A(1) : A(0);
  else if constexpr (ACT == kHswish)
    return clamp_nan(z + A(3), A(0), A(6)) / A(6) + ((z > A(-3) && z < A(3)) ? z / A(6) : A(0));
  else if constexpr (ACT == kSilu) {
    A s = sigmoid(z);
    return s * (A(1) + z * (A(1) - s));
  } else if constexpr (ACT == kHsigmoid) return (z > A(-3) && z < A(3)) ? A(1) / A(6) : A(0);
  else if constexpr (ACT == kSigmoid) {
    A s = sigmoid(z);
    return s * (A(1) - s);
  } else return A(1);
}

// activate_grad with the activation chosen at run time: the backward kernels use it (a
// uniform branch per element) so that they are not instantiated once per activation.
template <typename A> __device__ __forceinline__ A activate_grad_rt(int act, A z) {
  switch (act) {
    case kRelu: return activate_grad<kRelu>(z);
    case kRelu6: return activate_grad<kRelu6>(z);
    case kHswish: return activate_grad<kHswish>(z);
    case kSilu: return activate_grad<kSilu>(z);
    case kHsigmoid: return activate_grad<kHsigmoid>(z);
    case kSigmoid: return activate_grad<kSigmoid>(z);
    default: return A(1);
  }
}

struct Strides4 {
  int64_t n, c, h, w;
  Strides4() = default;
  explicit Strides4(const Strides& s) : n(s[0]), c(s[1]), h(s[2]), w(s[3]) {}
  __device__ __forceinline__ int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// Quotient of a non-negative index by a positive divisor, remainder in r. Nearly every index
// fits 32 bits, and 32-bit unsigned division is several times fewer instructions than the
// 64-bit one; the branch is uniform across a launch in practice.
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& r) {
  if (a <= 0xffffffffLL && b <= 0xffffffffLL) {
    const uint32_t q = uint32_t(a) / uint32_t(b);
    r = int64_t(uint32_t(a) - q * uint32_t(b));
    return q;
  }
  const int64_t q = a / b;
  r = a - q * b;
  return q;
}

// Splits a linear index into (n, c, h, w), walking channels fastest when channels_last so
// that neighbouring threads touch neighbouring addresses in that layout.
__device__ __forceinline__ void split_index(int64_t i, int C, int H, int W, bool channels_last, int64_t& n,
                                            int64_t& c, int64_t& h, int64_t& w) {
  if (channels_last) {
    i = divmod(i, C, c);
    i = divmod(i, W, w);
    n = divmod(i, H, h);
  } else {
    i = divmod(i, W, w);
    i = divmod(i, H, h);
    n = divmod(i, C, c);
  }
}

// Elementwise kernels take V consecutive channels per thread in channels_last (one 16-byte
// load or store: 8 fp16/bf16, 4 fp32), else one element; reductions with many sums per channel
// may take fewer (8 or 4 bytes). Pack<T, V> is that group, aligned to its size; load_pack and
// store_pack move it as one access of its size (RawPack).
template <typename T> struct VecWidth { static constexpr int value = 16 / int(sizeof(T)); };
template <> struct VecWidth<double> { static constexpr int value = 1; };  // float64 stays scalar
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };
template <int Bytes> struct RawPack;
template <> struct RawPack<16> { using type = uint4; };
template <> struct RawPack<8> { using type = uint2; };
template <> struct RawPack<4> { using type = unsigned int; };

// Through the raw type. A plain uint4 store of a pack built from converted elements came out of
// nvcc 13.0 as four 4-byte v2.u16 stores in the kernels (not in a minimal probe); the __stwb
// intrinsic (st.global.wb, the default write-back policy) stays one store of the pack's size.
template <int V, typename T> __device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  Pack<T, V> out;
  if constexpr (V == 1) {
    out.v[0] = *p;
  } else {
    using Raw = typename RawPack<int(sizeof(T)) * V>::type;
    const Raw raw = *reinterpret_cast<const Raw*>(p);
    memcpy(&out, &raw, sizeof(raw));
  }
  return out;
}
template <int V, typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  if constexpr (V == 1) {
    *p = v.v[0];
  } else {
    using Raw = typename RawPack<int(sizeof(T)) * V>::type;
    Raw raw;
    memcpy(&raw, &v, sizeof(raw));
    __stwb(reinterpret_cast<Raw*>(p), raw);
  }
}

// Whether packs of V elements along dimension `dim` (of N, C, H, W) fit every tensor of a launch:
// that dimension innermost and contiguous (stride 1), its size `extent` and every other stride
// multiples of V, addresses aligned to a pack. Decided on the host per launch; otherwise the
// kernel takes one element per thread.
struct Strided {
  uintptr_t address;
  Strides strides;
};
inline bool packs_fit_along(int dim, int extent, int V, size_t element, std::initializer_list<Strided> tensors) {
  if (V <= 1 || extent % V) return false;
  for (const Strided& t : tensors) {
    if (t.strides[dim] != 1 || t.address % (size_t(V) * element)) return false;
    for (int d = 0; d < 4; ++d) {
      if (d != dim && t.strides[d] % V) return false;
    }
  }
  return true;
}

// V channels per thread: channels_last, C a multiple of V.
inline bool packs_fit(int C, int V, size_t element, std::initializer_list<Strided> tensors) {
  return packs_fit_along(1, C, V, element, tensors);
}

// Elementwise kernels without a convolution may instead take V consecutive positions along W of
// one channel (kPackW), for NCHW, where W is innermost: the same 16-byte accesses. Each output is
// computed as with one element per thread, so the bits are the same.
constexpr int kPackChannels = 0, kPackW = 1;

inline bool w_packs_fit(int W, int V, size_t element, std::initializer_list<Strided> tensors) {
  return packs_fit_along(3, W, V, element, tensors);
}

// Pack i of an elementwise launch over (N, C, H, W) in packs of V along AXIS: its sample, first
// channel, row and first column. Element j of the pack is channel c0 + j (kPackChannels) or
// column w0 + j of channel c0 (kPackW); pack_channel says which channel.
template <int V, int AXIS>
__device__ __forceinline__ void split_pack(int64_t i, int C, int H, int W, bool channels_last, int64_t& n,
                                           int64_t& c0, int64_t& h, int64_t& w0) {
  if constexpr (AXIS == kPackW) {
    split_index(i, C, H, W / V, false, n, c0, h, w0);
    w0 *= V;
  } else {
    split_index(i, C / V, H, W, channels_last, n, c0, h, w0);
    c0 *= V;
  }
}
template <int AXIS> __device__ __forceinline__ int64_t pack_channel(int64_t c0, int j) {
  return AXIS == kPackW ? c0 : c0 + j;
}

// Reducing kernels run blocks of kReduceThreads threads: blockDim.x channel lanes x blockDim.y
// rows of positions, each lane taking V channels (a Pack, or one). In channels_last a warp
// reads whole cache lines: with packs, up to kLineBytes / pack bytes lanes (8 of 16 bytes, 16 of
// 8) cover 128 bytes of neighbouring channels of a position, and a warp holds 32 / lanes
// positions; one element per lane takes kLastChannels = 32 lanes (a position per warp). In
// NCHW a block is 1 x 256, so a warp reads 32 neighbouring positions of one channel. The
// grid's y axis walks the channel groups (lanes * V channels each).
constexpr int kReduceThreads = 256;
constexpr int kReduceWarps = kReduceThreads / 32;
constexpr int kLastChannels = 32;
constexpr int kLineBytes = 128;

// The most lanes of a reducing block with V channels of `element` bytes per lane.
__host__ __device__ constexpr int max_lanes(int V, int element) {
  return V == 1 ? kLastChannels : kLineBytes / (V * element);
}

struct ReduceShape {
  int lanes, rows;
  unsigned groups;
  dim3 block() const { return dim3(lanes, rows); }
};
// With packs: fewer lanes when C is small, so that no lane idles for want of channels while a
// warp still spans as many channels as C has (lanes is a power of two).
inline ReduceShape reduce_shape(int C, int V, int element, bool channels_last) {
  if (!channels_last) return {1, kReduceThreads, unsigned(C)};
  int lanes = kLastChannels;
  if (V > 1) {
    lanes = 1;
    while (lanes < max_lanes(V, element) && lanes * V < C) lanes *= 2;
  }
  return {lanes, kReduceThreads / lanes, unsigned((C + lanes * V - 1) / (lanes * V))};
}

// The first channel of this thread's lane in a reducing block (it may lie past the last
// channel: check before use; with V > 1, C is a multiple of V, so a pack is whole or absent).
template <int V> __device__ __forceinline__ int64_t lane_channel() {
  return (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
}
__device__ __forceinline__ int block_thread() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Warp exchange: v of the lane whose id differs from this one's by xor `mask`. Every thread of
// the block calls it (the CPU emulation exchanges through the block).
template <typename A> __device__ __forceinline__ A warp_xor(A v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// Shared memory for reduce_rows of Q values per thread with V channels of T per lane: all of them
// at once where that fits kReduceSharedBytes, else reduce_rows goes through them in slabs.
constexpr int kReduceSharedBytes = 24 * 1024;
template <typename T, typename A, int Q, int V> __host__ __device__ constexpr int reduce_slots() {
  constexpr int all = Q * kReduceWarps * max_lanes(V, int(sizeof(T))), most = kReduceSharedBytes / int(sizeof(A));
  return all < most ? all : most;
}

// Sums of Q values per thread over the rows of a reducing block, per (value, lane), in a fixed
// order (deterministic for a given block shape, unlike atomics): first across the rows a warp
// holds, by xor shuffles (both partners add the same two numbers, so every lane of a column
// gets the same bits), then across the warps in warp order, through `shared` (`slots` values)
// with one barrier per slab of values that fits it. emit(q, lane, sum) is called once per value
// and lane, by some thread of the block. Every thread must call it (inactive lanes with zeros).
template <int Q, typename A, typename Emit>
__device__ __forceinline__ void reduce_rows(A (&v)[Q], A* shared, int slots, Emit emit) {
  const int lanes = blockDim.x, t = block_thread(), warp = t / 32, lane_id = t % 32;
  for (int offset = lanes; offset < 32; offset <<= 1) {
#pragma unroll
    for (int q = 0; q < Q; ++q) v[q] += warp_xor(v[q], offset);
  }
  const int slab = slots / (kReduceWarps * lanes);
  for (int first = 0; first < Q; first += slab) {
    const int count = min(slab, Q - first);
    if (first > 0) __syncthreads();  // every thread has read the previous slab
    if (lane_id < lanes) {
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        if (q >= first && q < first + count) shared[(warp * count + q - first) * lanes + lane_id] = v[q];
      }
    }
    __syncthreads();
    for (int e = t; e < count * lanes; e += kReduceThreads) {
      A total = shared[e];
      for (int w = 1; w < kReduceWarps; ++w) total += shared[w * count * lanes + e];
      emit(first + e / lanes, e % lanes, total);
    }
  }
}

// Merge of (count, mean, M2) Welford triples (Chan et al.): no sum-of-squares cancellation.
template <typename A> __device__ __forceinline__ void welford_merge(A& n, A& mean, A& m2, A nb, A meanb, A m2b) {
  if (nb == A(0)) return;
  A total = n + nb;
  A delta = meanb - mean;
  A frac = nb / total;
  mean += delta * frac;
  m2 += m2b + delta * delta * n * frac;
  n = total;
}

// reduce_rows for Welford triples: per thread a count n (the same for its V channels) and a
// mean and M2 per channel, merged over the rows of the block. Merges are not symmetric in their
// operands, so each pair is merged lower row first, in both partners alike. emit(j, lane, n,
// mean, m2) once per channel j < V and lane. `shared` holds kReduceWarps * (2 V + 1) *
// blockDim.x values.
template <int V, typename A, typename Emit>
__device__ __forceinline__ void reduce_rows_welford(A n, A (&mean)[V], A (&m2)[V], A* shared, Emit emit) {
  const int lanes = blockDim.x, t = block_thread(), warp = t / 32, lane_id = t % 32;
  for (int offset = lanes; offset < 32; offset <<= 1) {
    const bool upper = lane_id & offset;
    const A other_n = warp_xor(n, offset);
    const A low_n = upper ? other_n : n, high_n = upper ? n : other_n;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A other_mean = warp_xor(mean[j], offset), other_m2 = warp_xor(m2[j], offset);
      A count = low_n, m = upper ? other_mean : mean[j], q = upper ? other_m2 : m2[j];
      welford_merge(count, m, q, high_n, upper ? mean[j] : other_mean, upper ? m2[j] : other_m2);
      mean[j] = m;
      m2[j] = q;
    }
    n = low_n + high_n;
  }
  A* shared_n = shared;
  A* shared_mean = shared + kReduceWarps * lanes;
  A* shared_m2 = shared_mean + kReduceWarps * V * lanes;
  if (lane_id < lanes) {
    shared_n[warp * lanes + lane_id] = n;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      shared_mean[(warp * V + j) * lanes + lane_id] = mean[j];
      shared_m2[(warp * V + j) * lanes + lane_id] = m2[j];
    }
  }
  __syncthreads();
  for (int e = t; e < V * lanes; e += kReduceThreads) {
    const int lane = e % lanes;
    A count = shared_n[lane], m = shared_mean[e], q = shared_m2[e];
    for (int w = 1; w < kReduceWarps; ++w) {
      welford_merge(count, m, q, shared_n[w * lanes + lane], shared_mean[w * V * lanes + e],
                    shared_m2[w * V * lanes + e]);
    }
    emit(e / lanes, lane, count, m, q);
  }
}

inline void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

inline int blocks_for(int64_t total, int threads) {
  int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 16 ? blocks : 65535 * 16);  // grid-stride loops cover the rest
}

template <typename T> inline const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T> inline T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Compile-time switches: a runtime code becomes a template argument.
#define MOBILEOPS_DISPATCH_DTYPE(code, T, ...)                                               \
  switch (code) {                                                                            \
    case kFloat32: { using T = float; __VA_ARGS__; break; }                                  \
    case kFloat16: { using T = __half; __VA_ARGS__; break; }                                 \
    case kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }                         \
    case kFloat64: { using T = double; __VA_ARGS__; break; }                                 \
    default: throw std::invalid_argument("unsupported dtype code " + std::to_string(code));  \
  }

#define MOBILEOPS_DISPATCH_ACT(code, ACT, ...)                                                   \
  switch (code) {                                                                                \
    case kNone: { constexpr int ACT = kNone; __VA_ARGS__; break; }                               \
    case kRelu: { constexpr int ACT = kRelu; __VA_ARGS__; break; }                               \
    case kRelu6: { constexpr int ACT = kRelu6; __VA_ARGS__; break; }                             \
    case kHswish: { constexpr int ACT = kHswish; __VA_ARGS__; break; }                           \
    case kSilu: { constexpr int ACT = kSilu; __VA_ARGS__; break; }                               \
    case kHsigmoid: { constexpr int ACT = kHsigmoid; __VA_ARGS__; break; }                       \
    default: throw std::invalid_argument("unsupported activation code " + std::to_string(code)); \
  }

#define MOBILEOPS_DISPATCH_GATE(code, GATE, ...)                                           \
  switch (code) {                                                                          \
    case kHsigmoid: { constexpr int GATE = kHsigmoid; __VA_ARGS__; break; }                \
    case kSigmoid: { constexpr int GATE = kSigmoid; __VA_ARGS__; break; }                  \
    default: throw std::invalid_argument("unsupported gate code " + std::to_string(code)); \
  }

// K = 0 is "no convolution" (the BatchNorm + activation op).
#define MOBILEOPS_DISPATCH_KERNEL_SIZE(k, K, ...)                                                              \
  switch (k) {                                                                                                 \
    case 0: { constexpr int K = 0; __VA_ARGS__; break; }                                                       \
    case 3: { constexpr int K = 3; __VA_ARGS__; break; }                                                       \
    case 5: { constexpr int K = 5; __VA_ARGS__; break; }                                                       \
    case 7: { constexpr int K = 7; __VA_ARGS__; break; }                                                       \
    default: throw std::invalid_argument("unsupported kernel size " + std::to_string(k) + " (3, 5 or 7)");    \
  }

}  // namespace mobileops
