// CUDA kernels over raw device pointers, launched on the caller's stream (PyTorch's current one).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace brecq {
namespace cuda {

enum class OutputType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// out[n, k] = scale * (code - zero) in out_type, from packed weights (format.h).
cudaError_t dequantize_packed(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero,
                              int64_t n, int64_t k, int bits, int64_t g, void* out,
                              OutputType out_type, cudaStream_t stream);

}  // namespace cuda
}  // namespace brecq
