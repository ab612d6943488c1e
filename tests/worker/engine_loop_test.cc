// EngineLoop on a random tiny model: output equals Engine::Generate, events
// in order, cancellation and deadlines free KV, the bounded queue, drain.
#include <memory>
#include <random>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/engine_loop.h"

namespace spear::engine {
namespace {

class Collect final : public RequestSink {
 public:
  void OnAccepted(double, int64_t cached) override {
    absl::MutexLock l(&mu);
    accepted = true;
    cached_tokens = cached;
  }
  void OnTokens(const std::vector<int32_t>& ids, double) override {
    absl::MutexLock l(&mu);
    tokens.insert(tokens.end(), ids.begin(), ids.end());
  }
  void OnFinished(const FinishInfo& f) override {
    {
      absl::MutexLock l(&mu);
      info = f;
    }
    done.Notify();
  }
  absl::Mutex mu;
  bool accepted = false;
  int64_t cached_tokens = 0;
  std::vector<int32_t> tokens;
  FinishInfo info;
  absl::Notification done;
};

class EngineLoopTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::MakeTempDir("loop");
    testing::TinyModelSpec spec;
    ASSERT_TRUE(testing::WriteTinyModel(dir, spec).ok());
    model_ = model::LoadModel(dir)->release();
  }
  static void TearDownTestSuite() { delete model_; }

  void Make(int64_t blocks = 64, int64_t max_waiting = 16) {
    EngineOptions o;
    o.num_threads = 2;
    o.kv_cache.block_size = 8;
    o.kv_cache.num_blocks = blocks;
    engine_ = std::move(*Engine::Create(model_, o));
    EngineLoopOptions lo;
    lo.scheduler.max_waiting = max_waiting;
    lo.profile.max_tokens = 64;
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

}  // namespace
}  // namespace spear::engine
