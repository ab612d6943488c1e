// Test helper: tiny random LLaMA models whose decoder linears are W4 with
// ECs (gated, static, absent), the inputs of the CUDA runner / engine
// tests (and of their CPU counterparts).
#pragma once

#include <cmath>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "kernels/w4_format.h"
#include "tests/engine/tiny_model.h"
#include "worker/model/w4_linear.h"
#include "worker/model/weights.h"

namespace spear::testing {

inline float H(float x) { return kernels::HalfToFloat(kernels::FloatToHalf(x)); }

// ec: 0 none, 1 gated, 2 static (not gated).
inline std::unique_ptr<model::W4Linear> RandomW4(int64_t n, int64_t k, int64_t group, bool symmetric,
                                                 bool act_scale, int ec_kind, int rank,
                                                 std::mt19937* rng) {
  std::uniform_int_distribution<int> code(0, 15);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> sc(0.01f, 0.03f);
  kernels::W4Weight w;
  w.fmt = {n, k, group, symmetric};
  w.packed.resize(n * w.fmt.packed_row_bytes());
  for (auto& b : w.packed) b = static_cast<uint8_t>(code(*rng) | (code(*rng) << 4));
  const int64_t ng = w.fmt.num_groups();
  for (int64_t i = 0; i < n * ng; ++i) {
    w.scales.push_back(kernels::FloatToHalf(sc(*rng)));
    w.zeros.push_back(symmetric ? 8 : static_cast<uint8_t>(6 + code(*rng) % 5));
  }
  if (act_scale) {
    for (int64_t j = 0; j < k; ++j) w.act_scale.push_back(H(0.5f + std::fabs(nd(*rng))));
  }
  std::optional<kernels::EcWeights> ec;
  if (ec_kind != 0) {
    kernels::EcWeights e;
    e.n = n;
    e.k = k;
    e.rank = rank;
    e.gated = ec_kind == 1;
    e.gate_hidden = e.gated ? 8 : 0;
    auto fill = [&](std::vector<float>* v, size_t size, float s) {
      v->resize(size);
      for (auto& x : *v) x = H(s * nd(*rng));
    };
    fill(&e.a, rank * k, 0.1f);
    fill(&e.b, n * rank, 0.1f);
    if (e.gated) {
      fill(&e.w1, 8 * rank, 0.5f);
      fill(&e.b1, 8, 0.1f);
      fill(&e.w2, rank * 8, 0.5f);
      fill(&e.b2, rank, 0.1f);
    }
    ec = std::move(e);
  }
  auto r = model::W4Linear::Create(std::move(w), std::move(ec));
  EXPECT_TRUE(r.ok()) << r.status();
  return std::move(*r);
}

// grouped = false: hidden 192, per-channel symmetric W4, a gated rank-4 EC
// on every module (q/k/v and gate/up fuse on the GPU). grouped = true:
// hidden 200 (ragged last group of 64), asymmetric, ECs gated / static /
// absent in turn, v with its own act_scale.
inline std::unique_ptr<model::LoadedModel> TinyW4Model(bool grouped, bool tied) {
  const std::string dir = MakeTempDir("cuda_runner");
  TinyModelSpec spec;
  spec.vocab = 300;
  spec.hidden = grouped ? 200 : 192;  // 200: a ragged last group of 64
  spec.heads = 6;
  spec.kv_heads = 2;
  spec.head_dim = 64;
  spec.intermediate = 328;
  spec.layers = 3;
  spec.tied = tied;
  spec.seed = grouped ? 11 : 12;
  EXPECT_TRUE(WriteTinyModel(dir, spec).ok());
  auto lm = model::LoadModel(dir);
  EXPECT_TRUE(lm.ok()) << lm.status();
  auto m = std::move(*lm);
  std::mt19937 rng(grouped ? 5 : 6);
  int i = 0;
  m->weights.ForEachLinear([&](const std::string&, std::unique_ptr<model::Linear>& l) {
    const int64_t n = l->out_features(), k = l->in_features();
    if (!grouped) {  // per-channel symmetric, gated EC r = 4 everywhere: fused q/k/v, gate/up
      l = RandomW4(n, k, k, true, false, 1, 4, &rng);
    } else {
      // groups of 64, asymmetric; ECs gated / static / absent in turn; v
      // (module 2 of 7) with an act_scale so q/k/v split into two weights.
      const int mod = i % 7;
      l = RandomW4(n, k, 64, false, mod == 2, i % 3, 2 + (i % 4) * 2, &rng);
    }
    ++i;
  });
  return m;
}

}  // namespace spear::testing
