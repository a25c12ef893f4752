// pybind11 binding for mobileops._C.
//
// The extension depends on the CUDA runtime and Python only (no PyTorch C++ ABI): kernels
// receive raw device pointers (as integers), sizes, element strides and a cudaStream_t from the
// Python side (mobileops/cuda/), which allocates with torch and validates tensors. This file
// checks every scalar argument again before a launch, so that a wrong call from Python raises
// ValueError here instead of reaching a kernel; CUDA errors come back as RuntimeError naming
// the op.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <vector>

#include <stdexcept>

#include "ops.h"

namespace py = pybind11;
using namespace mobileops;

namespace {

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

// Returns (device count, error message); the message is empty when the query succeeded.
std::pair<int, std::string> device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later queries start clean
    return {0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)};
  }
  return {count, std::string()};
}

// The extension links its own (static) CUDA runtime, whose current device is separate from
// torch's: the Python side selects the tensor's device here before every launch.
void set_device(int index) {
  cudaError_t err = cudaSetDevice(index);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cudaSetDevice(") + std::to_string(index) + "): " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

std::vector<std::string> implemented_ops() { return {"bn_act", "dwconv_act", "dwconv_bn_act", "squeeze_excite"}; }

// The enums of ops.h by name, as mobileops/codes.py spells them (a test compares the two).
std::map<std::string, std::map<std::string, int>> codes() {
  return {
      {"activation",
       {{"none", kNone}, {"relu", kRelu}, {"relu6", kRelu6}, {"hswish", kHswish}, {"silu", kSilu},
        {"hsigmoid", kHsigmoid}, {"sigmoid", kSigmoid}}},
      {"norm", {{"none", kNormNone}, {"running", kNormRunning}, {"batch", kNormBatch}}},
      {"dtype", {{"float32", kFloat32}, {"float16", kFloat16}, {"bfloat16", kBFloat16}, {"float64", kFloat64}}},
  };
}

void require(bool ok, const std::string& op, const std::string& what) {
  if (!ok) throw std::invalid_argument(op + ": " + what);
}

void check_common(const char* op, int dtype, int act, uintptr_t stream) {
  require(dtype >= kFloat32 && dtype <= kFloat64, op, "dtype code must be 0..3, got " + std::to_string(dtype));
  require(act >= kNone && act <= kHsigmoid, op, "activation code must be 0..5, got " + std::to_string(act));
  (void)stream;  // 0 is the legacy default stream, a valid choice
}

void check_shape(const char* op, const std::array<int, 8>& s, int k) {
  for (int i = 0; i < 6; ++i) require(s[i] >= 0, op, "sizes must be non-negative");
  require(s[6] >= 1, op, "stride must be >= 1, got " + std::to_string(s[6]));
  require(s[7] >= 0, op, "padding must be >= 0, got " + std::to_string(s[7]));
  require(s[1] <= 65535, op, "at most 65535 channels, got " + std::to_string(s[1]));
  require(k == 0 || k == 3 || k == 5 || k == 7, op, "kernel size must be 3, 5 or 7 (0: no conv), got " +
                                                        std::to_string(k));
  if (k > 0) {
    require(s[4] == (s[2] + 2 * s[7] - k) / s[6] + 1 && s[5] == (s[3] + 2 * s[7] - k) / s[6] + 1, op,
            "output size does not match the input size, kernel, stride and padding");
  } else {
    require(s[4] == s[2] && s[5] == s[3] && s[6] == 1 && s[7] == 0, op, "without a conv the output is the input's size");
  }
}

void checked_forward(int dtype, int k, int act, int norm, uintptr_t x, Strides sx, uintptr_t w, uintptr_t gamma,
                     uintptr_t beta, uintptr_t mean, uintptr_t var, double eps, uintptr_t y, Strides sy,
                     std::array<int, 8> shape, bool channels_last, uintptr_t stream) {
  const char* op = "dwconv_bn_act forward";
  check_common(op, dtype, act, stream);
  check_shape(op, shape, k);
  require(norm >= kNormNone && norm <= kNormBatch, op, "norm code must be 0..2");
  require(x && y && (k == 0 || w), op, "x, y and (with a conv) the weight must be given");
  require(norm == kNormNone || (mean && var), op, "mean and var (or rstd) are required with BatchNorm");
  require(eps >= 0, op, "eps must be >= 0");
  dwconv_bn_act_forward(dtype, k, act, norm, x, sx, w, gamma, beta, mean, var, eps, y, sy, shape, channels_last,
                        stream);
}

void checked_stats(int dtype, int k, uintptr_t x, Strides sx, uintptr_t w, std::array<int, 8> shape, int64_t chunk,
                   int chunks, uintptr_t part_count, uintptr_t part_mean, uintptr_t part_m2, uintptr_t mean,
                   uintptr_t rstd, uintptr_t running_mean, uintptr_t running_var, double momentum, double eps,
                   bool channels_last, uintptr_t stream) {
  const char* op = "dwconv_bn_act batch statistics";
  check_common(op, dtype, kNone, stream);
  check_shape(op, shape, k);
  const int64_t positions = int64_t(shape[0]) * shape[4] * shape[5];
  require(positions >= 2, op, "batch statistics need at least 2 values per channel");
  require(chunk >= 1 && chunks >= 1 && chunks <= 65535 * 1024 && (chunks - 1) * chunk < positions &&
              chunks * chunk >= positions, op, "chunks must tile the positions exactly");
  require(x && (k == 0 || w) && part_count && part_mean && part_m2 && mean && rstd, op, "missing buffer");
  require((running_mean == 0) == (running_var == 0), op, "running_mean and running_var come together");
  require(momentum >= 0 && momentum <= 1 && eps >= 0, op, "momentum must be in [0, 1] and eps >= 0");
  dwconv_bn_stats(dtype, k, x, sx, w, shape, chunk, chunks, part_count, part_mean, part_m2, mean, rstd, running_mean,
                  running_var, momentum, eps, channels_last, stream);
}

void checked_backward(int dtype, int k, int act, int norm, uintptr_t dy, Strides sdy, uintptr_t x, Strides sx,
                      uintptr_t w, uintptr_t gamma, uintptr_t beta, uintptr_t mean, uintptr_t var, double eps,
                      std::array<int, 8> shape, int64_t chunk, int chunks, uintptr_t part_du, uintptr_t part_dux,
                      uintptr_t sum_du, uintptr_t sum_dux, uintptr_t dz, Strides sdz, uintptr_t part_dw, uintptr_t dw,
                      uintptr_t dx, Strides sdx, bool channels_last, uintptr_t stream) {
  const char* op = "dwconv_bn_act backward";
  check_common(op, dtype, act, stream);
  check_shape(op, shape, k);
  require(norm >= kNormNone && norm <= kNormBatch, op, "norm code must be 0..2");
  const int64_t positions = int64_t(shape[0]) * shape[4] * shape[5];
  require(positions >= 1 && chunk >= 1 && chunks >= 1 && (chunks - 1) * chunk < positions &&
              chunks * chunk >= positions, op, "chunks must tile the positions exactly");
  require(dy && x && dx && part_du && part_dux && sum_du && sum_dux, op, "missing buffer");
  require(k == 0 || (w && dz), op, "a conv needs its weight and the dz workspace");
  require((part_dw == 0) == (dw == 0) && (k > 0 || dw == 0), op, "weight-gradient buffers come together");
  require(norm == kNormNone || (mean && var), op, "mean and var (or rstd) are required with BatchNorm");
  dwconv_bn_act_backward(dtype, k, act, norm, dy, sdy, x, sx, w, gamma, beta, mean, var, eps, shape, chunk, chunks,
                         part_du, part_dux, sum_du, sum_dux, dz, sdz, part_dw, dw, dx, sdx, channels_last, stream);
}

void check_se(const char* op, int dtype, int gate, int post_act, const std::array<int, 4>& s, int hidden) {
  check_common(op, dtype, post_act, 0);
  require(gate == kHsigmoid || gate == kSigmoid, op, "gate code must be hsigmoid (5) or sigmoid (6)");
  for (int v : s) require(v >= 0, op, "sizes must be non-negative");
  require(hidden >= 1, op, "the hidden width must be >= 1");
  const size_t acc = dtype == kFloat64 ? 8 : 4;
  require(acc * (2 * size_t(s[1]) + 2 * size_t(hidden)) <= 48 * 1024, op,
          "channels + hidden width too large for one block's shared memory");
}

void checked_se_forward(int dtype, int gate, int post_act, uintptr_t x, Strides sx, std::array<int, 4> shape,
                        int hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t pooled,
                        uintptr_t gates, uintptr_t y, Strides sy, bool channels_last, uintptr_t stream) {
  const char* op = "squeeze_excite forward";
  check_se(op, dtype, gate, post_act, shape, hidden);
  require(x && w1 && w2 && pooled && gates && y, op, "missing buffer");
  squeeze_excite_forward(dtype, gate, post_act, x, sx, shape, hidden, w1, b1, w2, b2, pooled, gates, y, sy,
                         channels_last, stream);
}

void checked_se_backward(int dtype, int gate, int post_act, uintptr_t dy, Strides sdy, uintptr_t x, Strides sx,
                         std::array<int, 4> shape, int hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2,
                         uintptr_t pooled, uintptr_t gates, uintptr_t d_gate, uintptr_t d_pre_gate,
                         uintptr_t hidden_act, uintptr_t d_pre_hidden, uintptr_t d_pooled, uintptr_t dw1,
                         uintptr_t db1, uintptr_t dw2, uintptr_t db2, uintptr_t dx, Strides sdx, bool channels_last,
                         uintptr_t stream) {
  const char* op = "squeeze_excite backward";
  check_se(op, dtype, gate, post_act, shape, hidden);
  require(dy && x && w1 && w2 && pooled && gates && d_gate && d_pre_gate && hidden_act && d_pre_hidden && d_pooled &&
              dw1 && dw2 && dx, op, "missing buffer");
  require((b1 == 0) == (db1 == 0) && (b2 == 0) == (db2 == 0), op, "a bias and its gradient come together");
  squeeze_excite_backward(dtype, gate, post_act, dy, sdy, x, sx, shape, hidden, w1, b1, w2, b2, pooled, gates, d_gate,
                          d_pre_gate, hidden_act, d_pre_hidden, d_pooled, dw1, db1, dw2, db2, dx, sdx, channels_last,
                          stream);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mobileops CUDA extension (raw-pointer kernels; no PyTorch C++ dependency)";
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was built with");
  m.def("device_count", &device_count, "(number of CUDA devices, error message or '')");
  m.def("implemented_ops", &implemented_ops, "fused ops implemented by this build");
  m.def("codes", &codes, "{table: {name: code}} of the activation, norm and dtype enums (see mobileops/codes.py)");
  m.def("set_device", &set_device, "make a CUDA device current for the launches that follow");
  // Launches release the GIL: they only enqueue work on the given stream.
  m.def("dwconv_bn_act_forward", &checked_forward, py::call_guard<py::gil_scoped_release>());
  m.def("dwconv_bn_stats", &checked_stats, py::call_guard<py::gil_scoped_release>());
  m.def("dwconv_bn_act_backward", &checked_backward, py::call_guard<py::gil_scoped_release>());
  m.def("squeeze_excite_forward", &checked_se_forward, py::call_guard<py::gil_scoped_release>());
  m.def("squeeze_excite_backward", &checked_se_backward, py::call_guard<py::gil_scoped_release>());
}
