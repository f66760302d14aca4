// What the two tensor-core decode kernels (gemv_mma.cu, gemv_mma16.cu) share: one lane's run of 16
// packed codes, the mma.sync m16n8k16 instruction and its 16-bit types, and activation loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace brecq {
namespace cuda {
namespace mma {

constexpr int kRunCodes = 16;  // codes of one weight row one lane loads per 64-code K block

// 16 consecutive codes of one row: code j at bits Bits * j of the words, little-endian as packed
// (docs/FORMAT.md).
template <int Bits> struct CodeRun;
template <> struct CodeRun<4> { uint32_t w[2]; };  // 8 bytes
template <> struct CodeRun<6> { uint32_t w[3]; };  // 12 bytes

template <int Bits>
__device__ inline CodeRun<Bits> load_code_run(const uint8_t* p);
template <>
__device__ inline CodeRun<4> load_code_run<4>(const uint8_t* p) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));  // 8-byte aligned: rows are 32-byte multiples
  return {{v.x, v.y}};
}
template <>
__device__ inline CodeRun<6> load_code_run<6>(const uint8_t* p) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(p);  // 4-byte aligned: 12-byte runs of 48-byte rows
  return {{__ldg(w), __ldg(w + 1), __ldg(w + 2)}};
}

// mma.sync m16n8k16 with float32 accumulation for one 16-bit input type, and that type's helpers.
template <typename T> struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x4300u;  // 128.0: 128 + q is exact for q < 128
  __device__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Mma<__half> {
  static constexpr uint32_t kMagic = 0x6400u;  // 1024.0: 1024 + q is exact for q < 1024
  __device__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

// 16 consecutive 16-bit activations from position col of one row, as 8 words (word i holds
// positions 2i, 2i+1, the lower in the low half), zero beyond k or when the row does not exist.
// Index is int64_t or int: gemv_mma16.cu keeps its index arithmetic 32-bit.
template <typename Index>
__device__ inline void load_activations(uint32_t (&regs)[8], bool valid, const uint16_t* row, Index col, Index k) {
  if (!valid) {
#pragma unroll
    for (int i = 0; i < 8; ++i) regs[i] = 0u;
    return;
  }
  if (col + kRunCodes <= k) {  // 16-byte aligned: the host checks x and its row stride
    const uint4 lo = __ldg(reinterpret_cast<const uint4*>(row + col));
    const uint4 hi = __ldg(reinterpret_cast<const uint4*>(row + col + 8));
    regs[0] = lo.x; regs[1] = lo.y; regs[2] = lo.z; regs[3] = lo.w;
    regs[4] = hi.x; regs[5] = hi.y; regs[6] = hi.z; regs[7] = hi.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t a = col + 2 * i < k ? row[col + 2 * i] : 0u;
    const uint32_t b = col + 2 * i + 1 < k ? row[col + 2 * i + 1] : 0u;
    regs[i] = a | (b << 16);
  }
}

}  // namespace mma
}  // namespace cuda
}  // namespace brecq
