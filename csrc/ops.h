// Host entry points of the mobileops CUDA kernels and the codes shared with Python. Plain C++
// (no CUDA device code), so that binding.cpp compiles with the host compiler alone.
#pragma once

#include <array>
#include <cstdint>

namespace mobileops {

// The codes of mobileops/codes.py (its single source on the Python side); codes() in
// binding.cpp exports these values and a test checks that they match.
// dtype codes (by torch dtype name).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// activation codes, the SE gates (hsigmoid, sigmoid) included.
enum Act : int { kNone = 0, kRelu = 1, kRelu6 = 2, kHswish = 3, kSilu = 4, kHsigmoid = 5, kSigmoid = 6 };
// BatchNorm modes: "none" (beta is a conv bias), "running" (var is the running variance),
// "batch" (var already holds rstd = 1/sqrt(batch var + eps)).
enum Norm : int { kNormNone = 0, kNormRunning = 1, kNormBatch = 2 };

// Element strides of a 4-D tensor (N, C, H, W), any memory format or slice.
using Strides = std::array<int64_t, 4>;

// (lanes, rows, channel groups) of the reducing kernels' blocks with `vec` channels of `element`
// bytes per lane (common.cuh reduce_shape), exported so that the Python launchers' copy can be
// checked.
std::array<int, 3> reduce_shape_of(int channels, int vec, int element, bool channels_last);

// shape: N, C, H, W, H_out, W_out, stride, padding. k = 0: no convolution (BN + activation).
void dwconv_bn_act_forward(int dtype, int k, int act, int norm, uintptr_t x, Strides sx, uintptr_t w,
                           uintptr_t gamma, uintptr_t beta, uintptr_t mean, uintptr_t var, double eps, uintptr_t y,
                           Strides sy, std::array<int, 8> shape, bool channels_last, uintptr_t stream);

void dwconv_bn_stats(int dtype, int k, uintptr_t x, Strides sx, uintptr_t w, std::array<int, 8> shape,
                     int64_t chunk, int chunks, uintptr_t part_count, uintptr_t part_mean, uintptr_t part_m2,
                     uintptr_t mean, uintptr_t rstd, uintptr_t running_mean, uintptr_t running_var, double momentum,
                     double eps, bool channels_last, uintptr_t stream);

void dwconv_bn_act_backward(int dtype, int k, int act, int norm, uintptr_t dy, Strides sdy, uintptr_t x, Strides sx,
                            uintptr_t w, uintptr_t gamma, uintptr_t beta, uintptr_t mean, uintptr_t var, double eps,
                            std::array<int, 8> shape, int64_t chunk, int chunks, uintptr_t part_du,
                            uintptr_t part_dux, uintptr_t sum_du, uintptr_t sum_dux, uintptr_t dz, Strides sdz,
                            uintptr_t part_dw, uintptr_t dw, uintptr_t dx, Strides sdx, bool channels_last,
                            uintptr_t stream);

// shape: N, C, H, W; `hidden` = R. FC weights and biases contiguous in the accumulation type.
void squeeze_excite_forward(int dtype, int gate, int post_act, uintptr_t x, Strides sx, std::array<int, 4> shape,
                            int hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, int64_t chunk,
                            int chunks, uintptr_t part, uintptr_t pooled, uintptr_t gates, uintptr_t y, Strides sy,
                            bool channels_last, uintptr_t stream);

void squeeze_excite_backward(int dtype, int gate, int post_act, uintptr_t dy, Strides sdy, uintptr_t x, Strides sx,
                             std::array<int, 4> shape, int hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2,
                             uintptr_t b2, int64_t chunk, int chunks, uintptr_t part, uintptr_t pooled,
                             uintptr_t gates, uintptr_t d_gate, uintptr_t d_pre_gate, uintptr_t hidden_act,
                             uintptr_t d_pre_hidden, uintptr_t d_pooled, uintptr_t dw1, uintptr_t db1, uintptr_t dw2,
                             uintptr_t db2, uintptr_t dx, Strides sdx, bool channels_last, uintptr_t stream);

}  // namespace mobileops
