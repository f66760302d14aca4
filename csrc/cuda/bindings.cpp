// pybind11 face of the CUDA kernels (module brecq_ext._cuda); raw device addresses and the
// stream handle come from torch in brecq_ext/ops.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_kernels.h"

namespace py = pybind11;

namespace {
void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "brecq CUDA kernels (raw-pointer interface; use brecq_ext.ops instead)";
  m.def("dequantize_packed", [](std::uintptr_t packed, std::uintptr_t scale, std::uintptr_t zero,
                                int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t out,
                                int out_type, std::uintptr_t stream) {
    check(brecq::cuda::dequantize_packed(
              reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const uint16_t*>(scale),
              reinterpret_cast<const uint8_t*>(zero), n, k, bits, g, reinterpret_cast<void*>(out),
              static_cast<brecq::cuda::OutputType>(out_type), reinterpret_cast<cudaStream_t>(stream)),
          "brecq dequantize_packed (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
}
