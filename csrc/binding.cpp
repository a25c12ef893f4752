// pybind11 binding for mobileops._C.
//
// The extension deliberately depends on the CUDA runtime and Python only (no PyTorch C++
// ABI): kernels receive raw device pointers, sizes, strides and a cudaStream_t from the
// Python side.  Until the CUDA kernels land (see the CUDA backend issue) this module only
// reports the runtime it was built against and what devices it can see, so that
// `python -m mobileops check` can tell the user why the cuda backend is or is not usable.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace py = pybind11;

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

// Names of the fused ops this build implements; the Python backend registry reads it.
std::vector<std::string> implemented_ops() { return {}; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mobileops CUDA extension (raw-pointer kernels; no PyTorch C++ dependency)";
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was built with");
  m.def("device_count", &device_count, "(number of CUDA devices, error message or '')");
  m.def("implemented_ops", &implemented_ops, "fused ops implemented by this build");
}
