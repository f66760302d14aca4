// pybind11 face of the CPU kernels: raw addresses in, nothing of libtorch linked, so one build
// works with any torch release. brecq_ext/ops.py validates every argument before calling here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "brecq/decoder.h"
#include "brecq/format.h"
#include "brecq/kernels.h"

namespace py = pybind11;
using brecq::Isa;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

Isa isa_from_name(const std::string& name) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx512vnni") return Isa::kAvx512Vnni;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  throw std::invalid_argument("isa must be one of 'avx512', 'avx512vnni', 'avx2', 'scalar', got '" + name + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "brecq CPU kernels (raw-pointer interface; use brecq_ext.ops instead)";
  m.attr("FORMAT_VERSION") = brecq::kFormatVersion;

  m.def("detected_isa", [] { return std::string(brecq::isa_name(brecq::detect_isa())); });
  m.def("active_isa", [] { return std::string(brecq::isa_name(brecq::active_isa())); });
  m.def("set_isa", [](const std::string& name) {
    return std::string(brecq::isa_name(brecq::set_isa(isa_from_name(name))));
  });

  py::call_guard<py::gil_scoped_release> nogil;

  m.def("quant_params", [](std::uintptr_t w, int64_t n, int64_t k, int bits, int64_t g, int steps,
                           std::uintptr_t scale, std::uintptr_t zero, int threads) {
    brecq::quant_params(ptr<const float>(w), n, k, bits, g, steps, ptr<uint16_t>(scale),
                        ptr<uint8_t>(zero), threads);
  }, nogil);
  m.def("quantize", [](std::uintptr_t w, std::uintptr_t scale, std::uintptr_t zero, int64_t n,
                       int64_t k, int bits, int64_t g, std::uintptr_t codes, int threads) {
    brecq::quantize(ptr<const float>(w), ptr<const uint16_t>(scale), ptr<const uint8_t>(zero), n, k,
                    bits, g, ptr<uint8_t>(codes), threads);
  }, nogil);
  m.def("dequantize", [](std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zero, int64_t n,
                         int64_t k, int64_t g, std::uintptr_t out, int threads) {
    brecq::dequantize(ptr<const uint8_t>(codes), ptr<const uint16_t>(scale),
                      ptr<const uint8_t>(zero), n, k, g, ptr<float>(out), threads);
  }, nogil);
  m.def("fake_quantize", [](std::uintptr_t w, std::uintptr_t scale, std::uintptr_t zero, int64_t n,
                            int64_t k, int bits, int64_t g, std::uintptr_t out, int threads) {
    brecq::fake_quantize(ptr<const float>(w), ptr<const uint16_t>(scale), ptr<const uint8_t>(zero),
                         n, k, bits, g, ptr<float>(out), threads);
  }, nogil);
  m.def("first_argmax", [](std::uintptr_t x, int64_t n) { return brecq::first_argmax(ptr<const float>(x), n); },
        "Index of the largest of n float32 values as torch.argmax picks it (NaN largest, first of ties)");
  m.def("adaround_forward", [](std::uintptr_t w, std::uintptr_t v, std::uintptr_t scale,
                               std::uintptr_t zero, int64_t n, int64_t k, int bits, int64_t g,
                               std::uintptr_t out, int threads) {
    brecq::adaround_forward(ptr<const float>(w), ptr<const float>(v), ptr<const uint16_t>(scale),
                            ptr<const uint8_t>(zero), n, k, bits, g, ptr<float>(out), threads);
  }, nogil);
  m.def("adaround_backward", [](std::uintptr_t grad_out, std::uintptr_t w, std::uintptr_t v,
                                std::uintptr_t scale, std::uintptr_t zero, int64_t n, int64_t k,
                                int bits, int64_t g, std::uintptr_t grad_v, int threads) {
    brecq::adaround_backward(ptr<const float>(grad_out), ptr<const float>(w), ptr<const float>(v),
                             ptr<const uint16_t>(scale), ptr<const uint8_t>(zero), n, k, bits, g,
                             ptr<float>(grad_v), threads);
  }, nogil);
  m.def("adaround_regularizer", [](std::uintptr_t v, int64_t count, float beta,
                                   std::uintptr_t grad_v, int threads) {
    return brecq::adaround_regularizer(ptr<const float>(v), count, beta, ptr<float>(grad_v), threads);
  }, nogil);
  m.def("pack", [](std::uintptr_t codes, int64_t n, int64_t k, int bits, int64_t g,
                   std::uintptr_t packed, int threads) {
    return brecq::pack(ptr<const uint8_t>(codes), n, k, bits, g, ptr<uint8_t>(packed), threads);
  }, nogil);
  m.def("unpack", [](std::uintptr_t packed, int64_t n, int64_t k, int bits, int64_t g,
                     std::uintptr_t codes, int threads) {
    brecq::unpack(ptr<const uint8_t>(packed), n, k, bits, g, ptr<uint8_t>(codes), threads);
  }, nogil);
  m.def("dequantize_packed", [](std::uintptr_t packed, std::uintptr_t scale, std::uintptr_t zero,
                                int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t out,
                                bool out_bf16, int threads) {
    brecq::dequantize_packed(ptr<const uint8_t>(packed), ptr<const uint16_t>(scale),
                             ptr<const uint8_t>(zero), n, k, bits, g, ptr<void>(out), out_bf16,
                             threads);
  }, nogil);
  m.def("packed_gemv", [](std::uintptr_t x, bool x_is_bf16, int64_t m_rows, int64_t x_stride,
                          std::uintptr_t packed, std::uintptr_t scale, std::uintptr_t zero,
                          std::uintptr_t bias, int64_t n, int64_t k, int bits, int64_t g,
                          std::uintptr_t y, bool y_is_bf16, int threads) {
    brecq::packed_gemv(ptr<const void>(x), x_is_bf16, m_rows, x_stride, ptr<const uint8_t>(packed),
                       ptr<const uint16_t>(scale), ptr<const uint8_t>(zero),
                       bias ? ptr<const float>(bias) : nullptr, n, k, bits, g, ptr<void>(y), y_is_bf16,
                       threads);
  }, nogil);
  m.def("dequantize_tiled", [](std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zero, int64_t n,
                               int64_t k, int bits, int64_t g, std::uintptr_t out, bool out_bf16, int threads) {
    brecq::dequantize_tiled(ptr<const uint8_t>(codes), ptr<const uint16_t>(scale), ptr<const uint8_t>(zero), n, k,
                            bits, g, ptr<void>(out), out_bf16, threads);
  }, nogil);
  m.def("tiled_gemv", [](std::uintptr_t x, bool x_is_bf16, int64_t m_rows, int64_t x_stride,
                         std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zero, std::uintptr_t bias,
                         int64_t n, int64_t k, int bits, int64_t g, std::uintptr_t y, bool y_is_bf16,
                         int threads) {
    brecq::tiled_gemv(ptr<const void>(x), x_is_bf16, m_rows, x_stride, ptr<const uint8_t>(codes),
                      ptr<const uint16_t>(scale), ptr<const uint8_t>(zero), bias ? ptr<const float>(bias) : nullptr,
                      n, k, bits, g, ptr<void>(y), y_is_bf16, threads);
  }, nogil);
  // calls: (codes, scale, zero, bias, n, bits, g, y) per product, y float32 [m, n]. With `snapshot`
  // (float32 [count, m, n]), the batch runs with a tile epilogue that copies every call's outputs of
  // the tile's columns there as it sees them, and the column ranges it was given come back in the
  // order it was given them (for tests: the epilogue must see final outputs, each column once).
  m.def("tiled_gemv_batch", [](std::uintptr_t x, bool x_is_bf16, int64_t m_rows, int64_t k,
                               const std::vector<std::tuple<std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                                                            int64_t, int, int64_t, std::uintptr_t>>& calls,
                               int threads, std::uintptr_t snapshot) {
    std::vector<brecq::TiledGemvCall> list(calls.size());
    for (size_t i = 0; i < calls.size(); ++i) {
      const auto& [codes, scale, zero, bias, n, bits, g, y] = calls[i];
      list[i].codes = ptr<const uint8_t>(codes), list[i].scale = ptr<const uint16_t>(scale);
      list[i].zero = ptr<const uint8_t>(zero), list[i].bias = bias ? ptr<const float>(bias) : nullptr;
      list[i].n = n, list[i].bits = bits, list[i].g = g, list[i].y = ptr<float>(y);
    }
    struct Recorder {
      const std::vector<brecq::TiledGemvCall>* calls;
      int64_t rows;
      float* snapshot;
      std::mutex lock;
      std::vector<std::pair<int64_t, int64_t>> ranges;
      static void run(void* context, int64_t begin, int64_t end) {
        Recorder& r = *static_cast<Recorder*>(context);
        const int64_t n = (*r.calls)[0].n;
        for (size_t i = 0; i < r.calls->size(); ++i)
          for (int64_t row = 0; row < r.rows; ++row)
            std::copy((*r.calls)[i].y + row * n + begin, (*r.calls)[i].y + row * n + end,
                      r.snapshot + (static_cast<int64_t>(i) * r.rows + row) * n + begin);
        std::lock_guard<std::mutex> hold(r.lock);
        r.ranges.emplace_back(begin, end);
      }
    } recorder{&list, m_rows, snapshot ? ptr<float>(snapshot) : nullptr, {}, {}};
    const brecq::TileEpilogue epilogue{&Recorder::run, &recorder};
    brecq::tiled_gemv_batch(ptr<const void>(x), x_is_bf16, m_rows, k, list.data(), static_cast<int>(list.size()),
                            threads, snapshot ? &epilogue : nullptr);
    return recorder.ranges;
  }, nogil, py::arg("x"), py::arg("x_is_bf16"), py::arg("m"), py::arg("k"), py::arg("calls"), py::arg("threads"),
     py::arg("snapshot") = 0);
  m.def("decode_attention", [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t key_mask,
                               bool bf16, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t kv_len,
                               int64_t head_dim, int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_l,
                               int64_t v_stride_b, int64_t v_stride_h, int64_t v_stride_l, int64_t mask_stride_b,
                               float scale, std::uintptr_t out, int threads) {
    brecq::decode_attention(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                            key_mask ? ptr<const uint8_t>(key_mask) : nullptr, bf16, batch, q_heads, kv_heads,
                            kv_len, head_dim, k_stride_b, k_stride_h, k_stride_l, v_stride_b, v_stride_h,
                            v_stride_l, mask_stride_b, scale, ptr<void>(out), threads);
  }, nogil);
  m.attr("MAX_DECODE_GROUP") = brecq::kMaxDecodeGroup;
  m.def("rms_norm", [](std::uintptr_t x, bool bf16, int64_t rows, int64_t n, int64_t x_stride, std::uintptr_t weight,
                       float eps, std::uintptr_t out, int threads) {
    brecq::rms_norm(ptr<const void>(x), bf16, rows, n, x_stride, ptr<const void>(weight), eps, ptr<void>(out), threads);
  }, nogil);
  // ---- the whole-decoder runtime (brecq/decoder.h); python/brecq/runtime builds it from a model ----
  py::class_<brecq::LinearWeights>(m, "LinearWeights")
      .def(py::init([](int kind, std::uintptr_t codes, std::uintptr_t scale, std::uintptr_t zero, std::uintptr_t dense,
                       std::uintptr_t bias, int64_t n, int64_t k, int bits, int64_t g) {
             if (kind < 0 || kind > 3) throw std::invalid_argument("LinearWeights: kind must be 0-3");
             brecq::LinearWeights w;
             w.kind = static_cast<brecq::WeightKind>(kind);
             w.codes = ptr<const uint8_t>(codes);
             w.scale = ptr<const uint16_t>(scale);
             w.zero = ptr<const uint8_t>(zero);
             w.dense = ptr<const void>(dense);
             w.bias = bias ? ptr<const float>(bias) : nullptr;
             w.n = n, w.k = k, w.bits = bits, w.group_size = g;
             return w;
           }),
           py::arg("kind"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("dense"), py::arg("bias"),
           py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("group_size"));
  py::class_<brecq::DecoderLayerWeights>(m, "DecoderLayerWeights")
      .def(py::init([](std::uintptr_t input_norm, std::uintptr_t post_attention_norm, std::uintptr_t q_norm,
                       std::uintptr_t k_norm, const brecq::LinearWeights& q, const brecq::LinearWeights& k,
                       const brecq::LinearWeights& v, const brecq::LinearWeights& o, const brecq::LinearWeights& gate,
                       const brecq::LinearWeights& up, const brecq::LinearWeights& down, int64_t sliding_window) {
        brecq::DecoderLayerWeights l;
        l.input_norm = ptr<const float>(input_norm);
        l.post_attention_norm = ptr<const float>(post_attention_norm);
        l.q_norm = q_norm ? ptr<const float>(q_norm) : nullptr;
        l.k_norm = k_norm ? ptr<const float>(k_norm) : nullptr;
        l.q = q, l.k = k, l.v = v, l.o = o, l.gate = gate, l.up = up, l.down = down;
        l.sliding_window = sliding_window;
        return l;
      }));
  py::class_<brecq::Decoder>(m, "Decoder")
      .def(py::init([](int64_t hidden, int64_t intermediate, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                       int64_t vocab, float rms_eps, bool bf16, float attention_scale, float rope_attention_scaling,
                       std::vector<float> inv_freq, std::uintptr_t embedding, bool embedding_bf16,
                       std::uintptr_t final_norm, const brecq::LinearWeights& lm_head,
                       std::vector<brecq::DecoderLayerWeights> layers, int threads) {
        brecq::DecoderConfig c;
        c.hidden = hidden, c.intermediate = intermediate, c.q_heads = q_heads, c.kv_heads = kv_heads;
        c.head_dim = head_dim, c.vocab = vocab, c.rms_eps = rms_eps, c.bf16 = bf16;
        c.attention_scale = attention_scale, c.rope_attention_scaling = rope_attention_scaling;
        c.inv_freq = std::move(inv_freq);
        return new brecq::Decoder(std::move(c), ptr<const void>(embedding), embedding_bf16,
                                  ptr<const float>(final_norm), lm_head, std::move(layers), threads);
      }))
      .def("forward", [](brecq::Decoder& d, std::uintptr_t tokens, int64_t count, std::uintptr_t logits,
                         bool all_logits) {
        d.forward(ptr<const int64_t>(tokens), count, ptr<float>(logits), all_logits);
      }, nogil)
      .def("forward_greedy", [](brecq::Decoder& d, std::uintptr_t tokens, int64_t count, std::uintptr_t logits) {
        return d.forward_greedy(ptr<const int64_t>(tokens), count, ptr<float>(logits));
      }, nogil)
      .def("set_cache", [](brecq::Decoder& d, int64_t layer, std::uintptr_t keys, std::uintptr_t values, int64_t count,
                           int64_t stride_h, int64_t stride_l) {
        d.set_cache(layer, ptr<const void>(keys), ptr<const void>(values), count, stride_h, stride_l);
      }, nogil)
      .def("truncate", &brecq::Decoder::truncate)
      .def("reserve", &brecq::Decoder::reserve)
      .def("set_length", &brecq::Decoder::set_length)
      .def("set_threads", &brecq::Decoder::set_threads)
      .def("set_profiling", &brecq::Decoder::set_profiling)
      .def("profile", &brecq::Decoder::profile)
      .def("reset_profile", &brecq::Decoder::reset_profile)
      .def_property_readonly("threads", &brecq::Decoder::threads)
      .def_property_readonly("length", &brecq::Decoder::length)
      .def_property_readonly("capacity", &brecq::Decoder::capacity)
      .def_property_readonly("num_layers", &brecq::Decoder::num_layers);
}
