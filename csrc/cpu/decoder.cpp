// The decoder step of brecq/decoder.h. Each linear layer and the attention are the project's own
// kernels (packed_gemv, tiled_gemv, decode_attention); everything between them (norms, rotary,
// cache appends, SiLU x up, residuals) is short loops over one token's few thousand activations,
// done here inside the step's one OpenMP region: at decode size a region of their own, or a barrier
// around one thread's work, costs more than the work.
#include "brecq/decoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include <omp.h>

#include "brecq/kernels.h"
#include "gemv.h"
#include "numeric.h"

namespace brecq {
namespace {

// Rows per pass of the packed kernels: tiled_gemv re-reads a tile from cache every 4 rows and is
// meant for up to 8, so longer prompts go through in chunks of 8 tokens.
constexpr int64_t kChunk = 8;
// Elements per share of an elementwise step split among the team.
constexpr int64_t kEltwiseBlock = 512;
// Logits per share of their bfloat16 rounding (a vocabulary of 150k is too long for one thread).
constexpr int64_t kRoundBlock = 8192;

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline float round_bf16(float x) { return numeric::bf16_to_f32(numeric::f32_to_bf16(x)); }

// gate[i] = SiLU(gate[i]) x up[i] for i in [begin, end), rounded as transformers rounds a bfloat16
// model's act_fn(gate_proj(x)) * up_proj(x).
void silu_mul(float* gate, const float* up, int64_t begin, int64_t end, bool bf16) {
  if (bf16) {
    for (int64_t i = begin; i < end; ++i) {
      const float gi = round_bf16(gate[i]);
      gate[i] = round_bf16(round_bf16(gi / (1.0f + numeric::exp_branchless(-gi))) * round_bf16(up[i]));
    }
  } else {
    for (int64_t i = begin; i < end; ++i) gate[i] = gate[i] / (1.0f + numeric::exp_branchless(-gate[i])) * up[i];
  }
}

// SiLU x up as gate/up's tile epilogue: columns [begin, end) of every row.
struct SiluMulColumns {
  float* gate;
  const float* up;
  int64_t rows, width;
  bool bf16;
  static void run(void* context, int64_t begin, int64_t end) {
    const SiluMulColumns& c = *static_cast<const SiluMulColumns*>(context);
    for (int64_t r = 0; r < c.rows; ++r) silu_mul(c.gate + r * c.width, c.up + r * c.width, begin, end, c.bf16);
  }
};

// An unsigned integer in torch.argmax's order of floats: a NaN above every number, -0 as +0, the
// rest as their values order (a negative float's bits inverted, a positive one's top bit set).
// Every number's key is above 0 (-inf's is 0x007fffff), so 0 stands for "none yet". Written with
// masks, not branches, so that the loops over it vectorize.
inline uint32_t argmax_key(uint32_t bits) {
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  const uint32_t key = bits ^ (negative | 0x80000000u);
  const uint32_t zero = 0u - static_cast<uint32_t>(magnitude == 0u);
  const uint32_t nan = 0u - static_cast<uint32_t>(magnitude > 0x7f800000u);
  return (key & ~zero) | (0x80000000u & zero) | nan;
}

struct Largest {
  uint32_t key = 0;
  int64_t index = -1;
  bool beaten_by(uint32_t k, int64_t i) const { return i >= 0 && (index < 0 || k > key || (k == key && i < index)); }
  void take(uint32_t k, int64_t i) {
    if (beaten_by(k, i)) key = k, index = i;
  }
};

// Whether any of the kRunKeys values at `bits` has key `top`: no early exit, so that it vectorizes.
constexpr int64_t kRunKeys = 64;
inline bool run_has_key(const uint32_t* bits, uint32_t top) {
  uint32_t hit = 0;
  for (int64_t j = 0; j < kRunKeys; ++j) hit |= static_cast<uint32_t>(argmax_key(bits[j]) == top);
  return hit != 0;
}

// Folds x[0, n) (indices from `offset`) into `best`: a max over the keys, and only when that could
// beat `best`, a search for the first index that has it, a run of 64 at a time. Both vectorize
// (about 30 us for 151936 values on one thread, against 150 us with a scalar search).
void fold_largest(const float* x, int64_t n, int64_t offset, Largest& best) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = argmax_key(bits[i]);
    top = top > k ? top : k;
  }
  if (n == 0 || !best.beaten_by(top, offset)) return;  // not even the run's first index could win
  int64_t i = 0;
  while (i + kRunKeys <= n && !run_has_key(bits + i, top)) i += kRunKeys;
  while (argmax_key(bits[i]) != top) ++i;  // top is there: it is the max of these keys
  best.take(top, offset + i);
}

void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("brecq decoder: " + message);
}

void check_linear(const LinearWeights& w, int64_t n, int64_t k, const std::string& name) {
  check(w.n == n && w.k == k, name + " has shape [" + std::to_string(w.n) + ", " + std::to_string(w.k) +
                                  "], expected [" + std::to_string(n) + ", " + std::to_string(k) + "]");
  const bool packed = w.kind == WeightKind::kPackedRows || w.kind == WeightKind::kTile16;
  check(packed ? (w.codes && w.scale && w.zero) : w.dense != nullptr, name + " has no weights");
}

// y[r, :] = W x[r, :] + bias for an unquantized weight: rows of W split across threads, each row
// read once for all the chunk's tokens.
template <bool kBf16>
void dense_gemv(const LinearWeights& w, const float* x, int64_t rows, float* y, int threads) {
  const int64_t n = w.n, k = w.k;
  detail::for_each_index(n, threads, [&](int64_t i) {
    const float* wf = static_cast<const float*>(w.dense) + i * k;
    const uint16_t* wb = static_cast<const uint16_t*>(w.dense) + i * k;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * k;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < k; ++j) {
        const float wij = kBf16 ? numeric::bits_to_f32(static_cast<uint32_t>(wb[j]) << 16) : wf[j];
        sum += wij * xr[j];
      }
      y[r * n + i] = sum + (w.bias ? w.bias[i] : 0.0f);
    }
  });
}

}  // namespace

int64_t first_argmax(const float* x, int64_t n) {
  Largest best;
  fold_largest(x, n, 0, best);
  return best.index;
}

Decoder::Decoder(DecoderConfig config, const void* embedding, bool embedding_bf16, const float* final_norm,
                 LinearWeights lm_head, std::vector<DecoderLayerWeights> layers, int threads)
    : config_(std::move(config)),
      embedding_(embedding),
      embedding_bf16_(embedding_bf16),
      final_norm_(final_norm),
      lm_head_(lm_head),
      layers_(std::move(layers)),
      threads_(threads < 1 ? 1 : threads),
      shares_(std::make_unique<detail::TeamShares>(threads_)) {
  const DecoderConfig& c = config_;
  check(c.hidden > 0 && c.intermediate > 0 && c.q_heads > 0 && c.kv_heads > 0 && c.head_dim > 0 && c.vocab > 0,
        "every size in the config must be positive");
  check(c.q_heads % c.kv_heads == 0, "q_heads must be a multiple of kv_heads");
  check(c.q_heads / c.kv_heads <= kMaxDecodeGroup, "more query heads per key/value head than decode_attention holds");
  check(c.head_dim % 2 == 0 && static_cast<int64_t>(c.inv_freq.size()) == c.head_dim / 2,
        "inv_freq must hold head_dim / 2 frequencies");
  check(embedding_ && final_norm_, "embedding and final norm are required");
  check(!layers_.empty(), "a decoder needs at least one layer");
  const int64_t qd = c.q_heads * c.head_dim, kvd = c.kv_heads * c.head_dim;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayerWeights& l = layers_[i];
    const std::string at = "layer " + std::to_string(i) + " ";
    check(l.input_norm && l.post_attention_norm, at + "has no norm weights");
    check((l.q_norm == nullptr) == (l.k_norm == nullptr), at + "has one of q_norm and k_norm");
    check(l.sliding_window >= 0, at + "sliding_window must be >= 0");
    check_linear(l.q, qd, c.hidden, at + "q_proj");
    check_linear(l.k, kvd, c.hidden, at + "k_proj");
    check_linear(l.v, kvd, c.hidden, at + "v_proj");
    check_linear(l.o, c.hidden, qd, at + "o_proj");
    check_linear(l.gate, c.intermediate, c.hidden, at + "gate_proj");
    check_linear(l.up, c.intermediate, c.hidden, at + "up_proj");
    check_linear(l.down, c.hidden, c.intermediate, at + "down_proj");
  }
  check_linear(lm_head_, c.vocab, c.hidden, "lm_head");
  keys_.resize(layers_.size());
  values_.resize(layers_.size());
  q_.resize(kChunk * qd);
  k_.resize(kChunk * kvd);
  v_.resize(kChunk * kvd);
  attn_.resize(kChunk * qd);
  proj_.resize(kChunk * c.hidden);
  gate_.resize(kChunk * c.intermediate);
  up_.resize(kChunk * c.intermediate);
  q_bits_.resize(kChunk * qd);
  attn_bits_.resize(kChunk * qd);
  rotary_.resize(kChunk * c.head_dim);
  reserve(256);
}

size_t Decoder::cache_elements(int64_t positions) const {
  return static_cast<size_t>(config_.kv_heads * positions * config_.head_dim) * (config_.bf16 ? 2 : 4);
}

void Decoder::reserve(int64_t positions) {
  if (positions <= capacity_) return;
  const int64_t grown = std::max(positions, 2 * capacity_);
  const int64_t row = config_.head_dim * (config_.bf16 ? 2 : 4);  // bytes per position and head
  for (size_t l = 0; l < layers_.size(); ++l) {
    for (auto* cache : {&keys_[l], &values_[l]}) {
      std::vector<uint8_t> bigger(cache_elements(grown));
      for (int64_t h = 0; h < config_.kv_heads; ++h)
        if (length_ > 0) std::memcpy(bigger.data() + h * grown * row, cache->data() + h * capacity_ * row, length_ * row);
      cache->swap(bigger);
    }
  }
  capacity_ = grown;
}

void Decoder::truncate(int64_t length) {
  check(length >= 0 && length <= length_, "truncate: length must be in [0, " + std::to_string(length_) + "]");
  length_ = length;
}

void Decoder::set_length(int64_t length) {
  check(length >= 0 && length <= capacity_, "set_length: length must be in [0, capacity]");
  length_ = length;
}

void Decoder::set_cache(int64_t layer, const void* keys, const void* values, int64_t count, int64_t stride_h,
                        int64_t stride_l) {
  check(layer >= 0 && layer < num_layers(), "set_cache: layer out of range");
  reserve(count);
  const int64_t d = config_.head_dim, elem = config_.bf16 ? 2 : 4;
  for (int pass = 0; pass < 2; ++pass) {
    const uint8_t* src = static_cast<const uint8_t*>(pass == 0 ? keys : values);
    uint8_t* dst = (pass == 0 ? keys_ : values_)[layer].data();
    for (int64_t h = 0; h < config_.kv_heads; ++h)
      for (int64_t p = 0; p < count; ++p)
        std::memcpy(dst + ((h * capacity_ + p) * d) * elem, src + (h * stride_h + p * stride_l) * elem, d * elem);
  }
}

Decoder::~Decoder() = default;

// A team of the new size gets work-sharing slots of its size (run_chunk keeps the static split for
// a team whose size differs from the slots').
void Decoder::set_threads(int threads) {
  threads_ = threads < 1 ? 1 : threads;
  if (shares_->size() != threads_) shares_ = std::make_unique<detail::TeamShares>(threads_);
}

void Decoder::round_activations(float* x, int64_t count) const {
  if (!config_.bf16) return;
  for (int64_t i = 0; i < count; ++i) x[i] = round_bf16(x[i]);
}

// transformers' RMSNorm: weight * dtype(x * rsqrt(mean(x^2) + eps)), the mean in float32.
void Decoder::norm_rows(const float* x, int64_t rows, int64_t n, const float* weight, float* out) const {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    const float squares = numeric::sum_of_squares(xr, n);
    const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(n) + config_.rms_eps);
    float* o = out + r * n;
    if (config_.bf16) {
      for (int64_t i = 0; i < n; ++i) o[i] = round_bf16(weight[i] * round_bf16(xr[i] * inverse));
    } else {
      for (int64_t i = 0; i < n; ++i) o[i] = weight[i] * (xr[i] * inverse);
    }
  }
}

// The rotary cos and sin of a position, in the activations' dtype (head_dim / 2 each): computed
// once per token, not once per layer and projection.
void Decoder::rotary_tables(int64_t position, float* cos_v, float* sin_v) const {
  for (int64_t i = 0; i < config_.head_dim / 2; ++i) {
    const float angle = config_.inv_freq[i] * static_cast<float>(position);
    float c = std::cos(angle) * config_.rope_attention_scaling, s = std::sin(angle) * config_.rope_attention_scaling;
    if (config_.bf16) c = round_bf16(c), s = round_bf16(s);
    cos_v[i] = c, sin_v[i] = s;
  }
}

// Rotary embedding of one head, as transformers' rotate_half form: x * cos + rotate_half(x) * sin.
// Written through `out` (head_dim floats apart from x) so that the loops vectorize.
void Decoder::rotate(float* x, const float* cos_v, const float* sin_v, float* out) const {
  const int64_t half = config_.head_dim / 2;
  if (config_.bf16) {
    for (int64_t i = 0; i < half; ++i)
      out[i] = round_bf16(round_bf16(x[i] * cos_v[i]) + round_bf16(-x[i + half] * sin_v[i]));
    for (int64_t i = 0; i < half; ++i)
      out[i + half] = round_bf16(round_bf16(x[i + half] * cos_v[i]) + round_bf16(x[i] * sin_v[i]));
  } else {
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos_v[i] + -x[i + half] * sin_v[i];
    for (int64_t i = 0; i < half; ++i) out[i + half] = x[i + half] * cos_v[i] + x[i] * sin_v[i];
  }
  std::memcpy(x, out, 2 * half * sizeof(float));
}

// What happens to one head of the q/k/v projections between their kernels and the attention:
// rounded as transformers stores them; q and k normed (Qwen3) and rotated; q as bfloat16 bits for
// the attention kernel, k and v appended to the cache in its dtype. head: [0, q_heads) are q's,
// then kv_heads of k, then kv_heads of v.
void Decoder::finish_head(const DecoderLayerWeights& layer, size_t li, int64_t r, int64_t head) {
  const DecoderConfig& c = config_;
  const int64_t d = c.head_dim, qd = c.q_heads * d, kvd = c.kv_heads * d;
  const float* cos_r = rotary_.data() + r * d;  // cos then sin, head_dim / 2 each
  float* scratch = thread_floats(1, d);
  const int64_t position = length_ + r;
  if (head < c.q_heads) {
    float* x = q_.data() + r * qd + head * d;
    round_activations(x, d);
    if (layer.q_norm) norm_rows(x, 1, d, layer.q_norm, x);
    rotate(x, cos_r, cos_r + d / 2, scratch);
    if (c.bf16)
      for (int64_t i = 0; i < d; ++i) q_bits_[r * qd + head * d + i] = numeric::f32_to_bf16(x[i]);
    return;
  }
  const bool key = head < c.q_heads + c.kv_heads;
  const int64_t h = key ? head - c.q_heads : head - c.q_heads - c.kv_heads;
  float* x = (key ? k_ : v_).data() + r * kvd + h * d;
  round_activations(x, d);
  if (key) {
    if (layer.k_norm) norm_rows(x, 1, d, layer.k_norm, x);
    rotate(x, cos_r, cos_r + d / 2, scratch);
  }
  uint8_t* dst = (key ? keys_ : values_)[li].data() + (h * capacity_ + position) * d * (c.bf16 ? 2 : 4);
  if (c.bf16) {
    uint16_t* out = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < d; ++i) out[i] = numeric::f32_to_bf16(x[i]);
  } else {
    std::memcpy(dst, x, d * sizeof(float));
  }
}

// Called by every thread of the step's team (run_chunk): the kernels share out their rows and end
// with the team's barrier. y is left as the kernels write it, in float32: for a bfloat16 model the
// step that reads y next rounds it (there is no barrier to spare for a pass of its own).
// x_bits, when given, is x as bfloat16 bits already (the attention's output).
void Decoder::linear(const LinearWeights& w, const float* x, const uint16_t* x_bits, int64_t rows, float* y) {
  const bool timing = profiling_ && omp_get_thread_num() == 0;
  const double started = timing ? now_seconds() : 0.0;
  // A bfloat16 model's activations are bfloat16 values already: handing them to the packed kernels
  // as bfloat16 lets the AVX-512 ones multiply pairs with VDPBF16PS, as the transformers path does.
  const bool packed = w.kind == WeightKind::kPackedRows || w.kind == WeightKind::kTile16;
  const bool as_bits = config_.bf16 && packed;
  if (x_bits && !as_bits) {  // a dense layer reads float32: each thread widens its own copy
    float* widened = thread_floats(1, rows * w.k);
    for (int64_t i = 0; i < rows * w.k; ++i) widened[i] = numeric::bf16_to_f32(x_bits[i]);
    x = widened;
  }
  const void* input = !as_bits ? static_cast<const void*>(x)
                      : x_bits ? static_cast<const void*>(x_bits)
                               : static_cast<const void*>(bf16_copy(x, rows * w.k));
  switch (w.kind) {
    case WeightKind::kPackedRows:
      packed_gemv(input, as_bits, rows, w.k, w.codes, w.scale, w.zero, w.bias, w.n, w.k, w.bits, w.group_size, y,
                  false, threads_);
      break;
    case WeightKind::kTile16:
      tiled_gemv(input, as_bits, rows, w.k, w.codes, w.scale, w.zero, w.bias, w.n, w.k, w.bits, w.group_size, y,
                 false, threads_);
      break;
    case WeightKind::kDenseBf16: dense_gemv<true>(w, x, rows, y, threads_); break;
    default: dense_gemv<false>(w, x, rows, y, threads_); break;
  }
  if (timing) profile_[&w == &lm_head_ ? kLmHead : kLinear] += now_seconds() - started;
}

// x as bfloat16 bits in the calling thread's own buffer: each thread of the team converts its copy
// (a few thousand values), which costs less than one thread converting behind a barrier.
const uint16_t* Decoder::bf16_copy(const float* x, int64_t count) {
  thread_local std::vector<uint16_t> bits;
  if (bits.size() < static_cast<size_t>(count)) bits.resize(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) bits[i] = numeric::f32_to_bf16(x[i]);
  return bits.data();
}

// A buffer of the calling thread's own (slot 0: a norm's output, slot 1: a widened input, slot 2:
// the residual stream). Every thread of the team computes such short steps (a norm of one token's
// hidden state) for itself, reading shared inputs and writing only here: the same values in each
// thread, and no barrier between the step and the kernel that reads it.
float* Decoder::thread_floats(int slot, int64_t count) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& buffer = buffers[slot];
  if (buffer.size() < static_cast<size_t>(count)) buffer.resize(static_cast<size_t>(count));
  return buffer.data();
}

// stream += proj, each rounded as transformers rounds them, in the calling thread's own copy of the
// residual stream: every thread adds the same values in the same order, so the copies stay equal
// and no thread reads another's (in the host's fast periods each line read from the other core
// costs a round trip of about 340 ns).
void Decoder::add_residual(float* stream, const float* proj, int64_t count) const {
  if (config_.bf16) {
    for (int64_t i = 0; i < count; ++i) stream[i] = round_bf16(stream[i] + round_bf16(proj[i]));
  } else {
    for (int64_t i = 0; i < count; ++i) stream[i] += proj[i];
  }
}

// Projections of one input (q/k/v, gate/up): when all are TILE16, one loop over all their tiles
// (tiled_gemv_batch), so the team meets at one barrier instead of one per projection, and true;
// otherwise one linear() each, and false. `after_tile` (for projections of one width) is then left
// to the caller.
bool Decoder::linear_batch(const LinearWeights* const* weights, float* const* outputs, int count, const float* x,
                           int64_t rows, const TileEpilogue* after_tile) {
  bool together = count > 1 && count <= kMaxTiledBatch;
  for (int i = 0; i < count && together; ++i)
    together = weights[i]->kind == WeightKind::kTile16 && weights[i]->k == weights[0]->k &&
               (!after_tile || weights[i]->n == weights[0]->n);
  if (!together) {
    for (int i = 0; i < count; ++i) linear(*weights[i], x, nullptr, rows, outputs[i]);
    return false;
  }
  const bool timing = profiling_ && omp_get_thread_num() == 0;
  const double started = timing ? now_seconds() : 0.0;
  const int64_t k = weights[0]->k;
  const void* input = config_.bf16 ? static_cast<const void*>(bf16_copy(x, rows * k)) : static_cast<const void*>(x);
  TiledGemvCall calls[kMaxTiledBatch];
  for (int i = 0; i < count; ++i) {
    const LinearWeights& w = *weights[i];
    calls[i].codes = w.codes, calls[i].scale = w.scale, calls[i].zero = w.zero, calls[i].bias = w.bias;
    calls[i].n = w.n, calls[i].bits = w.bits, calls[i].g = w.group_size, calls[i].y = outputs[i];
  }
  tiled_gemv_batch(input, config_.bf16, rows, k, calls, count, threads_, after_tile);
  if (timing) profile_[kLinear] += now_seconds() - started;
  return true;
}

void Decoder::forward(const int64_t* tokens, int64_t count, float* logits, bool all_logits) {
  run_tokens(tokens, count, logits, all_logits, nullptr);
}

int64_t Decoder::forward_greedy(const int64_t* tokens, int64_t count, float* logits) {
  int64_t index = -1;
  run_tokens(tokens, count, logits, false, &index);
  return index;
}

void Decoder::run_tokens(const int64_t* tokens, int64_t count, float* logits, bool all_logits, int64_t* argmax) {
  check(count > 0, "forward needs at least one token");
  for (int64_t i = 0; i < count; ++i)
    check(tokens[i] >= 0 && tokens[i] < config_.vocab,
          "token id " + std::to_string(tokens[i]) + " is outside the vocabulary [0, " + std::to_string(config_.vocab) + ")");
  reserve(length_ + count);
  for (int64_t at = 0; at < count; at += kChunk) {
    const int64_t rows = std::min(kChunk, count - at);
    const bool last = at + rows == count;
    if (all_logits) run_chunk(tokens + at, rows, logits + at * config_.vocab, true, nullptr);
    else run_chunk(tokens + at, rows, last ? logits : nullptr, false, last ? argmax : nullptr);
  }
}

void Decoder::run_chunk(const int64_t* tokens, int64_t rows, float* logits, bool all_logits, int64_t* argmax) {
  const double started = profiling_ ? now_seconds() : 0.0;
  double timed_before = 0.0;
  for (double t : profile_) timed_before += t;
  // One OpenMP region for the whole chunk: the linear layers, the attention and the short steps
  // between them share their work out among its threads (detail::for_each_index, finish_head) or
  // are computed by each thread for itself, instead of a fork and join per kernel (8 per layer).
  // The kernels' items are shared out as team_shares.h describes (a thread out of work takes half
  // of what another has left), so a thread that starts or reads late holds no one up at the barrier.
  shares_->reset();
  if (argmax && argmax_slots_.size() < static_cast<size_t>(threads_)) argmax_slots_.resize(threads_);
#pragma omp parallel num_threads(threads_)
  {
    detail::in_split_team() = true;
    detail::TeamMember& member = detail::team_member();
    // A team smaller than asked for (OMP_THREAD_LIMIT, nesting), or too large for the shares' words,
    // keeps the static split.
    const int team = omp_get_num_threads();
    member = {team == shares_->size() && team <= detail::kMaxSharedTeam ? shares_.get() : nullptr, 0};
    run_layers(tokens, rows, logits, all_logits, argmax);
    member = {};
    detail::in_split_team() = false;
  }
  length_ += rows;
  if (profiling_) {
    double timed_after = 0.0;
    for (double t : profile_) timed_after += t;
    profile_[kOther] += (now_seconds() - started) - (timed_after - timed_before);
  }
}

// Five barriers a layer (17 before): after the q/k/v kernels, the per-head step (finish_head) with the
// attention, o, gate/up with SiLU x up (a sixth for SiLU x up where gate and up are not TILE16) and
// down. The norms and residual adds are computed by every
// thread for itself (add_residual, thread_floats), and each kernel's output is rounded by whichever
// step reads it next, so none of them needs a barrier or a single thread of its own.
void Decoder::run_layers(const int64_t* tokens, int64_t rows, float* logits, bool all_logits, int64_t* argmax) {
  const DecoderConfig& c = config_;
  const int64_t hid = c.hidden, d = c.head_dim, qd = c.q_heads * d, inter = c.intermediate;
  const int64_t group = c.q_heads / c.kv_heads;
  const int64_t start = length_;
  const int64_t elem = c.bf16 ? 2 : 4;
  const bool timing = profiling_ && omp_get_thread_num() == 0;
  // The residual stream: a copy per thread (add_residual), starting from the tokens' embeddings.
  float* stream = thread_floats(2, rows * hid);
  const float* pending = nullptr;  // a projection not yet added to the stream
  for (int64_t r = 0; r < rows; ++r) {
    float* h = stream + r * hid;
    if (embedding_bf16_) {
      const uint16_t* e = static_cast<const uint16_t*>(embedding_) + tokens[r] * hid;
      for (int64_t i = 0; i < hid; ++i) h[i] = numeric::bf16_to_f32(e[i]);
    } else {
      std::memcpy(h, static_cast<const float*>(embedding_) + tokens[r] * hid, hid * sizeof(float));
    }
  }
  // The rotary tables are first read after q/k/v's kernels, past their barrier.
#pragma omp single nowait
  for (int64_t r = 0; r < rows; ++r) rotary_tables(start + r, rotary_.data() + r * d, rotary_.data() + r * d + d / 2);

  // Adds the pending projection to the stream and returns its norm, in this thread's own buffer.
  auto settle_and_norm = [&](const float* weight, int64_t first_row) {
    if (pending) add_residual(stream, pending, rows * hid);
    pending = nullptr;
    float* normed = thread_floats(0, rows * hid);
    norm_rows(stream + first_row * hid, rows - first_row, hid, weight, normed);
    return normed;
  };

  for (size_t li = 0; li < layers_.size(); ++li) {
    const DecoderLayerWeights& layer = layers_[li];
    {
      const float* normed = settle_and_norm(layer.input_norm, 0);
      const LinearWeights* weights[] = {&layer.q, &layer.k, &layer.v};
      float* outputs[] = {q_.data(), k_.data(), v_.data()};
      linear_batch(weights, outputs, 3, normed, rows);
    }
    // The per-head step (finish_head) and the attention of each token over the cache up to and
    // including itself; a bfloat16 model's output stays as bits, which o's kernel takes as they are.
    const double attention_started = timing ? now_seconds() : 0.0;
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    auto attend = [&](int64_t r, int64_t first_kv, int64_t kv_count, int threads) {
      const int64_t visible_end = start + r + 1;
      const int64_t first = layer.sliding_window > 0 ? std::max<int64_t>(0, visible_end - layer.sliding_window) : 0;
      const int64_t head_bytes = capacity_ * d * elem, q_at = r * qd + first_kv * group * d;
      const uint8_t* kbase = keys_[li].data() + first_kv * head_bytes + first * d * elem;
      const uint8_t* vbase = values_[li].data() + first_kv * head_bytes + first * d * elem;
      const void* query = c.bf16 ? static_cast<const void*>(q_bits_.data() + q_at) : static_cast<const void*>(q_.data() + q_at);
      void* out = c.bf16 ? static_cast<void*>(attn_bits_.data() + q_at) : static_cast<void*>(attn_.data() + q_at);
      decode_attention(query, kbase, vbase, nullptr, c.bf16, 1, kv_count * group, kv_count, visible_end - first, d, 0,
                       capacity_ * d, d, 0, capacity_ * d, d, 0, c.attention_scale, out, threads);
    };
    if (c.kv_heads >= team) {
      // Each thread takes whole key/value heads (a contiguous share): the per-head step of k's and
      // v's head and of the query heads that read it, then their attention. The attention then reads
      // only what its own thread has just written, and needs no barrier before it (one fewer a
      // layer, and no query or cache line fetched from the other core).
      const int64_t first_kv = me * c.kv_heads / team, end_kv = (me + 1) * c.kv_heads / team;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t h = first_kv; h < end_kv; ++h) {
          for (int64_t j = 0; j < group; ++j) finish_head(layer, li, r, h * group + j);
          finish_head(layer, li, r, c.q_heads + h);
          finish_head(layer, li, r, c.q_heads + c.kv_heads + h);
        }
        if (end_kv > first_kv) {
          const detail::AloneInTeam alone;
          attend(r, first_kv, end_kv - first_kv, 1);
        }
      }
#pragma omp barrier
    } else {
      // Fewer key/value heads than threads: every thread takes every team-size-th head of the
      // per-head step, then the team shares the attention out.
      const int64_t heads = c.q_heads + 2 * c.kv_heads;
      for (int64_t item = me; item < rows * heads; item += team) finish_head(layer, li, item / heads, item % heads);
#pragma omp barrier
      for (int64_t r = 0; r < rows; ++r) attend(r, 0, c.kv_heads, threads_);
    }
    if (timing) profile_[kAttention] += now_seconds() - attention_started;
    linear(layer.o, attn_.data(), c.bf16 ? attn_bits_.data() : nullptr, rows, proj_.data());
    pending = proj_.data();
    {
      // SiLU(gate) x up: when gate and up are TILE16, computed tile by tile by the thread that has just
      // computed that tile of both (one barrier a layer fewer, and no gate or up value read from the
      // other core); otherwise shared among the team after them.
      const float* normed = settle_and_norm(layer.post_attention_norm, 0);
      const LinearWeights* weights[] = {&layer.gate, &layer.up};
      float* outputs[] = {gate_.data(), up_.data()};
      SiluMulColumns silu{gate_.data(), up_.data(), rows, inter, c.bf16};
      const TileEpilogue after_tile{&SiluMulColumns::run, &silu};
      if (!linear_batch(weights, outputs, 2, normed, rows, &after_tile)) {
        const int64_t total = rows * inter;
        detail::for_each_index((total + kEltwiseBlock - 1) / kEltwiseBlock, threads_, [&](int64_t b) {
          silu_mul(gate_.data(), up_.data(), b * kEltwiseBlock, std::min(total, (b + 1) * kEltwiseBlock), c.bf16);
        });
      }
    }
    linear(layer.down, gate_.data(), nullptr, rows, proj_.data());
    pending = proj_.data();
  }

  if (logits) {
    const int64_t first_row = all_logits ? 0 : rows - 1;
    const int64_t out_rows = rows - first_row;
    const float* normed = settle_and_norm(final_norm_, first_row);
    linear(lm_head_, normed, nullptr, out_rows, logits);
    finish_logits(logits, out_rows, argmax);
  }
}

// The logits rounded to bfloat16 for a bfloat16 model, and, when `argmax` is given, the last row's
// first_argmax: each thread takes the largest of each share it rounds, while the share is in its
// cache, and thread 0 picks among the threads' after a barrier (the region's closing barrier then
// publishes it).
void Decoder::finish_logits(float* logits, int64_t rows, int64_t* argmax) {
  const int64_t vocab = config_.vocab, total = rows * vocab, last_row = total - vocab;
  if (!config_.bf16 && !argmax) return;
  Largest mine;
  detail::for_each_index((total + kRoundBlock - 1) / kRoundBlock, threads_, [&](int64_t b) {
    const int64_t begin = b * kRoundBlock, end = std::min(total, begin + kRoundBlock);
    if (config_.bf16) round_activations(logits + begin, end - begin);
    if (argmax && end > last_row) {
      const int64_t from = std::max(begin, last_row);
      fold_largest(logits + from, end - from, from - last_row, mine);
    }
  });
  if (!argmax) return;
  argmax_slots_[omp_get_thread_num()] = {mine.key, mine.index};
#pragma omp barrier
#pragma omp master
  {
    Largest all;
    for (int t = 0; t < omp_get_num_threads(); ++t) all.take(argmax_slots_[t].key, argmax_slots_[t].index);
    *argmax = all.index;
  }
}

}  // namespace brecq
