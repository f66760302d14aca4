// CUDA kernels over raw device pointers, launched on the caller's stream (PyTorch's current one).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace brecq {
namespace cuda {

enum class OutputType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Grouped quantization (csrc/cpu/quant.cpp, pack.cpp have the formulas): w float32 [n, k]
// row-major, scale float16 bits and zero uint8 [n, num_groups(k, g)], codes uint8 [n, k],
// packed uint8 [n, packed_row_bytes(k, g, bits)]. pack expects codes already checked <= 2^bits - 1.
cudaError_t quant_params(const float* w, int64_t n, int64_t k, int bits, int64_t g, int search_steps,
                         uint16_t* scale, uint8_t* zero, cudaStream_t stream);
cudaError_t quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                     int bits, int64_t g, uint8_t* codes, cudaStream_t stream);
cudaError_t dequantize(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n,
                       int64_t k, int64_t g, float* out, cudaStream_t stream);
cudaError_t fake_quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                          int bits, int64_t g, float* out, cudaStream_t stream);
cudaError_t pack(const uint8_t* codes, int64_t n, int64_t k, int bits, int64_t g, uint8_t* packed,
                 cudaStream_t stream);
cudaError_t unpack(const uint8_t* packed, int64_t n, int64_t k, int bits, int64_t g, uint8_t* codes,
                   cudaStream_t stream);

// out[n, k] = scale * (code - zero) in out_type, from packed weights (format.h).
cudaError_t dequantize_packed(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero,
                              int64_t n, int64_t k, int bits, int64_t g, void* out,
                              OutputType out_type, cudaStream_t stream);

// y[m, n] = x[m, k] . dequant(W)^T + bias for 1..16 rows of x (dtype of x and y alike, rows
// x_stride elements apart), W packed at 4 or 6 bits. bfloat16/float16 activations with a group size
// that is a multiple of 64 (and x 16-byte aligned, x_stride a multiple of 8, packed 8-byte
// aligned) take the tensor-core kernel (gemv_mma.cu); the rest, float32 included, the SIMT kernel
// (gemv.cu: group sizes that are multiples of 32, packed 16-byte aligned, activations staged in
// shared memory). Callers use the GEMM path where neither applies.
bool packed_gemv_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                           int64_t k, int64_t x_stride);
cudaError_t packed_gemv(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                        const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                        int bits, int64_t g, void* y, cudaStream_t stream);
bool packed_gemv_mma_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                               int64_t x_stride);
cudaError_t packed_gemv_mma(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                            const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                            int bits, int64_t g, void* y, cudaStream_t stream);

// AdaRound (csrc/cpu/adaround.cpp has the formulas); all pointers float32 except scale/zero.
cudaError_t adaround_forward(const float* w, const float* v, const uint16_t* scale, const uint8_t* zero,
                             int64_t n, int64_t k, int bits, int64_t g, float* out, cudaStream_t stream);
cudaError_t adaround_backward(const float* grad_out, const float* w, const float* v, const uint16_t* scale,
                              const uint8_t* zero, int64_t n, int64_t k, int bits, int64_t g, float* grad_v,
                              cudaStream_t stream);
// loss: one float on the device, overwritten.
cudaError_t adaround_regularizer(const float* v, int64_t count, float beta, float* grad_v, float* loss,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace brecq
