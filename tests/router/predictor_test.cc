// Admission's latency model and the balancers.
#include "gtest/gtest.h"
#include "router/admission/predictor.h"
#include "router/balancing/balancer.h"

namespace spear::router {
namespace {

spear::v1::StatsResponse Stats(double no_ec_1, double full_1, double no_ec_512, double full_512) {
  spear::v1::StatsResponse s;
  s.set_max_batch_tokens(512);
  auto* t = s.mutable_latency();
  t->add_tokens(1), t->add_seconds_no_ec(no_ec_1), t->add_seconds_full_ec(full_1);
  t->add_tokens(512), t->add_seconds_no_ec(no_ec_512), t->add_seconds_full_ec(full_512);
  return s;
}

TEST(Predictor, InterpolatesAndBlendsDensity) {
  auto s = Stats(0.01, 0.02, 0.11, 0.22);
  EXPECT_NEAR(IterationSeconds(s.latency(), 1, 0, 1), 0.01, 1e-12);
  EXPECT_NEAR(IterationSeconds(s.latency(), 1, 1, 1), 0.02, 1e-12);
  EXPECT_NEAR(IterationSeconds(s.latency(), 1, 0.5, 1), 0.015, 1e-12);
  EXPECT_GT(IterationSeconds(s.latency(), 256, 1, 1), 0.02);
  EXPECT_LT(IterationSeconds(s.latency(), 256, 1, 1), 0.22);
  // Beyond the table: extrapolated upwards.
  EXPECT_GT(IterationSeconds(s.latency(), 1024, 1, 1), 0.22);
  // Malformed table: the fallback.
  spear::v1::LatencyTable bad;
  bad.add_tokens(1);
  EXPECT_GT(IterationSeconds(bad, 1, 1, 0.5), 0.4);
}

TEST(Predictor, QueueRaisesTtftAndDensityLowersItl) {
  auto s = Stats(0.01, 0.02, 0.11, 0.22);
  const Prediction idle = Predict(s, {}, 100, 1);
  s.set_queued_prompt_tokens(2000);
  s.set_running(8);
  const Prediction busy = Predict(s, {}, 100, 1);
  EXPECT_GT(busy.ttft_seconds, 3 * idle.ttft_seconds);
  EXPECT_GT(busy.itl_seconds, idle.itl_seconds);
  EXPECT_LT(Predict(s, {}, 100, 0).itl_seconds, busy.itl_seconds);
  // Router-side pending load counts like queued work.
  EXPECT_GT(Predict(s, {4, 1000}, 100, 1).ttft_seconds, busy.ttft_seconds);
}

TEST(Predictor, LargestDensityMeeting) {
  auto s = Stats(0.01, 0.03, 0.11, 0.33);
  EXPECT_EQ(LargestDensityMeeting(s, {}, 10, 0, 0.05), 1.0);      // full EC meets
  const double d = LargestDensityMeeting(s, {}, 10, 0, 0.02);     // needs d ~ 0.5
  EXPECT_GT(d, 0.4);
  EXPECT_LT(d, 0.52);
  EXPECT_LT(LargestDensityMeeting(s, {}, 10, 0, 0.005), 0);       // nothing meets
  EXPECT_EQ(LargestDensityMeeting(s, {}, 10, 0, 0, 0.0), 0.0);    // NO_EC, no target
}

TEST(Balancer, Policies) {
  std::vector<Candidate> c = {{"a:1", {0.5, 0.01}, 0}, {"b:1", {0.1, 0.01}, 0}, {"c:1", {0.3, 0.01}, 0}};
  std::vector<int32_t> prompt = {1, 2, 3, 4};
  auto ll = MakeBalancer("least-latency");
  ASSERT_TRUE(ll.ok());
  EXPECT_EQ((*ll)->Pick(c, prompt), 1u);
  auto rr = MakeBalancer("round-robin");
  ASSERT_TRUE(rr.ok());
  std::set<size_t> seen;
  for (int i = 0; i < 3; ++i) seen.insert((*rr)->Pick(c, prompt));
  EXPECT_EQ(seen.size(), 3u);
  auto pa = MakeBalancer("prefix-affinity");
  ASSERT_TRUE(pa.ok());
  // Same prefix, same worker; equal latencies so affinity decides.
  for (auto& x : c) x.prediction = {0.1, 0.01};
  const size_t first = (*pa)->Pick(c, prompt);
  for (int i = 0; i < 5; ++i) EXPECT_EQ((*pa)->Pick(c, prompt), first);
  EXPECT_FALSE(MakeBalancer("random").ok());
}

}  // namespace
}  // namespace spear::router

#include "router/service/model_frontend.h"

namespace spear::router {
namespace {

TEST(Predictor, ItlTargetLimitsTheChunkAndRaisesTtft) {
  auto s = Stats(0.01, 0.02, 0.51, 1.02);  // 512 tokens: ~1 s per iteration
  s.set_queued_prompt_tokens(1000);
  const Prediction loose = Predict(s, {}, 100, 1, 0);
  const Prediction tight = Predict(s, {}, 100, 1, 0.1);
  EXPECT_LE(tight.itl_seconds, 0.1 + 1e-9);
  EXPECT_GT(tight.ttft_seconds, loose.ttft_seconds * 0.8);  // small chunks: same throughput at best
  // A machine slower than its table (recent ITL 3x the table) scales it all.
  s.set_running(4);
  s.set_ec_density(1);
  const Prediction before = Predict(s, {}, 100, 1, 0.1);
  s.set_recent_itl_seconds(3 * IterationSeconds(s.latency(), 5, 1, 1));
  const Prediction after = Predict(s, {}, 100, 1, 0.1);
  EXPECT_GT(after.ttft_seconds, 2 * before.ttft_seconds);
}

TEST(Utf8, SanitizeReplacesInvalidBytes) {
  EXPECT_EQ(SanitizeUtf8("abc"), "abc");
  EXPECT_EQ(SanitizeUtf8("h\xC3\xA9!"), "h\xC3\xA9!");
  EXPECT_EQ(SanitizeUtf8("a\x80z"), "a\xEF\xBF\xBDz");
  EXPECT_EQ(SanitizeUtf8("\xE2\x82"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // truncated
  EXPECT_EQ(SanitizeUtf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_TRUE(IsValidUtf8(SanitizeUtf8("\xFF\xFE\xF0\x9F\x98\x80")));
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));  // overlong
}

}  // namespace
}  // namespace spear::router
