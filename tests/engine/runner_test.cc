// ModelRunner invariants on a random tiny model: the paged, batched,
// chunked forward computes the same logits however the work is split.
#include <cmath>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/engine/perplexity.h"
#include "worker/model/weights.h"

namespace spear::engine {
namespace {

constexpr float kTol = 2e-4f;

class RunnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = testing::MakeTempDir("runner");
    ASSERT_TRUE(testing::WriteTinyModel(dir, spec_).ok());
    auto m = model::LoadModel(dir);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    KvCacheOptions ko;
    ko.block_size = 4;  // small blocks: many block boundaries
    ko.num_blocks = 256;
    auto c = KvCache::Create(model_->config, ko);
    ASSERT_TRUE(c.ok()) << c.status();
    cache_ = std::move(*c);
    pool_ = std::make_unique<kernels::ThreadPool>(2);
    runner_ = std::make_unique<ModelRunner>(model_.get(), cache_.get(), pool_.get());
  }

  std::vector<int32_t> Tokens(int n, uint32_t seed) const {
    std::mt19937 rng(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng() % spec_.vocab);
    return t;
  }

  // Non-contiguous table: blocks taken from the end, every third one.
  std::vector<int32_t> Table(int64_t tokens, int offset) const {
    std::vector<int32_t> t;
    for (int64_t i = 0; i < cache_->BlocksFor(tokens); ++i) {
      t.push_back(static_cast<int32_t>(cache_->num_blocks() - 1 - (3 * i + offset)));
    }
    return t;
  }

  // All-token logits of one sequence run as a single prefill.
  std::vector<float> Full(const std::vector<int32_t>& toks, int offset = 0) {
    auto table = Table(toks.size(), offset);
    ForwardOutput out;
    EXPECT_TRUE(runner_->Forward({SeqChunk{toks, 0, table, LogitsMode::kAll}}, &out).ok());
    return std::vector<float>(out.logits.begin(), out.logits.begin() + toks.size() * spec_.vocab);
  }

  void ExpectRowNear(const float* got, const float* want, const std::string& what) {
    float md = 0;
    for (int64_t j = 0; j < spec_.vocab; ++j) md = std::max(md, std::abs(got[j] - want[j]));
    EXPECT_LE(md, kTol) << what;
  }

  testing::TinyModelSpec spec_;
  std::unique_ptr<model::LoadedModel> model_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<kernels::ThreadPool> pool_;
  std::unique_ptr<ModelRunner> runner_;
};

TEST_F(RunnerTest, IncrementalDecodeMatchesFullPrefill) {
  const auto toks = Tokens(40, 7);
  const auto full = Full(toks);
  auto table = Table(toks.size(), 1);
  ForwardOutput out;
  const std::span<const int32_t> all(toks);
  ASSERT_TRUE(runner_->Forward({SeqChunk{all.subspan(0, 9), 0, table, LogitsMode::kLast}}, &out)
                  .ok());
  ExpectRowNear(out.row(0), &full[8 * spec_.vocab], "prefill last row");
  for (int64_t p = 9; p < 40; ++p) {
    ASSERT_TRUE(
        runner_->Forward({SeqChunk{all.subspan(p, 1), p, table, LogitsMode::kLast}}, &out).ok());
    ASSERT_EQ(out.num_rows, 1);
    ExpectRowNear(out.row(0), &full[p * spec_.vocab], "decode position " + std::to_string(p));
  }
}

TEST_F(RunnerTest, ChunkedPrefillMatchesUnchunked) {
  const auto toks = Tokens(45, 8);
  const auto full = Full(toks);
  auto table = Table(toks.size(), 2);
  const std::span<const int32_t> all(toks);
  ForwardOutput out;
  int64_t start = 0;
  for (int64_t n : {7, 1, 13, 24}) {  // chunks cross block edges at odd offsets
    ASSERT_TRUE(
        runner_->Forward({SeqChunk{all.subspan(start, n), start, table, LogitsMode::kAll}}, &out)
            .ok());
    ASSERT_EQ(out.num_rows, n);
    for (int64_t i = 0; i < n; ++i) {
      ExpectRowNear(out.row(i), &full[(start + i) * spec_.vocab],
                    "chunked position " + std::to_string(start + i));
    }
    start += n;
  }
  ASSERT_EQ(start, 45);
}

TEST_F(RunnerTest, BatchedMatchesEachAlone) {
  const std::vector<std::vector<int32_t>> seqs = {Tokens(5, 1), Tokens(17, 2), Tokens(33, 3)};
  std::vector<std::vector<float>> alone;
  for (const auto& s : seqs) alone.push_back(Full(s));
  // Interleaved tables: sequence i uses blocks i, i+3, i+6, ... (disjoint).
  std::vector<std::vector<int32_t>> tables(3);
  for (int i = 0; i < 3; ++i) {
    for (int64_t b = 0; b < cache_->BlocksFor(seqs[i].size()); ++b) {
      tables[i].push_back(static_cast<int32_t>(i + 3 * b));
    }
  }
  // Step 1: a mixed batch: seq 0 fully, seq 1's first 10 tokens (no
  // logits), seq 2 fully with all logits.
  ForwardOutput out;
  std::vector<SeqChunk> batch = {
      {seqs[0], 0, tables[0], LogitsMode::kLast},
      {std::span<const int32_t>(seqs[1]).subspan(0, 10), 0, tables[1], LogitsMode::kNone},
      {seqs[2], 0, tables[2], LogitsMode::kAll}};
  ASSERT_TRUE(runner_->Forward(batch, &out).ok());
  ASSERT_EQ(out.num_rows, 1 + 33);
  EXPECT_EQ(out.first_row[1], -1);
  ExpectRowNear(out.row(out.first_row[0]), &alone[0][4 * spec_.vocab], "seq 0 last");
  for (int i = 0; i < 33; ++i) {
    ExpectRowNear(out.row(out.first_row[2] + i), &alone[2][i * spec_.vocab],
                  "seq 2 row " + std::to_string(i));
  }
  // Step 2: the rest of seq 1, attending to its 10 positions cached in step 1.
  batch = {{std::span<const int32_t>(seqs[1]).subspan(10), 10, tables[1], LogitsMode::kAll}};
  ASSERT_TRUE(runner_->Forward(batch, &out).ok());
  for (int i = 0; i < 7; ++i) {
    ExpectRowNear(out.row(i), &alone[1][(10 + i) * spec_.vocab],
                  "seq 1 row " + std::to_string(10 + i));
  }
}

TEST_F(RunnerTest, RejectsBadInput) {
  const auto toks = Tokens(10, 4);
  std::vector<int32_t> short_table = {0, 1};  // 8 positions < 10
  ForwardOutput out;
  EXPECT_EQ(runner_->Forward({SeqChunk{toks, 0, short_table}}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> bad_block = {0, 1, 100000};
  EXPECT_EQ(runner_->Forward({SeqChunk{toks, 0, bad_block}}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> bad_tok = {1, 2, 1000};
  std::vector<int32_t> table = {0};
  EXPECT_EQ(runner_->Forward({SeqChunk{bad_tok, 0, table}}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(runner_->Forward({SeqChunk{{}, 0, table}}, &out).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(runner_->Forward({}, &out).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RunnerTest, PerplexityMatchesManualLogSoftmax) {
  const auto toks = Tokens(50, 9);
  const int ctx = 16;  // 3 windows, 2 tokens dropped
  double nll = 0;
  int64_t n = 0;
  for (int w = 0; w < 3; ++w) {
    std::vector<int32_t> win(toks.begin() + w * ctx, toks.begin() + (w + 1) * ctx);
    const auto full = Full(win);
    for (int i = 0; i + 1 < ctx; ++i) {
      const float* row = &full[i * spec_.vocab];
      double mx = row[0], s = 0;
      for (int j = 0; j < spec_.vocab; ++j) mx = std::max<double>(mx, row[j]);
      for (int j = 0; j < spec_.vocab; ++j) s += std::exp(row[j] - mx);
      nll += mx + std::log(s) - row[win[i + 1]];
      ++n;
    }
  }
  int64_t calls = 0;
  for (int64_t chunk : {int64_t{5}, int64_t{256}}) {
    auto r = EvalPerplexity(*runner_, toks, ctx, 0,
                            [&](int64_t, int64_t, double) { ++calls; }, chunk);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->windows, 3);
    EXPECT_EQ(r->tokens_scored, 3 * 15);
    EXPECT_EQ(r->tokens_scored, n);
    EXPECT_NEAR(r->nll_sum, nll, 1e-3);
    EXPECT_NEAR(r->ppl, std::exp(nll / n), 1e-3 * r->ppl);
  }
  EXPECT_EQ(calls, 6);
  EXPECT_EQ(cache_->allocator().num_free(), cache_->num_blocks());
  EXPECT_EQ(EvalPerplexity(*runner_, toks, 1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EvalPerplexity(*runner_, toks, 64, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spear::engine
