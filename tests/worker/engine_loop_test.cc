// EngineLoop on a random tiny model: output equals Engine::Generate, events
// in order, cancellation and deadlines free KV, the bounded queue, drain.
#include <memory>
#include <random>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/engine/collect_sink.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/engine_loop.h"

namespace spear::engine {
namespace {

using testing::Collect;

class EngineLoopTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::MakeTempDir("loop");
    testing::TinyModelSpec spec;
    ASSERT_TRUE(testing::WriteTinyModel(dir, spec).ok());
    model_ = model::LoadModel(dir)->release();
  }
  static void TearDownTestSuite() { delete model_; }

  void Make(int64_t blocks = 64, int64_t max_waiting = 16, bool prefix_caching = true) {
    loop_.reset();  // before the engine it borrows
    EngineOptions o;
    o.num_threads = 2;
    o.kv_cache.block_size = 8;
    o.kv_cache.num_blocks = blocks;
    engine_ = std::move(*Engine::Create(model_, o));
    EngineLoopOptions lo;
    lo.scheduler.max_waiting = max_waiting;
    lo.profile.max_tokens = std::min<int64_t>(64, blocks * 8);
    lo.prefix_caching = prefix_caching;
    auto loop = EngineLoop::Create(engine_.get(), nullptr, lo, &clock_, nullptr);
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
  }

  static std::vector<int32_t> Prompt(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(3 + rng() % 120);
    return t;
  }
  static ExecuteSpec Spec(std::vector<int32_t> prompt, int max_new, uint64_t seed = 0) {
    ExecuteSpec s;
    s.prompt = std::move(prompt);
    s.options.max_new_tokens = max_new;
    s.options.stop_on_eos = false;
    s.sampling.temperature = seed ? 0.8f : 0.f;
    s.sampling.seed = seed;
    return s;
  }

  static model::LoadedModel* model_;
  SteadyClock clock_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<EngineLoop> loop_;
};
model::LoadedModel* EngineLoopTest::model_ = nullptr;

TEST_F(EngineLoopTest, MatchesGenerateAndFreesKv) {
  Make();
  // Reference first, on its own engine.
  EngineOptions o;
  o.num_threads = 2;
  o.kv_cache.block_size = 8;
  o.kv_cache.num_blocks = 64;
  auto ref_engine = std::move(*Engine::Create(model_, o));
  std::vector<std::vector<int32_t>> want;
  for (int i = 0; i < 3; ++i) {
    GenerateOptions go;
    go.max_new_tokens = 12;
    go.stop_on_eos = false;
    SamplingParams sp;
    sp.temperature = i ? 0.8f : 0.f;
    sp.seed = i;
    auto r = ref_engine->Generate(Prompt(5 + 7 * i, i), sp, go);
    ASSERT_TRUE(r.ok());
    want.push_back(r->tokens);
  }
  loop_->Start();
  std::vector<std::shared_ptr<Collect>> sinks;
  for (int i = 0; i < 3; ++i) {
    sinks.push_back(std::make_shared<Collect>());
    auto id = loop_->Submit(Spec(Prompt(5 + 7 * i, i), 12, i), sinks.back());
    ASSERT_TRUE(id.ok()) << id.status();
  }
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(sinks[i]->done.WaitForNotificationWithTimeout(absl::Seconds(30)));
    EXPECT_TRUE(sinks[i]->info.status.ok()) << sinks[i]->info.status;
    EXPECT_TRUE(sinks[i]->accepted);
    EXPECT_EQ(sinks[i]->tokens, want[i]) << "request " << i;
    EXPECT_EQ(sinks[i]->info.reason, FinishReason::kLength);
  }
  absl::Notification idle;
  loop_->WhenIdle([&] { idle.Notify(); });
  ASSERT_TRUE(idle.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(loop_->Snapshot().kv_used_blocks, 0);
}

std::vector<int32_t> Reference(model::LoadedModel* m, const std::vector<int32_t>& prompt,
                               int max_new, uint64_t seed) {
  EngineOptions o;
  o.num_threads = 2;
  o.kv_cache.block_size = 8;
  o.kv_cache.num_blocks = 64;
  auto e = std::move(*Engine::Create(m, o));
  GenerateOptions go;
  go.max_new_tokens = max_new;
  go.stop_on_eos = false;
  SamplingParams sp;
  sp.temperature = seed ? 0.8f : 0.f;
  sp.seed = seed;
  auto r = e->Generate(prompt, sp, go);
  EXPECT_TRUE(r.ok());
  return r.ok() ? r->tokens : std::vector<int32_t>{};
}

TEST_F(EngineLoopTest, PreemptionByRecomputeKeepsOutputsIdentical) {
  // 7 blocks of 8 = 56 positions for three requests of 10 + 20: they cannot
  // all hold their KV at once, so the youngest are preempted and recomputed.
  Make(/*blocks=*/7);
  std::vector<std::shared_ptr<Collect>> sinks;
  for (int i = 0; i < 3; ++i) {
    sinks.push_back(std::make_shared<Collect>());
    ASSERT_TRUE(loop_->Submit(Spec(Prompt(10, 20 + i), 20, i), sinks.back()).ok());
  }
  loop_->Start();  // all three in the first iteration: deterministic
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(sinks[i]->done.WaitForNotificationWithTimeout(absl::Seconds(30)));
    ASSERT_TRUE(sinks[i]->info.status.ok()) << sinks[i]->info.status;
    EXPECT_EQ(sinks[i]->tokens, Reference(model_, Prompt(10, 20 + i), 20, i)) << i;
  }
  EXPECT_GT(loop_->Snapshot().preemptions, 0);
  absl::Notification idle;
  loop_->WhenIdle([&] { idle.Notify(); });
  ASSERT_TRUE(idle.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(loop_->Snapshot().kv_used_blocks, 0);
}

TEST_F(EngineLoopTest, PrefixCacheReuseKeepsOutputsIdentical) {
  Make();
  loop_->Start();
  const std::vector<int32_t> prompt = Prompt(37, 5);
  const std::vector<int32_t> want = Reference(model_, prompt, 10, 0);
  for (int round = 0; round < 2; ++round) {
    auto sink = std::make_shared<Collect>();
    ASSERT_TRUE(loop_->Submit(Spec(prompt, 10), sink).ok());
    ASSERT_TRUE(sink->done.WaitForNotificationWithTimeout(absl::Seconds(30)));
    EXPECT_EQ(sink->tokens, want) << "round " << round;
    // Second time: the four full blocks of the prompt (32 tokens) come from
    // the cache.
    EXPECT_EQ(sink->info.cached_prompt_tokens, round == 0 ? 0 : 32);
  }
}

TEST_F(EngineLoopTest, BoundedQueueAndDrain) {
  Make(64, /*max_waiting=*/2);
  // Not started: requests stay queued, so the bound is exact.
  auto a = std::make_shared<Collect>(), b = std::make_shared<Collect>();
  ASSERT_TRUE(loop_->Submit(Spec(Prompt(4, 1), 3), a).ok());
  ASSERT_TRUE(loop_->Submit(Spec(Prompt(4, 2), 3), b).ok());
  EXPECT_EQ(loop_->Submit(Spec(Prompt(4, 3), 3), std::make_shared<Collect>()).status().code(),
            absl::StatusCode::kResourceExhausted);
  ExecuteSpec dup = Spec(Prompt(4, 4), 3);
  dup.spec.request_id = "x";
  auto c = std::make_shared<Collect>();
  Make(64, 8);
  ASSERT_TRUE(loop_->Submit(dup, c).ok());
  EXPECT_EQ(loop_->Submit(dup, std::make_shared<Collect>()).status().code(),
            absl::StatusCode::kAlreadyExists);
  loop_->StartDrain();
  EXPECT_EQ(loop_->Submit(Spec(Prompt(4, 5), 3), std::make_shared<Collect>()).status().code(),
            absl::StatusCode::kUnavailable);
  absl::Notification idle;
  loop_->WhenIdle([&] { idle.Notify(); });
  loop_->Start();
  ASSERT_TRUE(idle.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ASSERT_TRUE(c->done.HasBeenNotified());
  EXPECT_TRUE(c->info.status.ok());
  EXPECT_EQ(c->tokens.size(), 3u);
  // The first loop was destroyed unstarted: its queued requests ended UNAVAILABLE.
  ASSERT_TRUE(a->done.HasBeenNotified());
  EXPECT_EQ(a->info.status.code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace spear::engine
