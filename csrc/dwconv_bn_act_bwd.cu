// Backward of depthwise conv + BatchNorm + activation (and of BN + activation, K = 0).
// Saves nothing but x and the per-channel statistics: every pass recomputes the conv.
//   1. (batch statistics only) per-(chunk, channel) sums of du and du * xhat, where du is
//      dL/d(BN output) = dy * act'(u); merged in chunk order.
//   2. dz = dL/d(conv output) per position, written to a workspace in the activation dtype (or
//      straight into dx without a conv), with the per-chunk weight-gradient partials
//      sum(dz * x[tap]) and, for running statistics, the du sums.
//   3. dx as a gather-form transposed depthwise conv of dz.
// Partials are merged in a fixed order: no atomics, the same bits on every run.
#include "dwconv_bn_act.cuh"

namespace mobileops {
namespace {

constexpr int kThreads = 256;

struct Grad {
  int act, norm;
};

template <typename T, int K>
__global__ void __launch_bounds__(kReduceThreads)
grad_sums_kernel(const T* __restrict__ dy, Strides4 sdy, const T* __restrict__ x, Strides4 sx,
                 const T* __restrict__ w, const typename Acc<T>::type* gamma, const typename Acc<T>::type* beta,
                 const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd, DwShape s, int64_t chunk,
                 int act, typename Acc<T>::type* part_du, typename Acc<T>::type* part_dux) {
  using A = typename Acc<T>::type;
  __shared__ A buf[kReduceThreads];
  const int64_t c = block_channel();
  const bool active = c < s.C;
  const int64_t cs = active ? c : 0;  // a channel that exists, for the per-channel reads
  const ChannelParams<A> p(gamma, beta, mean, rstd, kNormBatch, A(0), cs);
  const int64_t hw = int64_t(s.HO) * s.WO, positions = s.N * hw;
  const int64_t begin = blockIdx.x * chunk, end = min(begin + chunk, positions);
  A sdu = A(0), sdux = A(0);
  for (int64_t q = begin + threadIdx.y; active && q < end; q += blockDim.y) {
    int64_t r, ow;
    const int64_t n = divmod(q, hw, r), oh = divmod(r, s.WO, ow);
    const A xhat = (conv_at<T, A, K>(x, w, s, sx, n, c, oh, ow) - p.mean) * p.rstd;
    const A du = load_as<A>(dy + sdy.at(n, c, oh, ow)) * activate_grad_rt(act, xhat * p.gamma + p.beta);
    sdu += du;
    sdux += du * xhat;
  }
  sdu = column_sum(sdu, buf);
  sdux = column_sum(sdux, buf);
  if (threadIdx.y == 0 && active) {
    part_du[blockIdx.x * int64_t(s.C) + c] = sdu;
    part_dux[blockIdx.x * int64_t(s.C) + c] = sdux;
  }
}

// rows x cols partials -> cols sums, adding rows in order.
template <typename A>
__global__ void sum_rows_kernel(const A* part, int rows, int64_t cols, A* out) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  A acc = A(0);
  for (int r = 0; r < rows; ++r) acc += part[r * cols + j];
  out[j] = acc;
}

template <typename T, int K>
__global__ void __launch_bounds__(kReduceThreads)
grad_input_kernel(const T* __restrict__ dy, Strides4 sdy, const T* __restrict__ x, Strides4 sx,
                  const T* __restrict__ w, const typename Acc<T>::type* gamma, const typename Acc<T>::type* beta,
                  const typename Acc<T>::type* mean, const typename Acc<T>::type* var, typename Acc<T>::type eps,
                  const typename Acc<T>::type* sum_du, const typename Acc<T>::type* sum_dux, DwShape s,
                  int64_t chunk, Grad g, T* dz, Strides4 sdz, T* dx_direct, Strides4 sdx,
                  typename Acc<T>::type* part_dw, typename Acc<T>::type* part_du, typename Acc<T>::type* part_dux) {
  using A = typename Acc<T>::type;
  constexpr int TAPS = K > 0 ? K * K : 1;
  __shared__ A buf[kReduceThreads];
  const int64_t c = block_channel();
  const bool active = c < s.C;
  const int64_t cs = active ? c : 0;  // a channel that exists, for the per-channel reads
  const ChannelParams<A> p(gamma, beta, mean, var, g.norm, eps, cs);
  const int64_t hw = int64_t(s.HO) * s.WO, positions = s.N * hw;
  const A inv_count = A(1) / A(positions);
  const A mean_du = g.norm == kNormBatch ? sum_du[cs] * inv_count : A(0);
  const A mean_dux = g.norm == kNormBatch ? sum_dux[cs] * inv_count : A(0);
  const int64_t begin = blockIdx.x * chunk, end = min(begin + chunk, positions);
  A dw[TAPS];
#pragma unroll
  for (int t = 0; t < TAPS; ++t) dw[t] = A(0);
  A sdu = A(0), sdux = A(0);
  for (int64_t q = begin + threadIdx.y; active && q < end; q += blockDim.y) {
    int64_t r, ow;
    const int64_t n = divmod(q, hw, r), oh = divmod(r, s.WO, ow);
    const A xhat = (conv_at<T, A, K>(x, w, s, sx, n, c, oh, ow) - p.mean) * p.rstd;
    const A du = load_as<A>(dy + sdy.at(n, c, oh, ow)) * activate_grad_rt(g.act, xhat * p.gamma + p.beta);
    sdu += du;
    sdux += du * xhat;
    A d;  // dL/dz
    if (g.norm == kNormBatch) d = p.gamma * p.rstd * (du - mean_du - xhat * mean_dux);
    else d = du * p.gamma * p.rstd;
    if constexpr (K == 0) {
      dx_direct[sdx.at(n, c, oh, ow)] = store_as<T>(d);
    } else {
      dz[sdz.at(n, c, oh, ow)] = store_as<T>(d);
      if (part_dw != nullptr) {
        const T* xb = x + n * sx.n + c * sx.c;
        const int64_t ih0 = oh * s.stride - s.pad, iw0 = ow * s.stride - s.pad;
#pragma unroll
        for (int kh = 0; kh < K; ++kh) {
#pragma unroll
          for (int kw = 0; kw < K; ++kw) {
            const int64_t ih = ih0 + kh, iw = iw0 + kw;
            if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) dw[kh * K + kw] += d * load_as<A>(xb + ih * sx.h + iw * sx.w);
          }
        }
      }
    }
  }
  if (part_dw != nullptr && K > 0) {
    for (int t = 0; t < TAPS; ++t) {
      const A total = column_sum(dw[t], buf);
      if (threadIdx.y == 0 && active) part_dw[(blockIdx.x * int64_t(s.C) + c) * TAPS + t] = total;
    }
  }
  if (g.norm != kNormBatch) {  // with batch statistics pass 1 already produced these sums
    sdu = column_sum(sdu, buf);
    sdux = column_sum(sdux, buf);
    if (threadIdx.y == 0 && active) {
      part_du[blockIdx.x * int64_t(s.C) + c] = sdu;
      part_dux[blockIdx.x * int64_t(s.C) + c] = sdux;
    }
  }
}

// dx as a gather of dz over the taps that reach (h, w), for V channels per thread (see
// packs_fit) or one.
template <typename T, int K, int V>
__global__ void __launch_bounds__(kThreads)
dx_kernel(const T* __restrict__ dz, Strides4 sdz, const T* __restrict__ w, T* __restrict__ dx, Strides4 sdx,
          DwShape s, bool channels_last) {
  using A = typename Acc<T>::type;
  const int groups = s.C / V;
  const int64_t total = int64_t(s.N) * groups * s.H * s.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, g, h, ww;
    split_index(i, groups, s.H, s.W, channels_last, n, g, h, ww);
    const int64_t c0 = g * V;
    const T* wc = w + c0 * K * K;
    A acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = A(0);
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int64_t th = h + s.pad - kh;
      if (th < 0 || th % s.stride) continue;
      const int64_t oh = th / s.stride;
      if (oh >= s.HO) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int64_t tw = ww + s.pad - kw;
        if (tw < 0 || tw % s.stride) continue;
        const int64_t ow = tw / s.stride;
        if (ow >= s.WO) continue;
        const Pack<T, V> d = load_pack<V>(dz + sdz.at(n, c0, oh, ow));
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += load_as<A>(&d.v[j]) * load_as<A>(wc + j * K * K + kh * K + kw);
      }
    }
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = store_as<T>(acc[j]);
    store_pack<V>(dx + sdx.at(n, c0, h, ww), out);
  }
}

// Without a conv the input-gradient pass already wrote dx.
template <typename T, int K>
void launch_dx(uintptr_t dz, Strides sdz, const T* w, uintptr_t dx, Strides sdx, const DwShape& s,
               bool channels_last, cudaStream_t st) {
  if constexpr (K > 0) {
    const int64_t total = int64_t(s.N) * s.C * s.H * s.W;
    if (total == 0) return;
    constexpr int V = VecWidth<T>::value;
    if (channels_last && packs_fit(s.C, V, sizeof(T), {{dz, sdz}, {dx, sdx}})) {
      dx_kernel<T, K, V><<<blocks_for(total / V, kThreads), kThreads, 0, st>>>(
          cptr<T>(dz), Strides4(sdz), w, mptr<T>(dx), Strides4(sdx), s, channels_last);
    } else {
      dx_kernel<T, K, 1><<<blocks_for(total, kThreads), kThreads, 0, st>>>(
          cptr<T>(dz), Strides4(sdz), w, mptr<T>(dx), Strides4(sdx), s, channels_last);
    }
  }
}

}  // namespace

void dwconv_bn_act_backward(int dtype, int k, int act, int norm, uintptr_t dy, Strides sdy, uintptr_t x, Strides sx,
                            uintptr_t w, uintptr_t gamma, uintptr_t beta, uintptr_t mean, uintptr_t var, double eps,
                            std::array<int, 8> shape, int64_t chunk, int chunks, uintptr_t part_du,
                            uintptr_t part_dux, uintptr_t sum_du, uintptr_t sum_dux, uintptr_t dz, Strides sdz,
                            uintptr_t part_dw, uintptr_t dw, uintptr_t dx, Strides sdx, bool channels_last,
                            uintptr_t stream) {
  const DwShape s{shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6], shape[7]};
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(chunks, channel_groups(s.C, channels_last)), block = reduce_block(channels_last);
  const int taps = k > 0 ? k * k : 1;
  MOBILEOPS_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    MOBILEOPS_DISPATCH_KERNEL_SIZE(k, K, {
      if (norm == kNormBatch) {
        grad_sums_kernel<T, K><<<grid, block, 0, st>>>(
            cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta),
            cptr<A>(mean), cptr<A>(var), s, chunk, act, mptr<A>(part_du), mptr<A>(part_dux));
        check_launch("dwconv_bn_act backward (gradient sums)");
        sum_rows_kernel<A><<<(s.C + 127) / 128, 128, 0, st>>>(cptr<A>(part_du), chunks, s.C, mptr<A>(sum_du));
        sum_rows_kernel<A><<<(s.C + 127) / 128, 128, 0, st>>>(cptr<A>(part_dux), chunks, s.C, mptr<A>(sum_dux));
      }
      grad_input_kernel<T, K><<<grid, block, 0, st>>>(
          cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta),
          cptr<A>(mean), cptr<A>(var), A(eps), cptr<A>(sum_du), cptr<A>(sum_dux), s, chunk, Grad{act, norm},
          mptr<T>(dz), Strides4(sdz), mptr<T>(dx), Strides4(sdx), mptr<A>(part_dw), mptr<A>(part_du),
          mptr<A>(part_dux));
      check_launch("dwconv_bn_act backward (input gradient)");
      if (norm != kNormBatch) {
        sum_rows_kernel<A><<<(s.C + 127) / 128, 128, 0, st>>>(cptr<A>(part_du), chunks, s.C, mptr<A>(sum_du));
        sum_rows_kernel<A><<<(s.C + 127) / 128, 128, 0, st>>>(cptr<A>(part_dux), chunks, s.C, mptr<A>(sum_dux));
      }
      if (part_dw != 0 && K > 0) {
        const int64_t cols = int64_t(s.C) * taps;
        sum_rows_kernel<A><<<blocks_for(cols, 128), 128, 0, st>>>(cptr<A>(part_dw), chunks, cols, mptr<A>(dw));
      }
      launch_dx<T, K>(dz, sdz, cptr<T>(w), dx, sdx, s, channels_last, st);
    });
  });
  check_launch("dwconv_bn_act backward");
}

}  // namespace mobileops
