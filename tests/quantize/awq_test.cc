#include "worker/quantize/awq.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/quantize/test_helpers.h"

namespace spear::quantize {
namespace {

using testing::OutputError;
using testing::RandomNormal;

// Inputs with a few outlier channels (x30), as in LLM activations.
Matrix OutlierInputs(int64_t tokens, int64_t k, uint64_t seed) {
  Matrix x = RandomNormal(tokens, k, seed);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j : {3, 50, 100, 200}) x.at(t, j) *= 30.0f;
  }
  return x;
}

TEST(Awq, BeatsRtnWithOutlierChannels) {
  const int64_t n = 64, k = 256;
  const Matrix w = RandomNormal(n, k, 21, 0.02f);
  const Matrix calib = OutlierInputs(1024, k, 22);
  const Matrix test = OutlierInputs(1024, k, 23);  // held out
  for (int64_t group : {k, int64_t{64}}) {
    for (bool sym : {false, true}) {
      const W4Format fmt{n, k, group, sym};
      auto rtn = QuantizeRtn(w.view(), fmt);
      ASSERT_TRUE(rtn.ok());
      auto rtn_eff = DequantizeW4Effective(*rtn);
      const double e_rtn = OutputError(w.view(), rtn_eff->view(), test.view());
      AwqReport rep;
      auto q = QuantizeAwq(w.view(), calib.view(), fmt, {}, &rep);
      ASSERT_TRUE(q.ok()) << q.status();
      ASSERT_EQ(q->act_scale.size(), static_cast<size_t>(k));
      auto eff = DequantizeW4Effective(*q);
      ASSERT_TRUE(eff.ok());
      const double e_awq = OutputError(w.view(), eff->view(), test.view());
      EXPECT_LT(e_awq, 0.7 * e_rtn) << "group " << group << " sym " << sym;
      EXPECT_GT(rep.best_alpha, 0.0);
      EXPECT_LE(rep.scaled_error, rep.rtn_error);
      EXPECT_LE(rep.final_error, rep.scaled_error * (1 + 1e-6));
      EXPECT_EQ(rep.alpha_errors.size(), 21u);
      // Outlier channels get the largest scales; normalisation sqrt(max*min) = 1.
      float smax = 0, smin = 1e30f;
      for (float s : q->act_scale) smax = std::max(smax, s), smin = std::min(smin, s);
      EXPECT_GT(q->act_scale[50], 1.3f * q->act_scale[51]);
      EXPECT_GT(q->act_scale[50], 0.9f * smax);
      EXPECT_NEAR(std::sqrt(double(smax) * smin), 1.0, 2e-3);
    }
  }
}

TEST(Awq, AlphaZeroWithoutClipIsRtn) {
  const int64_t n = 8, k = 64;
  const Matrix w = RandomNormal(n, k, 31, 0.02f);
  const Matrix x = RandomNormal(128, k, 32);  // no outliers: scaling buys little
  AwqOptions opt;
  opt.grid = 1;  // alpha in {0, 1}
  opt.clip_search = false;
  AwqReport rep;
  auto q = QuantizeAwq(w.view(), x.view(), {n, k, 32, false}, opt, &rep);
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(rep.alpha_errors.size(), 2u);
  EXPECT_DOUBLE_EQ(rep.final_error, std::min(rep.alpha_errors[0], rep.alpha_errors[1]));
  EXPECT_FALSE(QuantizeAwq(w.view(), {x.data.data(), 128, k - 1}, {n, k, 32, false}).ok());
  EXPECT_FALSE(QuantizeAwq(w.view(), x.view(), {n, k, 32, false}, {}, nullptr, {1.0, 2.0}).ok());
}

}  // namespace
}  // namespace spear::quantize

// Timings at SmolLM2 down_proj-like size (n=576, k=1536) and up_proj-like
// (n=1536, k=576). Disabled by default; run with
// --gtest_also_run_disabled_tests --gtest_filter='*RealSizeTiming*'.
#include <chrono>

#include "worker/quantize/cka.h"
#include "worker/quantize/gptq.h"
#include "worker/quantize/lowrank.h"

namespace spear::quantize {
namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(QuantizeTiming, DISABLED_RealSizeTiming) {
  for (auto [n, k] : {std::pair<int64_t, int64_t>{1536, 576}, {576, 1536}}) {
    const Matrix w = RandomNormal(n, k, 1, 0.02f);
    const Matrix x = OutlierInputs(4096, k, 2);
    const W4Format fmt{n, k, k, false};
    auto t0 = std::chrono::steady_clock::now();
    HessianAccumulator acc(k);
    ASSERT_TRUE(acc.Add(x.view()).ok());
    const double t_h = Seconds(t0);
    t0 = std::chrono::steady_clock::now();
    auto rtn = QuantizeRtn(w.view(), fmt);
    const double t_rtn = Seconds(t0);
    t0 = std::chrono::steady_clock::now();
    auto gq = QuantizeGptq(w.view(), acc.Hessian(), fmt, {.act_order = true});
    const double t_gptq = Seconds(t0);
    t0 = std::chrono::steady_clock::now();
    auto aq = QuantizeAwq(w.view(), x.view(), fmt);
    const double t_awq = Seconds(t0);
    ASSERT_TRUE(rtn.ok() && gq.ok() && aq.ok());
    auto e = QuantizationError(w.view(), *rtn);
    t0 = std::chrono::steady_clock::now();
    auto fit = FitLowRankActivationAware(e->view(), acc.SecondMoment(), 32);
    const double t_lr = Seconds(t0);
    ASSERT_TRUE(fit.ok());
    t0 = std::chrono::steady_clock::now();
    auto cka = LinearCka(x.view(), x.view());
    const double t_cka = Seconds(t0);
    std::printf("n=%lld k=%lld T=4096: hessian %.2fs rtn %.3fs gptq(act_order) %.2fs awq(+clip) %.2fs "
                "lowrank-aware r32 %.2fs cka %.2fs\n",
                (long long)n, (long long)k, t_h, t_rtn, t_gptq, t_awq, t_lr, t_cka);
  }
}

}  // namespace
}  // namespace spear::quantize
