// Device helpers shared by the forward and backward depthwise conv + BN + activation kernels
// (dwconv_bn_act_{fwd,bwd}.cu; their host entry points are declared in ops.h).
#pragma once

#include "common.cuh"

namespace mobileops {

// Sizes of one problem. K = 0 means no convolution (BatchNorm + activation).
struct DwShape {
  int N, C, H, W, HO, WO, stride, pad;
};

// The depthwise convolution at output (n, c, oh, ow), accumulated in A; weights (C, K, K)
// contiguous. Without a convolution it is x itself.
template <typename T, typename A, int K>
__device__ __forceinline__ A conv_at(const T* __restrict__ x, const T* __restrict__ w, const DwShape& s,
                                     const Strides4& sx, int64_t n, int64_t c, int64_t oh, int64_t ow) {
  if constexpr (K == 0) {
    return load_as<A>(x + sx.at(n, c, oh, ow));
  } else {
    A acc = A(0);
    const T* xb = x + n * sx.n + c * sx.c;
    const T* wc = w + c * K * K;
    const int64_t ih0 = oh * s.stride - s.pad, iw0 = ow * s.stride - s.pad;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ih = ih0 + kh;
      if (ih < 0 || ih >= s.H) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int64_t iw = iw0 + kw;
        if (iw < 0 || iw >= s.W) continue;
        acc += load_as<A>(xb + ih * sx.h + iw * sx.w) * load_as<A>(wc + kh * K + kw);
      }
    }
    return acc;
  }
}

// Per-channel (mean, rstd, gamma, beta) such that u = (z - mean) * rstd * gamma + beta.
// Parameters are in A (the Python side converts them); absent ones are null.
template <typename A>
struct ChannelParams {
  A mean, rstd, gamma, beta;
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
