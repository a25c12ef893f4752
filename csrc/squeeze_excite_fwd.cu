// SE forward: two passes over x plus one small launch.
//   1. pool: per (sample, position chunk, channel group) block, sums of its positions, merged in
//      chunk order when a sample has several (se_channel_sums);
//   2. MLP: one block per sample, FC1 -> ReLU -> FC2 -> gate, from the pooled means;
//   3. scale: y = post_act(x * gate), elementwise in x's memory order.
#include "squeeze_excite.cuh"

namespace mobileops {

namespace {

template <typename A, int GATE>
__global__ void __launch_bounds__(kSeThreads)
mlp_kernel(const A* pooled, const A* w1, const A* b1, const A* w2, const A* b2, int C, int R, A* gates) {
  extern __shared__ unsigned char smem[];
  A* s = reinterpret_cast<A*>(smem);
  A* hidden = s + C;
  const int64_t n = blockIdx.x;
  se_hidden(pooled, w1, b1, C, R, n, s, hidden);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    gates[n * C + c] = activate<GATE>(se_pre_gate(w2, b2, R, c, hidden));
  }
}

// V channels per thread (see packs_fit), V columns of one channel (AXIS kPackW, see
// w_packs_fit), or one element.
template <typename T, int POST, int V, int AXIS = kPackChannels>
__global__ void __launch_bounds__(kSeThreads)
scale_kernel(const T* __restrict__ x, Strides4 sx, const typename Acc<T>::type* gates, T* __restrict__ y,
             Strides4 sy, int N, int C, int H, int W, bool channels_last) {
  using A = typename Acc<T>::type;
  const int64_t total = int64_t(N) * C * H * W / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c0, h, w;
    split_pack<V, AXIS>(i, C, H, W, channels_last, n, c0, h, w);
    const Pack<T, V> xv = load_pack<V>(x + sx.at(n, c0, h, w));
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      out.v[j] = store_as<T>(activate<POST>(load_as<A>(&xv.v[j]) * gates[n * C + pack_channel<AXIS>(c0, j)]));
    }
    store_pack<V>(y + sy.at(n, c0, h, w), out);
  }
}

}  // namespace

void squeeze_excite_forward(int dtype, int gate, int post_act, uintptr_t x, Strides sx, std::array<int, 4> shape,
                            int hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, int64_t chunk,
                            int chunks, uintptr_t part, uintptr_t pooled, uintptr_t gates, uintptr_t y, Strides sy,
                            bool channels_last, uintptr_t stream) {
  const int N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  const int64_t total = int64_t(N) * C * H * W;
  if (total == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  MOBILEOPS_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    constexpr int V = VecWidth<T>::value;
    se_channel_sums<T>(cptr<T>(x), sx, nullptr, sx, nullptr, kNone, N, C, H, W, chunk, chunks, mptr<A>(pooled),
                       mptr<A>(part), channels_last, st);
    check_launch("squeeze_excite forward (pool)");
    const size_t smem = sizeof(A) * (size_t(C) + hidden);
    MOBILEOPS_DISPATCH_GATE(gate, GATE, {
      mlp_kernel<A, GATE><<<N, kSeThreads, smem, st>>>(cptr<A>(pooled), cptr<A>(w1), cptr<A>(b1), cptr<A>(w2),
                                                       cptr<A>(b2), C, hidden, mptr<A>(gates));
    });
    check_launch("squeeze_excite forward (MLP)");
    const bool packed = channels_last && packs_fit(C, V, sizeof(T), {{x, sx}, {y, sy}});
    const bool w_packed = !channels_last && w_packs_fit(W, V, sizeof(T), {{x, sx}, {y, sy}});
    MOBILEOPS_DISPATCH_ACT(post_act, POST, {
      if (w_packed) {
        scale_kernel<T, POST, V, kPackW><<<blocks_for(total / V, kSeThreads), kSeThreads, 0, st>>>(
            cptr<T>(x), Strides4(sx), cptr<A>(gates), mptr<T>(y), Strides4(sy), N, C, H, W, channels_last);
      } else if (packed) {
        scale_kernel<T, POST, V><<<blocks_for(total / V, kSeThreads), kSeThreads, 0, st>>>(
            cptr<T>(x), Strides4(sx), cptr<A>(gates), mptr<T>(y), Strides4(sy), N, C, H, W, channels_last);
      } else {
        scale_kernel<T, POST, 1><<<blocks_for(total, kSeThreads), kSeThreads, 0, st>>>(
            cptr<T>(x), Strides4(sx), cptr<A>(gates), mptr<T>(y), Strides4(sy), N, C, H, W, channels_last);
      }
    });
  });
  check_launch("squeeze_excite forward (scale)");
}

}  // namespace mobileops
