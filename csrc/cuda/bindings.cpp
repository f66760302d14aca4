// pybind11 face of the CUDA kernels (module brecq_ext._cuda); raw device addresses and the
// stream handle come from torch in brecq_ext/ops.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_kernels.h"

namespace py = pybind11;

namespace {
template <typename T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }
cudaStream_t stream_of(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

brecq::cuda::GemvKernel gemv_kernel(int kernel) {
  if (kernel < 0 || kernel > 3)
    throw std::invalid_argument("kernel must be 0 (auto), 1 (simt), 2 (mma8) or 3 (mma16), got " +
                                std::to_string(kernel));
  return static_cast<brecq::cuda::GemvKernel>(kernel);
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "brecq CUDA kernels (raw-pointer interface; use brecq_ext.ops instead)";
  // This module links its own CUDA runtime, whose current device is not torch's: ops call this with
  // the tensor's device before launching (a no-op when it is already current on this thread).
  m.def("use_device", [](int device) {
    thread_local int current = -1;
    if (device == current) return;
    check(cudaSetDevice(device), "brecq use_device (CUDA)");
    current = device;
  });
  m.def("quant_params", [](std::uintptr_t w, int64_t n, int64_t k, int bits, int64_t g, int search_steps,
                           std::uintptr_t scale, std::uintptr_t zero, std::uintptr_t stream) {
    check(brecq::cuda::quant_params(ptr<const float>(w), n, k, bits, g, search_steps, ptr<uint16_t>(scale),
                                    ptr<uint8_t>(zero), stream_of(stream)),
          "brecq quant_params (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("quantize", [](std::uintptr_t w, std::uintptr_t scale, std::uintptr_t zero, int64_t n, int64_t k,
                       int bits, int64_t g, std::uintptr_t codes, std::uintptr_t stream) {
    check(brecq::cuda::quantize(ptr<const float>(w), ptr<const uint16_t>(scale), ptr<const uint8_t>(zero), n, k,
                                bits, g, ptr<uint8_t>(codes), stream_of(stream)),
          "brecq quantize (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", [](std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zero, int64_t n, int64_t k,
                         int64_t g, std::uintptr_t out, std::uintptr_t stream) {
    check(brecq::cuda::dequantize(ptr<const uint8_t>(codes), ptr<const uint16_t>(scale), ptr<const uint8_t>(zero),
                                  n, k, g, ptr<float>(out), stream_of(stream)),
          "brecq dequantize (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("fake_quantize", [](std::uintptr_t w, std::uintptr_t scale, std::uintptr_t zero, int64_t n, int64_t k,
                            int bits, int64_t g, std::uintptr_t out, std::uintptr_t stream) {
    check(brecq::cuda::fake_quantize(ptr<const float>(w), ptr<const uint16_t>(scale), ptr<const uint8_t>(zero), n,
                                     k, bits, g, ptr<float>(out), stream_of(stream)),
          "brecq fake_quantize (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("pack", [](std::uintptr_t codes, int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t packed,
                   std::uintptr_t stream) {
    check(brecq::cuda::pack(ptr<const uint8_t>(codes), n, k, bits, g, ptr<uint8_t>(packed), stream_of(stream)),
          "brecq pack (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("unpack", [](std::uintptr_t packed, int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t codes,
                     std::uintptr_t stream) {
    check(brecq::cuda::unpack(ptr<const uint8_t>(packed), n, k, bits, g, ptr<uint8_t>(codes), stream_of(stream)),
          "brecq unpack (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_packed", [](std::uintptr_t packed, std::uintptr_t scale, std::uintptr_t zero,
                                int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t out,
                                int out_type, std::uintptr_t stream) {
    check(brecq::cuda::dequantize_packed(
              reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const uint16_t*>(scale),
              reinterpret_cast<const uint8_t*>(zero), n, k, bits, g, reinterpret_cast<void*>(out),
              static_cast<brecq::cuda::OutputType>(out_type), reinterpret_cast<cudaStream_t>(stream)),
          "brecq dequantize_packed (CUDA)");
  }, py::call_guard<py::gil_scoped_release>());
  // kernel: 0 picks the fastest that applies; 1 SIMT, 2 tensor cores with 8 features per MMA, 3 with 16
  // (brecq::cuda::GemvKernel). Tests and benchmarks name one to check or time each kernel, and
  // `tuning` (packed_gemv only) one of the 16-feature kernel's Tuning<> variants.
  m.def("packed_gemv_supported", [](std::uintptr_t x, std::uintptr_t packed, int dtype, int bits, int64_t g,
                                    int m_rows, int64_t k, int64_t x_stride, int kernel) {
    return brecq::cuda::packed_gemv_supported(reinterpret_cast<const void*>(x), ptr<const uint8_t>(packed),
                                              static_cast<brecq::cuda::OutputType>(dtype), bits, g, m_rows, k,
                                              x_stride, gemv_kernel(kernel));
  }, py::arg("x"), py::arg("packed"), py::arg("dtype"), py::arg("bits"), py::arg("g"), py::arg("m"), py::arg("k"),
     py::arg("x_stride"), py::arg("kernel") = 0);
  m.def("packed_gemv", [](std::uintptr_t x, int dtype, int m_rows, int64_t x_stride, std::uintptr_t packed,
                          std::uintptr_t scale, std::uintptr_t zero, std::uintptr_t bias, int64_t n, int64_t k,
                          int bits, int64_t g, std::uintptr_t y, std::uintptr_t stream, int kernel, int tuning) {
    if (tuning != 0) {  // a tuning of the 16-feature kernel other than its default: for measurements
      if (gemv_kernel(kernel) != brecq::cuda::GemvKernel::kMma16)
        throw std::invalid_argument("tuning applies to kernel 3 (mma16) only");
      if (tuning < 0 || tuning > 3)
        throw std::invalid_argument("tuning must be 0..3 (gemv_mma16.cu's Tuning<>), got " + std::to_string(tuning));
      check(brecq::cuda::packed_gemv_mma16(
                reinterpret_cast<const void*>(x), static_cast<brecq::cuda::OutputType>(dtype), m_rows, x_stride,
                reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const uint16_t*>(scale),
                reinterpret_cast<const uint8_t*>(zero), bias ? reinterpret_cast<const float*>(bias) : nullptr, n, k,
                bits, g, reinterpret_cast<void*>(y), reinterpret_cast<cudaStream_t>(stream), tuning),
            "brecq packed_gemv (CUDA, mma16 tuning)");
      return;
    }
    check(brecq::cuda::packed_gemv(reinterpret_cast<const void*>(x), static_cast<brecq::cuda::OutputType>(dtype),
                                   m_rows, x_stride, reinterpret_cast<const uint8_t*>(packed),
                                   reinterpret_cast<const uint16_t*>(scale), reinterpret_cast<const uint8_t*>(zero),
                                   bias ? reinterpret_cast<const float*>(bias) : nullptr, n, k, bits, g,
                                   reinterpret_cast<void*>(y), reinterpret_cast<cudaStream_t>(stream),
                                   gemv_kernel(kernel)),
          "brecq packed_gemv (CUDA)");
  }, py::arg("x"), py::arg("dtype"), py::arg("m"), py::arg("x_stride"), py::arg("packed"), py::arg("scale"),
     py::arg("zero"), py::arg("bias"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("g"), py::arg("y"),
     py::arg("stream"), py::arg("kernel") = 0, py::arg("tuning") = 0, py::call_guard<py::gil_scoped_release>());
  // The kernel and tuning kAuto takes for a layer on a GPU with `sms` multiprocessors, where the
  // tensor-core kernels apply: pure host logic, checked by tests without a GPU.
  m.def("gemv_choice", [](int64_t n, int64_t k, int64_t g, int bits, int m_rows, int sms, bool mma16_supported) {
    const brecq::cuda::GemvChoice choice =
        brecq::cuda::choose_tensor_core_gemv(n, k, g, bits, m_rows, sms, mma16_supported);
    return py::make_tuple(static_cast<int>(choice.kernel), choice.tuning);
  }, py::arg("n"), py::arg("k"), py::arg("g"), py::arg("bits"), py::arg("m"), py::arg("sms"),
     py::arg("mma16_supported") = true);
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
