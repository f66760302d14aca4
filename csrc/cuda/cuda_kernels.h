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
// x_stride elements apart), W packed at 4 or 6 bits. Three kernels:
// * kMma16 (gemv_mma16.cu): tensor cores, weights as the A operand, 16 features per MMA;
// * kMma8 (gemv_mma.cu): tensor cores, activations as the A operand, 8 features per MMA;
// * kSimt (gemv.cu): CUDA cores, activations staged in shared memory as float32.
// The tensor-core kernels need bfloat16/float16 activations, a group size that is a multiple of 64,
// x 16-byte aligned, x_stride a multiple of 8 and packed 8-byte aligned; the SIMT kernel takes
// float32 too and group sizes that are multiples of 32, with packed 16-byte aligned. kAuto picks
// the fastest that applies. Callers use the GEMM path where none applies.
enum class GemvKernel : int { kAuto = 0, kSimt = 1, kMma8 = 2, kMma16 = 3 };
bool packed_gemv_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                           int64_t k, int64_t x_stride, GemvKernel kernel = GemvKernel::kAuto);
cudaError_t packed_gemv(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                        const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                        int bits, int64_t g, void* y, cudaStream_t stream, GemvKernel kernel = GemvKernel::kAuto);
bool packed_gemv_mma_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                               int64_t x_stride);
cudaError_t packed_gemv_mma(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                            const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                            int bits, int64_t g, void* y, cudaStream_t stream);
// kMma16 also needs a group size of 64 times a power of two and a layer whose codes, scales and
// activations each take under 2^31 elements (32-bit offsets); packed_gemv_supported, which is not
// told n, checks the rest, and kAuto falls back to kMma8 for larger layers.
bool packed_gemv_mma16_supported(const void* x, const uint8_t* packed, OutputType dtype, int bits, int64_t g, int m,
                                 int64_t n, int64_t k, int64_t x_stride);
// tuning: one of gemv_mma16.cu's Tuning<> (0..3); a call naming kMma16 runs 0, kAuto picks one.
cudaError_t packed_gemv_mma16(const void* x, OutputType dtype, int m, int64_t x_stride, const uint8_t* packed,
                              const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                              int bits, int64_t g, void* y, cudaStream_t stream, int tuning = 0);

// How kAuto picks between the tensor-core kernels (gemv_mma16.cu has the reasons), as a pure
// function of the layer and the SM count so that it can be checked without a GPU; mma16_supported
// says whether kMma16 applies at all.
struct GemvChoice {
  GemvKernel kernel;
  int tuning;
};
GemvChoice choose_tensor_core_gemv(int64_t n, int64_t k, int64_t g, int bits, int m, int sms, bool mma16_supported);
// Rounds of loads (trips to DRAM, one after another) a warp of the 8-feature kernel makes.
int packed_gemv_mma_rounds(int64_t n, int64_t k, int64_t g, int sms);
// Multiprocessors of the current device, cached per device; 132 (an H100's) when it cannot be read.
int multiprocessor_count();

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
