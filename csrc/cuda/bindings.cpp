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
  m.def("packed_gemv_supported", &brecq::cuda::packed_gemv_supported);
  m.def("packed_gemv", [](std::uintptr_t x, int dtype, int m_rows, int64_t x_stride, std::uintptr_t packed,
                          std::uintptr_t scale, std::uintptr_t zero, std::uintptr_t bias, int64_t n, int64_t k,
                          int bits, int64_t g, std::uintptr_t y, std::uintptr_t stream) {
    check(brecq::cuda::packed_gemv(reinterpret_cast<const void*>(x), static_cast<brecq::cuda::OutputType>(dtype),
                                   m_rows, x_stride, reinterpret_cast<const uint8_t*>(packed),
                                   reinterpret_cast<const uint16_t*>(scale), reinterpret_cast<const uint8_t*>(zero),
                                   bias ? reinterpret_cast<const float*>(bias) : nullptr, n, k, bits, g,
                                   reinterpret_cast<void*>(y), reinterpret_cast<cudaStream_t>(stream)),
          "brecq packed_gemv (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("adaround_forward", [](std::uintptr_t w, std::uintptr_t v, std::uintptr_t scale, std::uintptr_t zero,
                               int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t out, std::uintptr_t stream) {
    check(brecq::cuda::adaround_forward(reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(v),
                                        reinterpret_cast<const uint16_t*>(scale), reinterpret_cast<const uint8_t*>(zero),
                                        n, k, bits, g, reinterpret_cast<float*>(out),
                                        reinterpret_cast<cudaStream_t>(stream)),
          "brecq adaround_forward (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("adaround_backward", [](std::uintptr_t grad, std::uintptr_t w, std::uintptr_t v, std::uintptr_t scale,
                                std::uintptr_t zero, int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t out,
                                std::uintptr_t stream) {
    check(brecq::cuda::adaround_backward(reinterpret_cast<const float*>(grad), reinterpret_cast<const float*>(w),
                                         reinterpret_cast<const float*>(v), reinterpret_cast<const uint16_t*>(scale),
                                         reinterpret_cast<const uint8_t*>(zero), n, k, bits, g,
                                         reinterpret_cast<float*>(out), reinterpret_cast<cudaStream_t>(stream)),
          "brecq adaround_backward (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("adaround_regularizer", [](std::uintptr_t v, int64_t count, float beta, std::uintptr_t grad,
                                   std::uintptr_t loss, std::uintptr_t stream) {
    check(brecq::cuda::adaround_regularizer(reinterpret_cast<const float*>(v), count, beta,
                                            reinterpret_cast<float*>(grad), reinterpret_cast<float*>(loss),
                                            reinterpret_cast<cudaStream_t>(stream)),
          "brecq adaround_regularizer (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
}
