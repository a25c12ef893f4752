// Forward of depthwise conv + BatchNorm + activation (and of BN + activation, K = 0):
// - apply: y = act((conv(x) - mean) * rstd * gamma + beta), one read of x, one write of y;
// - stats: per-(chunk, channel) Welford partials of conv(x), then a finalize that merges
//   them in chunk order, gives mean and rstd and updates the running statistics in place.
// The training forward is stats then apply: the conv is recomputed instead of stored.
#include "dwconv_bn_act.cuh"

namespace mobileops {
namespace {

constexpr int kThreads = 256;

// V channels per thread (see packs_fit), V columns of one channel without a conv in NCHW
// (AXIS kPackW, see w_packs_fit), or one element.
template <typename T, int K, int ACT, int V, int AXIS = kPackChannels>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const T* __restrict__ x, Strides4 sx, const T* __restrict__ w, const typename Acc<T>::type* gamma,
             const typename Acc<T>::type* beta, const typename Acc<T>::type* mean,
             const typename Acc<T>::type* var, int norm, typename Acc<T>::type eps, T* __restrict__ y, Strides4 sy,
             DwShape s, bool channels_last) {
  static_assert(AXIS == kPackChannels || K == 0, "packs along W only without a convolution");
  using A = typename Acc<T>::type;
  const int64_t total = int64_t(s.N) * s.C * s.HO * s.WO / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c0, oh, ow;
    split_pack<V, AXIS>(i, s.C, s.HO, s.WO, channels_last, n, c0, oh, ow);
    A z[V];
    conv_pack<T, A, K, V>(x, w, s, sx, n, c0, oh, ow, z);  // (K = 0: the pack at (n, c0, oh, ow) either way)
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const ChannelParams<A> p(gamma, beta, mean, var, norm, eps, pack_channel<AXIS>(c0, j));
      out.v[j] = store_as<T>(activate<ACT>((z[j] - p.mean) * p.rstd * p.gamma + p.beta));
    }
    store_pack<V>(y + sy.at(n, c0, oh, ow), out);
  }
}

// One block per (chunk, channel group): each thread folds its positions into Welford triples
// of its V channels, then the block merges them over its rows (reduce_rows_welford).
template <typename T, int K, int V>
__global__ void __launch_bounds__(kReduceThreads)
stats_kernel(const T* __restrict__ x, Strides4 sx, const T* __restrict__ w, DwShape s, int64_t chunk,
             typename Acc<T>::type* part_count, typename Acc<T>::type* part_mean, typename Acc<T>::type* part_m2) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kReduceWarps * (2 * V + 1) * max_lanes(V, int(sizeof(T)))];
  const int64_t c0 = lane_channel<V>();
  const bool active = c0 < s.C;
  const int64_t hw = int64_t(s.HO) * s.WO, positions = s.N * hw;
  const int64_t begin = blockIdx.x * chunk, end = min(begin + chunk, positions);
  A count = A(0), mean[V], m2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = A(0);
  for (int64_t p = begin + threadIdx.y; active && p < end; p += blockDim.y) {
    int64_t r, ow;
    const int64_t n = divmod(p, hw, r), oh = divmod(r, s.WO, ow);
    A z[V];
    conv_pack<T, A, K, V>(x, w, s, sx, n, c0, oh, ow, z);
    count += A(1);
    const A inv = A(1) / count;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A delta = z[j] - mean[j];
      mean[j] += delta * inv;
      m2[j] += delta * (z[j] - mean[j]);
    }
  }
  reduce_rows_welford<V>(count, mean, m2, shared, [&](int j, int lane, A n_, A mean_, A m2_) {
    const int64_t c = (int64_t(blockIdx.y) * blockDim.x + lane) * V + j;
    if (c < s.C) {
      const int64_t slot = blockIdx.x * int64_t(s.C) + c;
      part_count[slot] = n_;
      part_mean[slot] = mean_;
      part_m2[slot] = m2_;
    }
  });
}

template <typename A>
__global__ void finalize_kernel(const A* part_count, const A* part_mean, const A* part_m2, int chunks, int C,
                                A* mean, A* rstd, A* running_mean, A* running_var, A momentum, A eps) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A n = A(0), m = A(0), q = A(0);
  for (int j = 0; j < chunks; ++j) {
    welford_merge(n, m, q, part_count[int64_t(j) * C + c], part_mean[int64_t(j) * C + c],
                  part_m2[int64_t(j) * C + c]);
  }
  const A var = q / n;
  mean[c] = m;
  rstd[c] = A(1) / sqrt(var + eps);
  if (running_mean != nullptr) {
    // nn.BatchNorm2d: exponential average with the unbiased batch variance.
    running_mean[c] = (A(1) - momentum) * running_mean[c] + momentum * m;
    running_var[c] = (A(1) - momentum) * running_var[c] + momentum * (q / (n - A(1)));
  }
}

DwShape to_shape(const std::array<int, 8>& v) { return DwShape{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]}; }

}  // namespace

std::array<int, 3> reduce_shape_of(int channels, int vec, int element, bool channels_last) {
  const ReduceShape r = reduce_shape(channels, vec, element, channels_last);
  return {r.lanes, r.rows, int(r.groups)};
}

void dwconv_bn_act_forward(int dtype, int k, int act, int norm, uintptr_t x, Strides sx, uintptr_t w,
                           uintptr_t gamma, uintptr_t beta, uintptr_t mean, uintptr_t var, double eps, uintptr_t y,
                           Strides sy, std::array<int, 8> shape, bool channels_last, uintptr_t stream) {
  const DwShape s = to_shape(shape);
  const int64_t total = int64_t(s.N) * s.C * s.HO * s.WO;
  if (total == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  MOBILEOPS_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    constexpr int V = VecWidth<T>::value;
    if (k == 0 && !channels_last && w_packs_fit(s.WO, V, sizeof(T), {{x, sx}, {y, sy}})) {
      MOBILEOPS_DISPATCH_ACT(act, ACT, {
        apply_kernel<T, 0, ACT, V, kPackW><<<blocks_for(total / V, kThreads), kThreads, 0, st>>>(
            cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta), cptr<A>(mean), cptr<A>(var),
            norm, A(eps), mptr<T>(y), Strides4(sy), s, channels_last);
      });
      check_launch("dwconv_bn_act forward");
      return;
    }
    MOBILEOPS_DISPATCH_KERNEL_SIZE(k, K, {
      const bool packed = channels_last && packs_fit(s.C, V, sizeof(T), {{x, sx}, {y, sy}});
      MOBILEOPS_DISPATCH_ACT(act, ACT, {
        if (packed) {
          apply_kernel<T, K, ACT, V><<<blocks_for(total / V, kThreads), kThreads, 0, st>>>(
              cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta), cptr<A>(mean), cptr<A>(var),
              norm, A(eps), mptr<T>(y), Strides4(sy), s, channels_last);
        } else {
          apply_kernel<T, K, ACT, 1><<<blocks_for(total, kThreads), kThreads, 0, st>>>(
              cptr<T>(x), Strides4(sx), cptr<T>(w), cptr<A>(gamma), cptr<A>(beta), cptr<A>(mean), cptr<A>(var),
              norm, A(eps), mptr<T>(y), Strides4(sy), s, channels_last);
        }
      });
    });
  });
  check_launch("dwconv_bn_act forward");
}

void dwconv_bn_stats(int dtype, int k, uintptr_t x, Strides sx, uintptr_t w, std::array<int, 8> shape,
                     int64_t chunk, int chunks, uintptr_t part_count, uintptr_t part_mean, uintptr_t part_m2,
                     uintptr_t mean, uintptr_t rstd, uintptr_t running_mean, uintptr_t running_var, double momentum,
                     double eps, bool channels_last, uintptr_t stream) {
  const DwShape s = to_shape(shape);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  MOBILEOPS_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    MOBILEOPS_DISPATCH_KERNEL_SIZE(k, K, {
      constexpr int V = VecWidth<T>::value;
      if (channels_last && packs_fit(s.C, V, sizeof(T), {{x, sx}})) {
        const ReduceShape r = reduce_shape(s.C, V, sizeof(T), true);
        stats_kernel<T, K, V><<<dim3(chunks, r.groups), r.block(), 0, st>>>(
            cptr<T>(x), Strides4(sx), cptr<T>(w), s, chunk, mptr<A>(part_count), mptr<A>(part_mean),
            mptr<A>(part_m2));
      } else {
        const ReduceShape r = reduce_shape(s.C, 1, sizeof(T), channels_last);
        stats_kernel<T, K, 1><<<dim3(chunks, r.groups), r.block(), 0, st>>>(
            cptr<T>(x), Strides4(sx), cptr<T>(w), s, chunk, mptr<A>(part_count), mptr<A>(part_mean),
            mptr<A>(part_m2));
      }
    });
    check_launch("dwconv_bn_act batch statistics");
    finalize_kernel<A><<<(s.C + 127) / 128, 128, 0, st>>>(cptr<A>(part_count), cptr<A>(part_mean), cptr<A>(part_m2),
                                                          chunks, s.C, mptr<A>(mean), mptr<A>(rstd),
                                                          mptr<A>(running_mean), mptr<A>(running_var), A(momentum),
                                                          A(eps));
  });
  check_launch("dwconv_bn_act batch statistics (finalize)");
}

}  // namespace mobileops
