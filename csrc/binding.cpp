// pybind11 binding for mobileops._C.
//
// The extension depends on the CUDA runtime and Python only (no PyTorch C++ ABI): kernels
// receive raw device pointers (as integers), sizes, element strides and a cudaStream_t from the
// Python side (mobileops/cuda/), which allocates with torch; the ops in mobileops/ops validate
// the user's tensors (shapes, dtypes, devices). Every launch function takes keyword arguments
// only and checks each argument it receives once, here at the C++ boundary (codes in range,
// supported kernel size, sizes, strides, chunk counts, null pointers of required tensors), so a
// wrong call raises ValueError naming the argument instead of reaching a kernel; CUDA errors
// come back as RuntimeError naming the op.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ops.h"

namespace py = pybind11;
using namespace mobileops;
using namespace pybind11::literals;

// (N, C, H, W) as Python ints; checked against the kernels' int range before use.
using Shape4 = std::array<int64_t, 4>;

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

// Every check below names the argument at fault, as the Python keyword that carries it.
class Checker {
 public:
  explicit Checker(const char* op) : op_(op) {}

  void require(bool ok, const std::string& what) const {
    if (!ok) throw std::invalid_argument(std::string(op_) + ": " + what);
  }

  // A tensor the launch cannot do without: its address must not be null.
  void pointer(const char* name, uintptr_t address) const {
    require(address != 0, std::string(name) + " is required (got a null pointer)");
  }

  void pointers(std::initializer_list<std::pair<const char*, uintptr_t>> named) const {
    for (const auto& [name, address] : named) pointer(name, address);
  }

  // Two optional tensors that are given or absent together.
  void together(const char* a, uintptr_t pa, const char* b, uintptr_t pb) const {
    require((pa == 0) == (pb == 0), std::string(a) + " and " + b + " must both be given or both be null");
  }

  void code(const char* name, int value, int lo, int hi) const {
    require(value >= lo && value <= hi, std::string(name) + " must be a code in " + std::to_string(lo) + ".." +
                                            std::to_string(hi) + ", got " + std::to_string(value));
  }

  // Sizes arrive as Python ints (int64 here) so that one past the kernels' int range is refused
  // by name instead of failing pybind11's conversion with a bare signature.
  std::array<int, 4> sizes(const char* name, const Shape4& shape) const {
    std::array<int, 4> out{};
    for (int i = 0; i < 4; ++i) {
      require(shape[i] >= 0 && shape[i] <= INT32_MAX, std::string(name) + "[" + std::to_string(i) +
                                                          "] must be in [0, 2**31), got " + std::to_string(shape[i]));
      out[i] = int(shape[i]);
    }
    return out;
  }

  // Strides are element strides and never negative (torch has none); a tensor the launch
  // writes must not repeat an element (stride 0 on a dimension longer than 1), or threads race.
  void strides(const char* name, const Strides& s, const std::array<int, 4>& shape, bool written) const {
    for (int i = 0; i < 4; ++i) {
      require(s[i] >= 0, std::string(name) + "[" + std::to_string(i) + "] must be >= 0, got " +
                             std::to_string(s[i]));
      require(!written || s[i] > 0 || shape[i] <= 1, std::string(name) + "[" + std::to_string(i) +
                                                         "] is 0 on a written tensor of size " +
                                                         std::to_string(shape[i]) + " (it would repeat elements)");
    }
  }

  void chunks(int64_t chunk, int64_t chunks, int64_t positions) const {
    require(chunk >= 1 && chunks >= 1 && chunks <= 65535 * 1024, "chunk and chunks must be >= 1 (chunks at most " +
                                                                      std::to_string(65535 * 1024) + "), got " +
                                                                      std::to_string(chunk) + " and " +
                                                                      std::to_string(chunks));
    require((chunks - 1) * chunk < positions && chunks * chunk >= positions,
            "chunks of chunk positions must tile the " + std::to_string(positions) + " positions exactly, got " +
                std::to_string(chunks) + " x " + std::to_string(chunk));
  }

 private:
  const char* op_;
};

std::string shape_text(const std::array<int, 4>& s) {
  return "(" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + ", " + std::to_string(s[2]) + ", " +
         std::to_string(s[3]) + ")";
}

// The depthwise geometry as ops.h takes it (N, C, H, W, H_out, W_out, stride, padding), with the
// output size computed here, the one place that derives it from the conv's arguments.
struct DwGeometry {
  std::array<int, 4> x, y;
  std::array<int, 8> shape;
  int64_t positions;  // values per channel of the conv output: N * H_out * W_out
};

DwGeometry dw_geometry(const Checker& check, int kernel_size, const Shape4& x_shape, int64_t stride,
                       int64_t padding) {
  check.require(kernel_size == 0 || kernel_size == 3 || kernel_size == 5 || kernel_size == 7,
                "kernel_size must be 3, 5 or 7 (0: no conv), got " + std::to_string(kernel_size));
  const std::array<int, 4> x = check.sizes("x_shape", x_shape);
  check.require(x[1] <= 65535, "x_shape[1] (channels) must be at most 65535, got " + std::to_string(x[1]));
  check.require(stride >= 1 && stride <= INT32_MAX, "stride must be >= 1, got " + std::to_string(stride));
  check.require(padding >= 0 && padding <= INT32_MAX / 4, "padding must be in [0, 2**29), got " +
                                                               std::to_string(padding));
  std::array<int, 4> y = x;
  if (kernel_size == 0) {
    check.require(stride == 1 && padding == 0, "without a conv (kernel_size 0) stride must be 1 and padding 0, got " +
                                                   std::to_string(stride) + " and " + std::to_string(padding));
  } else {
    for (int i = 2; i < 4; ++i) {
      const int64_t padded = int64_t(x[i]) + 2 * padding;
      check.require(padded >= kernel_size, "a " + std::to_string(kernel_size) + "x" + std::to_string(kernel_size) +
                                               " kernel does not fit x_shape " + shape_text(x) + " with padding " +
                                               std::to_string(padding));
      y[i] = int((padded - kernel_size) / stride + 1);
    }
  }
  return {x, y, {x[0], x[1], x[2], x[3], y[2], y[3], int(stride), int(padding)},
          int64_t(y[0]) * y[2] * y[3]};
}

void check_y_shape(const Checker& check, const char* name, const DwGeometry& g, const Shape4& given) {
  const std::array<int, 4> y = check.sizes(name, given);
  check.require(y == g.y, std::string(name) + " must be " + shape_text(g.y) + " for x_shape " + shape_text(g.x) +
                              ", kernel_size, stride and padding; got " + shape_text(y));
}

void check_dw_codes(const Checker& check, int dtype, int activation, int norm) {
  check.code("dtype", dtype, kFloat32, kFloat64);
  check.code("activation", activation, kNone, kHsigmoid);
  check.code("norm", norm, kNormNone, kNormBatch);
}

void checked_forward(int dtype, int kernel_size, int activation, int norm, uintptr_t x, Strides x_strides,
                     Shape4 x_shape, int64_t stride, int64_t padding, uintptr_t weight, uintptr_t gamma,
                     uintptr_t beta, uintptr_t mean, uintptr_t var, double eps, uintptr_t y, Strides y_strides,
                     Shape4 y_shape, bool channels_last, uintptr_t stream) {
  const Checker check("dwconv_bn_act forward");
  check_dw_codes(check, dtype, activation, norm);
  const DwGeometry g = dw_geometry(check, kernel_size, x_shape, stride, padding);
  check_y_shape(check, "y_shape", g, y_shape);
  check.strides("x_strides", x_strides, g.x, false);
  check.strides("y_strides", y_strides, g.y, true);
  check.pointers({{"x", x}, {"y", y}});
  if (kernel_size > 0) check.pointer("weight", weight);
  if (norm != kNormNone) {
    check.pointer("mean", mean);
    check.pointer("var", var);
  }
  check.require(eps >= 0, "eps must be >= 0, got " + std::to_string(eps));
  dwconv_bn_act_forward(dtype, kernel_size, activation, norm, x, x_strides, weight, gamma, beta, mean, var, eps, y,
                        y_strides, g.shape, channels_last, stream);
}

void checked_stats(int dtype, int kernel_size, uintptr_t x, Strides x_strides, Shape4 x_shape, int64_t stride,
                   int64_t padding, uintptr_t weight, int64_t chunk, int64_t chunks, uintptr_t part_count,
                   uintptr_t part_mean, uintptr_t part_m2, uintptr_t mean, uintptr_t rstd, uintptr_t running_mean,
                   uintptr_t running_var, double momentum, double eps, bool channels_last, uintptr_t stream) {
  const Checker check("dwconv_bn_act batch statistics");
  check.code("dtype", dtype, kFloat32, kFloat64);
  const DwGeometry g = dw_geometry(check, kernel_size, x_shape, stride, padding);
  check.strides("x_strides", x_strides, g.x, false);
  check.require(g.positions >= 2, "batch statistics need at least 2 values per channel, got " +
                                      std::to_string(g.positions));
  check.chunks(chunk, chunks, g.positions);
  check.pointer("x", x);
  if (kernel_size > 0) check.pointer("weight", weight);
  check.pointers({{"part_count", part_count}, {"part_mean", part_mean}, {"part_m2", part_m2}, {"mean", mean},
                  {"rstd", rstd}});
  check.together("running_mean", running_mean, "running_var", running_var);
  check.require(momentum >= 0 && momentum <= 1, "momentum must be in [0, 1], got " + std::to_string(momentum));
  check.require(eps >= 0, "eps must be >= 0, got " + std::to_string(eps));
  dwconv_bn_stats(dtype, kernel_size, x, x_strides, weight, g.shape, chunk, int(chunks), part_count, part_mean,
                  part_m2, mean, rstd, running_mean, running_var, momentum, eps, channels_last, stream);
}

void checked_backward(int dtype, int kernel_size, int activation, int norm, uintptr_t dy, Strides dy_strides,
                      Shape4 dy_shape, uintptr_t x, Strides x_strides, Shape4 x_shape, int64_t stride,
                      int64_t padding, uintptr_t weight, uintptr_t gamma, uintptr_t beta, uintptr_t mean,
                      uintptr_t var, double eps, int64_t chunk, int64_t chunks, uintptr_t part_du, uintptr_t part_dux,
                      uintptr_t sum_du, uintptr_t sum_dux, uintptr_t dz, Strides dz_strides, uintptr_t part_dw,
                      uintptr_t dw, uintptr_t dx, Strides dx_strides, bool channels_last, uintptr_t stream) {
  const Checker check("dwconv_bn_act backward");
  check_dw_codes(check, dtype, activation, norm);
  const DwGeometry g = dw_geometry(check, kernel_size, x_shape, stride, padding);
  check_y_shape(check, "dy_shape", g, dy_shape);
  check.strides("dy_strides", dy_strides, g.y, false);
  check.strides("x_strides", x_strides, g.x, false);
  check.strides("dx_strides", dx_strides, g.x, true);
  check.require(g.positions >= 1, "the backward needs at least 1 value per channel, got 0");
  check.chunks(chunk, chunks, g.positions);
  check.pointers({{"dy", dy}, {"x", x}, {"dx", dx}, {"part_du", part_du}, {"part_dux", part_dux}, {"sum_du", sum_du},
                  {"sum_dux", sum_dux}});
  if (kernel_size > 0) {
    check.pointer("weight", weight);
    check.pointer("dz", dz);
    check.strides("dz_strides", dz_strides, g.y, true);
  }
  check.together("part_dw", part_dw, "dw", dw);
  check.require(kernel_size > 0 || dw == 0, "dw must be null without a conv (kernel_size 0)");
  if (norm != kNormNone) {
    check.pointer("mean", mean);
    check.pointer("var", var);
  }
  check.require(eps >= 0, "eps must be >= 0, got " + std::to_string(eps));
  dwconv_bn_act_backward(dtype, kernel_size, activation, norm, dy, dy_strides, x, x_strides, weight, gamma, beta,
                         mean, var, eps, g.shape, chunk, int(chunks), part_du, part_dux, sum_du, sum_dux, dz,
                         dz_strides, part_dw, dw, dx, dx_strides, channels_last, stream);
}

std::array<int, 4> check_se(const Checker& check, int dtype, int gate, int post_act, const Shape4& x_shape,
                            int64_t hidden) {
  check.code("dtype", dtype, kFloat32, kFloat64);
  check.require(gate == kHsigmoid || gate == kSigmoid, "gate must be the code of hsigmoid (" +
                                                           std::to_string(kHsigmoid) + ") or sigmoid (" +
                                                           std::to_string(kSigmoid) + "), got " +
                                                           std::to_string(gate));
  check.code("post_act", post_act, kNone, kHsigmoid);
  const std::array<int, 4> x = check.sizes("x_shape", x_shape);
  check.require(hidden >= 1 && hidden <= INT32_MAX, "hidden must be >= 1, got " + std::to_string(hidden));
  const size_t acc = dtype == kFloat64 ? 8 : 4;
  check.require(acc * (2 * size_t(x[1]) + 2 * size_t(hidden)) <= 48 * 1024,
                "x_shape[1] (channels, " + std::to_string(x[1]) + ") + hidden (" + std::to_string(hidden) +
                    ") too large for one block's shared memory");
  return x;
}

// The SE channel sums' position chunks: they tile each sample's H * W positions, and several
// need the partial sums' buffer.
void check_se_chunks(const Checker& check, const std::array<int, 4>& shape, int64_t chunk, int64_t chunks,
                     uintptr_t part) {
  check.chunks(chunk, chunks, int64_t(shape[2]) * shape[3]);
  check.require(int64_t(shape[0]) * chunks <= 0x7fffffff, "N * chunks must fit a grid (2**31 - 1 blocks)");
  if (chunks > 1) check.pointers({{"part", part}});
}

void checked_se_forward(int dtype, int gate, int post_act, uintptr_t x, Strides x_strides, Shape4 x_shape,
                        int64_t hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, int64_t chunk,
                        int64_t chunks, uintptr_t part, uintptr_t pooled, uintptr_t gates, uintptr_t y,
                        Strides y_strides, bool channels_last, uintptr_t stream) {
  const Checker check("squeeze_excite forward");
  const std::array<int, 4> shape = check_se(check, dtype, gate, post_act, x_shape, hidden);
  check.strides("x_strides", x_strides, shape, false);
  check.strides("y_strides", y_strides, shape, true);
  check.pointers({{"x", x}, {"w1", w1}, {"w2", w2}, {"pooled", pooled}, {"gates", gates}, {"y", y}});
  check_se_chunks(check, shape, chunk, chunks, part);
  squeeze_excite_forward(dtype, gate, post_act, x, x_strides, shape, int(hidden), w1, b1, w2, b2, chunk, int(chunks),
                         part, pooled, gates, y, y_strides, channels_last, stream);
}

void checked_se_backward(int dtype, int gate, int post_act, uintptr_t dy, Strides dy_strides, uintptr_t x,
                         Strides x_strides, Shape4 x_shape, int64_t hidden, uintptr_t w1, uintptr_t b1, uintptr_t w2,
                         uintptr_t b2, int64_t chunk, int64_t chunks, uintptr_t part, uintptr_t pooled,
                         uintptr_t gates, uintptr_t d_gate, uintptr_t d_pre_gate,
                         uintptr_t hidden_act, uintptr_t d_pre_hidden, uintptr_t d_pooled, uintptr_t dw1,
                         uintptr_t db1, uintptr_t dw2, uintptr_t db2, uintptr_t dx, Strides dx_strides,
                         bool channels_last, uintptr_t stream) {
  const Checker check("squeeze_excite backward");
  const std::array<int, 4> shape = check_se(check, dtype, gate, post_act, x_shape, hidden);
  check.strides("dy_strides", dy_strides, shape, false);
  check.strides("x_strides", x_strides, shape, false);
  check.strides("dx_strides", dx_strides, shape, true);
  check.pointers({{"dy", dy}, {"x", x}, {"w1", w1}, {"w2", w2}, {"pooled", pooled}, {"gates", gates},
                  {"d_gate", d_gate}, {"d_pre_gate", d_pre_gate}, {"hidden_act", hidden_act},
                  {"d_pre_hidden", d_pre_hidden}, {"d_pooled", d_pooled}, {"dw1", dw1}, {"dw2", dw2}, {"dx", dx}});
  check.together("b1", b1, "db1", db1);
  check.together("b2", b2, "db2", db2);
  check_se_chunks(check, shape, chunk, chunks, part);
  squeeze_excite_backward(dtype, gate, post_act, dy, dy_strides, x, x_strides, shape, int(hidden), w1, b1, w2, b2,
                          chunk, int(chunks), part, pooled, gates, d_gate, d_pre_gate, hidden_act, d_pre_hidden,
                          d_pooled, dw1, db1, dw2, db2, dx, dx_strides, channels_last, stream);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mobileops CUDA extension (raw-pointer kernels; no PyTorch C++ dependency)";
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was built with");
  m.def("device_count", &device_count, "(number of CUDA devices, error message or '')");
  m.def("implemented_ops", &implemented_ops, "fused ops implemented by this build");
  m.def("codes", &codes, "{table: {name: code}} of the activation, norm and dtype enums (see mobileops/codes.py)");
  m.def("set_device", &set_device, "make a CUDA device current for the launches that follow");
  m.def("reduce_shape", &reduce_shape_of, py::kw_only(), "channels"_a, "vec"_a, "element"_a, "channels_last"_a,
        "(lanes, rows, channel groups) of the reducing kernels' blocks (csrc/common.cuh reduce_shape)");
  // Launches take keyword arguments only (named like the C++ parameters above), so that no call
  // depends on the order of 17-31 integers, and release the GIL: they only enqueue work on the
  // given stream. Their arguments are converted before the GIL is released.
  const auto launch = py::call_guard<py::gil_scoped_release>();
  m.def("dwconv_bn_act_forward", &checked_forward, launch, py::kw_only(), "dtype"_a, "kernel_size"_a, "activation"_a,
        "norm"_a, "x"_a, "x_strides"_a, "x_shape"_a, "stride"_a, "padding"_a, "weight"_a, "gamma"_a, "beta"_a,
        "mean"_a, "var"_a, "eps"_a, "y"_a, "y_strides"_a, "y_shape"_a, "channels_last"_a, "stream"_a,
        "Depthwise conv (kernel_size 0: none) -> BatchNorm -> activation into y.");
  m.def("dwconv_bn_stats", &checked_stats, launch, py::kw_only(), "dtype"_a, "kernel_size"_a, "x"_a, "x_strides"_a,
        "x_shape"_a, "stride"_a, "padding"_a, "weight"_a, "chunk"_a, "chunks"_a, "part_count"_a, "part_mean"_a,
        "part_m2"_a, "mean"_a, "rstd"_a, "running_mean"_a, "running_var"_a, "momentum"_a, "eps"_a,
        "channels_last"_a, "stream"_a,
        "Per-channel batch mean and rstd of the conv output; updates the running statistics when given.");
  m.def("dwconv_bn_act_backward", &checked_backward, launch, py::kw_only(), "dtype"_a, "kernel_size"_a,
        "activation"_a, "norm"_a, "dy"_a, "dy_strides"_a, "dy_shape"_a, "x"_a, "x_strides"_a, "x_shape"_a,
        "stride"_a, "padding"_a, "weight"_a, "gamma"_a, "beta"_a, "mean"_a, "var"_a, "eps"_a, "chunk"_a,
        "chunks"_a, "part_du"_a, "part_dux"_a, "sum_du"_a, "sum_dux"_a, "dz"_a, "dz_strides"_a, "part_dw"_a, "dw"_a,
        "dx"_a, "dx_strides"_a, "channels_last"_a, "stream"_a,
        "Gradients of dwconv_bn_act_forward: dx, the BN gradient sums and (with part_dw, dw) the weight gradient.");
  m.def("squeeze_excite_forward", &checked_se_forward, launch, py::kw_only(), "dtype"_a, "gate"_a, "post_act"_a,
        "x"_a, "x_strides"_a, "x_shape"_a, "hidden"_a, "w1"_a, "b1"_a, "w2"_a, "b2"_a, "chunk"_a, "chunks"_a,
        "part"_a, "pooled"_a, "gates"_a, "y"_a, "y_strides"_a, "channels_last"_a, "stream"_a,
        "Squeeze-and-Excitation into y, saving pooled and gates.");
  m.def("squeeze_excite_backward", &checked_se_backward, launch, py::kw_only(), "dtype"_a, "gate"_a, "post_act"_a,
        "dy"_a, "dy_strides"_a, "x"_a, "x_strides"_a, "x_shape"_a, "hidden"_a, "w1"_a, "b1"_a, "w2"_a, "b2"_a,
        "chunk"_a, "chunks"_a, "part"_a, "pooled"_a, "gates"_a, "d_gate"_a, "d_pre_gate"_a, "hidden_act"_a, "d_pre_hidden"_a, "d_pooled"_a, "dw1"_a,
        "db1"_a, "dw2"_a, "db2"_a, "dx"_a, "dx_strides"_a, "channels_last"_a, "stream"_a,
        "Gradients of squeeze_excite_forward: dx and the FC weight and bias gradients.");
}
