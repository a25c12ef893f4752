// Squeeze-and-Excitation: device code shared by squeeze_excite_{fwd,bwd}.cu (host entry points
// in ops.h).
// x (N, C, H, W) any strides; FC weights in nn.Linear layout, contiguous, in the accumulation
// type (float, or double for double x): fc1 (R, C), fc2 (C, R); pooled / gates (N, C).
#pragma once

#include "common.cuh"

namespace mobileops {

constexpr int kSeThreads = 256;

// Used by the backward too: sum over (h, w) of x[n, c] (or of dy * post'(x * g) * x when dy is
// given), one block per (n, c), divided by `scale_div`.
template <typename T>
__global__ void __launch_bounds__(kSeThreads)
se_channel_sum_kernel(const T* __restrict__ x, Strides4 sx, const T* __restrict__ dy, Strides4 sdy,
                      const typename Acc<T>::type* gates, int post_act, int C, int H, int W,
                      typename Acc<T>::type scale_div, typename Acc<T>::type* out) {
  using A = typename Acc<T>::type;
  __shared__ A buf[kSeThreads];
  const int64_t n = blockIdx.x / C, c = blockIdx.x % C;
  const int64_t hw = int64_t(H) * W;
  const A g = dy != nullptr ? gates[blockIdx.x] : A(0);
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
    const int64_t h = i / W, w = i % W;
    const A xv = load_as<A>(x + sx.at(n, c, h, w));
    if (dy == nullptr) {
      acc += xv;
    } else {
      acc += load_as<A>(dy + sdy.at(n, c, h, w)) * activate_grad_rt(post_act, xv * g) * xv;
    }
  }
  acc = block_sum(acc, buf);
  if (threadIdx.x == 0) out[blockIdx.x] = acc / scale_div;
}

}  // namespace mobileops
