// The real model: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized). Skips
// when the GGUF is absent. Perplexity catches a wrong q/k permutation
// (hundreds instead of ~20); generation checks the tokenizer round trip.
#include <cmath>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "worker/engine/engine.h"
#include "worker/engine/perplexity.h"
#include "worker/model/weights.h"

namespace spear::engine {
namespace {

class SmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = testing::SmolLm2GgufPath();
    if (path.empty()) return;
    auto m = model::LoadModel(path);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
    EngineOptions o;
    o.num_threads = 2;
    o.kv_cache.bytes = 64ll << 20;
    auto e = Engine::Create(model_, o);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = e->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    delete model_;
  }
  static model::LoadedModel* model_;
  static Engine* engine_;
};
model::LoadedModel* SmolLm2Test::model_ = nullptr;
Engine* SmolLm2Test::engine_ = nullptr;

TEST_F(SmolLm2Test, WikiText2Perplexity) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(gguf);
  ASSERT_NE(engine_, nullptr);
  ASSERT_NE(model_->tokenizer, nullptr);
  const std::string wiki = std::string(SPEAR_SHARED_DATA_DIR) + "/wikitext-2-raw/wiki.test.raw";
  std::ifstream f(wiki);
  if (!f) GTEST_SKIP() << wiki << " not found";
  std::string text(64 * 1024, '\0');  // ~2k tokens need ~10 KB; read a bit more
  f.read(text.data(), text.size());
  text.resize(f.gcount());
  const auto tokens = model_->tokenizer->Encode(text, /*add_bos=*/false);
  ASSERT_GE(tokens.size(), 2048u);
  auto r = EvalPerplexity(engine_->backend(), tokens, 256, 2048);
  ASSERT_TRUE(r.ok()) << r.status();
  std::printf("SmolLM2-135M (Q4_1 dequantized) WikiText-2 ppl @ctx256, first 2048 tokens: %.3f "
              "(%lld tokens, %lld windows)\n",
              r->ppl, static_cast<long long>(r->tokens_scored),
              static_cast<long long>(r->windows));
  RecordProperty("ppl", std::to_string(r->ppl));
  EXPECT_EQ(r->windows, 8);
  EXPECT_TRUE(std::isfinite(r->ppl));
  EXPECT_LT(r->ppl, 40.0);
  EXPECT_GT(r->ppl, 3.0);
}

TEST_F(SmolLm2Test, GreedyCapitalOfFrance) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(gguf);
  ASSERT_NE(engine_, nullptr);
  ASSERT_NE(model_->tokenizer, nullptr);
  const auto prompt = model_->tokenizer->Encode("The capital of France is", true);
  GenerateOptions o;
  o.max_new_tokens = 16;
  auto r = engine_->Generate(prompt, SamplingParams{}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::string text = model_->tokenizer->Decode(r->tokens, true);
  std::printf("greedy: \"The capital of France is%s\"\n", text.c_str());
  EXPECT_NE(text.find("Paris"), std::string::npos) << text;
  EXPECT_EQ(engine_->num_free_blocks(), engine_->backend().num_blocks());
}

}  // namespace
}  // namespace spear::engine
