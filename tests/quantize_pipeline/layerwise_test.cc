// The engine's layer-wise runner (ModelRunner::Embed/RunLayers/FinalNorm/
// LmHead + observer) against Forward, and LayerwiseRunner's micro-batching.
#include <cmath>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/model/weights.h"
#include "worker/quantize/pipeline/layerwise.h"

namespace spear {
namespace {

using engine::LayerModule;

std::unique_ptr<model::LoadedModel> Tiny(const testing::TinyModelSpec& spec) {
  const std::string dir = testing::MakeTempDir("layerwise");
  EXPECT_TRUE(testing::WriteTinyModel(dir, spec).ok());
  auto m = model::LoadModel(dir);
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(*m);
}

std::vector<std::vector<int32_t>> Seqs(int n, int len, int vocab, int seed) {
  std::vector<std::vector<int32_t>> s(n);
  for (int i = 0; i < n; ++i) {
    for (int t = 0; t < len + 3 * i; ++t) s[i].push_back((seed + 7 * t + 13 * i * t) % vocab);
  }
  return s;
}

TEST(LayerwiseTest, PiecesMatchForward) {
  testing::TinyModelSpec spec;
  spec.layers = 3;
  auto m = Tiny(spec);
  kernels::ThreadPool pool(2);
  engine::KvCacheOptions ko;
  ko.num_blocks = 64;
  auto cache = engine::KvCache::Create(m->config, ko);
  ASSERT_TRUE(cache.ok());
  engine::ModelRunner runner(m.get(), cache->get(), &pool);
  const auto seqs = Seqs(3, 20, 128, 5);
  std::vector<std::vector<int32_t>> tables(3);
  std::vector<engine::SeqChunk> batch;
  int64_t T = 0;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE((*cache)->allocator().Allocate(4, &tables[i]).ok());
    engine::SeqChunk ch;
    ch.tokens = seqs[i];
    ch.block_table = tables[i];
    ch.logits = engine::LogitsMode::kAll;
    batch.push_back(ch);
    T += seqs[i].size();
  }
  engine::ForwardOutput ref;
  ASSERT_TRUE(runner.Forward(batch, &ref).ok());

  const int64_t d = m->config.hidden_size, V = m->config.vocab_size;
  std::vector<float> h(T * d), logits(T * V);
  ASSERT_TRUE(runner.Embed(batch, h.data()).ok());
  // Split the layer range in two calls and observe every linear's input.
  int observed = 0;
  engine::LinearObserver obs = [&](int64_t l, LayerModule mod, const float*, int64_t rows,
                                   int64_t ldx) {
    EXPECT_EQ(rows, T);
    const int j = static_cast<int>(mod);
    EXPECT_EQ(ldx, j == 3 ? 64 : (j == 6 ? 96 : 64));
    EXPECT_EQ(observed % 7, j) << "layer " << l;
    ++observed;
    return true;
  };
  ASSERT_TRUE(runner.RunLayers(batch, 0, 1, h.data(), obs).ok());
  ASSERT_TRUE(runner.RunLayers(batch, 1, 3, h.data(), obs).ok());
  EXPECT_EQ(observed, 21);
  ASSERT_TRUE(runner.FinalNorm(h.data(), T, h.data()).ok());
  ASSERT_TRUE(runner.LmHead(h.data(), T, logits.data()).ok());
  double max_err = 0;
  for (int64_t i = 0; i < T * V; ++i) max_err = std::max(max_err, std::fabs(double(logits[i]) - ref.logits[i]));
  EXPECT_LT(max_err, 1e-4);

  // An observer that stops leaves h untouched.
  std::vector<float> h2(T * d, 3.f);
  ASSERT_TRUE(runner.Embed(batch, h2.data()).ok());
  const std::vector<float> before = h2;
  bool stopped = false;
  ASSERT_TRUE(runner
                  .RunLayers(batch, 0, 3, h2.data(),
                             [](int64_t l, LayerModule mod, const float*, int64_t, int64_t) {
                               return !(l == 1 && mod == LayerModule::kDown);
                             },
                             &stopped)
                  .ok());
  EXPECT_TRUE(stopped);
  EXPECT_EQ(h2, before);
  EXPECT_FALSE(runner.RunLayers(batch, 2, 4, h2.data()).ok());
}

TEST(LayerwiseTest, MicroBatchesMatchOneBatch) {
  auto m = Tiny({});
  kernels::ThreadPool pool(2);
  const auto seqs = Seqs(5, 30, 128, 9);
  auto one = quantize::LayerwiseRunner::Create(m.get(), &pool, seqs, 1 << 20);
  auto many = quantize::LayerwiseRunner::Create(m.get(), &pool, seqs, 40);  // ~1 seq per batch
  ASSERT_TRUE(one.ok() && many.ok());
  const int64_t T = (*one)->num_tokens(), d = 64;
  ASSERT_EQ(T, (*many)->num_tokens());
  std::vector<float> a(T * d), b(T * d);
  ASSERT_TRUE((*one)->Embed(a.data()).ok());
  ASSERT_TRUE((*many)->Embed(b.data()).ok());
  std::vector<int64_t> rows_seen;
  ASSERT_TRUE((*one)->RunLayers(0, 2, a.data()).ok());
  ASSERT_TRUE((*many)
                  ->RunLayers(0, 2, b.data(),
                              [&](int64_t l, LayerModule mod, const float*, int64_t row0,
                                  int64_t rows, int64_t) {
                                if (l == 0 && mod == LayerModule::kQ) rows_seen.push_back(row0 + rows);
                                return true;
                              })
                  .ok());
  ASSERT_TRUE((*one)->FinalNorm(a.data(), a.data()).ok());
  ASSERT_TRUE((*many)->FinalNorm(b.data(), b.data()).ok());
  for (int64_t i = 0; i < T * d; ++i) ASSERT_NEAR(a[i], b[i], 1e-4) << i;
  ASSERT_GE(rows_seen.size(), 4u);
  EXPECT_EQ(rows_seen.back(), T);
}

}  // namespace
}  // namespace spear
