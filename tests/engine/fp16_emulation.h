// Test helper: the CPU ModelRunner with the CUDA runner's fp16 storage
// emulated (cuda_model_runner.h: residual stream fp32, activations and
// K/V fp16). Built on the layer-wise API: every linear's input is rounded
// to fp16 in place (the LinearObserver sees the runner's own buffer: the
// normed input of q/k/v and gate/up, the attention output before o, the
// SwiGLU output before down), the K/V cache of a layer is rounded to fp16
// before that layer runs (so every earlier position is read as fp16; the
// batch's own new K/V stay fp32), and the final-normed rows are rounded
// before lm_head. Not emulated: fp16 q/k/v and gate/up outputs, fp16
// lm_head weights, the GPU's summation orders.
//
// Each rounding point can be switched off, to find which one a difference
// comes from.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"

namespace spear::testing {

struct Fp16Points {
  bool linear_inputs = true;
  bool kv_cache = true;
  bool final_norm = true;
  // Linear inputs of this layer only (-1: all) and of this input only
  // (-1: all; 0 = q/k/v, 1 = o, 2 = gate/up, 3 = down).
  int64_t only_layer = -1;
  int only_input = -1;
};

// Which linear input (0 q/k/v, 1 o, 2 gate/up, 3 down) a module reads.
inline int LinearInput(engine::LayerModule m) {
  switch (m) {
    case engine::LayerModule::kQ:
    case engine::LayerModule::kK:
    case engine::LayerModule::kV: return 0;
    case engine::LayerModule::kO: return 1;
    case engine::LayerModule::kGate:
    case engine::LayerModule::kUp: return 2;
    case engine::LayerModule::kDown: return 3;
  }
  return -1;
}

class Fp16EmulatingRunner {
 public:
  Fp16EmulatingRunner(const model::LoadedModel* m, engine::KvCache* cache,
                      kernels::ThreadPool* pool, Fp16Points points)
      : model_(m), cache_(cache), runner_(m, cache, pool), points_(points) {}

  void set_points(Fp16Points p) { points_ = p; }
  // If set, each forward appends the (rounded) linear inputs it sees, in
  // order: per layer q/k/v in, o in, gate/up in, down in ([T, ldx] each).
  void set_trace(std::vector<std::vector<float>>* trace) { trace_ = trace; }

  // ModelRunner::Forward's contract (logits rows as requested).
  absl::Status Forward(const std::vector<engine::SeqChunk>& batch, engine::ForwardOutput* out) {
    const model::ModelConfig& c = model_->config;
    int64_t T = 0;
    for (const auto& ch : batch) T += static_cast<int64_t>(ch.tokens.size());
    const int64_t d = c.hidden_size, V = c.vocab_size;
    std::vector<float> h(T * d), y(T * d), logits(T * V);
    if (absl::Status s = runner_.Embed(batch, h.data()); !s.ok()) return s;
    const int64_t kv_elems = cache_->num_blocks() * cache_->block_size() * cache_->kv_dim();
    auto round_all = [](float* p, int64_t n) {
      for (int64_t i = 0; i < n; ++i) p[i] = kernels::HalfToFloat(kernels::FloatToHalf(p[i]));
    };
    for (int64_t l = 0; l < c.num_layers; ++l) {
      if (points_.kv_cache) {
        round_all(cache_->k(l), kv_elems);
        round_all(cache_->v(l), kv_elems);
      }
      engine::LinearObserver obs = [&](int64_t layer, engine::LayerModule mod, const float* x,
                                       int64_t m, int64_t ldx) {
        if (points_.linear_inputs && (points_.only_layer < 0 || points_.only_layer == layer) &&
            (points_.only_input < 0 || points_.only_input == LinearInput(mod))) {
          round_all(const_cast<float*>(x), m * ldx);
        }
        if (trace_ != nullptr && mod != engine::LayerModule::kK && mod != engine::LayerModule::kV &&
            mod != engine::LayerModule::kUp) {
          trace_->emplace_back(x, x + m * ldx);
        }
        return true;
      };
      if (absl::Status s = runner_.RunLayers(batch, l, l + 1, h.data(), obs); !s.ok()) return s;
    }
    if (absl::Status s = runner_.FinalNorm(h.data(), T, y.data()); !s.ok()) return s;
    if (points_.final_norm) round_all(y.data(), T * d);
    if (absl::Status s = runner_.LmHead(y.data(), T, logits.data()); !s.ok()) return s;
    out->vocab = V;
    out->num_rows = 0;
    out->first_row.assign(batch.size(), -1);
    out->logits.clear();
    int64_t t0 = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      const int64_t n = static_cast<int64_t>(batch[i].tokens.size());
      if (batch[i].logits != engine::LogitsMode::kNone) {
        const int64_t first = batch[i].logits == engine::LogitsMode::kAll ? t0 : t0 + n - 1;
        out->first_row[i] = out->num_rows;
        out->logits.insert(out->logits.end(), logits.begin() + first * V,
                           logits.begin() + (t0 + n) * V);
        out->num_rows += t0 + n - first;
      }
      t0 += n;
    }
    return absl::OkStatus();
  }

 private:
  const model::LoadedModel* model_;
  engine::KvCache* cache_;
  engine::ModelRunner runner_;
  Fp16Points points_;
  std::vector<std::vector<float>>* trace_ = nullptr;
};

}  // namespace spear::testing
