// Engine behaviour on a random tiny model: greedy/sampled generation,
// batching, stop conditions, KV accounting, request validation.
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/backend.h"
#include "worker/engine/engine.h"
#include "worker/model/weights.h"

namespace spear::engine {
namespace {

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::MakeTempDir("engine");
    testing::TinyModelSpec spec;
    spec.tied = true;
    ASSERT_TRUE(testing::WriteTinyModel(dir, spec).ok());
    auto m = model::LoadModel(dir);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }

  std::unique_ptr<Engine> MakeEngine(int64_t num_blocks = 128, int64_t max_batch_tokens = 512) {
    EngineOptions o;
    o.num_threads = 2;
    o.kv_cache.block_size = 8;
    o.kv_cache.num_blocks = num_blocks;
    o.max_batch_tokens = max_batch_tokens;
    auto e = Engine::Create(model_, o);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  static std::vector<int32_t> Prompt(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(3 + rng() % 120);
    return t;
  }

  static GenerateOptions Opts(int64_t n) {
    GenerateOptions o;
    o.max_new_tokens = n;
    o.stop_on_eos = false;
    return o;
  }

  static model::LoadedModel* model_;
};
model::LoadedModel* EngineTest::model_ = nullptr;

TEST_F(EngineTest, GreedyIsDeterministicAndStreams) {
  auto e = MakeEngine();
  std::vector<int32_t> streamed;
  auto r1 = e->Generate(Prompt(12, 1), SamplingParams{}, Opts(20), [&](int32_t t) {
    streamed.push_back(t);
    return true;
  });
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->tokens.size(), 20u);
  EXPECT_EQ(r1->finish_reason, FinishReason::kLength);
  EXPECT_EQ(streamed, r1->tokens);
  EXPECT_EQ(e->num_free_blocks(), 128);  // KV blocks freed
  auto r2 = e->Generate(Prompt(12, 1), SamplingParams{}, Opts(20));
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r1->tokens, r2->tokens);
}

TEST_F(EngineTest, ChunkedPrefillGivesSameGreedyTokens) {
  auto whole = MakeEngine(128, 512);
  auto chunked = MakeEngine(128, 5);  // 37-token prompt in 5-token chunks
  auto a = whole->Generate(Prompt(37, 2), SamplingParams{}, Opts(12));
  auto b = chunked->Generate(Prompt(37, 2), SamplingParams{}, Opts(12));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
}

TEST_F(EngineTest, SeededSamplingIsReproducibleAndTopK1IsGreedy) {
  auto e = MakeEngine();
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.top_p = 0.9f;
  sp.seed = 42;
  auto a = e->Generate(Prompt(8, 3), sp, Opts(24));
  auto b = e->Generate(Prompt(8, 3), sp, Opts(24));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);

  SamplingParams k1;
  k1.temperature = 1.5f;
  k1.top_k = 1;
  k1.seed = 7;
  auto c = e->Generate(Prompt(8, 3), k1, Opts(24));
  auto g = e->Generate(Prompt(8, 3), SamplingParams{}, Opts(24));
  ASSERT_TRUE(c.ok() && g.ok());
  EXPECT_EQ(c->tokens, g->tokens);
  // Sampling at high temperature departs from greedy somewhere.
  SamplingParams hot;
  hot.temperature = 5.f;
  hot.seed = 3;
  auto h = e->Generate(Prompt(8, 3), hot, Opts(24));
  ASSERT_TRUE(h.ok());
  EXPECT_NE(h->tokens, g->tokens);
}

// A test-only backend that offers ForwardSample the way a device backend
// does, emulated on the host (Forward, then Sampler::Pick with each row's
// draw): the Engine's device-sampling path (rows in chunk order, one RNG
// draw per non-greedy row, the history span) must give exactly the tokens
// of host sampling for every request of a mixed batch.
class PickingBackend final : public ModelBackend {
 public:
  explicit PickingBackend(std::unique_ptr<CpuBackend> cpu) : cpu_(std::move(cpu)) {}
  absl::Status Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out) override {
    return cpu_->Forward(batch, out);
  }
  bool samples_on_device() const override { return true; }
  absl::Status ForwardSample(const std::vector<SeqChunk>& batch,
                             const std::vector<RowSampling>& rows,
                             std::vector<int32_t>* tokens) override {
    ++calls;
    if (auto st = cpu_->Forward(batch, &out_); !st.ok()) return st;
    if (static_cast<int64_t>(rows.size()) != out_.num_rows) {
      return absl::InvalidArgumentError("row count");
    }
    tokens->clear();
    for (size_t r = 0; r < rows.size(); ++r) {
      Sampler s(rows[r].params);
      tokens->push_back(s.Pick(out_.row(static_cast<int64_t>(r)), out_.vocab, rows[r].history,
                               rows[r].uniform));
    }
    return absl::OkStatus();
  }
  BlockAllocator& allocator() override { return cpu_->allocator(); }
  const BlockAllocator& allocator() const override { return cpu_->allocator(); }
  int block_size() const override { return cpu_->block_size(); }
  int64_t num_blocks() const override { return cpu_->num_blocks(); }
  const model::LoadedModel& model() const override { return cpu_->model(); }
  Device device() const override { return Device::kCpu; }
  std::string Describe() const override { return "picking test backend"; }
  int calls = 0;

 private:
  std::unique_ptr<CpuBackend> cpu_;
  ForwardOutput out_;
};

TEST_F(EngineTest, DeviceSamplingPathGivesHostSamplingTokens) {
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 5; ++i) {
    GenerateRequest r;
    r.prompt = Prompt(6 + 5 * i, 20 + i);
    r.options = Opts(14 + i);
    r.sampling.seed = 100 + i;
    r.sampling.temperature = i == 0 ? 0.f : 0.6f + 0.3f * i;
    r.sampling.top_k = i == 2 ? 20 : 0;
    r.sampling.top_p = i == 3 || i == 4 ? 0.8f : 1.f;
    r.sampling.repetition_penalty = i == 4 || i == 0 ? 1.3f : 1.f;
    reqs.push_back(r);
  }
  auto host = MakeEngine();
  const std::vector<GenerateResult> want = host->GenerateBatch(reqs);
  EngineOptions o;
  o.num_threads = 2;
  o.max_batch_tokens = 512;
  auto pool = std::make_unique<kernels::ThreadPool>(2);
  KvCacheOptions kv;
  kv.block_size = 8;
  kv.num_blocks = 128;
  auto cpu = CpuBackend::Create(model_, kv, pool.get());
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto picking = std::make_unique<PickingBackend>(std::move(*cpu));
  PickingBackend* pb = picking.get();
  auto dev = Engine::Create(model_, o, std::move(picking));
  ASSERT_TRUE(dev.ok()) << dev.status();
  const std::vector<GenerateResult> got = (*dev)->GenerateBatch(reqs);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_GT(pb->calls, 0);
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_TRUE(want[i].status.ok() && got[i].status.ok()) << i;
    EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << i;
    EXPECT_EQ(got[i].tokens.size(), static_cast<size_t>(14 + i));
  }
}

TEST_F(EngineTest, BatchMatchesSingleAndFinishesIndependently) {
  auto e = MakeEngine();
  std::vector<GenerateRequest> reqs(3);
  const int lens[3] = {5, 17, 33};
  const int news[3] = {9, 3, 14};
  std::vector<std::vector<int32_t>> streamed(3);
  for (int i = 0; i < 3; ++i) {
    reqs[i].prompt = Prompt(lens[i], 10 + i);
    reqs[i].options = Opts(news[i]);
    reqs[i].on_token = [&streamed, i](int32_t t) {
      streamed[i].push_back(t);
      return true;
    };
  }
  reqs[2].sampling.temperature = 0.8f;
  reqs[2].sampling.seed = 5;
  auto rs = e->GenerateBatch(reqs);
  ASSERT_EQ(rs.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(rs[i].status.ok()) << rs[i].status;
    EXPECT_EQ(rs[i].tokens.size(), static_cast<size_t>(news[i]));
    EXPECT_EQ(streamed[i], rs[i].tokens);
    auto alone = e->Generate(reqs[i].prompt, reqs[i].sampling, reqs[i].options);
    ASSERT_TRUE(alone.ok());
    EXPECT_EQ(alone->tokens, rs[i].tokens) << "request " << i;
  }
  EXPECT_EQ(e->num_free_blocks(), 128);
}

TEST_F(EngineTest, BatchLargerThanCacheRunsInWaves) {
  auto e = MakeEngine(/*num_blocks=*/6);  // 48 positions: one request at a time
  std::vector<GenerateRequest> reqs(4);
  for (int i = 0; i < 4; ++i) {
    reqs[i].prompt = Prompt(20, 20 + i);
    reqs[i].options = Opts(10);
  }
  auto rs = e->GenerateBatch(reqs);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(rs[i].status.ok()) << rs[i].status;
    EXPECT_EQ(rs[i].tokens.size(), 10u);
    auto alone = e->Generate(reqs[i].prompt, reqs[i].sampling, reqs[i].options);
    ASSERT_TRUE(alone.ok());
    EXPECT_EQ(alone->tokens, rs[i].tokens);
  }
  EXPECT_EQ(e->num_free_blocks(), 6);
}

TEST_F(EngineTest, StopTokensAndCancellation) {
  auto e = MakeEngine();
  auto g = e->Generate(Prompt(10, 4), SamplingParams{}, Opts(8));
  ASSERT_TRUE(g.ok());
  ASSERT_EQ(g->tokens.size(), 8u);
  // Stop at the 4th greedy token: 3 tokens out, the stop token excluded.
  GenerateOptions o = Opts(8);
  o.stop_token_ids = {g->tokens[3]};
  auto s = e->Generate(Prompt(10, 4), SamplingParams{}, o);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->finish_reason, FinishReason::kStop);
  const auto first = std::find(g->tokens.begin(), g->tokens.end(), g->tokens[3]);
  EXPECT_EQ(s->tokens, std::vector<int32_t>(g->tokens.begin(), first));
  // Callback says stop after 2 tokens.
  int seen = 0;
  auto c = e->Generate(Prompt(10, 4), SamplingParams{}, Opts(8), [&](int32_t) {
    return ++seen < 2;
  });
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(c->tokens.size(), 2u);
  // EOS (id 2 in the tiny config) stops when stop_on_eos.
  GenerateOptions eos = Opts(8);
  eos.stop_on_eos = true;
  auto z = e->Generate(Prompt(10, 4), SamplingParams{}, eos);
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(std::count(z->tokens.begin(), z->tokens.end(), 2), 0);
  auto zero = e->Generate(Prompt(10, 4), SamplingParams{}, Opts(0));
  ASSERT_TRUE(zero.ok());
  EXPECT_TRUE(zero->tokens.empty());
  EXPECT_EQ(e->num_free_blocks(), 128);
}

TEST_F(EngineTest, RejectsBadRequests) {
  auto e = MakeEngine(/*num_blocks=*/4);
  const auto ok_prompt = Prompt(5, 1);
  EXPECT_EQ(e->Generate({}, SamplingParams{}, Opts(4)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Generate({1, 2, 500}, SamplingParams{}, Opts(4)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Generate({1, -1}, SamplingParams{}, Opts(4)).status().code(),
            absl::StatusCode::kInvalidArgument);
  SamplingParams bad;
  bad.temperature = -1;
  EXPECT_EQ(e->Generate(ok_prompt, bad, Opts(4)).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = SamplingParams{};
  bad.top_p = 0;
  EXPECT_EQ(e->Generate(ok_prompt, bad, Opts(4)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Generate(ok_prompt, SamplingParams{}, Opts(-1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Generate(ok_prompt, SamplingParams{}, Opts(5000)).status().code(),
            absl::StatusCode::kInvalidArgument);  // beyond max_position
  EXPECT_EQ(e->Generate(ok_prompt, SamplingParams{}, Opts(40)).status().code(),
            absl::StatusCode::kResourceExhausted);  // 45 positions > 4 blocks of 8
  // A batch with one bad request still serves the others.
  std::vector<GenerateRequest> reqs(2);
  reqs[0].prompt = {};
  reqs[1].prompt = ok_prompt;
  reqs[1].options = Opts(3);
  auto rs = e->GenerateBatch(reqs);
  EXPECT_EQ(rs[0].status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(rs[1].status.ok());
  EXPECT_EQ(rs[1].tokens.size(), 3u);
  EXPECT_EQ(e->num_free_blocks(), 4);
}

}  // namespace
}  // namespace spear::engine
