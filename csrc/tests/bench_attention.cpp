// Standalone decode-attention timing without Python (perf, valgrind):
//   brecq_attention_bench [kv_len=2048] [layers=28] [kv_heads=8] [group=2] [head_dim=128] [threads=2]
//                         [reps=30] [bf16=1]
// One "step" is one decode_attention call per layer over that layer's cache, [1, kv_heads, kv_len,
// head_dim] keys and values as the decoder keeps them; layers=1 keeps one layer's cache hot in cache
// (the kernel's compute alone), 28 layers at 2048 tokens (235 MB) stream from memory as a decode step
// of Qwen3-0.6B does. Each step alternates with a plain read of another set of caches of the same
// size on as many threads: the rate those bytes can be read at, measured in the same seconds.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_weights.h"
#include "brecq/kernels.h"

int main(int argc, char** argv) {
  using namespace brecq;
  auto arg = [&](int i, long fallback) { return argc > i ? std::atol(argv[i]) : fallback; };
  const int64_t kv_len = arg(1, 2048), layers = arg(2, 28), kv_heads = arg(3, 8), group = arg(4, 2);
  const int64_t head_dim = arg(5, 128);
  const int threads = static_cast<int>(arg(6, 2));
  const int reps = static_cast<int>(arg(7, 30));
  const bool bf16 = arg(8, 1) != 0;
  if (kv_len < 1 || layers < 1 || kv_heads < 1 || group < 1 || group > kMaxDecodeGroup || head_dim < 1) {
    std::fprintf(stderr, "expected kv_len, layers, kv_heads, head_dim >= 1 and 1 <= group <= %lld\n",
                 static_cast<long long>(kMaxDecodeGroup));
    return 2;
  }
  const int64_t element = bf16 ? 2 : 4;
  const int64_t per_layer = kv_heads * kv_len * head_dim * element;  // bytes of K (and of V)
  const int64_t q_bytes = kv_heads * group * head_dim * element;
  // Two sets of caches: the step reads one while the plain read takes the other, then they swap.
  std::vector<uint8_t> caches(static_cast<size_t>(2 * 2 * layers * per_layer));
  for (size_t i = 0; i < caches.size(); ++i) caches[i] = static_cast<uint8_t>(bf16 ? (i & 1 ? 0x3e : i * 7) : 0);
  if (!bf16) {
    float* values = reinterpret_cast<float*>(caches.data());
    for (size_t i = 0; i < caches.size() / 4; ++i) values[i] = 0.01f * static_cast<float>(i % 97);
  }
  std::vector<uint8_t> q(static_cast<size_t>(q_bytes), 0x3c), out(static_cast<size_t>(q_bytes));
  const int64_t stride_l = head_dim, stride_h = kv_len * head_dim, stride_b = kv_heads * stride_h;
  std::vector<double> step_times, read_times;
  uint64_t sink = 0;
  for (int i = 0; i < reps; ++i) {
    const uint8_t* set = caches.data() + (i % 2) * 2 * layers * per_layer;
    auto start = std::chrono::steady_clock::now();
    for (int64_t l = 0; l < layers; ++l) {
      const uint8_t* k = set + 2 * l * per_layer;
      decode_attention(q.data(), k, k + per_layer, nullptr, bf16, 1, kv_heads * group, kv_heads, kv_len, head_dim,
                       stride_b, stride_h, stride_l, stride_b, stride_h, stride_l, 0, 0.088f, out.data(), threads);
    }
    step_times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    sink ^= out[0];

    start = std::chrono::steady_clock::now();
    sink ^= brecq_bench::fold_bytes(caches.data() + ((i + 1) % 2) * 2 * layers * per_layer, 2 * layers * per_layer,
                                    threads);
    read_times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const double step = brecq_bench::median_of(step_times), read = brecq_bench::median_of(read_times);
  const double bytes = 2.0 * layers * per_layer;
  std::printf("decode attention kv_len=%lld layers=%lld kv_heads=%lld group=%lld head_dim=%lld %s threads=%d isa=%s: "
              "median %.1f us a step, %.1f GB/s of cache; plain read of the same bytes %.1f us, %.1f GB/s "
              "(attention at %.0f%% of it)%s\n",
              static_cast<long long>(kv_len), static_cast<long long>(layers), static_cast<long long>(kv_heads),
              static_cast<long long>(group), static_cast<long long>(head_dim), bf16 ? "bf16" : "f32", threads,
              isa_name(active_isa()), step * 1e6, bytes / step / 1e9, read * 1e6, bytes / read / 1e9,
              100.0 * read / step, sink == 42 ? " " : "");
  return 0;
}
