#include "worker/quantize/ec_train.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>

#include "tests/quantize/test_helpers.h"
#include "worker/quantize/ec_model.h"
#include "worker/quantize/lowrank.h"

namespace spear::quantize {
namespace {

using testing::RandomNormal;
using D = double;

EcParams<D> RandomParams(int64_t n, int64_t k, int64_t r, int64_t h, bool gated, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<D> nd(0.0, 0.7);
  auto fill = [&](auto& m, int64_t rows, int64_t cols) {
    m.resize(rows, cols);
    for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  };
  EcParams<D> p;
  p.gated = gated;
  fill(p.a, r, k);
  fill(p.b, n, r);
  if (gated) {
    fill(p.w1, h, r);
    fill(p.w2, r, h);
    fill(p.b1, 1, h);
    fill(p.b2, 1, r);
  } else {
    p.w1.resize(0, r);
    p.w2.resize(r, 0);
    p.b1.resize(0);
    p.b2.resize(0);
  }
  return p;
}

// Central differences on every parameter element; |analytic - numeric| <=
// 1e-6 * max(1, |analytic|) in float64 (h = 1e-6: truncation error ~1e-12,
// rounding ~1e-10 relative to the loss).
void CheckGradients(bool gated, bool weighted) {
  const int64_t m = 7, k = 6, n = 5, r = 3, h = 4;
  EcParams<D> p = RandomParams(n, k, r, h, gated, 3);
  std::mt19937_64 rng(4);
  std::normal_distribution<D> nd;
  EMat<D> x(m, k), tr(m, n);
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = nd(rng);
  for (int64_t i = 0; i < tr.size(); ++i) tr.data()[i] = nd(rng);
  EVec<D> cw;
  if (weighted) {
    cw.resize(n);
    for (int64_t i = 0; i < n; ++i) cw(i) = 0.5 + i;
  }
  EcParams<D> grad;
  EcLossAndGrad<D>(p, x, tr, cw, &grad);
  const D eps = 1e-6;
  auto check = [&](auto member, const char* name) {
    auto& param = p.*member;
    const auto& g = grad.*member;
    ASSERT_EQ(param.size(), g.size()) << name;
    for (int64_t i = 0; i < param.size(); ++i) {
      const D saved = param.data()[i];
      param.data()[i] = saved + eps;
      const D lp = EcLossAndGrad<D>(p, x, tr, cw, nullptr);
      param.data()[i] = saved - eps;
      const D lm = EcLossAndGrad<D>(p, x, tr, cw, nullptr);
      param.data()[i] = saved;
      const D num = (lp - lm) / (2 * eps);
      EXPECT_NEAR(g.data()[i], num, 1e-6 * std::max<D>(1.0, std::fabs(num))) << name << "[" << i << "]";
    }
  };
  // The expanded form (used by training) agrees with the direct one.
  EcParams<D> grad2;
  const D l1 = EcLossAndGrad<D>(p, x, tr, cw, nullptr);
  const D l2 = EcLossAndGradExpanded<D>(p, x, tr, cw, &grad2);
  EXPECT_NEAR(l1, l2, 1e-10 * std::fabs(l1));
  EXPECT_LT((grad2.a - grad.a).norm(), 1e-10 * grad.a.norm());
  EXPECT_LT((grad2.b - grad.b).norm(), 1e-10 * grad.b.norm());
  EXPECT_LT((grad2.w1 - grad.w1).norm(), 1e-10 * (1 + grad.w1.norm()));
  EXPECT_LT((grad2.w2 - grad.w2).norm(), 1e-10 * (1 + grad.w2.norm()));
  EXPECT_LT((grad2.b1 - grad.b1).norm(), 1e-10 * (1 + grad.b1.norm()));
  EXPECT_LT((grad2.b2 - grad.b2).norm(), 1e-10 * (1 + grad.b2.norm()));
  check(&EcParams<D>::a, "A");
  check(&EcParams<D>::b, "B");
  if (gated) {
    check(&EcParams<D>::w1, "W1");
    check(&EcParams<D>::w2, "W2");
    check(&EcParams<D>::b1, "b1");
    check(&EcParams<D>::b2, "b2");
  }
}

TEST(EcGradients, GatedFiniteDifferences) { CheckGradients(true, false); }
TEST(EcGradients, GatedWeightedFiniteDifferences) { CheckGradients(true, true); }
TEST(EcGradients, StaticFiniteDifferences) { CheckGradients(false, false); }

TEST(Adam, MatchesHandComputedSteps) {
  // Two steps, lr 0.1, betas (0.9, 0.999), eps 1e-8; values from the update
  // rule by hand (and numpy): step 1 moves each entry by lr * sign(g).
  Eigen::Matrix<D, 1, 2> p(1.0, -2.0);
  AdamTensor<D> adam;
  adam.Step(p, Eigen::Matrix<D, 1, 2>(0.5, -0.1), 0.1, 1);
  EXPECT_NEAR(p(0), 0.9, 1e-8);
  EXPECT_NEAR(p(1), -1.9, 1e-7);
  adam.Step(p, Eigen::Matrix<D, 1, 2>(0.2, 0.3), 0.1, 2);
  EXPECT_NEAR(p(0), 0.81014248, 1e-7);
  EXPECT_NEAR(p(1), -1.94941899, 1e-7);
}

// A task whose error depends on the token: r_t = B0 (m_t * u0_t), u0 = A0 x,
// m_t = 1 + 0.9 tanh(2 c.u0_t / |c|) -- a per-token magnitude in (0.1, 1.9).
// The best static rank-4 correction cannot follow m_t; the gated EC can.
struct Task {
  Matrix x, r;
  Matrix e;  // B0 A0
};
Task MakeTask(int64_t tokens, int64_t k, int64_t n, int64_t rank, uint64_t seed) {
  Task t;
  const Matrix a0 = RandomNormal(rank, k, seed, 1.0f / std::sqrt(float(k)));
  const Matrix b0 = RandomNormal(n, rank, seed + 1, 0.3f);
  t.x = RandomNormal(tokens, k, seed + 2);
  const RowMatrixXf u0 = AsEigen(t.x.view()) * AsEigen(a0.view()).transpose();
  Eigen::VectorXf c = Eigen::VectorXf::Ones(rank) / std::sqrt(float(rank));
  const Eigen::VectorXf mod = ((u0 * c).array() * 2.0f).tanh() * 0.9f + 1.0f;
  const RowMatrixXf r = (mod.asDiagonal() * u0) * AsEigen(b0.view()).transpose();
  t.r = FromEigen(r);
  t.e = FromEigen(AsEigen(b0.view()) * AsEigen(a0.view()));
  return t;
}

TEST(EcTrain, GatedBeatsStaticOnTokenDependentError) {
  const int64_t k = 32, n = 48, rank = 4;
  const Task task = MakeTask(4096, k, n, rank, 51);
  auto fit = FitLowRankPlain(task.e.view(), rank);
  ASSERT_TRUE(fit.ok());
  EcTrainOptions opt;
  opt.steps = 800;
  opt.lr = 3e-3f;
  opt.patience = 0;
  EcWeights st = MakeStaticEc(*fit);
  auto rs = TrainEc(task.x.view(), task.r.view(), &st, opt);
  ASSERT_TRUE(rs.ok()) << rs.status();
  EcWeights gated = MakeGatedEc(*fit, 16, 5);
  auto rg = TrainEc(task.x.view(), task.r.view(), &gated, opt);
  ASSERT_TRUE(rg.ok()) << rg.status();
  // Same start (gate == 1), same split.
  EXPECT_NEAR(rg->init_val_loss, rs->init_val_loss, 1e-4 * rs->init_val_loss);
  EXPECT_LT(rg->final_val_loss, 0.5 * rg->init_val_loss);
  EXPECT_LT(rg->final_val_loss, 0.5 * rs->final_val_loss)
      << "static " << rs->final_val_loss << " gated " << rg->final_val_loss;
  EXPECT_LE(rs->final_val_loss, rs->init_val_loss);
  EXPECT_LT(rg->init_val_loss, rg->zero_val_loss);
  // Per-token stats: the gate tracks the modulation (varies across tokens).
  auto stats = ComputeEcTokenStats(gated, task.x.view(), task.r.view());
  ASSERT_TRUE(stats.ok());
  ASSERT_EQ(stats->mean_gate.size(), 4096u);
  float gmin = 2, gmax = 0;
  double with = 0, without = 0;
  for (size_t t = 0; t < stats->mean_gate.size(); ++t) {
    gmin = std::min(gmin, stats->mean_gate[t]);
    gmax = std::max(gmax, stats->mean_gate[t]);
    with += stats->err_with[t] * stats->err_with[t];
    without += stats->err_without[t] * stats->err_without[t];
  }
  EXPECT_GT(gmax - gmin, 0.5f);
  EXPECT_LT(with, 0.2 * without);
}

TEST(EcTrain, FreezeEarlyStopAndErrors) {
  const Task task = MakeTask(512, 16, 12, 2, 61);
  auto fit = FitLowRankPlain(task.e.view(), 2);
  ASSERT_TRUE(fit.ok());
  EcWeights ec = MakeGatedEc(*fit, 4, 1);
  EcTrainOptions opt;
  opt.train_a = false;
  opt.steps = 50;
  opt.eval_every = 5;
  auto rep = TrainEc(task.x.view(), task.r.view(), &ec, opt);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(ec.a, fit->a.data);  // frozen
  // A huge learning rate diverges; early stopping keeps the best (initial) params.
  EcWeights ec2 = MakeStaticEc(*fit);
  EcTrainOptions bad;
  bad.lr = 10.0f;
  bad.eval_every = 1;
  bad.patience = 2;
  auto rep2 = TrainEc(task.x.view(), task.r.view(), &ec2, bad);
  ASSERT_TRUE(rep2.ok());
  EXPECT_TRUE(rep2->stopped_early);
  EXPECT_LE(rep2->final_val_loss, rep2->init_val_loss);
  EXPECT_EQ(rep2->best_step, 0);
  EXPECT_EQ(ec2.a, fit->a.data);
  EXPECT_FALSE(TrainEc({task.x.data.data(), 512, 15}, task.r.view(), &ec2, opt).ok());
  EXPECT_FALSE(TrainEc(task.x.view(), {task.r.data.data(), 511, 12}, &ec2, opt).ok());
  opt.channel_weights = {1.0f};
  EXPECT_FALSE(TrainEc(task.x.view(), task.r.view(), &ec2, opt).ok());
}

// The stated size (k=576, n=1536, r=32, T=16k, 300 steps). Disabled by
// default (data generation dominates); run with
// --gtest_also_run_disabled_tests --gtest_filter='*StatedSize*'.
TEST(EcTrain, DISABLED_StatedSizeTiming) {
  const int64_t k = 576, n = 1536, r = 32, tokens = 16384;
  const Task task = MakeTask(tokens, k, n, r, 71);
  auto fit = FitLowRankPlain(task.e.view(), r);
  ASSERT_TRUE(fit.ok());
  EcWeights ec = MakeGatedEc(*fit, 32, 1);
  EcTrainOptions opt;
  opt.steps = 300;
  opt.patience = 0;
  auto rep = TrainEc(task.x.view(), task.r.view(), &ec, opt);
  ASSERT_TRUE(rep.ok());
  std::printf("stated size: %lld steps in %.2f s (train %lld / val %lld tokens), val %.4g -> %.4g\n",
              static_cast<long long>(rep->steps_run), rep->seconds,
              static_cast<long long>(rep->train_tokens), static_cast<long long>(rep->val_tokens),
              rep->init_val_loss, rep->final_val_loss);
  opt.steps = 0;  // the fixed cost: split, gate init, initial/final full-split losses
  EcWeights ec0 = MakeGatedEc(*fit, 32, 1);
  auto rep0 = TrainEc(task.x.view(), task.r.view(), &ec0, opt);
  ASSERT_TRUE(rep0.ok());
  std::printf("  of which evaluation overhead (0 steps): %.2f s\n", rep0->seconds);
}

}  // namespace
}  // namespace spear::quantize
