// A whole Llama-family decoder step in C++ (Llama, Mistral, Qwen2, Qwen3): one call per token, or
// per chunk of prompt tokens, instead of some two hundred module calls and tensor ops in Python.
// Weights are not copied: every pointer points into tensors the Python side owns and keeps alive
// (python/brecq/runtime/cpu_decoder.py). The runtime owns its activations and its KV cache.
//
// Numerics follow transformers' eager path on the same model: activations are computed in float32
// and, for a bfloat16 model, rounded to bfloat16 wherever transformers stores a bfloat16 tensor
// (after every linear layer, norm, rotary op, activation and residual add), so the logits agree
// to float tolerance, not merely in top-1.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace brecq {
struct TileEpilogue;  // brecq/kernels.h
namespace detail {
class TeamShares;  // csrc/cpu/team_shares.h
}

// The index of the largest of x[0, n) as torch.argmax picks it: a NaN counts as larger than any
// number, -0 equals +0, and of equal values the first wins. -1 when n is 0.
int64_t first_argmax(const float* x, int64_t n);

enum class WeightKind : int {
  kPackedRows = 0,  // docs/FORMAT.md row-major codes (packed_gemv)
  kTile16 = 1,      // the AVX-512 TILE16 layout (tiled_gemv)
  kDenseF32 = 2,    // an unquantized [n, k] float32 weight
  kDenseBf16 = 3,   // an unquantized [n, k] bfloat16 weight (bits)
};

struct LinearWeights {
  WeightKind kind = WeightKind::kDenseF32;
  const uint8_t* codes = nullptr;    // packed kinds
  const uint16_t* scale = nullptr;   // float16 bits
  const uint8_t* zero = nullptr;
  const void* dense = nullptr;       // dense kinds, [n, k]
  const float* bias = nullptr;       // [n] float32, or null
  int64_t n = 0, k = 0;
  int bits = 0;
  int64_t group_size = 0;
};

struct DecoderLayerWeights {
  const float* input_norm = nullptr;           // [hidden]
  const float* post_attention_norm = nullptr;  // [hidden]
  const float* q_norm = nullptr;               // [head_dim] (Qwen3), or null
  const float* k_norm = nullptr;
  LinearWeights q, k, v, o, gate, up, down;
  int64_t sliding_window = 0;  // keys visible to a query (itself included); 0: all
};

struct DecoderConfig {
  int64_t hidden = 0, intermediate = 0, q_heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  float rms_eps = 1e-6f;
  bool bf16 = false;            // activations rounded, and the KV cache held, as a bfloat16 model's
  float attention_scale = 0.0f;
  float rope_attention_scaling = 1.0f;
  std::vector<float> inv_freq;  // [head_dim / 2] rotary frequencies (rope scaling already applied)
};

class Decoder {
 public:
  // embedding: [vocab, hidden], float32, or bfloat16 bits when embedding_bf16. final_norm: [hidden].
  Decoder(DecoderConfig config, const void* embedding, bool embedding_bf16, const float* final_norm,
          LinearWeights lm_head, std::vector<DecoderLayerWeights> layers, int threads);
  ~Decoder();  // where TeamShares is complete

  // Runs `count` tokens at positions length() .. length() + count - 1 and appends them to the cache.
  // logits: [vocab] float32 for the last token, or [count, vocab] when all_logits.
  void forward(const int64_t* tokens, int64_t count, float* logits, bool all_logits);
  // forward() with last-token logits, returning first_argmax of them: greedy decoding's next
  // token, found by the step's threads as they finish the logits instead of in a pass of its own.
  int64_t forward_greedy(const int64_t* tokens, int64_t count, float* logits);

  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  // Forgets positions from `length` on (a shorter prefix stays usable).
  void truncate(int64_t length);
  // Grows the cache to hold at least `positions` tokens (it also grows by itself, doubling).
  void reserve(int64_t positions);
  // Replaces the cache with `count` positions per layer taken from another runtime's cache (a
  // batched prefill): keys/values [kv_heads, count, head_dim] with the given strides (elements),
  // float32, or bfloat16 bits for a bfloat16 model; rotary already applied, as transformers keeps them.
  void set_cache(int64_t layer, const void* keys, const void* values, int64_t count, int64_t stride_h,
                 int64_t stride_l);
  void set_length(int64_t length);
  void set_threads(int threads);  // the work-sharing state follows the team size
  int threads() const { return threads_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // Where the time of forward() goes, summed over calls since the last reset, in seconds: the
  // linear layers (weights streamed), the attention over the cache, and everything else.
  enum Section : int { kLinear = 0, kLmHead = 1, kAttention = 2, kOther = 3, kSections = 4 };
  void set_profiling(bool on) { profiling_ = on; }
  std::vector<double> profile() const { return std::vector<double>(profile_, profile_ + kSections); }
  void reset_profile() { for (double& t : profile_) t = 0.0; }

 private:
  void run_tokens(const int64_t* tokens, int64_t count, float* logits, bool all_logits, int64_t* argmax);
  void run_chunk(const int64_t* tokens, int64_t count, float* logits, bool all_logits, int64_t* argmax);
  void run_layers(const int64_t* tokens, int64_t count, float* logits, bool all_logits, int64_t* argmax);
  void finish_logits(float* logits, int64_t rows, int64_t* argmax);
  void linear(const LinearWeights& w, const float* x, const uint16_t* x_bits, int64_t rows, float* y);
  bool linear_batch(const LinearWeights* const* weights, float* const* outputs, int count, const float* x,
                    int64_t rows, const TileEpilogue* after_tile = nullptr);
  static const uint16_t* bf16_copy(const float* x, int64_t count);
  static float* thread_floats(int slot, int64_t count);
  void add_residual(float* stream, const float* proj, int64_t count) const;
  void round_activations(float* x, int64_t count) const;
  void norm_rows(const float* x, int64_t rows, int64_t n, const float* weight, float* out) const;
  void rotary_tables(int64_t position, float* cos_v, float* sin_v) const;
  void rotate(float* x, const float* cos_v, const float* sin_v, float* out) const;
  void finish_head(const DecoderLayerWeights& layer, size_t li, int64_t r, int64_t head);
  size_t cache_elements(int64_t positions) const;

  DecoderConfig config_;
  const void* embedding_;
  bool embedding_bf16_;
  const float* final_norm_;
  LinearWeights lm_head_;
  std::vector<DecoderLayerWeights> layers_;
  int threads_;
  // The step's work-sharing state, shared by its team's threads (team_shares.h). Owned: a copy of
  // the decoder would share it, and two steps at once would mix their requests.
  std::unique_ptr<detail::TeamShares> shares_;
  // Each thread's largest logit so far in forward_greedy (key, index), a cache line each.
  struct alignas(64) ArgmaxSlot {
    uint32_t key;
    int64_t index;
  };
  std::vector<ArgmaxSlot> argmax_slots_;
  bool profiling_ = false;
  double profile_[kSections] = {0.0, 0.0, 0.0, 0.0};

  int64_t length_ = 0, capacity_ = 0;
  // Per layer [kv_heads, capacity, head_dim]: float32, or bfloat16 bits for a bfloat16 model.
  std::vector<std::vector<uint8_t>> keys_, values_;
  // Activations of one chunk shared by the team (the residual stream is each thread's own:
  // add_residual).
  std::vector<float> q_, k_, v_, attn_, proj_, gate_, up_, rotary_;
  std::vector<uint16_t> q_bits_, attn_bits_;
};

}  // namespace brecq
