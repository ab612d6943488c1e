// The Engine on the CUDA backend (engine_factory: CreateEngine(.., kCuda))
// against the Engine on the CPU backend, same model: GenerateBatch greedy
// (chunked prefill mixed with decode steps, the graph-replay path), the
// EngineLoop (scheduler, BlockManager with prefix reuse on the device
// cache), perplexity and the latency profile. (a) tiny random W4+EC
// models; (b) SmolLM2-135M W4+EC (`spear quantize`) when its .spear is
// present (SPEAR_TEST_SPEAR_MODEL or $SPEAR_HOME/models/
// smollm2-135m-w4-spear.spear), else skipped. Label gpu: skips with a
// message without a CUDA device.
//
// Token agreement: the GPU keeps activations and K/V in fp16, the CPU in
// fp32, so greedy streams may part where the CPU's top two logits are
// nearly tied. Each request's tokens must equal the CPU's up to the first
// difference, and there the CPU's logit of its own token may beat its
// logit of the GPU's token by at most kTie x std(CPU logits) (0.2: the
// runner test's "clear winner" margin; logits agree within 0.05 std).
// After a divergence the two sequences differ and are not compared.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/engine/collect_sink.h"
#include "tests/engine/smollm2_spear.h"
#include "tests/engine/tiny_w4_model.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/cuda_backend.h"
#include "worker/engine/engine.h"
#include "worker/engine/engine_factory.h"
#include "worker/engine/engine_loop.h"
#include "worker/engine/latency_table.h"
#include "worker/engine/perplexity.h"

namespace spear::engine {
namespace {

constexpr double kTie = 0.2;

#define SKIP_WITHOUT_GPU()                                                              \
  do {                                                                                  \
    if (absl::Status s = CudaUsable(); !s.ok()) {                                       \
      GTEST_SKIP() << s.message() << "; GPU tests run on the GPU machine (scripts/gpu/)"; \
    }                                                                                   \
  } while (0)

EngineOptions Options(int64_t num_blocks, int64_t max_batch_tokens) {
  EngineOptions o;
  o.num_threads = 4;
  o.kv_cache.block_size = 16;
  o.kv_cache.num_blocks = num_blocks;
  o.max_batch_tokens = max_batch_tokens;
  return o;
}

// CPU logits of the token after `context` (a fresh sequence on the CPU
// engine's backend).
std::vector<float> CpuNextLogits(Engine* cpu, const std::vector<int32_t>& context) {
  ModelBackend& b = cpu->backend();
  std::vector<int32_t> table;
  EXPECT_TRUE(b.allocator().Allocate(b.BlocksFor(static_cast<int64_t>(context.size())), &table).ok());
  SeqChunk c;
  c.tokens = context;
  c.block_table = table;
  c.logits = LogitsMode::kLast;
  ForwardOutput out;
  EXPECT_TRUE(b.Forward({c}, &out).ok());
  (void)b.allocator().Free(table);
  return std::vector<float>(out.row(0), out.row(0) + out.vocab);
}

struct Agreement {
  int64_t compared = 0, matched = 0, diverged = 0;
};

// Checks one request's GPU tokens against the CPU's (rule above).
void CheckGreedy(Engine* cpu, const std::vector<int32_t>& prompt, const std::vector<int32_t>& want,
                 const std::vector<int32_t>& got, const std::string& what, Agreement* a) {
  const size_t n = std::min(want.size(), got.size());
  size_t k = 0;
  while (k < n && want[k] == got[k]) ++k;
  a->compared += static_cast<int64_t>(want.size());
  a->matched += static_cast<int64_t>(k);
  if (k == want.size()) {
    EXPECT_EQ(got.size(), want.size()) << what;
    return;
  }
  ++a->diverged;
  ASSERT_LT(k, got.size()) << what << ": GPU stream shorter than the CPU's with no divergence";
  std::vector<int32_t> ctx = prompt;
  ctx.insert(ctx.end(), want.begin(), want.begin() + static_cast<int64_t>(k));
  const std::vector<float> row = CpuNextLogits(cpu, ctx);
  double s = 0, s2 = 0;
  for (float v : row) {
    s += v;
    s2 += static_cast<double>(v) * v;
  }
  const double mean = s / row.size();
  const double sd = std::sqrt(std::max(0.0, s2 / row.size() - mean * mean));
  const double gap = row[want[k]] - row[got[k]];
  std::printf("[%s] diverges at token %zu of %zu: cpu %d, gpu %d, cpu logit gap %.4g = %.4g std\n",
              what.c_str(), k, want.size(), want[k], got[k], gap, gap / sd);
  EXPECT_LE(gap, kTie * sd) << what << ": the GPU left the CPU's greedy path at token " << k
                            << " where the CPU's choice was clear";
}

std::vector<GenerateRequest> GreedyRequests(const std::vector<std::vector<int32_t>>& prompts,
                                            int max_new) {
  std::vector<GenerateRequest> reqs;
  for (const auto& p : prompts) {
    GenerateRequest r;
    r.prompt = p;
    r.options.max_new_tokens = max_new;
    r.options.stop_on_eos = false;
    reqs.push_back(std::move(r));
  }
  return reqs;
}

// GenerateBatch on both engines; returns the agreement.
Agreement CompareGenerateBatch(const model::LoadedModel* m,
                               const std::vector<std::vector<int32_t>>& prompts, int max_new,
                               int64_t max_batch_tokens, const std::string& what) {
  const int64_t blocks = 64 * static_cast<int64_t>(prompts.size());
  auto cpu = Engine::Create(m, Options(blocks, max_batch_tokens));
  EXPECT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = CreateEngine(m, Options(blocks, max_batch_tokens), Device::kCuda);
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (!cpu.ok() || !gpu.ok()) return {};
  EXPECT_EQ((*gpu)->backend().device(), Device::kCuda);
  EXPECT_STREQ((*gpu)->backend().name(), "cuda");
  EXPECT_EQ((*gpu)->backend().num_blocks(), blocks);
  std::printf("[%s] %s\n", what.c_str(), (*gpu)->backend().Describe().c_str());
  const auto want = (*cpu)->GenerateBatch(GreedyRequests(prompts, max_new));
  const auto got = (*gpu)->GenerateBatch(GreedyRequests(prompts, max_new));
  Agreement a;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_TRUE(want[i].status.ok()) << want[i].status;
    EXPECT_TRUE(got[i].status.ok()) << what << " request " << i << ": " << got[i].status;
    EXPECT_EQ(got[i].finish_reason, FinishReason::kLength);
    CheckGreedy(cpu->get(), prompts[i], want[i].tokens, got[i].tokens,
                absl::StrCat(what, " request ", i), &a);
  }
  EXPECT_EQ((*gpu)->num_free_blocks(), blocks);
  std::printf("[%s] %lld of %lld greedy tokens identical, %lld of %zu requests diverged (near ties)\n",
              what.c_str(), static_cast<long long>(a.matched), static_cast<long long>(a.compared),
              static_cast<long long>(a.diverged), prompts.size());
  return a;
}

std::vector<std::vector<int32_t>> RandomPrompts(const std::vector<int>& lens, int64_t vocab,
                                                uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> out;
  for (int len : lens) {
    std::vector<int32_t> p(len);
    for (auto& t : p) t = static_cast<int32_t>(rng() % vocab);
    out.push_back(std::move(p));
  }
  return out;
}

TEST(CudaEngine, TinyGroupedGenerateBatchMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto m = testing::TinyW4Model(/*grouped=*/true, /*tied=*/true);
  // A 16-token budget: the long prompts prefill in chunks beside decodes.
  const Agreement a = CompareGenerateBatch(m.get(), RandomPrompts({1, 7, 16, 33, 70}, 300, 1), 24,
                                           16, "tiny grouped");
  EXPECT_GE(a.matched, a.compared / 2);
}

TEST(CudaEngine, TinyPerChannelGatedGenerateBatchMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto m = testing::TinyW4Model(/*grouped=*/false, /*tied=*/false);
  const Agreement a = CompareGenerateBatch(m.get(), RandomPrompts({3, 17, 40}, 300, 2), 24, 512,
                                           "tiny per-channel");
  EXPECT_GE(a.matched, a.compared / 2);
}

TEST(CudaEngine, PerplexityMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto m = testing::TinyW4Model(/*grouped=*/true, /*tied=*/true);
  auto cpu = Engine::Create(m.get(), Options(16, 512));
  auto gpu = CreateEngine(m.get(), Options(16, 512), Device::kCuda);
  ASSERT_TRUE(cpu.ok() && gpu.ok()) << gpu.status();
  const std::vector<int32_t> toks = RandomPrompts({200}, 300, 4)[0];
  auto a = EvalPerplexity((*cpu)->backend(), toks, 96, 0, nullptr, 40);
  auto b = EvalPerplexity((*gpu)->backend(), toks, 96, 0, nullptr, 40);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  std::printf("perplexity cpu %.6f, cuda %.6f (2 windows of 96)\n", a->ppl, b->ppl);
  EXPECT_EQ(b->tokens_scored, a->tokens_scored);
  EXPECT_NEAR(b->ppl / a->ppl, 1.0, 1e-2);
  EXPECT_EQ((*gpu)->num_free_blocks(), 16);
}

// Sampling on the device (the default of the CUDA backend) against
// sampling on the host from the same backend's logits: the same requests
// (greedy, temperature, top-k, top-p, repetition penalty, seeded) give the
// same tokens, and the Describe line says which one runs.
TEST(CudaEngine, DeviceSamplingMatchesHostSampling) {
  SKIP_WITHOUT_GPU();
  auto m = testing::TinyW4Model(/*grouped=*/true, /*tied=*/true);
  std::vector<GenerateRequest> reqs;
  const auto prompts = RandomPrompts({1, 9, 30, 64}, 300, 7);
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateRequest r;
    r.prompt = prompts[i];
    r.options.max_new_tokens = 20;
    r.options.stop_on_eos = false;
    r.sampling.seed = 11 + i;
    r.sampling.temperature = i == 0 ? 0.f : 0.7f + 0.2f * static_cast<float>(i);
    r.sampling.top_k = i == 2 ? 30 : 0;
    r.sampling.top_p = i == 1 || i == 3 ? 0.9f : 1.f;
    r.sampling.repetition_penalty = i == 0 || i == 3 ? 1.2f : 1.f;
    reqs.push_back(r);
  }
  std::vector<std::vector<GenerateResult>> res;
  for (bool on_device : {false, true}) {
    CudaRunnerOptions co;
    co.block_size = 16;
    co.num_blocks = 64;
    co.device_sampling = on_device;
    auto b = CudaBackend::Create(m.get(), co);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ((*b)->samples_on_device(), on_device);
    EXPECT_NE((*b)->Describe().find(on_device ? "sampling on the device" : "sampling on the host"),
              std::string::npos)
        << (*b)->Describe();
    auto e = Engine::Create(m.get(), Options(64, 512), std::move(*b));
    ASSERT_TRUE(e.ok()) << e.status();
    res.push_back((*e)->GenerateBatch(reqs));
    EXPECT_EQ((*e)->num_free_blocks(), 64);
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(res[0][i].status.ok() && res[1][i].status.ok()) << res[1][i].status;
    EXPECT_EQ(res[1][i].tokens, res[0][i].tokens) << "request " << i;
    EXPECT_EQ(res[1][i].tokens.size(), 20u);
  }
}

using testing::Collect;

// The serving path: latency table profiled on the GPU, then the loop
// (scheduler + BlockManager over the device cache) serves requests, two of
// them sharing a 48-token prefix (prefix blocks reused on the device).
TEST(CudaEngine, EngineLoopServesOnTheGpu) {
  SKIP_WITHOUT_GPU();
  auto m = testing::TinyW4Model(/*grouped=*/true, /*tied=*/true);
  auto cpu = Engine::Create(m.get(), Options(64, 64));
  auto gpu = CreateEngine(m.get(), Options(64, 64), Device::kCuda);
  ASSERT_TRUE(cpu.ok() && gpu.ok()) << gpu.status();
  SteadyClock clock;
  EngineLoopOptions lo;
  lo.scheduler.max_batch_tokens = 64;
  lo.profile.max_tokens = 64;
  lo.profile.repeats = 3;
  auto loop = EngineLoop::Create(gpu->get(), nullptr, lo, &clock, nullptr);
  ASSERT_TRUE(loop.ok()) << loop.status();
  const LatencyPoints p = (*loop)->latency_points();
  for (size_t i = 0; i < p.tokens.size(); ++i) {
    std::printf("latency table (cuda): %d tokens %.3f ms\n", p.tokens[i],
                p.seconds_full_ec[i] * 1e3);
    EXPECT_GT(p.seconds_full_ec[i], 0);
    EXPECT_LT(p.seconds_full_ec[i], 1.0);  // a tiny model's forward, not a hang
  }
  auto prompts = RandomPrompts({48, 5, 30}, 300, 7);
  std::vector<int32_t> shared = prompts[0];
  shared.insert(shared.end(), {11, 12, 13});
  prompts.push_back(shared);
  (*loop)->Start();
  std::vector<std::shared_ptr<Collect>> sinks;
  for (size_t i = 0; i < prompts.size(); ++i) {
    // The request sharing the prefix goes in once the first has finished,
    // so that its blocks are cached.
    if (i + 1 == prompts.size()) {
      ASSERT_TRUE(sinks[0]->done.WaitForNotificationWithTimeout(absl::Seconds(60)));
    }
    ExecuteSpec s;
    s.spec.request_id = absl::StrCat("r", i);
    s.prompt = prompts[i];
    s.options.max_new_tokens = 16;
    s.options.stop_on_eos = false;
    sinks.push_back(std::make_shared<Collect>());
    auto id = (*loop)->Submit(std::move(s), sinks.back());
    ASSERT_TRUE(id.ok()) << id.status();
  }
  const auto want = (*cpu)->GenerateBatch(GreedyRequests(prompts, 16));
  Agreement a;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(sinks[i]->done.WaitForNotificationWithTimeout(absl::Seconds(60)));
    EXPECT_TRUE(sinks[i]->info.status.ok()) << sinks[i]->info.status;
    CheckGreedy(cpu->get(), prompts[i], want[i].tokens, sinks[i]->tokens,
                absl::StrCat("loop request ", i), &a);
  }
  EXPECT_EQ(sinks.back()->info.cached_prompt_tokens, 48);  // three full blocks of 16 reused
  absl::Notification idle;
  (*loop)->WhenIdle([&] { idle.Notify(); });
  ASSERT_TRUE(idle.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ((*loop)->Snapshot().kv_used_blocks, 0);
  (*loop)->Stop();
  std::printf("[loop] %lld of %lld greedy tokens identical\n", static_cast<long long>(a.matched),
              static_cast<long long>(a.compared));
}

TEST(CudaEngine, SmolLm2GenerateBatchMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const std::string path = testing::SmolLm2SpearPath();
  if (!std::filesystem::exists(path + "/spear.json")) {
    GTEST_SKIP() << "no SmolLM2 .spear at " << path
                 << " (set SPEAR_TEST_SPEAR_MODEL; `spear quantize` makes one)";
  }
  auto lm = model::LoadModel(path);
  ASSERT_TRUE(lm.ok()) << lm.status();
  std::vector<std::vector<int32_t>> prompts;
  if ((*lm)->tokenizer != nullptr) {
    std::string longer;
    for (int i = 0; i < 12; ++i) {
      absl::StrAppend(&longer, "Paris is the capital of France, and Berlin is the capital of ",
                      "Germany. ");
    }
    for (const std::string& text :
         {std::string("The capital of France is"), std::string("def fibonacci(n):"),
          std::string("Once upon a time, in a small village,"), longer}) {
      prompts.push_back((*lm)->tokenizer->Encode(text, /*add_bos=*/true));
    }
  } else {
    prompts = RandomPrompts({6, 19, 40, 150}, (*lm)->config.vocab_size, 5);
  }
  // A 64-token budget: the long prompt prefills in chunks beside decodes.
  const Agreement a = CompareGenerateBatch(lm->get(), prompts, 32, 64, "smollm2");
  EXPECT_GE(a.matched, a.compared / 2);
}

}  // namespace
}  // namespace spear::engine
