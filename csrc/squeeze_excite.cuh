// Squeeze-and-Excitation: device code shared by squeeze_excite_{fwd,bwd}.cu (host entry points
// in ops.h).
// x (N, C, H, W) any strides; FC weights in nn.Linear layout, contiguous, in the accumulation
// type (float, or double for double x): fc1 (R, C), fc2 (C, R); pooled / gates (N, C).
#pragma once

#include "common.cuh"

namespace mobileops {

constexpr int kSeThreads = 256;

// Used by the backward too: sum over (h, w) of x[n, c] (or of dy * post'(x * g) * x when dy is
// given), divided by `scale_div`, for V channels per lane (see packs_fit) or one. Grid
// (N, channel groups), reducing blocks (see reduce_shape).
template <typename T, int V>
__global__ void __launch_bounds__(kReduceThreads)
se_channel_sum_kernel(const T* __restrict__ x, Strides4 sx, const T* __restrict__ dy, Strides4 sdy,
                      const typename Acc<T>::type* gates, int post_act, int C, int H, int W,
                      typename Acc<T>::type scale_div, typename Acc<T>::type* out) {
  using A = typename Acc<T>::type;
  constexpr int SLOTS = reduce_slots<T, A, V, V>();
  __shared__ A shared[SLOTS];
  const int64_t n = blockIdx.x, c0 = lane_channel<V>();
  const int64_t hw = int64_t(H) * W;
  A acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = A(0);
  if (c0 < C) {
    A g[V];
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = dy != nullptr ? gates[n * C + c0 + j] : A(0);
    for (int64_t i = threadIdx.y; i < hw; i += blockDim.y) {
      const int64_t h = i / W, w = i % W;
      const Pack<T, V> xv = load_pack<V>(x + sx.at(n, c0, h, w));
      if (dy == nullptr) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += load_as<A>(&xv.v[j]);
      } else {
        const Pack<T, V> d = load_pack<V>(dy + sdy.at(n, c0, h, w));
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A xj = load_as<A>(&xv.v[j]);
          acc[j] += load_as<A>(&d.v[j]) * activate_grad_rt(post_act, xj * g[j]) * xj;
        }
      }
    }
  }
  reduce_rows<V>(acc, shared, SLOTS, [&](int j, int lane, A total) {
    const int64_t c = (int64_t(blockIdx.y) * blockDim.x + lane) * V + j;
    if (c < C) out[n * C + c] = total / scale_div;
  });
}

// The SE MLP of sample n, in one block: s[C] <- pooled[n], hidden[R] <- fc1(s) before the ReLU,
// and fc2 of the ReLU'd hidden layer at channel c. Shared by the forward and the backward
// (which recomputes it instead of saving it).
template <typename A>
__device__ __forceinline__ void se_hidden(const A* pooled, const A* w1, const A* b1, int C, int R, int64_t n, A* s,
                                          A* hidden) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) s[c] = pooled[n * C + c];
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    A h = b1 ? b1[r] : A(0);
    for (int c = 0; c < C; ++c) h += w1[int64_t(r) * C + c] * s[c];
    hidden[r] = h;
  }
  __syncthreads();
}

template <typename A>
__device__ __forceinline__ A se_pre_gate(const A* w2, const A* b2, int R, int c, const A* hidden) {
  A t = b2 ? b2[c] : A(0);
  for (int r = 0; r < R; ++r) t += w2[int64_t(c) * R + r] * activate<kRelu>(hidden[r]);  // keeps NaN, as torch.relu
  return t;
}

}  // namespace mobileops
