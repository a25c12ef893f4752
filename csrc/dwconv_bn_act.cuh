// Device helpers shared by the forward and backward depthwise conv + BN + activation kernels
// (dwconv_bn_act_{fwd,bwd}.cu; their host entry points are declared in ops.h).
#pragma once

#include "common.cuh"

namespace mobileops {

// Sizes of one problem. K = 0 means no convolution (BatchNorm + activation).
struct DwShape {
  int N, C, H, W, HO, WO, stride, pad;
};

// The depthwise convolution at output (n, c0 + j, oh, ow) for the V channels j < V, accumulated
// in A; weights (C, K, K) contiguous. Without a convolution it is x itself. V > 1 only where
// packs_fit: one pack load of x per tap, and each channel adds its taps in the same order as
// V = 1, so both give the same bits. With `taps`, the loaded packs are kept there (tap
// kh * K + kw) and bit t of *valid says whether tap t lay inside x (the backward reuses them).
template <typename T, typename A, int K, int V>
__device__ __forceinline__ void conv_pack(const T* __restrict__ x, const T* __restrict__ w, const DwShape& s,
                                          const Strides4& sx, int64_t n, int64_t c0, int64_t oh, int64_t ow,
                                          A (&acc)[V], Pack<T, V>* taps = nullptr, uint64_t* valid = nullptr) {
  if constexpr (K == 0) {
    const Pack<T, V> v = load_pack<V>(x + sx.at(n, c0, oh, ow));
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = load_as<A>(&v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = A(0);
    const T* xb = x + n * sx.n + c0 * sx.c;
    const T* wc = w + c0 * K * K;
    const int64_t ih0 = oh * s.stride - s.pad, iw0 = ow * s.stride - s.pad;
    if (valid != nullptr) *valid = 0;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = ih0 + kh;
      if (ih < 0 || ih >= s.H) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int64_t iw = iw0 + kw;
        if (iw < 0 || iw >= s.W) continue;
        const Pack<T, V> v = load_pack<V>(xb + ih * sx.h + iw * sx.w);
        if (taps != nullptr) {
          taps[kh * K + kw] = v;
          *valid |= uint64_t(1) << (kh * K + kw);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += load_as<A>(&v.v[j]) * load_as<A>(wc + j * K * K + kh * K + kw);
      }
    }
  }
}

// Per-channel (mean, rstd, gamma, beta) such that u = (z - mean) * rstd * gamma + beta.
// Parameters are in A (the Python side converts them); absent ones are null.
template <typename A>
struct ChannelParams {
  A mean, rstd, gamma, beta;
  ChannelParams() = default;
  __device__ __forceinline__ ChannelParams(const A* gamma_p, const A* beta_p, const A* mean_p, const A* var_p,
                                           int norm, A eps, int64_t c) {
    mean = A(0);
    rstd = A(1);
    if (norm == kNormRunning) {
      mean = mean_p[c];
      rstd = A(1) / sqrt(var_p[c] + eps);
    } else if (norm == kNormBatch) {
      mean = mean_p[c];
      rstd = var_p[c];
    }
    gamma = gamma_p ? gamma_p[c] : A(1);
    beta = beta_p ? beta_p[c] : A(0);
  }
};

// Position chunks: the N * HO * WO outputs of a channel are split into `chunks` ranges of
// `chunk` positions; each (channel, chunk) block writes one partial result, merged later in
// chunk order (deterministic).
struct Chunking {
  int64_t positions, chunk;
  int chunks;
};

}  // namespace mobileops
