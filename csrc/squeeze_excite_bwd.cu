// SE backward, from x, the saved per-sample pooled means and gates, and dy:
//   1. d_gate[n, c] = sum_hw dy * post'(x * g) * x, per (sample, position chunk, channel group)
//      block, merged in chunk order (se_channel_sums);
//   2. per sample: the MLP's backward (recomputing its hidden layer) -> d(pre-gate),
//      d(pre-hidden), d(pooled);
//   3. FC weight and bias gradients as sums over samples in sample order (no atomics);
//   4. dx = dy * post'(x * g) * g + d(pooled) / (H * W), elementwise.
#include "squeeze_excite.cuh"

namespace mobileops {
namespace {

template <typename A, int GATE>
__global__ void __launch_bounds__(kSeThreads)
mlp_backward_kernel(const A* pooled, const A* w1, const A* b1, const A* w2, const A* b2, const A* d_gate, int C,
                    int R, A* d_pre_gate, A* hidden_out, A* d_pre_hidden, A* d_pooled) {
  extern __shared__ unsigned char smem[];
  A* s = reinterpret_cast<A*>(smem);  // pooled, then d(pre-gate) [C]
  A* dt = s + C;                        // [C]
  A* hidden = dt + C;                   // [R]
  A* dh = hidden + R;                   // [R]
  const int64_t n = blockIdx.x;
  se_hidden(pooled, w1, b1, C, R, n, s, hidden);  // hidden before the ReLU
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const A d = d_gate[n * C + c] * activate_grad<GATE>(se_pre_gate(w2, b2, R, c, hidden));
    dt[c] = d;
    d_pre_gate[n * C + c] = d;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    A acc = A(0);
    for (int c = 0; c < C; ++c) acc += w2[int64_t(c) * R + r] * dt[c];
    const bool on = hidden[r] > A(0);
    dh[r] = on ? acc : A(0);
    d_pre_hidden[n * R + r] = dh[r];
    hidden_out[n * R + r] = on ? hidden[r] : A(0);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    A acc = A(0);
    for (int r = 0; r < R; ++r) acc += w1[int64_t(r) * C + c] * dh[r];
    d_pooled[n * C + c] = acc;
  }
}

// out[i, j] = sum_n a[n, i] * b[n, j]  (a: N x I, b: N x J), n in order.
template <typename A>
__global__ void outer_sum_kernel(const A* a, const A* b, int N, int I, int J, A* out) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= int64_t(I) * J) return;
  const int64_t i = k / J, j = k % J;
  A acc = A(0);
  for (int n = 0; n < N; ++n) acc += a[int64_t(n) * I + i] * b[int64_t(n) * J + j];
  out[k] = acc;
}

template <typename A>
__global__ void column_sum_kernel(const A* a, int N, int I, A* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= I) return;
  A acc = A(0);
  for (int n = 0; n < N; ++n) acc += a[int64_t(n) * I + i];
  out[i] = acc;
}

// V channels per thread (see packs_fit), V columns of one channel (AXIS kPackW, see
// w_packs_fit), or one element.
template <typename T, int V, int AXIS = kPackChannels>
__global__ void __launch_bounds__(kSeThreads)
dx_kernel(const T* __restrict__ dy, Strides4 sdy, const T* __restrict__ x, Strides4 sx,
          const typename Acc<T>::type* gates, const typename Acc<T>::type* d_pooled, int post_act,
          T* __restrict__ dx, Strides4 sdx, int N, int C, int H, int W, bool channels_last) {
  using A = typename Acc<T>::type;
  const int64_t total = int64_t(N) * C * H * W / V;
  const A inv_hw = A(1) / A(int64_t(H) * W);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c0, h, w;
    split_pack<V, AXIS>(i, C, H, W, channels_last, n, c0, h, w);
    const Pack<T, V> xv = load_pack<V>(x + sx.at(n, c0, h, w)), dyv = load_pack<V>(dy + sdy.at(n, c0, h, w));
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = n * C + pack_channel<AXIS>(c0, j);
      const A gate = gates[c], xj = load_as<A>(&xv.v[j]);
      const A dv = load_as<A>(&dyv.v[j]) * activate_grad_rt(post_act, xj * gate);
      out.v[j] = store_as<T>(dv * gate + d_pooled[c] * inv_hw);
    }
    store_pack<V>(dx + sdx.at(n, c0, h, w), out);
  }
}

}  // namespace

void squeeze_excite_backward(int dtype, int gate, int post_act, uintptr_t dy, Strides sdy, uintptr_t x, Strides sx,
                             std::array<int, 4> shape, int hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2,
                             uintptr_t b2, int64_t chunk, int chunks, uintptr_t part, uintptr_t pooled,
                             uintptr_t gates, uintptr_t d_gate, uintptr_t d_pre_gate, uintptr_t hidden_act,
                             uintptr_t d_pre_hidden, uintptr_t d_pooled, uintptr_t dw1, uintptr_t db1, uintptr_t dw2,
                             uintptr_t db2, uintptr_t dx, Strides sdx, bool channels_last, uintptr_t stream) {
  const int N = shape[0], C = shape[1], H = shape[2], W = shape[3], R = hidden;
  const int64_t total = int64_t(N) * C * H * W;
  if (total == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  MOBILEOPS_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    constexpr int V = VecWidth<T>::value;
    se_channel_sums<T>(cptr<T>(x), sx, cptr<T>(dy), sdy, cptr<A>(gates), post_act, N, C, H, W, chunk, chunks,
                       mptr<A>(d_gate), mptr<A>(part), channels_last, st);
    check_launch("squeeze_excite backward (gate gradient)");
    const size_t smem = sizeof(A) * (2 * size_t(C) + 2 * size_t(R));
    MOBILEOPS_DISPATCH_GATE(gate, GATE, {
      mlp_backward_kernel<A, GATE><<<N, kSeThreads, smem, st>>>(
          cptr<A>(pooled), cptr<A>(w1), cptr<A>(b1), cptr<A>(w2), cptr<A>(b2), cptr<A>(d_gate), C, R,
          mptr<A>(d_pre_gate), mptr<A>(hidden_act), mptr<A>(d_pre_hidden), mptr<A>(d_pooled));
    });
    check_launch("squeeze_excite backward (MLP)");
    const int64_t weights = int64_t(C) * R;
    outer_sum_kernel<A><<<blocks_for(weights, 128), 128, 0, st>>>(cptr<A>(d_pre_gate), cptr<A>(hidden_act), N, C, R,
                                                                   mptr<A>(dw2));
    outer_sum_kernel<A><<<blocks_for(weights, 128), 128, 0, st>>>(cptr<A>(d_pre_hidden), cptr<A>(pooled), N, R, C,
                                                                   mptr<A>(dw1));
    if (db2 != 0) column_sum_kernel<A><<<(C + 127) / 128, 128, 0, st>>>(cptr<A>(d_pre_gate), N, C, mptr<A>(db2));
    if (db1 != 0) column_sum_kernel<A><<<(R + 127) / 128, 128, 0, st>>>(cptr<A>(d_pre_hidden), N, R, mptr<A>(db1));
    check_launch("squeeze_excite backward (weight gradients)");
    if (!channels_last && w_packs_fit(W, V, sizeof(T), {{dy, sdy}, {x, sx}, {dx, sdx}})) {
      dx_kernel<T, V, kPackW><<<blocks_for(total / V, kSeThreads), kSeThreads, 0, st>>>(
          cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<A>(gates), cptr<A>(d_pooled), post_act,
          mptr<T>(dx), Strides4(sdx), N, C, H, W, channels_last);
    } else if (channels_last && packs_fit(C, V, sizeof(T), {{dy, sdy}, {x, sx}, {dx, sdx}})) {
      dx_kernel<T, V><<<blocks_for(total / V, kSeThreads), kSeThreads, 0, st>>>(
          cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<A>(gates), cptr<A>(d_pooled), post_act,
          mptr<T>(dx), Strides4(sdx), N, C, H, W, channels_last);
    } else {
      dx_kernel<T, 1><<<blocks_for(total, kSeThreads), kSeThreads, 0, st>>>(
          cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<A>(gates), cptr<A>(d_pooled), post_act,
          mptr<T>(dx), Strides4(sdx), N, C, H, W, channels_last);
    }
  });
  check_launch("squeeze_excite backward (input gradient)");
}

}  // namespace mobileops
