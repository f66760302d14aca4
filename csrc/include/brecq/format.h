// The packed weight format, defined once. docs/FORMAT.md is the prose version of this file;
// every kernel (CPU, CUDA) and the Python reference follow it.
//
// A quantized linear layer W[out_features, in_features] is stored as
//   packed : uint8   [out_features, packed_row_bytes(in_features, group_size, bits)]
//   scale  : float16 [out_features, num_groups(in_features, group_size)]
//   zero   : uint8   [out_features, num_groups(in_features, group_size)]
// with w[o, k] ~= scale[o, k / group_size] * (code[o, k] - zero[o, k / group_size]).
//
// Packing axis: in_features (each output row is packed independently, rows are contiguous).
// Bit order: LSB-first bit stream per row: code k occupies bits [k*bits, (k+1)*bits) of the row,
// where bit i of the row is bit (i % 8) of byte (i / 8).  For 4 bits: code 2j is the low nibble of
// byte j, code 2j+1 the high nibble.  For 6 bits: codes 4j..4j+3 fill bytes 3j..3j+2 as the
// little-endian 24-bit word c0 | c1 << 6 | c2 << 12 | c3 << 18.
// Padding: each row is padded to a whole number of groups; padded codes are 0 and padded scale/zero
// do not exist (the last group simply covers fewer real inputs).  Readers must ignore padded codes.
#pragma once
#include <cstdint>

namespace brecq {

constexpr int kFormatVersion = 1;
constexpr int kMinBits = 2;
constexpr int kMaxBits = 8;
// Groups must start on a byte boundary for every bit width, so group sizes are multiples of 8.
constexpr int kGroupSizeMultiple = 8;

constexpr int64_t num_groups(int64_t in_features, int64_t group_size) {
  return (in_features + group_size - 1) / group_size;
}
constexpr int64_t padded_in_features(int64_t in_features, int64_t group_size) {
  return num_groups(in_features, group_size) * group_size;
}
constexpr int64_t packed_row_bytes(int64_t in_features, int64_t group_size, int bits) {
  return padded_in_features(in_features, group_size) * bits / 8;
}
constexpr int max_code(int bits) { return (1 << bits) - 1; }

// Bytes one group occupies (codes only) and effective bits per weight including the float16 scale
// and uint8 zero of the group:  bits + 24 / group_size.
constexpr int64_t group_code_bytes(int64_t group_size, int bits) { return group_size * bits / 8; }

// The two layouts the fast kernels are specialised for, at the study's group size of 64:
//   W4 g64: 32 code bytes + 2 scale bytes + 1 zero byte = 35 bytes / 64 weights = 4.375 bits/weight
//   W6 g64: 48 code bytes + 2 scale bytes + 1 zero byte = 51 bytes / 64 weights = 6.375 bits/weight
static_assert(group_code_bytes(64, 4) + 2 + 1 == 35, "W4 g64 group must be 35 bytes");
static_assert(group_code_bytes(64, 6) + 2 + 1 == 51, "W6 g64 group must be 51 bytes");
static_assert(packed_row_bytes(172, 64, 4) == 96, "172 inputs pad to 192 = 3 groups of 64");
static_assert(packed_row_bytes(1000, 32, 6) == 768, "1000 inputs pad to 1024 = 32 groups of 32 (6-bit)");

// ---- TILE16: the CPU execution layout of 4-, 6- and 8-bit layers (docs/FORMAT.md, "Tiled layout")
// Held in memory only, never saved: the same codes, scales and zeros as above, rearranged so that
// a 64-byte vector holds 8 consecutive codes of each of 16 consecutive output rows, one row per
// 32-bit lane. A step is 8 codes of every row of a tile: steps = padded_in_features / 8.
//   4 bits: codes uint8 [tiles, steps, 64]: byte 4*r + b of step t of tile i = byte 4*t + b of the
//           row-major packed row 16*i + r (codes 8t..8t+7 of that row, code 8t + c in bits
//           [4c, 4c+4) of lane r).
//   6 bits: codes uint8 [tiles, steps / 2, 192]: steps in pairs (group sizes a multiple of 16). Pair
//           u holds the low nibbles of its two steps, each laid out as a 4-bit step (bytes 0..63,
//           64..127), then one vector of the codes' top two bits (bytes 128..191): in lane r, field
//           f = 4*p + s (step p of the pair, s = 0..3) holds the top bits of code 16u + 8p + s at
//           bits [2f, 2f+2) and of code 16u + 8p + s + 4 at bits [16+2f, 18+2f).
//   8 bits: codes uint8 [tiles, padded_in_features / 4, 64]: as 4 bits, 4-byte units of the packed
//           rows transposed: lane r of unit u holds codes 4u..4u+3 of row 16*i + r.
//   scale : float16 [tiles, groups, 16] scale[16*i + r, group]
//   zero  : uint8   [tiles, groups, 16] zero[16*i + r, group]
// tiles = ceil(out_features / 16); rows past out_features are zero codes with scale 0 and zero 0.
// A 16-row x 64-input group: 512 (W4), 768 (W6) or 1024 (W8) code bytes + 32 scale bytes + 16 zero
// bytes, 4.375, 6.375 or 8.375 bits/weight, as in the row-major layout.
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileStepCodes = 8;  // codes of one row in one step: one 32-bit lane of nibbles
constexpr int64_t kTileStepBytes = kTileRows * kTileStepCodes * 4 / 8;
constexpr int64_t kTile6PairBytes = 2 * kTileStepBytes + kTileRows * 2 * kTileStepCodes * 2 / 8;
static_assert(kTileStepBytes == 64, "a TILE16 step of nibbles is one 64-byte vector");
static_assert(kTile6PairBytes == 3 * 64, "a 6-bit TILE16 step pair is three 64-byte vectors");
static_assert(kGroupSizeMultiple % kTileStepCodes == 0, "every group is a whole number of steps");
static_assert((kTileRows * 64 * 4 / 8 + kTileRows * 2 + kTileRows) * 8 * 1000 / (kTileRows * 64) == 4375,
              "TILE16 W4 g64 costs 4.375 bits/weight, like the row-major layout");
static_assert((64 / 16 * kTile6PairBytes + kTileRows * 2 + kTileRows) * 8 * 1000 / (kTileRows * 64) == 6375,
              "TILE16 W6 g64 costs 6.375 bits/weight, like the row-major layout");
constexpr int64_t tile_count(int64_t out_features) { return (out_features + kTileRows - 1) / kTileRows; }
constexpr int64_t tile_steps(int64_t in_features, int64_t group_size) {
  return padded_in_features(in_features, group_size) / kTileStepCodes;
}
static_assert((tile_steps(64, 64) * kTileRows * kTileStepCodes * 8 / 8 + kTileRows * 2 + kTileRows) * 8 * 1000 /
                      (kTileRows * 64) == 8375,
              "TILE16 W8 g64 costs 8.375 bits/weight, like the row-major layout");
// Code bytes of one tile, and whether TILE16 holds this bit width and group size.
constexpr int64_t tile_code_bytes(int64_t in_features, int64_t group_size, int bits) {
  return tile_steps(in_features, group_size) * kTileRows * kTileStepCodes * bits / 8;
}
constexpr bool tile16_supports(int bits, int64_t group_size) {
  return ((bits == 4 || bits == 8) && group_size % kTileStepCodes == 0) ||
         (bits == 6 && group_size % (2 * kTileStepCodes) == 0);
}

}  // namespace brecq
