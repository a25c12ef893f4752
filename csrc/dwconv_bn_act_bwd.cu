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

template <typename T, int K, int V>
__global__ void __launch_bounds__(kReduceThreads)
grad_sums_kernel(const T* __restrict__ dy, Strides4 sdy, const T* __restrict__ x, Strides4 sx,
                 const T* __restrict__ w, const typename Acc<T>::type* gamma, const typename Acc<T>::type* beta,
                 const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd, DwShape s, int64_t chunk,
                 int act, typename Acc<T>::type* part_du, typename Acc<T>::type* part_dux) {
  using A = typename Acc<T>::type;
  constexpr int SLOTS = reduce_slots<T, A, 2 * V, V>();
  __shared__ A shared[SLOTS];
  const int64_t c0 = lane_channel<V>();
  const bool active = c0 < s.C;
  const int64_t hw = int64_t(s.HO) * s.WO, positions = s.N * hw;
  const int64_t begin = blockIdx.x * chunk, end = min(begin + chunk, positions);
  A sums[2 * V];  // sum du per channel, then sum du * xhat
#pragma unroll
  for (int q = 0; q < 2 * V; ++q) sums[q] = A(0);
  if (active) {
    ChannelParams<A> p[V] = {};
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = ChannelParams<A>(gamma, beta, mean, rstd, kNormBatch, A(0), c0 + j);
    for (int64_t q = begin + threadIdx.y; q < end; q += blockDim.y) {
      int64_t r, ow;
      const int64_t n = divmod(q, hw, r), oh = divmod(r, s.WO, ow);
      A z[V];
      conv_pack<T, A, K, V>(x, w, s, sx, n, c0, oh, ow, z);
      const Pack<T, V> d = load_pack<V>(dy + sdy.at(n, c0, oh, ow));
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A xhat = (z[j] - p[j].mean) * p[j].rstd;
        const A du = load_as<A>(&d.v[j]) * activate_grad_rt(act, xhat * p[j].gamma + p[j].beta);
        sums[j] += du;
        sums[V + j] += du * xhat;
      }
    }
  }
  reduce_rows<2 * V>(sums, shared, SLOTS, [&](int q, int lane, A total) {
    const int64_t c = (int64_t(blockIdx.y) * blockDim.x + lane) * V + q % V;
    if (c < s.C) (q < V ? part_du : part_dux)[blockIdx.x * int64_t(s.C) + c] = total;
  });
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

// Channels per lane of grad_input_kernel: with a conv it keeps TAPS * V weight-gradient sums
// and the TAPS loaded packs of x in registers, so it takes half a pack at 3x3 and a quarter
// at 5x5 and 7x7 (16 bytes per lane made 254-255 registers at 3x3 in fp16, spilling in bf16).
template <typename T, int K> constexpr int grad_input_vec() {
  constexpr int full = VecWidth<T>::value, divisor = K == 0 ? 1 : (K == 3 ? 2 : 4);
  return full >= divisor ? full / divisor : 1;
}

template <typename T, int K, int V>
__global__ void __launch_bounds__(kReduceThreads)
grad_input_kernel(const T* __restrict__ dy, Strides4 sdy, const T* __restrict__ x, Strides4 sx,
                  const T* __restrict__ w, const typename Acc<T>::type* gamma, const typename Acc<T>::type* beta,
                  const typename Acc<T>::type* mean, const typename Acc<T>::type* var, typename Acc<T>::type eps,
                  const typename Acc<T>::type* sum_du, const typename Acc<T>::type* sum_dux, DwShape s,
                  int64_t chunk, Grad g, T* dz, Strides4 sdz, T* dx_direct, Strides4 sdx,
                  typename Acc<T>::type* part_dw, typename Acc<T>::type* part_du, typename Acc<T>::type* part_dux) {
  using A = typename Acc<T>::type;
  constexpr int TAPS = K > 0 ? K * K : 1;
  constexpr int DW = K > 0 ? TAPS * V : 0;  // sums[0, DW): dw per (tap, channel); then du, du * xhat
  constexpr int Q = DW + 2 * V;
  constexpr int SLOTS = reduce_slots<T, A, Q, V>();
  __shared__ A shared[SLOTS];
  const int64_t c0 = lane_channel<V>();
  const bool active = c0 < s.C;
  const int64_t hw = int64_t(s.HO) * s.WO, positions = s.N * hw;
  const A inv_count = A(1) / A(positions);
  const int64_t begin = blockIdx.x * chunk, end = min(begin + chunk, positions);
  A sums[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) sums[q] = A(0);
  if (active) {
    ChannelParams<A> p[V] = {};
    A mean_du[V], mean_dux[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      p[j] = ChannelParams<A>(gamma, beta, mean, var, g.norm, eps, c0 + j);
      mean_du[j] = g.norm == kNormBatch ? sum_du[c0 + j] * inv_count : A(0);
      mean_dux[j] = g.norm == kNormBatch ? sum_dux[c0 + j] * inv_count : A(0);
    }
    const bool want_dw = part_dw != nullptr;
    for (int64_t q = begin + threadIdx.y; q < end; q += blockDim.y) {
      int64_t r, ow;
      const int64_t n = divmod(q, hw, r), oh = divmod(r, s.WO, ow);
      // The conv recompute's loads of x stay in registers for the weight gradient.
      Pack<T, V> taps[TAPS];
      uint64_t valid = 0;  // bit t: tap t inside x (7x7 has 49 taps)
      A z[V];
      conv_pack<T, A, K, V>(x, w, s, sx, n, c0, oh, ow, z, taps, &valid);
      const Pack<T, V> d = load_pack<V>(dy + sdy.at(n, c0, oh, ow));
      Pack<T, V> out;
      A dzv[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A xhat = (z[j] - p[j].mean) * p[j].rstd;
        const A du = load_as<A>(&d.v[j]) * activate_grad_rt(g.act, xhat * p[j].gamma + p[j].beta);
        sums[DW + j] += du;
        sums[DW + V + j] += du * xhat;
        if (g.norm == kNormBatch) dzv[j] = p[j].gamma * p[j].rstd * (du - mean_du[j] - xhat * mean_dux[j]);
        else dzv[j] = du * p[j].gamma * p[j].rstd;
        out.v[j] = store_as<T>(dzv[j]);
      }
      if constexpr (K == 0) {
        store_pack<V>(dx_direct + sdx.at(n, c0, oh, ow), out);
      } else {
        store_pack<V>(dz + sdz.at(n, c0, oh, ow), out);
        if (want_dw) {
#pragma unroll
          for (int t = 0; t < TAPS; ++t) {
            if (valid & (uint64_t(1) << t)) {
#pragma unroll
              for (int j = 0; j < V; ++j) sums[t * V + j] += dzv[j] * load_as<A>(&taps[t].v[j]);
            }
          }
        }
      }
    }
  }
  // Uniform per launch: the weight-gradient partials, and the du sums unless pass 1 made them.
  if ((part_dw == nullptr || K == 0) && g.norm == kNormBatch) return;
  reduce_rows<Q>(sums, shared, SLOTS, [&](int q, int lane, A total) {
    const int64_t c = (int64_t(blockIdx.y) * blockDim.x + lane) * V + q % V;
    if (c >= s.C) return;
    if (q < DW) {
      if (part_dw != nullptr) part_dw[(blockIdx.x * int64_t(s.C) + c) * TAPS + q / V] = total;
    } else if (g.norm != kNormBatch) {
      (q < DW + V ? part_du : part_dux)[blockIdx.x * int64_t(s.C) + c] = total;
    }
  });
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
  const int taps = k > 0 ? k * k : 1;
  MOBILEOPS_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    MOBILEOPS_DISPATCH_KERNEL_SIZE(k, K, {
      // Channels per lane where packs fit every activation tensor a pass reads or writes.
      constexpr int V = VecWidth<T>::value, VI = grad_input_vec<T, K>();
      const bool packs_sums = channels_last && packs_fit(s.C, V, sizeof(T), {{dy, sdy}, {x, sx}});
      const uintptr_t written = K > 0 ? dz : dx;
      const Strides& s_written = K > 0 ? sdz : sdx;
      const bool packs_input =
          channels_last && packs_fit(s.C, VI, sizeof(T), {{dy, sdy}, {x, sx}, {written, s_written}});
      const ReduceShape rs = reduce_shape(s.C, packs_sums ? V : 1, sizeof(T), channels_last);
      const ReduceShape ri = reduce_shape(s.C, packs_input ? VI : 1, sizeof(T), channels_last);
      if (norm == kNormBatch) {
        if (packs_sums) {
          grad_sums_kernel<T, K, V><<<dim3(chunks, rs.groups), rs.block(), 0, st>>>(
              cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta),
              cptr<A>(mean), cptr<A>(var), s, chunk, act, mptr<A>(part_du), mptr<A>(part_dux));
        } else {
          grad_sums_kernel<T, K, 1><<<dim3(chunks, rs.groups), rs.block(), 0, st>>>(
              cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta),
              cptr<A>(mean), cptr<A>(var), s, chunk, act, mptr<A>(part_du), mptr<A>(part_dux));
        }
        check_launch("dwconv_bn_act backward (gradient sums)");
        sum_rows_kernel<A><<<(s.C + 127) / 128, 128, 0, st>>>(cptr<A>(part_du), chunks, s.C, mptr<A>(sum_du));
        sum_rows_kernel<A><<<(s.C + 127) / 128, 128, 0, st>>>(cptr<A>(part_dux), chunks, s.C, mptr<A>(sum_dux));
      }
      if (packs_input) {
        grad_input_kernel<T, K, VI><<<dim3(chunks, ri.groups), ri.block(), 0, st>>>(
            cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta),
            cptr<A>(mean), cptr<A>(var), A(eps), cptr<A>(sum_du), cptr<A>(sum_dux), s, chunk, Grad{act, norm},
            mptr<T>(dz), Strides4(sdz), mptr<T>(dx), Strides4(sdx), mptr<A>(part_dw), mptr<A>(part_du),
            mptr<A>(part_dux));
      } else {
        grad_input_kernel<T, K, 1><<<dim3(chunks, ri.groups), ri.block(), 0, st>>>(
            cptr<T>(dy), Strides4(sdy), cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta),
            cptr<A>(mean), cptr<A>(var), A(eps), cptr<A>(sum_du), cptr<A>(sum_dux), s, chunk, Grad{act, norm},
            mptr<T>(dz), Strides4(sdz), mptr<T>(dx), Strides4(sdx), mptr<A>(part_dw), mptr<A>(part_du),
            mptr<A>(part_dux));
      }
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
