// CPU kernels over raw pointers. No libtorch: the Python layer owns allocation, shape and dtype
// checks; these functions assume contiguous row-major buffers of the stated shapes.
// Conventions: `n` = out_features (rows of W), `k` = in_features, `m` = rows of activations,
// `g` = group_size, `groups` = num_groups(k, g). Scales are IEEE float16 bit patterns (uint16_t).
#pragma once
#include <cstdint>
#include <string>

namespace brecq {

// kAvx512Vnni: AVX-512 (F, BW, VL, DQ) with VBMI and VNNI but not AVX512_BF16 (Ice Lake, and
// virtual machines that hide BF16): the AVX-512 kernels run, except those built on BF16 instructions
// (bfloat16 dot products, bfloat16 attention), which take their AVX2 or float32 versions.
// kAvx512: the same with AVX512_BF16 (Zen 4, Sapphire Rapids and later).
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAvx512 = 3 };

// Highest instruction set this CPU supports among those compiled in.
Isa detect_isa();
// Instruction set the kernels use now (detect_isa() unless lowered by set_isa or BRECQ_CPU_ISA).
Isa active_isa();
// Lower (never raise above detect_isa()) the instruction set; returns the one now active.
Isa set_isa(Isa isa);
const char* isa_name(Isa isa);

// ---- quantization parameters -------------------------------------------------------------
// w: float32 [n, k]. Writes scale (float16 bits) and zero (uint8) [n, groups].
// search_steps == 0: min-max range (extended to include 0). search_steps > 0: the range is shrunk
// by factors 1, 0.99, ..., 1 - 0.01 * (search_steps - 1) and the factor with the least squared
// reconstruction error of the group is kept (first one on ties).
void quant_params(const float* w, int64_t n, int64_t k, int bits, int64_t g, int search_steps,
                  uint16_t* scale, uint8_t* zero, int threads);

// codes[n, k] = clamp(round_half_even(w / scale) + zero, 0, 2^bits - 1)
void quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
              int bits, int64_t g, uint8_t* codes, int threads);
// out[n, k] = scale * (codes - zero), float32
void dequantize(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n,
                int64_t k, int64_t g, float* out, int threads);
// out = dequantize(quantize(w)), float32.
void fake_quantize(const float* w, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                   int bits, int64_t g, float* out, int threads);

// ---- AdaRound ------------------------------------------------------------------------------
// h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1.
// w_soft = scale * (clamp(floor(w / scale) + h(V) + zero, 0, qmax) - zero)
void adaround_forward(const float* w, const float* v, const uint16_t* scale, const uint8_t* zero,
                      int64_t n, int64_t k, int bits, int64_t g, float* w_soft, int threads);
// grad_v = grad_out * d w_soft / d V
void adaround_backward(const float* grad_out, const float* w, const float* v, const uint16_t* scale,
                       const uint8_t* zero, int64_t n, int64_t k, int bits, int64_t g, float* grad_v,
                       int threads);
// Returns sum(1 - |2 h(V) - 1|^beta) over `count` elements and writes its gradient to grad_v.
double adaround_regularizer(const float* v, int64_t count, float beta, float* grad_v, int threads);

// ---- packing -------------------------------------------------------------------------------
// codes: uint8 [n, k] -> packed [n, packed_row_bytes(k, g, bits)]. Returns the number of codes
// above 2^bits - 1 (nothing is written in that case).
int64_t pack(const uint8_t* codes, int64_t n, int64_t k, int bits, int64_t g, uint8_t* packed,
             int threads);
void unpack(const uint8_t* packed, int64_t n, int64_t k, int bits, int64_t g, uint8_t* codes,
            int threads);
// Dense float32 (out_bf16 == false) or bfloat16 bits (out_bf16 == true) [n, k] from packed weights.
void dequantize_packed(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero, int64_t n,
                       int64_t k, int bits, int64_t g, void* out, bool out_bf16, int threads);

// ---- packed matmul, few rows ----------------------------------------------------------------
// y[m, n] = x[m, k] . dequant(W)^T + bias, accumulated in float32. x is float32 (x_is_bf16 ==
// false) or bfloat16 bits, rows x_stride elements apart; y is float32 or bfloat16 bits
// (y_is_bf16), contiguous. bias may be null. Streams the packed weights once for all m rows;
// intended for m <= 16.
void packed_gemv(const void* x, bool x_is_bf16, int64_t m, int64_t x_stride, const uint8_t* packed,
                 const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                 int bits, int64_t g, void* y, bool y_is_bf16, int threads);

// y = x . dequant(W)^T + bias for 4- or 6-bit weights in the TILE16 layout (format.h; the caller
// checks tile16_supports(bits, g)): codes uint8, tile_code_bytes(k, g, bits) per tile, scale float16
// bits and zero uint8 [tile_count(n), groups, 16]. Arguments otherwise as packed_gemv; meant for
// m <= 8 rows (each pass of 4 rows re-reads a tile from cache).
void tiled_gemv(const void* x, bool x_is_bf16, int64_t m, int64_t x_stride, const uint8_t* codes,
                const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k, int bits,
                int64_t g, void* y, bool y_is_bf16, int threads);

// One TILE16 product of a tiled_gemv_batch: weights as tiled_gemv's, output y [m, n] float32.
struct TiledGemvCall {
  const uint8_t* codes = nullptr;
  const uint16_t* scale = nullptr;
  const uint8_t* zero = nullptr;
  const float* bias = nullptr;
  int64_t n = 0;
  int bits = 0;
  int64_t g = 0;
  float* y = nullptr;
};
constexpr int kMaxTiledBatch = 4;

// Work done on a tile's outputs as soon as every call of a tiled_gemv_batch has computed them, by the
// thread that computed them: run(context, begin, end) with output columns [begin, end) of every
// call's y final for all m rows. A decoder's SiLU(gate) x up this way needs no pass (and no barrier)
// of its own, and reads no output the other core wrote.
struct TileEpilogue {
  void (*run)(void* context, int64_t begin, int64_t end) = nullptr;
  void* context = nullptr;
};

// Up to kMaxTiledBatch TILE16 products of the same x [m, k] (row stride k) in one pass over all
// their tiles, shared among the threads as one loop: a decoder's q/k/v or gate/up projections
// with one work-sharing loop (and one barrier) instead of one per projection. Results equal
// tiled_gemv's for each call. With `after_tile`, every call must have the same n: the loop then
// takes tile t of every call in turn, then after_tile's run over that tile's columns.
void tiled_gemv_batch(const void* x, bool x_is_bf16, int64_t m, int64_t k, const TiledGemvCall* calls, int count,
                      int threads, const TileEpilogue* after_tile = nullptr);

// Dense rows [0, n) of TILE16 weights whose first tile starts at codes / scale / zero (pass the
// tile holding a range's first row to dequantize a range whose start is a multiple of 16): out
// [n, k] float32, or bfloat16 bits when out_bf16; the same values as dequantize_packed on the
// row-major weights, bit for bit.
void dequantize_tiled(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                      int bits, int64_t g, void* out, bool out_bf16, int threads);

// ---- attention, one query token per sequence (decode) -----------------------------------------
// Query heads per key/value head up to which decode_attention runs (its per-thread state).
constexpr int64_t kMaxDecodeGroup = 64;

// out[b, h, :] = softmax(scale * q[b, h, :] . K[b, h / group, l, :] over visible l) . V[b, h / group]
// with group = q_heads / kv_heads (q_heads a multiple of kv_heads, group <= kMaxDecodeGroup), as
// transformers' repeat_kv pairs heads. q and out are contiguous [batch, q_heads, head_dim]; K and V
// [batch, kv_heads, kv_len, head_dim] with unit stride along head_dim and the given strides (in
// elements) otherwise. All float32, or all bfloat16 bits when bf16; accumulation in float32.
// key_mask, when not null, is uint8 [batch, kv_len] rows mask_stride_b apart: 0 hides a key. A row
// with no visible key gives zeros.
void decode_attention(const void* q, const void* k, const void* v, const uint8_t* key_mask, bool bf16,
                      int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t kv_len, int64_t head_dim,
                      int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l, int64_t v_stride_b,
                      int64_t v_stride_h, int64_t v_stride_l, int64_t mask_stride_b, float scale, void* out,
                      int threads);

// ---- RMS normalisation ------------------------------------------------------------------------
// out[r, :] = weight * dtype(x[r, :] * rsqrt(mean(x[r, :]^2) + eps)) for r < rows, with the mean and
// the normalised row in float32 and, for bfloat16, the normalised row rounded to bfloat16 before
// the weight multiplies it (transformers' Llama/Qwen RMSNorm). x rows x_stride elements apart;
// weight [n] and out [rows, n] contiguous; all float32, or all bfloat16 bits when bf16.
void rms_norm(const void* x, bool bf16, int64_t rows, int64_t n, int64_t x_stride, const void* weight, float eps,
              void* out, int threads);

}  // namespace brecq
