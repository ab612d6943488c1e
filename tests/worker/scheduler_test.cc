// Scheduler with a fake clock and a made-up latency table: the chunk
// search respects the ITL SLO, ECs are shed only when even no prefill
// breaks it and never with a FULL_EC sequence in the batch, the EC mask is
// the union of the batch's needs, preemption by recompute when KV runs
// out, cancellation and deadlines free KV at once.
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/latency_table.h"
#include "worker/engine/scheduler.h"

namespace spear::engine {
namespace {

class FakeClock final : public Clock {
 public:
  double Now() const override { return t; }
  double t = 1000;
};

// Iteration seconds: 10 ms + 1 ms per token without EC; ECs add 50%.
LatencyPoints Linear() {
  LatencyPoints p;
  for (int t : {1, 2048}) {
    p.tokens.push_back(t);
    p.seconds_no_ec.push_back(0.010 + 0.001 * t);
    p.seconds_full_ec.push_back(1.5 * (0.010 + 0.001 * t));
  }
  return p;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void Make(int64_t num_blocks, SchedulerOptions so = {}, int units = 4) {
    so.slo_headroom = 1.0;  // exact budgets in these tests
    so.error_quantile = 0;
    model::ModelConfig c;
    c.num_layers = 1;
    c.num_kv_heads = 1;
    c.head_dim = 4;
    KvCacheOptions ko;
    ko.block_size = 4;
    ko.num_blocks = num_blocks;
    cache_ = std::move(*KvCache::Create(c, ko));
    blocks_ = std::make_unique<BlockManager>(cache_.get());
    table_ = std::make_unique<LatencyTable>(*LatencyTable::Create(Linear()));
    EcProfile ec;
    for (int i = 0; i < units; ++i) {
      ec.share.push_back(1.0 / units);
      ec.shed_order.push_back(units - 1 - i);  // last unit has the lowest value
    }
    sched_ = std::make_unique<Scheduler>(so, blocks_.get(), table_.get(), ec, &clock_);
  }

  Request* Add(int prompt, int max_new, QualityPolicy q = QualityPolicy::kAuto,
               double itl = 0, int first_token = 1) {
    auto r = std::make_unique<Request>();
    std::vector<int32_t> toks(prompt);
    for (int i = 0; i < prompt; ++i) toks[i] = first_token + i;
    GenerateOptions o;
    o.max_new_tokens = max_new;
    r->seq = std::make_unique<Sequence>(next_id_++, toks, SamplingParams(), o);
    r->spec.quality = q;
    r->spec.itl_slo = itl;
    Request* raw = r.get();
    EXPECT_TRUE(sched_->Add(std::move(r)).ok());
    return raw;
  }

  // Plays the engine: computes the planned tokens and samples token 7 for
  // sequences whose pending tokens are all computed.
  std::vector<std::unique_ptr<Request>> Run(const IterationPlan& plan) {
    for (const StepItem& it : plan.items) {
      Sequence* s = it.seq;
      const int64_t n = std::min(it.max_tokens, s->num_pending());
      EXPECT_GE(static_cast<int64_t>(s->block_table().size()) * 4, s->num_computed() + n);
      const bool sample = n == s->num_pending();
      s->MarkComputed(n);
      if (sample) {
        s->Append(7);
        if (s->num_generated() >= s->options().max_new_tokens) s->Finish(FinishReason::kLength);
      }
    }
    clock_.t += plan.predicted_seconds;
    std::vector<std::unique_ptr<Request>> done;
    sched_->Complete(plan, plan.predicted_seconds, &done);
    return done;
  }

  FakeClock clock_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<BlockManager> blocks_;
  std::unique_ptr<LatencyTable> table_;
  std::unique_ptr<Scheduler> sched_;
  int64_t next_id_ = 0;
};

TEST_F(SchedulerTest, AdmitsAndRunsToCompletionWithoutEcUnits) {
  Make(64, {}, /*units=*/0);
  Add(3, 2);
  IterationPlan p = sched_->Schedule();
  ASSERT_EQ(p.items.size(), 1u);
  EXPECT_EQ(p.prefill_tokens, 3);
  EXPECT_EQ(p.ec_density, 0);
  EXPECT_TRUE(Run(p).empty());
  p = sched_->Schedule();
  ASSERT_EQ(p.items.size(), 1u);
  EXPECT_EQ(p.decode_tokens, 1);
  EXPECT_EQ(Run(p).size(), 1u);
  EXPECT_TRUE(sched_->idle());
  EXPECT_EQ(blocks_->num_used(), 0);
}


TEST_F(SchedulerTest, ChunkSearchKeepsTheItlSlo) {
  Make(1024);
  Add(2, 50, QualityPolicy::kAuto, /*itl=*/0.1);
  Run(sched_->Schedule());  // prefill; now decoding
  Add(400, 5);
  IterationPlan p = sched_->Schedule();
  // 1.5 * (0.010 + 0.001 * (1 + P)) <= 0.1  ->  P = 55.
  EXPECT_EQ(p.decode_tokens, 1);
  EXPECT_EQ(p.chunk_limit, 55);
  EXPECT_EQ(p.prefill_tokens, 55);
  EXPECT_LE(p.predicted_seconds, 0.1);
  EXPECT_GT(table_->Predict(p.decode_tokens + p.prefill_tokens + 1, p.ec_density), 0.1);
  EXPECT_FALSE(p.shed);
  EXPECT_DOUBLE_EQ(p.ec_density, 1.0);
  // The prompt is consumed chunk by chunk, each iteration within the SLO.
  int iterations = 0;
  while (!sched_->idle() && iterations < 200) {
    p = sched_->Schedule();
    if (p.decode_tokens > 0) {
      EXPECT_LE(p.predicted_seconds, 0.1 + 1e-12);
    }
    Run(p);
    ++iterations;
  }
  EXPECT_TRUE(sched_->idle());
  EXPECT_EQ(blocks_->num_used(), 0);
}

TEST_F(SchedulerTest, NoEcBatchesGetLargerChunks) {
  Make(1024);
  Add(2, 50, QualityPolicy::kNoEc, 0.1);
  Run(sched_->Schedule());
  Add(400, 5, QualityPolicy::kNoEc);
  IterationPlan p = sched_->Schedule();
  EXPECT_DOUBLE_EQ(p.ec_density, 0.0);
  EXPECT_EQ(p.chunk_limit, 89);  // 0.010 + 0.001 * (1 + P) <= 0.1
}

TEST_F(SchedulerTest, StaticChunkIgnoresTheSlo) {
  SchedulerOptions so;
  so.adaptive = false;
  so.static_chunk = 512;
  Make(1024, so);
  Add(2, 50, QualityPolicy::kAuto, 0.1);
  Run(sched_->Schedule());
  Add(600, 5);
  IterationPlan p = sched_->Schedule();
  EXPECT_EQ(p.prefill_tokens, 511);  // max_batch_tokens 512 - 1 decode
  EXPECT_GT(p.predicted_seconds, 0.1);
  EXPECT_FALSE(p.shed);
}

TEST_F(SchedulerTest, NoSloMeansFullBudget) {
  Make(1024);
  Add(2, 50);
  Run(sched_->Schedule());
  Add(600, 5);
  IterationPlan p = sched_->Schedule();
  EXPECT_EQ(p.itl_budget, 0);
  EXPECT_EQ(p.prefill_tokens, 511);
}

class ShedTest : public SchedulerTest {
 protected:
  // n decoding requests with a 0.1 s ITL target; `full` of them FULL_EC.
  void Decoding(int n, int full = 0) {
    SchedulerOptions so;
    so.max_running = 1000;
    so.max_waiting = 1000;
    Make(4096, so, /*units=*/10);
    for (int i = 0; i < n; ++i) {
      Add(2, 100, i < full ? QualityPolicy::kFullEc : QualityPolicy::kAuto, 0.1);
    }
    Run(sched_->Schedule());
    ASSERT_EQ(sched_->num_running(), n);
  }
};

TEST_F(ShedTest, NoSheddingWhenTheBatchFits) {
  Decoding(10);  // 1.5 * (0.010 + 0.010) = 0.03
  IterationPlan p = sched_->Schedule();
  EXPECT_FALSE(p.shed);
  EXPECT_DOUBLE_EQ(p.ec_density, 1.0);
  EXPECT_EQ(sched_->shed_iterations(), 0);
}

TEST_F(ShedTest, ShedsLowestValueUnitsWhenEvenNoPrefillBreaksTheSlo) {
  Decoding(80);  // full EC: 0.135 > 0.1; no EC: 0.09
  Add(100, 5);   // waiting prefill gets only the progress minimum
  IterationPlan p = sched_->Schedule();
  EXPECT_TRUE(p.shed);
  EXPECT_EQ(p.prefill_tokens, 4);  // SchedulerOptions::min_prefill_chunk
  EXPECT_LE(p.predicted_seconds, 0.1);
  // 80 decodes + 4 prefill: 0.094 + d * 0.047 <= 0.1  ->  d <= 0.128: one
  // of ten units stays, the highest-value one (unit 0; unit 9 is shed first).
  EXPECT_NEAR(p.ec_density, 0.1, 1e-9);
  ASSERT_EQ(p.ec_mask.size(), 10u);
  EXPECT_TRUE(p.ec_mask[0]);
  for (int u = 1; u < 10; ++u) EXPECT_FALSE(p.ec_mask[u]) << u;
  EXPECT_EQ(sched_->shed_iterations(), 1);
}

TEST_F(ShedTest, NoSheddingWhenEvenPlainW4MissesTheSlo) {
  Decoding(95);  // no EC: 0.010 + 0.095 = 0.105 > 0.1
  IterationPlan p = sched_->Schedule();
  EXPECT_FALSE(p.shed);
  EXPECT_DOUBLE_EQ(p.ec_density, 1.0);
}

TEST_F(ShedTest, NeverShedsWithFullEcInTheBatch) {
  Decoding(80, /*full=*/1);
  IterationPlan p = sched_->Schedule();
  EXPECT_FALSE(p.shed);
  EXPECT_TRUE(p.has_full_ec);
  EXPECT_DOUBLE_EQ(p.ec_density, 1.0);
  EXPECT_GT(p.predicted_seconds, 0.1);  // the SLO is missed, quality is not
  EXPECT_EQ(sched_->shed_iterations(), 0);
}

TEST_F(ShedTest, FullEcWaitingAtTheHeadForbidsShedding) {
  Decoding(80);
  Add(20, 5, QualityPolicy::kFullEc);  // will get the progress minimum this iteration
  IterationPlan p = sched_->Schedule();
  EXPECT_FALSE(p.shed);
  EXPECT_DOUBLE_EQ(p.ec_density, 1.0);
}

TEST_F(ShedTest, PrefillProgressesWhenDecodesAloneExceedTheSlo) {
  Decoding(80);
  Add(40, 2);
  int iterations = 0;
  while (sched_->num_running() < 81 && iterations < 100) {
    Run(sched_->Schedule());
    ++iterations;
  }
  EXPECT_EQ(sched_->num_running(), 81);
  // 40 tokens at 4 per iteration.
  while (iterations < 100) {
    bool prefilling = false;
    for (int64_t id = 80; id < 81; ++id) {
      Request* r = sched_->Find(id);
      prefilling |= r != nullptr && r->seq->in_prefill();
    }
    if (!prefilling) break;
    Run(sched_->Schedule());
    ++iterations;
  }
  EXPECT_LE(iterations, 12);
}

TEST_F(SchedulerTest, EcMaskIsTheUnionOfTheBatch) {
  Make(1024);
  Request* a = Add(3, 4, QualityPolicy::kNoEc);
  IterationPlan p = sched_->Schedule();
  EXPECT_DOUBLE_EQ(p.ec_density, 0.0);  // NO_EC alone: plain W4
  Run(p);
  Request* b = Add(3, 4, QualityPolicy::kAuto);
  b->spec.max_ec_density = 0.5;
  p = sched_->Schedule();
  EXPECT_DOUBLE_EQ(p.ec_density, 0.5);  // AUTO's cap; NO_EC rides along
  ASSERT_EQ(p.ec_mask.size(), 4u);
  EXPECT_TRUE(p.ec_mask[0] && p.ec_mask[1] && !p.ec_mask[2] && !p.ec_mask[3]);
  Run(p);
  Add(3, 4, QualityPolicy::kFullEc);
  p = sched_->Schedule();
  EXPECT_DOUBLE_EQ(p.ec_density, 1.0);
  EXPECT_TRUE(p.has_full_ec);
  (void)a;
}

TEST_F(SchedulerTest, PreemptsYoungestByRecomputeWhenKvRunsOut) {
  Make(/*num_blocks=*/6);  // 24 positions
  Add(6, 10);
  Add(6, 10);
  int iterations = 0;
  std::vector<std::unique_ptr<Request>> done;
  while (!sched_->idle() && iterations < 500) {
    IterationPlan p = sched_->Schedule();
    ASSERT_FALSE(p.empty()) << "stalled at iteration " << iterations;
    for (auto& r : Run(p)) done.push_back(std::move(r));
    ++iterations;
  }
  ASSERT_EQ(done.size(), 2u);
  EXPECT_GT(sched_->total_preemptions(), 0);
  for (auto& r : done) {
    EXPECT_EQ(r->seq->num_generated(), 10);
    EXPECT_EQ(r->seq->finish_reason(), FinishReason::kLength);
  }
  EXPECT_EQ(blocks_->num_used(), 0);
}

TEST_F(SchedulerTest, RemoveAndDeadlinesFreeKvAtOnce) {
  Make(64);
  Request* a = Add(10, 20);
  Request* b = Add(10, 20);
  b->spec.deadline = clock_.t + 0.5;
  Run(sched_->Schedule());
  EXPECT_GT(blocks_->num_used(), 0);
  auto removed = sched_->Remove(a->seq->id());
  ASSERT_NE(removed, nullptr);
  EXPECT_TRUE(removed->seq->block_table().empty());
  EXPECT_EQ(sched_->Remove(12345), nullptr);
  EXPECT_TRUE(sched_->ExpireDeadlines(clock_.t).empty());
  clock_.t += 1;
  auto expired = sched_->ExpireDeadlines(clock_.t);
  ASSERT_EQ(expired.size(), 1u);
  EXPECT_TRUE(sched_->idle());
  EXPECT_EQ(blocks_->num_used(), 0);
}

TEST_F(SchedulerTest, BoundedWaitingQueue) {
  SchedulerOptions so;
  so.max_waiting = 2;
  Make(64, so);
  Add(3, 3);
  Add(3, 3);
  auto r = std::make_unique<Request>();
  r->seq = std::make_unique<Sequence>(99, std::vector<int32_t>{1, 2}, SamplingParams(),
                                      GenerateOptions());
  EXPECT_EQ(sched_->Add(std::move(r)).code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(SchedulerTest, PrefixCacheHitIsRecorded) {
  Make(64);
  Add(12, 1, QualityPolicy::kAuto, 0, /*first_token=*/40);
  while (!sched_->idle()) Run(sched_->Schedule());
  Request* b = Add(12, 1, QualityPolicy::kAuto, 0, 40);
  IterationPlan p = sched_->Schedule();
  EXPECT_EQ(b->cached_prompt_tokens, 8);  // two full blocks of 4; the last token is computed
  EXPECT_EQ(p.prefill_tokens, 4);
}

TEST_F(SchedulerTest, HeadroomShrinksTheBudget) {
  SchedulerOptions so;
  Make(1024, so);
  // Make() forces headroom 1; rebuild with 0.5 (and no error margin).
  so.slo_headroom = 0.5;
  so.error_quantile = 0;
  sched_ = std::make_unique<Scheduler>(so, blocks_.get(), table_.get(), EcProfile{}, &clock_);
  Add(2, 50, QualityPolicy::kAuto, 0.2);
  Run(sched_->Schedule());
  Add(400, 5);
  IterationPlan p = sched_->Schedule();
  EXPECT_DOUBLE_EQ(p.itl_budget, 0.1);
  EXPECT_EQ(p.chunk_limit, 89);  // no EC units: 0.010 + 0.001 * (1 + P) <= 0.1
}

TEST_F(SchedulerTest, PredictionErrorsShrinkTheChunk) {
  SchedulerOptions so;
  Make(1024, so, 0);
  so.slo_headroom = 1.0;
  so.error_quantile = 1.0;
  sched_ = std::make_unique<Scheduler>(so, blocks_.get(), table_.get(), EcProfile{}, &clock_);
  Add(2, 50, QualityPolicy::kAuto, 0.1);
  Run(sched_->Schedule());
  Add(400, 5);
  // No observations yet: every prediction x the cold ratio 1.5:
  // 1.5 * (0.010 + 0.001 * (1 + P)) <= 0.1  ->  P = 55.
  EXPECT_DOUBLE_EQ(table_->RatioQuantile(1.0, 56), LatencyTable::kColdRatio);
  IterationPlan p = sched_->Schedule();
  EXPECT_DOUBLE_EQ(p.itl_budget, 0.1);
  EXPECT_EQ(p.chunk_limit, 55);
  // Past the warm-up, iterations of 2048 tokens ran 1.5x their prediction
  // (each measurement 1.5x the prediction of its moment): that size class,
  // and classes never seen, now plan with 1.5x.
  for (int i = 0; i < LatencyTable::kWarmup + 16; ++i) {
    const double pred = table_->Predict(2048, 0);
    table_->Observe(2048, 0, 1.5 * pred);
  }
  EXPECT_NEAR(table_->RatioQuantile(1.0, 2048), 1.5, 1e-9);
  EXPECT_NEAR(table_->RatioQuantile(1.0, 41), 1.5, 1e-9);
  SchedulerOptions no_margin = so;
  no_margin.error_quantile = 0;
  Scheduler plain(no_margin, blocks_.get(), table_.get(), EcProfile{}, &clock_);
  const double budget = table_->Predict(201, 0);
  const int64_t with_margin = sched_->LargestChunk(1, 400, 0, budget);
  const int64_t without = plain.LargestChunk(1, 400, 0, budget);
  EXPECT_EQ(without, 200);
  EXPECT_GT(with_margin, 0);
  EXPECT_LT(with_margin, 200);
  EXPECT_LE(sched_->Risky(1 + with_margin, 0), budget);
  EXPECT_GT(sched_->Risky(2 + with_margin, 0), budget);
  EXPECT_NEAR(sched_->Risky(1 + with_margin, 0), 1.5 * table_->Predict(1 + with_margin, 0), 1e-12);
}

TEST(LatencyTableTest, InterpolatesAndLearns) {
  LatencyPoints pts;
  pts.tokens = {1, 101};
  pts.seconds_no_ec = {0.01, 0.11};
  pts.seconds_full_ec = {0.02, 0.22};
  auto t = LatencyTable::Create(pts, 0.5);
  ASSERT_TRUE(t.ok());
  EXPECT_NEAR(t->Predict(51, 0), 0.06, 1e-12);
  EXPECT_NEAR(t->Predict(51, 1), 0.12, 1e-12);
  EXPECT_NEAR(t->Predict(51, 0.5), 0.09, 1e-12);
  EXPECT_NEAR(t->Predict(201, 0), 0.21, 1e-12);  // extrapolated
  // Twice slower than predicted at T = 101: the machine factor moves by
  // 10% of the error, the point by half of it (alpha 0.5).
  EXPECT_NEAR(t->Observe(101, 0, 0.22), 2.0, 1e-12);
  EXPECT_NEAR(t->factor(), 1.1, 1e-12);
  EXPECT_NEAR(t->Predict(101, 0), 0.165 * 1.1, 1e-12);
  EXPECT_NEAR(t->Predict(1, 0), 0.01 * 1.1, 1e-12);  // the factor moves the whole table
  EXPECT_NEAR(t->Snapshot().seconds_no_ec[1], 0.165 * 1.1, 1e-12);
  EXPECT_FALSE(LatencyTable::Create(LatencyPoints{}).ok());
  pts.tokens = {5, 5};
  EXPECT_FALSE(LatencyTable::Create(pts).ok());
}

}  // namespace
}  // namespace spear::engine
