// Squeeze-and-Excitation: device code shared by squeeze_excite_{fwd,bwd}.cu (host entry points
// in ops.h).
// x (N, C, H, W) any strides; FC weights in nn.Linear layout, contiguous, in the accumulation
// type (float, or double for double x): fc1 (R, C), fc2 (C, R); pooled / gates (N, C).
#pragma once

#include "common.cuh"

namespace mobileops {

constexpr int kSeThreads = 256;

// Used by the backward too: sum over (h, w) of x[n, c] (or of dy * post'(x * g) * x when dy is
// given), for V channels per lane (see packs_fit) or one. Each sample's H * W positions are split
// into `chunks` ranges of `chunk` (so that a layer with few samples and channel groups still
// fills the GPU); grid (N * chunks, channel groups), reducing blocks (see reduce_shape). One
// chunk: out = sum / scale_div directly; several: the block's sum goes to part[(n * chunks + k),
// c] and se_merge_kernel adds them in chunk order (deterministic).
template <typename T, int V>
__global__ void __launch_bounds__(kReduceThreads)
se_channel_sum_kernel(const T* __restrict__ x, Strides4 sx, const T* __restrict__ dy, Strides4 sdy,
                      const typename Acc<T>::type* gates, int post_act, int C, int H, int W, int64_t chunk,
                      int chunks, typename Acc<T>::type scale_div, typename Acc<T>::type* out,
                      typename Acc<T>::type* part) {
  using A = typename Acc<T>::type;
  constexpr int SLOTS = reduce_slots<T, A, V, V>();
  __shared__ A shared[SLOTS];
  const int64_t n = blockIdx.x / chunks, c0 = lane_channel<V>();
  const int64_t hw = int64_t(H) * W, begin = (blockIdx.x % chunks) * chunk;
  const int64_t end = begin + chunk < hw ? begin + chunk : hw;
  A acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = A(0);
  if (c0 < C) {
    A g[V];
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = dy != nullptr ? gates[n * C + c0 + j] : A(0);
    for (int64_t i = begin + threadIdx.y; i < end; i += blockDim.y) {
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
    if (c >= C) return;
    if (chunks == 1) {
      out[n * C + c] = total / scale_div;
    } else {
      part[int64_t(blockIdx.x) * C + c] = total;
    }
  });
}

// out[n, c] = (sum over k of part[n * chunks + k, c], k in order) / scale_div.
template <typename A>
__global__ void se_merge_kernel(const A* part, int N, int C, int chunks, A scale_div, A* out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(N) * C) return;
  const int64_t n = i / C, c = i % C;
  A acc = A(0);
  for (int k = 0; k < chunks; ++k) acc += part[(n * chunks + k) * C + c];
  out[i] = acc / scale_div;
}

// Launches se_channel_sum_kernel (and the merge for several chunks) over x, or over dy with x and
// the gates when dy is non-null.
template <typename T>
void se_channel_sums(const T* x, Strides sx, const T* dy, Strides sdy, const typename Acc<T>::type* gates,
                     int post_act, int N, int C, int H, int W, int64_t chunk, int chunks,
                     typename Acc<T>::type* out, typename Acc<T>::type* part, bool channels_last, cudaStream_t st) {
  using A = typename Acc<T>::type;
  constexpr int V = VecWidth<T>::value;
  const uintptr_t dy_address = reinterpret_cast<uintptr_t>(dy);
  const bool packed = channels_last && (dy == nullptr ? packs_fit(C, V, sizeof(T), {{uintptr_t(x), sx}})
                                                      : packs_fit(C, V, sizeof(T), {{uintptr_t(x), sx},
                                                                                    {dy_address, sdy}}));
  const A scale_div = dy == nullptr ? A(int64_t(H) * W) : A(1);
  if (packed) {
    const ReduceShape r = reduce_shape(C, V, sizeof(T), true);
    se_channel_sum_kernel<T, V><<<dim3(N * chunks, r.groups), r.block(), 0, st>>>(
        x, Strides4(sx), dy, Strides4(sdy), gates, post_act, C, H, W, chunk, chunks, scale_div, out, part);
  } else {
    const ReduceShape r = reduce_shape(C, 1, sizeof(T), channels_last);
    se_channel_sum_kernel<T, 1><<<dim3(N * chunks, r.groups), r.block(), 0, st>>>(
        x, Strides4(sx), dy, Strides4(sdy), gates, post_act, C, H, W, chunk, chunks, scale_div, out, part);
  }
  if (chunks > 1) {
    se_merge_kernel<A><<<int((int64_t(N) * C + 255) / 256), 256, 0, st>>>(part, N, C, chunks, scale_div, out);
  }
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
