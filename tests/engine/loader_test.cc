// LoadModel: dtypes, tied/untied, qwen2 biases, clear errors on bad
// checkpoints; the GGUF q/k un-permutation; DenseLinear.
#include <optional>
#include <cmath>
#include <filesystem>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/model/linear.h"
#include "worker/model/weights.h"

namespace spear::engine {
namespace {

using testing::TinyModelSpec;

absl::StatusOr<std::unique_ptr<model::LoadedModel>> Load(const TinyModelSpec& s,
                                                         const std::string& tag) {
  const std::string dir = testing::MakeTempDir(tag);
  if (auto st = testing::WriteTinyModel(dir, s); !st.ok()) return st;
  return model::LoadModel(dir);
}

std::vector<float> Logits(const model::LoadedModel& m, const std::vector<int32_t>& toks) {
  KvCacheOptions ko;
  ko.num_blocks = 16;
  auto cache = KvCache::Create(m.config, ko);
  EXPECT_TRUE(cache.ok());
  ModelRunner runner(&m, cache->get(), nullptr);
  std::vector<int32_t> table = {3, 1, 4, 0, 2};
  ForwardOutput out;
  EXPECT_TRUE(runner.Forward({SeqChunk{toks, 0, table, LogitsMode::kAll}}, &out).ok());
  return std::vector<float>(out.logits.begin(), out.logits.begin() + out.num_rows * out.vocab);
}

TEST(Loader, HalfPrecisionWeightsMatchF32OfSameValues) {
  TinyModelSpec s;
  s.bf16_values = true;
  auto f32 = Load(s, "f32");
  s.dtype = model::TensorType::kBF16;
  auto bf16 = Load(s, "bf16");
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ((*bf16)->weights.embed_dtype, kernels::DType::kBF16);
  const std::vector<int32_t> toks = {5, 9, 100, 3, 7, 7, 42};
  const auto a = Logits(**f32, toks), b = Logits(**bf16, toks);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-4) << i;

  s.dtype = model::TensorType::kF16;
  auto f16 = Load(s, "f16");
  ASSERT_TRUE(f16.ok()) << f16.status();
  const auto c = Logits(**f16, toks);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], c[i], 1e-3) << i;
}

TEST(Loader, TiedAndQwen2Biases) {
  TinyModelSpec s;
  s.tied = true;
  s.qwen2 = true;
  auto m = Load(s, "qwen2");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE((*m)->weights.tied_embeddings);
  EXPECT_TRUE((*m)->config.attention_bias);
  auto* q = dynamic_cast<model::DenseLinear*>((*m)->weights.layers[1].q_proj.get());
  ASSERT_NE(q, nullptr);
  EXPECT_NE(q->bias(), nullptr);
  EXPECT_EQ((*m)->tokenizer, nullptr);  // no tokenizer.json: runs on ids
  const auto l = Logits(**m, {1, 2, 3});
  for (float x : l) ASSERT_TRUE(std::isfinite(x));
  int visited = 0;
  (*m)->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<model::Linear>& lin) {
    EXPECT_NE(lin, nullptr);
    // ParseLinearName inverts the names: layer visited / 7, member visited % 7,
    // and that member's slot is the one visited.
    const std::optional<model::LinearName> n = model::ParseLinearName(name);
    ASSERT_TRUE(n.has_value()) << name;
    EXPECT_EQ(n->layer, visited / 7) << name;
    EXPECT_EQ(static_cast<int>(n->which), visited % 7) << name;
    model::LayerWeights& L = (*m)->weights.layers[static_cast<size_t>(n->layer)];
    std::unique_ptr<model::Linear>* slots[] = {&L.q_proj,    &L.k_proj, &L.v_proj,   &L.o_proj,
                                               &L.gate_proj, &L.up_proj, &L.down_proj};
    EXPECT_EQ(slots[static_cast<int>(n->which)], &lin) << name;
    ++visited;
  });
  EXPECT_EQ(visited, 2 * 7);
  for (const char* bad : {"lm_head", "model.layers.x.self_attn.q_proj", "model.layers.3",
                          "model.layers.-1.mlp.up_proj", "model.layers.3.mlp.up_proj.weight",
                          "layers.3.mlp.up_proj", "model.layers.3.mlp.q_proj"}) {
    EXPECT_FALSE(model::ParseLinearName(bad).has_value()) << bad;
  }
  const auto up = model::ParseLinearName("model.layers.12.mlp.up_proj");
  ASSERT_TRUE(up.has_value());
  EXPECT_EQ(up->layer, 12);
  EXPECT_EQ(up->which, model::LayerLinear::kUp);
}

TEST(Loader, ClearErrorsForBadCheckpoints) {
  TinyModelSpec s;
  s.drop_tensor = "model.layers.1.mlp.up_proj.weight";
  auto m = Load(s, "missing");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("model.layers.1.mlp.up_proj.weight"), std::string::npos)
      << m.status();

  s = TinyModelSpec{};
  s.drop_tensor = "lm_head.weight";  // untied config without lm_head
  m = Load(s, "nohead");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound) << m.status();

  s = TinyModelSpec{};
  s.reshape_tensor = "model.layers.0.self_attn.k_proj.weight";
  m = Load(s, "shape");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("shape"), std::string::npos) << m.status();

  s = TinyModelSpec{};
  s.qwen2 = true;
  s.drop_tensor = "model.layers.0.self_attn.v_proj.bias";
  m = Load(s, "nobias");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound) << m.status();

  EXPECT_FALSE(model::LoadModel("/nonexistent/spear/model").ok());
  const std::string empty = testing::MakeTempDir("empty");
  EXPECT_FALSE(model::LoadModel(empty).ok());
  const std::string junk = empty + "/junk.gguf";
  { std::ofstream(junk) << "not a gguf file"; }
  EXPECT_FALSE(model::LoadModel(junk).ok());
}

TEST(Loader, UnsupportedDtypeIsAnError) {
  const std::string dir = testing::MakeTempDir("i32");
  ASSERT_TRUE(testing::WriteTinyModel(dir, TinyModelSpec{}).ok());
  // Rewrite the checkpoint with one I32 weight.
  auto ck = model::SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(ck.ok());
  std::vector<model::TensorToWrite> tw;
  std::vector<int32_t> ints;
  for (const auto& t : (*ck)->tensors()) {
    if (t.name == "model.layers.0.mlp.gate_proj.weight") {
      ints.assign(t.numel(), 1);
      tw.push_back({t.name, model::TensorType::kI32, t.shape, ints.data(), ints.size() * 4});
    } else {
      tw.push_back({t.name, t.type, t.shape, t.data, t.nbytes});
    }
  }
  const std::string dir2 = testing::MakeTempDir("i32b");
  ASSERT_TRUE(model::WriteSafetensors(dir2 + "/model.safetensors", tw, {}).ok());
  std::filesystem::copy_file(dir + "/config.json", dir2 + "/config.json");
  auto m = model::LoadModel(dir2);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("dtype"), std::string::npos) << m.status();
}

// llama.cpp convert_hf_to_gguf.py permute(), written out.
std::vector<float> LlamaCppPermute(const std::vector<float>& w, int64_t n_head, int64_t cols) {
  const int64_t rows = static_cast<int64_t>(w.size()) / cols, hd = rows / n_head;
  std::vector<float> out(w.size());
  // reshape(n_head, 2, hd/2, cols).swapaxes(1, 2): out[h][i][s] = in[h][s][i]
  for (int64_t h = 0; h < n_head; ++h)
    for (int64_t i = 0; i < hd / 2; ++i)
      for (int64_t s = 0; s < 2; ++s)
        for (int64_t c = 0; c < cols; ++c)
          out[((h * hd) + 2 * i + s) * cols + c] = w[((h * hd) + s * hd / 2 + i) * cols + c];
  return out;
}

TEST(Loader, UnpermuteGgufQkInvertsLlamaCpp) {
  const int64_t heads = 3, hd = 8, cols = 5;
  std::vector<float> w(heads * hd * cols);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i);
  auto p = LlamaCppPermute(w, heads, cols);
  ASSERT_NE(p, w);
  ASSERT_TRUE(model::UnpermuteGgufQk(p.data(), heads * hd, cols, heads).ok());
  EXPECT_EQ(p, w);
  EXPECT_FALSE(model::UnpermuteGgufQk(p.data(), heads * hd, cols, 5).ok());
}

TEST(DenseLinearTest, ForwardAndErrors) {
  // [2 out, 8 in] (k a multiple of 8: this tests the wrapper, not the
  // kernel's tail handling, which tests/kernels covers).
  const int64_t k = 8, ldx = 10;
  std::vector<float> w(2 * k), b = {0.5f, -1.f};
  for (int64_t i = 0; i < 2 * k; ++i) w[i] = static_cast<float>(i % 5) - 2.f;
  auto lin = model::DenseLinear::Create(w.data(), kernels::DType::kF32, 2, k, b.data());
  ASSERT_TRUE(lin.ok());
  EXPECT_EQ((*lin)->weight_bytes(), 2 * k * 4 + 2 * 4);
  EXPECT_EQ((*lin)->in_features(), k);
  EXPECT_EQ((*lin)->out_features(), 2);
  std::vector<float> x(2 * ldx, 1000.f);  // padding columns must be ignored
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t c = 0; c < k; ++c) x[r * ldx + c] = static_cast<float>(r + c) * 0.25f;
  std::vector<float> y(4, 100.f), want(4);
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t j = 0; j < 2; ++j) {
      float acc = b[j];
      for (int64_t c = 0; c < k; ++c) acc += x[r * ldx + c] * w[j * k + c];
      want[r * 2 + j] = acc;
    }
  ASSERT_TRUE((*lin)->Forward(x.data(), 2, ldx, y.data(), 2, false, nullptr).ok());
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], want[i], 1e-5) << i;
  ASSERT_TRUE((*lin)->Forward(x.data(), 1, ldx, y.data(), 2, true, nullptr).ok());
  EXPECT_NEAR(y[0], 2 * want[0], 1e-5);
  EXPECT_NEAR(y[2], want[2], 1e-5);  // row 1 untouched
  EXPECT_FALSE((*lin)->Forward(x.data(), 2, k - 1, y.data(), 2, false, nullptr).ok());
  EXPECT_FALSE(model::DenseLinear::Create(nullptr, kernels::DType::kF32, 2, 3).ok());
  EXPECT_FALSE(model::DenseLinear::Create(w.data(), kernels::DType::kF32, 0, 3).ok());
}

}  // namespace
}  // namespace spear::engine
