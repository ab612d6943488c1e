// The Engine's backend interface on the CPU: an engine on an explicit
// backend gives the same greedy tokens as Engine::Create; a wrapping
// backend sees every forward (the engine, perplexity and the latency
// profile drive only the interface) and its failures reach the requests
// with their KV blocks freed; device parsing and resolution (engine_factory)
// with their errors on a build or machine without CUDA.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/tiny_model.h"
#include "tests/engine/tiny_w4_model.h"
#include "worker/engine/backend.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/engine.h"
#include "worker/engine/engine_factory.h"
#include "worker/engine/latency_table.h"
#include "worker/engine/perplexity.h"

namespace spear::engine {
namespace {

// A backend that forwards to a CPU backend, counts forwards and tokens,
// and can fail the n-th forward.
class CountingBackend final : public ModelBackend {
 public:
  explicit CountingBackend(std::unique_ptr<CpuBackend> inner) : inner_(std::move(inner)) {}
  absl::Status Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out) override {
    ++forwards;
    int64_t t = 0;
    for (const SeqChunk& c : batch) t += static_cast<int64_t>(c.tokens.size());
    tokens += t;
    // A graph-capturing backend: the first forward of each token count is slow.
    if (first_use_sleep_ms > 0 && shapes_seen.insert(t).second) {
      std::this_thread::sleep_for(std::chrono::milliseconds(first_use_sleep_ms));
    }
    if (forwards == fail_at) return absl::InternalError("injected device failure");
    return inner_->Forward(batch, out);
  }
  BlockAllocator& allocator() override { return inner_->allocator(); }
  const BlockAllocator& allocator() const override { return inner_->allocator(); }
  int block_size() const override { return inner_->block_size(); }
  int64_t num_blocks() const override { return inner_->num_blocks(); }
  const model::LoadedModel& model() const override { return inner_->model(); }
  Device device() const override { return device_as; }
  std::string Describe() const override { return "counting " + inner_->Describe(); }

  int64_t forwards = 0, tokens = 0, fail_at = -1;
  Device device_as = Device::kCpu;
  int first_use_sleep_ms = 0;
  std::set<int64_t> shapes_seen;

 private:
  std::unique_ptr<CpuBackend> inner_;
};

class BackendTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = testing::TinyW4Model(/*grouped=*/true, /*tied=*/false).release();
    pool_ = new kernels::ThreadPool(2);
  }
  static void TearDownTestSuite() {
    delete model_;
    delete pool_;
  }

  static EngineOptions Options(int64_t max_batch_tokens = 512) {
    EngineOptions o;
    o.num_threads = 2;
    o.kv_cache.block_size = 8;
    o.kv_cache.num_blocks = 96;
    o.max_batch_tokens = max_batch_tokens;
    return o;
  }

  static std::vector<GenerateRequest> Requests() {
    std::mt19937 rng(3);
    std::vector<GenerateRequest> reqs;
    for (int len : {1, 9, 23, 40}) {
      GenerateRequest r;
      for (int i = 0; i < len; ++i) r.prompt.push_back(static_cast<int32_t>(rng() % 300));
      r.options.max_new_tokens = 12;
      r.options.stop_on_eos = false;
      reqs.push_back(std::move(r));
    }
    return reqs;
  }

  std::unique_ptr<CountingBackend> Counting() {
    KvCacheOptions kv = Options().kv_cache;
    auto cpu = CpuBackend::Create(model_, kv, pool_);
    EXPECT_TRUE(cpu.ok()) << cpu.status();
    return std::make_unique<CountingBackend>(std::move(*cpu));
  }

  static model::LoadedModel* model_;
  static kernels::ThreadPool* pool_;
};
model::LoadedModel* BackendTest::model_ = nullptr;
kernels::ThreadPool* BackendTest::pool_ = nullptr;

TEST_F(BackendTest, EngineOnAnExplicitBackendMatchesCreate) {
  auto ref = Engine::Create(model_, Options(16));  // 16-token budget: chunked prefill
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ((*ref)->backend().device(), Device::kCpu);
  EXPECT_STREQ((*ref)->backend().name(), "cpu");
  EXPECT_EQ((*ref)->backend().num_blocks(), 96);
  EXPECT_EQ((*ref)->backend().block_size(), 8);
  EXPECT_NE((*ref)->backend().Describe().find("96 blocks x 8 fp32"), std::string::npos)
      << (*ref)->backend().Describe();

  auto counting = Counting();
  CountingBackend* c = counting.get();
  auto e = Engine::Create(model_, Options(16), std::move(counting));
  ASSERT_TRUE(e.ok()) << e.status();
  const auto want = (*ref)->GenerateBatch(Requests());
  const auto got = (*e)->GenerateBatch(Requests());
  ASSERT_EQ(want.size(), got.size());
  int64_t generated = 0, prompt = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_TRUE(want[i].status.ok()) << want[i].status;
    ASSERT_TRUE(got[i].status.ok()) << got[i].status;
    EXPECT_EQ(got[i].tokens.size(), 12u);
    EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << i;
    generated += static_cast<int64_t>(got[i].tokens.size());
    prompt += got[i].prompt_tokens;
  }
  // Every prompt token and every generated token but the last of each
  // request went through the backend once; with a 16-token budget the
  // 40-token prompt needed at least 3 forwards.
  EXPECT_EQ(c->tokens, prompt + generated - static_cast<int64_t>(want.size()));
  EXPECT_GE(c->forwards, 12 + 2);
  EXPECT_EQ((*e)->num_free_blocks(), 96);
}

TEST_F(BackendTest, BackendFailureFailsTheBatchAndFreesBlocks) {
  auto counting = Counting();
  counting->fail_at = 3;
  auto e = Engine::Create(model_, Options(), std::move(counting));
  ASSERT_TRUE(e.ok()) << e.status();
  const auto got = (*e)->GenerateBatch(Requests());
  for (const GenerateResult& r : got) {
    EXPECT_EQ(r.status.code(), absl::StatusCode::kInternal) << r.status;
    EXPECT_EQ(r.finish_reason, FinishReason::kError);
    EXPECT_EQ(r.tokens.size(), 2u);  // two steps ran before the failure
  }
  EXPECT_EQ((*e)->num_free_blocks(), 96);
  // The engine stays usable.
  const auto again = (*e)->GenerateBatch(Requests());
  for (const GenerateResult& r : again) EXPECT_TRUE(r.status.ok()) << r.status;
}

// on_hidden reports every position the engine runs (prompt chunks, then one
// per decode step) exactly once, with the final-normed hidden states one
// forward over the whole sequence computes.
TEST_F(BackendTest, HiddenStatesOfEveryRunPositionMatchOneForward) {
  auto e = Engine::Create(model_, Options(16));  // chunked prefill
  ASSERT_TRUE(e.ok()) << e.status();
  const int64_t d = model_->config.hidden_size;
  std::vector<GenerateRequest> reqs = Requests();
  std::vector<std::vector<float>> got(reqs.size());
  std::vector<std::vector<int>> seen(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    const size_t cap = reqs[i].prompt.size() + 12;
    got[i].assign(cap * d, std::nanf(""));
    seen[i].assign(cap, 0);
    reqs[i].on_hidden = [&, i](int64_t pos, const float* rows, int64_t count, int64_t dim) {
      ASSERT_EQ(dim, d);
      for (int64_t r = 0; r < count; ++r) {
        ASSERT_LT(pos + r, static_cast<int64_t>(seen[i].size()));
        ++seen[i][pos + r];
        std::copy(rows + r * d, rows + (r + 1) * d, got[i].begin() + (pos + r) * d);
      }
    };
  }
  const auto res = (*e)->GenerateBatch(reqs);

  auto cache = KvCache::Create(model_->config, Options().kv_cache);
  ASSERT_TRUE(cache.ok()) << cache.status();
  ModelRunner runner(model_, cache->get(), pool_);
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(res[i].status.ok()) << res[i].status;
    std::vector<int32_t> seq = reqs[i].prompt;
    seq.insert(seq.end(), res[i].tokens.begin(), res[i].tokens.end() - 1);  // the last never runs
    const int64_t n = static_cast<int64_t>(seq.size());
    for (int64_t p = 0; p < static_cast<int64_t>(seen[i].size()); ++p) {
      EXPECT_EQ(seen[i][p], p < n ? 1 : 0) << "request " << i << " position " << p;
    }
    std::vector<int32_t> blocks;
    for (int32_t b = 0; b < (n + 7) / 8; ++b) blocks.push_back(b);
    SeqChunk ch;
    ch.tokens = seq;
    ch.block_table = blocks;
    ch.logits = LogitsMode::kNone;
    ch.hidden = true;
    ForwardOutput out;
    ASSERT_TRUE(runner.Forward({ch}, &out).ok());
    ASSERT_EQ(out.num_hidden_rows, n);
    ASSERT_EQ(out.first_hidden_row[0], 0);
    double err = 0, scale = 0;
    for (int64_t j = 0; j < n * d; ++j) {
      err = std::max(err, static_cast<double>(std::fabs(got[i][j] - out.hidden[j])));
      scale = std::max(scale, static_cast<double>(std::fabs(out.hidden[j])));
    }
    // The same model, batched differently (chunks, decode rows beside other
    // sequences): summation order only.
    EXPECT_LE(err, 1e-4 * std::max(1.0, scale)) << "request " << i;
  }
}

// A backend that does not return hidden states (the CUDA one, here a
// wrapper) fails exactly the requests that ask for them, with the reason.
TEST_F(BackendTest, HiddenStatesNeedABackendThatReturnsThem) {
  auto counting = Counting();
  EXPECT_FALSE(counting->returns_hidden());
  auto e = Engine::Create(model_, Options(), std::move(counting));
  ASSERT_TRUE(e.ok()) << e.status();
  std::vector<GenerateRequest> reqs = Requests();
  int calls = 0;
  reqs[1].on_hidden = [&](int64_t, const float*, int64_t, int64_t) { ++calls; };
  const auto res = (*e)->GenerateBatch(reqs);
  for (size_t i = 0; i < res.size(); ++i) {
    if (i == 1) {
      EXPECT_EQ(res[i].status.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(res[i].status.message().find("does not return hidden states"), std::string::npos)
          << res[i].status;
    } else {
      EXPECT_TRUE(res[i].status.ok()) << res[i].status;
      EXPECT_EQ(res[i].tokens.size(), 12u);
    }
  }
  EXPECT_EQ(calls, 0);
  auto seq = (*e)->NewSequence({5, 6, 7}, SamplingParams{}, GenerateOptions{});
  ASSERT_TRUE(seq.ok());
  std::vector<StepOutput> outs;
  EXPECT_EQ((*e)->Step({{seq->get(), 3, /*hidden=*/true}}, &outs).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*e)->num_free_blocks(), 96);
}

TEST_F(BackendTest, CreateRejectsMissingOrForeignBackend) {
  EXPECT_EQ(Engine::Create(model_, Options(), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto other = testing::TinyW4Model(/*grouped=*/false, /*tied=*/false);
  auto foreign = CpuBackend::Create(other.get(), Options().kv_cache, pool_);
  ASSERT_TRUE(foreign.ok());
  auto e = Engine::Create(model_, Options(), std::move(*foreign));
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("another model"), std::string::npos) << e.status();
}

TEST_F(BackendTest, PerplexityOnTheInterfaceEqualsTheRunnerOverload) {
  KvCacheOptions kv;  // the same block size as the counting backend's
  kv.block_size = 8;
  kv.num_blocks = 8;
  auto cache = KvCache::Create(model_->config, kv);
  ASSERT_TRUE(cache.ok());
  ModelRunner runner(model_, cache->get(), pool_);
  std::mt19937 rng(9);
  std::vector<int32_t> toks(100);
  for (auto& t : toks) t = static_cast<int32_t>(rng() % 300);
  auto a = EvalPerplexity(runner, toks, 48, 0, nullptr, 20);
  ASSERT_TRUE(a.ok()) << a.status();
  auto counting = Counting();
  auto b = EvalPerplexity(*counting, toks, 48, 0, nullptr, 20);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->ppl, b->ppl);  // same arithmetic, bit for bit
  EXPECT_EQ(b->windows, 2);
  EXPECT_EQ(counting->forwards, 2 * 3);  // 48 tokens in chunks of 20
  EXPECT_EQ(counting->allocator().num_free(), counting->num_blocks());
  EXPECT_EQ((*cache)->allocator().num_free(), 8);
}

// ProfileLatency at 1, 4, 16 and 32 tokens (repeats timed runs each) on an
// engine over `backend` (which the engine owns: its counts are copied out
// before it goes); the profile must give back every KV block.
struct Profiled {
  absl::StatusOr<LatencyTable> table = absl::UnknownError("not run");
  int64_t forwards = 0, tokens = 0;
};
Profiled ProfileOn(std::unique_ptr<CountingBackend> backend, int repeats,
                   const model::LoadedModel* model, const EngineOptions& options) {
  Profiled out;
  CountingBackend* c = backend.get();
  auto e = Engine::Create(model, options, std::move(backend));
  if (!e.ok()) {
    out.table = e.status();
    return out;
  }
  BlockManager blocks(&(*e)->backend().allocator(), (*e)->backend().block_size(),
                      BlockManager::Options());
  ProfileOptions po;
  po.tokens = {1, 4, 16};
  po.max_tokens = 32;
  po.repeats = repeats;
  out.table = ProfileLatency(e->get(), &blocks, nullptr, po);
  EXPECT_EQ(blocks.num_used(), 0);
  out.forwards = c->forwards;
  out.tokens = c->tokens;
  return out;
}

TEST_F(BackendTest, LatencyProfileRunsOnTheEnginesBackend) {
  const Profiled p = ProfileOn(Counting(), 1, model_, Options());
  ASSERT_TRUE(p.table.ok()) << p.table.status();
  // One warm-up (32 tokens) + one timed run at each of 1, 4, 16, 32 tokens.
  EXPECT_EQ(p.forwards, 5);
  EXPECT_EQ(p.tokens, 32 + 1 + 4 + 16 + 32);
  EXPECT_GT(p.table->Predict(32, 0), 0);
}

// On CUDA the profile runs each point once untimed before timing it (the
// runner captures a graph per shape): a backend whose first forward of
// each token count sleeps 60 ms reports its steady times, and the count of
// forwards has one more run per point.
TEST_F(BackendTest, LatencyProfileWarmsEachPointOnCuda) {
  auto counting = Counting();
  counting->device_as = Device::kCuda;
  counting->first_use_sleep_ms = 60;
  const Profiled p = ProfileOn(std::move(counting), 2, model_, Options());
  ASSERT_TRUE(p.table.ok()) << p.table.status();
  // One warm-up (32 tokens) + (one untimed + two timed) at 1, 4, 16, 32.
  EXPECT_EQ(p.forwards, 1 + 4 * 3);
  for (int32_t tok : {1, 4, 16, 32}) {
    EXPECT_LT(p.table->Predict(tok, 0), 0.050) << tok << " tokens: the first-use sleep was timed";
  }
}

TEST(Device, ParseAndName) {
  for (Device d : {Device::kCpu, Device::kCuda, Device::kAuto}) {
    auto p = ParseDevice(DeviceName(d));
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(*p, d);
  }
  auto bad = ParseDevice("gpu");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'gpu'"), std::string::npos) << bad.status();
}

TEST(Device, ResolutionSaysWhyCudaIsUnavailable) {
  auto cpu = ResolveDevice(Device::kCpu);
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(*cpu, Device::kCpu);
  const absl::Status usable = CudaUsable();
  auto cuda = ResolveDevice(Device::kCuda);
  auto autod = ResolveDevice(Device::kAuto);
  ASSERT_TRUE(autod.ok());
  if (usable.ok()) {
    ASSERT_TRUE(BuiltWithCuda());
    ASSERT_TRUE(cuda.ok());
    EXPECT_EQ(*autod, Device::kCuda);
    GTEST_SKIP() << "a CUDA device is present: the unavailable paths are not reachable here";
  }
  EXPECT_EQ(*autod, Device::kCpu);
  ASSERT_FALSE(cuda.ok());
  EXPECT_EQ(cuda.status(), usable);
  if (BuiltWithCuda()) {
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kUnavailable) << cuda.status();
  } else {
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition) << cuda.status();
    EXPECT_NE(cuda.status().message().find("no CUDA backend"), std::string::npos);
  }
  // CreateEngine: the same error for cuda, the CPU engine for auto.
  auto m = testing::TinyW4Model(false, false);
  EngineOptions o;
  o.num_threads = 1;
  o.kv_cache.num_blocks = 16;
  EXPECT_EQ(CreateEngine(m.get(), o, Device::kCuda).status(), usable);
  auto e = CreateEngine(m.get(), o, Device::kAuto);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->backend().device(), Device::kCpu);
  EXPECT_EQ((*e)->backend().num_blocks(), 16);
}

}  // namespace
}  // namespace spear::engine
