// Our full-sequence logits vs HF transformers' (tests/testdata/golden/*,
// produced by tests/testdata/make_golden.py).
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/model/safetensors.h"
#include "worker/model/weights.h"

namespace spear::engine {
namespace {

void CheckGolden(const std::string& name) {
  const std::string dir = testing::TestdataPath("golden/" + name);
  if (!std::filesystem::exists(dir + "/golden.safetensors")) {
    GTEST_SKIP() << "golden fixture " << dir << " not present yet";
  }
  auto model = model::LoadModel(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  auto golden = model::SafetensorsFile::Open(dir + "/golden.safetensors");
  ASSERT_TRUE(golden.ok()) << golden.status();
  auto it = (*golden)->metadata().find("num_prompts");
  ASSERT_NE(it, (*golden)->metadata().end());
  const int num_prompts = std::stoi(it->second);
  ASSERT_GT(num_prompts, 0);

  KvCacheOptions ko;
  ko.num_blocks = 64;
  auto cache = KvCache::Create((*model)->config, ko);
  ASSERT_TRUE(cache.ok()) << cache.status();
  kernels::ThreadPool pool(2);
  ModelRunner runner(model->get(), cache->get(), &pool);
  const int64_t vocab = (*model)->config.vocab_size;

  for (int p = 0; p < num_prompts; ++p) {
    const model::TensorInfo* ids = (*golden)->Find("input_ids_" + std::to_string(p));
    const model::TensorInfo* ref = (*golden)->Find("logits_" + std::to_string(p));
    ASSERT_NE(ids, nullptr);
    ASSERT_NE(ref, nullptr);
    ASSERT_EQ(ids->type, model::TensorType::kI32);
    ASSERT_EQ(ref->type, model::TensorType::kF32);
    const int64_t len = ids->numel();
    ASSERT_EQ(ref->shape, (std::vector<int64_t>{len, vocab}));
    std::vector<int32_t> tokens(len);
    std::memcpy(tokens.data(), ids->data, len * 4);
    std::vector<float> want(len * vocab);
    std::memcpy(want.data(), ref->data, want.size() * 4);

    std::vector<int32_t> table;
    ASSERT_TRUE((*cache)->allocator().Allocate((*cache)->BlocksFor(len), &table).ok());
    SeqChunk ch{tokens, 0, table, LogitsMode::kAll};
    ForwardOutput out;
    ASSERT_TRUE(runner.Forward({ch}, &out).ok());
    ASSERT_EQ(out.num_rows, len);
    double max_diff = 0, max_ref = 0;
    int64_t bad = 0;
    for (int64_t i = 0; i < len * vocab; ++i) {
      const double a = out.logits[i], b = want[i];
      max_diff = std::max(max_diff, std::abs(a - b));
      max_ref = std::max(max_ref, std::abs(b));
      if (!(std::abs(a - b) <= 1e-4 * (1 + std::abs(b)))) ++bad;
    }
    EXPECT_LE(max_diff / max_ref, 1e-4) << name << " prompt " << p << " (len " << len << ")";
    EXPECT_EQ(bad, 0) << name << " prompt " << p << ": elements out of tolerance, max |a-b| "
                      << max_diff;
    ASSERT_TRUE((*cache)->allocator().Free(table).ok());
  }
}

TEST(GoldenParity, TinyLlamaUntied) { CheckGolden("tiny_llama_untied"); }
TEST(GoldenParity, TinyLlamaTiedLlama3Rope) { CheckGolden("tiny_llama_tied"); }

}  // namespace
}  // namespace spear::engine
