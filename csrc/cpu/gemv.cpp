// Packed GEMV dispatcher and CPU feature detection.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "gemv.h"
#include "numeric.h"

namespace brecq {
namespace {

Isa detect_uncached() {
#if defined(__x86_64__) && defined(BRECQ_HAVE_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512 : Isa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa isa_from_env(Isa detected) {
  const char* requested = std::getenv("BRECQ_CPU_ISA");
  if (!requested) return detected;
  Isa wanted = detected;
  if (std::strcmp(requested, "scalar") == 0) wanted = Isa::kScalar;
  else if (std::strcmp(requested, "avx2") == 0) wanted = Isa::kAvx2;
  else if (std::strcmp(requested, "avx512vnni") == 0) wanted = Isa::kAvx512Vnni;
  else if (std::strcmp(requested, "avx512") == 0) wanted = Isa::kAvx512;
  return static_cast<Isa>(std::min(static_cast<int>(wanted), static_cast<int>(detected)));
}

std::atomic<int>& active_isa_storage() {
  static std::atomic<int> active{static_cast<int>(isa_from_env(detect_isa()))};
  return active;
}

}  // namespace

Isa detect_isa() {
  static const Isa detected = detect_uncached();
  return detected;
}

Isa active_isa() { return static_cast<Isa>(active_isa_storage().load()); }

Isa set_isa(Isa isa) {
  const Isa chosen = static_cast<Isa>(std::min(static_cast<int>(isa), static_cast<int>(detect_isa())));
  active_isa_storage().store(static_cast<int>(chosen));
  return chosen;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

namespace detail {
bool& in_split_team() {
  static thread_local bool member = false;
  return member;
}
}  // namespace detail

namespace {

struct PreparedInput {
  std::vector<float> x_f32, xsum, scratch;
  std::vector<uint16_t> x_bf16;
};

// The problem's shape and weights, with x copied into per-thread buffers: a natural-order,
// zero-padded float32 copy (and bfloat16 copy when x is bfloat16), plus the per-group sums used
// by the zero-point correction. Reused across calls: decode-sized calls are short enough for
// allocation to show. `slot` picks one of kMaxTiledBatch sets of buffers, so that the problems
// of one tiled_gemv_batch keep theirs side by side.
detail::GemvProblem prepare(const void* x, bool x_is_bf16, int64_t m, int64_t x_stride, const uint8_t* packed,
                            const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                            int bits, int64_t g, void* y, bool y_is_bf16, int threads, int slot = 0) {
  detail::GemvProblem p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.g = g;
  p.bits = bits;
  p.groups = num_groups(k, g);
  p.k_padded = padded_in_features(k, g);
  p.row_bytes = packed_row_bytes(k, g, bits);
  p.packed = packed;
  p.scale = scale;
  p.zero = zero;
  p.bias = bias;
  p.y = y_is_bf16 ? nullptr : static_cast<float*>(y);
  p.y_bf16 = y_is_bf16 ? static_cast<uint16_t*>(y) : nullptr;
  p.threads = threads;

  thread_local PreparedInput buffers[kMaxTiledBatch];
  std::vector<float>& x_f32 = buffers[slot].x_f32;
  std::vector<float>& xsum = buffers[slot].xsum;
  std::vector<float>& scratch = buffers[slot].scratch;
  std::vector<uint16_t>& x_bf16 = buffers[slot].x_bf16;
  const size_t x_elems = static_cast<size_t>(m * p.k_padded);
  if (x_f32.size() < x_elems) x_f32.resize(x_elems);
  if (scratch.size() < x_elems) scratch.resize(x_elems);
  if (x_is_bf16 && x_bf16.size() < x_elems) x_bf16.resize(x_elems);
  if (xsum.size() < static_cast<size_t>(m * p.groups)) xsum.resize(static_cast<size_t>(m * p.groups));
  for (int64_t r = 0; r < m; ++r) {
    float* dst = x_f32.data() + r * p.k_padded;
    std::fill(dst + k, dst + p.k_padded, 0.0f);
    if (x_is_bf16) {
      const uint16_t* src = static_cast<const uint16_t*>(x) + r * x_stride;
      uint16_t* dst_bf16 = x_bf16.data() + r * p.k_padded;
      std::copy(src, src + k, dst_bf16);
      std::fill(dst_bf16 + k, dst_bf16 + p.k_padded, static_cast<uint16_t>(0));
      for (int64_t i = 0; i < k; ++i) dst[i] = numeric::bf16_to_f32(src[i]);
    } else {
      const float* src = static_cast<const float*>(x) + r * x_stride;
      std::copy(src, src + k, dst);
    }
    for (int64_t grp = 0; grp < p.groups; ++grp) xsum[r * p.groups + grp] = numeric::sum(dst + grp * g, g);
  }
  p.x = x_f32.data();
  p.x_bf16 = x_is_bf16 ? x_bf16.data() : nullptr;
  p.xsum = xsum.data();
  p.scratch = scratch.data();
  return p;
}

}  // namespace

void packed_gemv(const void* x, bool x_is_bf16, int64_t m, int64_t x_stride, const uint8_t* packed,
                 const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k,
                 int bits, int64_t g, void* y, bool y_is_bf16, int threads) {
  const detail::GemvProblem p =
      prepare(x, x_is_bf16, m, x_stride, packed, scale, zero, bias, n, k, bits, g, y, y_is_bf16, threads);
  const Isa isa = active_isa();
  if (isa >= Isa::kAvx512Vnni && detail::gemv_avx512(p)) return;
  if (isa >= Isa::kAvx2 && detail::gemv_avx2(p)) return;
  detail::gemv_scalar(p);
}

namespace {

// The fastest TILE16 kernel that holds p.
void run_tiled(const detail::GemvProblem& p) {
  const Isa isa = active_isa();
  if (isa >= Isa::kAvx512Vnni && detail::tiled_gemv_avx512(p)) return;
  if (isa >= Isa::kAvx2 && detail::tiled_gemv_avx2(p)) return;
  detail::tiled_gemv_scalar(p);
}

}  // namespace

void tiled_gemv(const void* x, bool x_is_bf16, int64_t m, int64_t x_stride, const uint8_t* codes,
                const uint16_t* scale, const uint8_t* zero, const float* bias, int64_t n, int64_t k, int bits,
                int64_t g, void* y, bool y_is_bf16, int threads) {
  run_tiled(prepare(x, x_is_bf16, m, x_stride, codes, scale, zero, bias, n, k, bits, g, y, y_is_bf16, threads));
}

void tiled_gemv_batch(const void* x, bool x_is_bf16, int64_t m, int64_t k, const TiledGemvCall* calls, int count,
                      int threads, const TileEpilogue* after_tile) {
  if (count < 1 || count > kMaxTiledBatch)
    throw std::invalid_argument("tiled_gemv_batch: count must be 1-" + std::to_string(kMaxTiledBatch) + ", got " +
                                std::to_string(count));
  if (after_tile) {
    if (!after_tile->run) throw std::invalid_argument("tiled_gemv_batch: after_tile.run must not be null");
    for (int i = 1; i < count; ++i)
      if (calls[i].n != calls[0].n)
        throw std::invalid_argument("tiled_gemv_batch: with after_tile every call needs the same n; call 0 has " +
                                    std::to_string(calls[0].n) + ", call " + std::to_string(i) + " has " +
                                    std::to_string(calls[i].n));
  }
  detail::GemvProblem problems[kMaxTiledBatch];
  for (int i = 0; i < count; ++i) {
    const TiledGemvCall& c = calls[i];
    int same = 0;  // an earlier call of the same width and group size: its prepared input serves
    while (same < i && (calls[same].bits != c.bits || calls[same].g != c.g)) ++same;
    if (same < i) {
      problems[i] = problems[same];
      problems[i].packed = c.codes, problems[i].scale = c.scale, problems[i].zero = c.zero;
      problems[i].bias = c.bias, problems[i].n = c.n, problems[i].y = c.y;
    } else {
      problems[i] = prepare(x, x_is_bf16, m, k, c.codes, c.scale, c.zero, c.bias, c.n, k, c.bits, c.g, c.y, false,
                            threads, i);
    }
  }
  const Isa isa = active_isa();
  if (isa >= Isa::kAvx512Vnni && detail::tiled_gemv_avx512_batch(problems, count, after_tile)) return;
  if (isa >= Isa::kAvx2 && detail::tiled_gemv_avx2_batch(problems, count, after_tile)) return;
  // No vector batch kernel (the portable path): each call through the kernel it gets alone, so that
  // results never depend on the company a call keeps, then the epilogue tile by tile.
  for (int i = 0; i < count; ++i) run_tiled(problems[i]);
  if (after_tile) {
    const int64_t n = calls[0].n;
    detail::for_each_index(tile_count(n), threads,
                           [&](int64_t tile) { detail::run_tile_epilogue(*after_tile, tile, n); });
  }
}

}  // namespace brecq
