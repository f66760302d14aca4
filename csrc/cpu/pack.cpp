// Bit packing along in_features (LSB-first bit stream per row; see format.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "brecq/format.h"
#include "brecq/kernels.h"
#include "gemv.h"
#include "numeric.h"

namespace brecq {
namespace {

void pack_row(const uint8_t* codes, int64_t k, int64_t k_padded, int bits, uint8_t* out) {
  if (bits == 4) {
    for (int64_t j = 0; j < k_padded / 2; ++j) {
      const uint8_t lo = 2 * j < k ? codes[2 * j] : 0;
      const uint8_t hi = 2 * j + 1 < k ? codes[2 * j + 1] : 0;
      out[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
    return;
  }
  uint64_t acc = 0;
  int pending = 0;
  for (int64_t i = 0; i < k_padded; ++i) {
    const uint64_t c = i < k ? codes[i] : 0;
    acc |= c << pending;
    pending += bits;
    while (pending >= 8) {
      *out++ = static_cast<uint8_t>(acc & 0xffu);
      acc >>= 8;
      pending -= 8;
    }
  }
}

}  // namespace

namespace detail {
namespace {

// Codes [0, count) of a row whose bit stream starts at a byte boundary, one at a time.
void unpack_bits(const uint8_t* packed, int64_t count, int bits, uint8_t* codes) {
  const uint32_t mask = (1u << bits) - 1u;
  uint64_t acc = 0;
  int available = 0;
  for (int64_t i = 0; i < count; ++i) {
    while (available < bits) {
      acc |= static_cast<uint64_t>(*packed++) << available;
      available += 8;
    }
    codes[i] = static_cast<uint8_t>(acc & mask);
    acc >>= bits;
    available -= bits;
  }
}

// Eight codes are exactly Bits bytes of the stream: one 8-byte little-endian load (of which Bits
// bytes are used) and eight shifts each, against a loop-carried refill per code above. The loads
// stop 8 bytes short of the row's end; the rest goes code by code. (Copying just Bits bytes into a
// uint64 on the stack and reading it back stalled on store forwarding, slower than the old loop.)
template <int Bits>
void unpack_by_eight(const uint8_t* packed, int64_t k, uint8_t* codes) {
  const int64_t row_bytes = (k * Bits + 7) / 8;
  const int64_t blocks = row_bytes >= 8 ? std::min(k / 8, (row_bytes - 8) / Bits + 1) : 0;
  for (int64_t t = 0; t < blocks; ++t) {
    uint64_t v;
    std::memcpy(&v, packed + t * Bits, 8);
    for (int j = 0; j < 8; ++j) codes[8 * t + j] = static_cast<uint8_t>((v >> (Bits * j)) & ((1u << Bits) - 1u));
  }
  unpack_bits(packed + blocks * Bits, k - 8 * blocks, Bits, codes + 8 * blocks);
}

}  // namespace

void unpack_row(const uint8_t* packed, int64_t k, int bits, uint8_t* codes) {
  if (bits == 4) {
    for (int64_t i = 0; i < k; ++i) codes[i] = (packed[i / 2] >> (4 * (i & 1))) & 0x0fu;
    return;
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  switch (bits) {
    case 2: unpack_by_eight<2>(packed, k, codes); return;
    case 3: unpack_by_eight<3>(packed, k, codes); return;
    case 5: unpack_by_eight<5>(packed, k, codes); return;
    case 6: unpack_by_eight<6>(packed, k, codes); return;
    case 7: unpack_by_eight<7>(packed, k, codes); return;
    default: break;
  }
#endif
  unpack_bits(packed, k, bits, codes);
}
}  // namespace detail

int64_t pack(const uint8_t* codes, int64_t n, int64_t k, int bits, int64_t g, uint8_t* packed,
             int threads) {
  const uint8_t qmax = static_cast<uint8_t>(max_code(bits));
  int64_t invalid = 0;
#pragma omp parallel for schedule(static) reduction(+ : invalid) num_threads(threads)
  for (int64_t i = 0; i < n * k; ++i) invalid += codes[i] > qmax;
  if (invalid) return invalid;
  const int64_t row_bytes = packed_row_bytes(k, g, bits);
  const int64_t k_padded = padded_in_features(k, g);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; ++row)
    pack_row(codes + row * k, k, k_padded, bits, packed + row * row_bytes);
  return 0;
}

void unpack(const uint8_t* packed, int64_t n, int64_t k, int bits, int64_t g, uint8_t* codes,
            int threads) {
  const int64_t row_bytes = packed_row_bytes(k, g, bits);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; ++row) detail::unpack_row(packed + row * row_bytes, k, bits, codes + row * k);
}

void dequantize_packed(const uint8_t* packed, const uint16_t* scale, const uint8_t* zero, int64_t n,
                       int64_t k, int bits, int64_t g, void* out, bool out_bf16, int threads) {
  if (active_isa() >= Isa::kAvx512Vnni &&
      detail::dequantize_packed_avx512(packed, scale, zero, n, k, bits, g, out, out_bf16, threads))
    return;
  const int64_t row_bytes = packed_row_bytes(k, g, bits);
  const int64_t groups = num_groups(k, g);
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint8_t> codes(static_cast<size_t>(k));
    std::vector<float> row_values(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n; ++row) {
      detail::unpack_row(packed + row * row_bytes, k, bits, codes.data());
      for (int64_t grp = 0; grp < groups; ++grp) {
        const float s = numeric::f16_to_f32(scale[row * groups + grp]);
        const float z = static_cast<float>(zero[row * groups + grp]);
        const int64_t end = std::min(k, grp * g + g);
        for (int64_t i = grp * g; i < end; ++i)
          row_values[i] = (static_cast<float>(codes[i]) - z) * s;
      }
      if (out_bf16) {
        uint16_t* dst = static_cast<uint16_t*>(out) + row * k;
        for (int64_t i = 0; i < k; ++i) dst[i] = numeric::f32_to_bf16(row_values[i]);
      } else {
        std::copy(row_values.begin(), row_values.end(), static_cast<float*>(out) + row * k);
      }
    }
  }
}

void dequantize_tiled(const uint8_t* codes, const uint16_t* scale, const uint8_t* zero, int64_t n, int64_t k,
                      int bits, int64_t g, void* out, bool out_bf16, int threads) {
  const Isa isa = active_isa();
  if (isa >= Isa::kAvx512Vnni && detail::dequantize_tiled_avx512(codes, scale, zero, n, k, bits, g, out, out_bf16, threads))
    return;
  if (isa >= Isa::kAvx2 && detail::dequantize_tiled_avx2(codes, scale, zero, n, k, bits, g, out, out_bf16, threads))
    return;
  const int64_t tile_bytes = tile_code_bytes(k, g, bits), groups = num_groups(k, g);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; ++row) {
    const int64_t tile = row / kTileRows, lane = row % kTileRows;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t param = (tile * groups + i / g) * kTileRows + lane;
      const float q = static_cast<float>(detail::tile16_code(codes + tile * tile_bytes, bits, lane, i));
      const float value = (q - static_cast<float>(zero[param])) * numeric::f16_to_f32(scale[param]);
      if (out_bf16)
        static_cast<uint16_t*>(out)[row * k + i] = numeric::f32_to_bf16(value);
      else
        static_cast<float*>(out)[row * k + i] = value;
    }
  }
}

}  // namespace brecq
