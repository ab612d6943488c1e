#include "worker/quantize/cka.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "tests/quantize/test_helpers.h"
#include "worker/quantize/placement.h"

namespace spear::quantize {
namespace {

using testing::RandomNormal;

TEST(Cka, SelfIsOneAndInvariances) {
  const Matrix x = RandomNormal(300, 20, 81);
  auto self = LinearCka(x.view(), x.view());
  ASSERT_TRUE(self.ok());
  EXPECT_NEAR(*self, 1.0, 1e-12);
  // Y = 3.7 X Q (+ a constant offset, removed by centering).
  const Matrix g = RandomNormal(20, 20, 82);
  Eigen::HouseholderQR<Eigen::MatrixXf> qr(AsEigen(g.view()));
  const Eigen::MatrixXf q = qr.householderQ();
  RowMatrixXf y = 3.7f * AsEigen(x.view()) * q;
  y.array() += 5.0f;
  auto rot = LinearCka(x.view(), FromEigen(y).view());
  ASSERT_TRUE(rot.ok());
  EXPECT_NEAR(*rot, 1.0, 1e-5);  // float inputs
  // Different widths, unrelated features: well below 1.
  const Matrix z = RandomNormal(300, 7, 83);
  auto other = LinearCka(x.view(), z.view());
  ASSERT_TRUE(other.ok());
  EXPECT_LT(*other, 0.5);
  EXPECT_GT(*other, 0.0);
  // A reference reused across many Y gives the same numbers.
  auto ref = CkaReference::Create(x.view());
  ASSERT_TRUE(ref.ok());
  EXPECT_DOUBLE_EQ(*ref->Cka(z.view()), *other);
}

TEST(Cka, HandComputedTinyExample) {
  // X = [[1,0],[0,1],[1,1],[0,0]], Y = [1,2,3,5]^T. Centered: Xc^T Xc = I
  // (norm sqrt 2), Yc^T Xc = [-1.5, -0.5] (squared norm 2.5), Yc^T Yc = 8.75.
  // CKA = 2.5 / (sqrt(2) * 8.75) = 0.2020305089104422 (numpy agrees).
  const float xs[] = {1, 0, 0, 1, 1, 1, 0, 0};
  const float ys[] = {1, 2, 3, 5};
  auto c = LinearCka({xs, 4, 2}, {ys, 4, 1});
  ASSERT_TRUE(c.ok());
  EXPECT_NEAR(*c, 0.2020305089104422, 1e-12);
  EXPECT_FALSE(LinearCka({xs, 4, 2}, {ys, 3, 1}).ok());
  EXPECT_FALSE(LinearCka({xs, 1, 2}, {ys, 1, 1}).ok());
  const float flat[] = {2, 2, 2, 2};
  EXPECT_EQ(*LinearCka({xs, 4, 2}, {flat, 4, 1}), 0.0);
}

TEST(DamageEntropy, UniformOneHotAndZero) {
  auto u = ComputeDamageEntropy({0.2, 0.2, 0.2, 0.2});
  ASSERT_TRUE(u.ok());
  EXPECT_NEAR(u->entropy, std::log(4.0), 1e-12);
  EXPECT_NEAR(u->normalized_entropy, 1.0, 1e-12);
  EXPECT_NEAR(u->effective_modules, 4.0, 1e-12);
  auto one = ComputeDamageEntropy({0.0, 3.0, 0.0});
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->entropy, 0.0);
  EXPECT_EQ(one->normalized_entropy, 0.0);
  EXPECT_EQ(one->effective_modules, 1.0);
  EXPECT_EQ(one->p[1], 1.0);
  auto zero = ComputeDamageEntropy({0.0, 0.0});
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->effective_modules, 0.0);
  EXPECT_FALSE(ComputeDamageEntropy({1.0, -0.1}).ok());
  EXPECT_FALSE(ComputeDamageEntropy({}).ok());
}

TEST(Placement, ConcentratedDamageUsesFewModules) {
  std::vector<double> d(10, 1e-6);
  d[3] = 1.0;
  std::vector<ModuleEcCost> costs(10, {0.0, 100.0, 0.0});
  auto plan = PlanEcPlacement(d, costs, 1e6, {8, 16, 32, 64});
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->size(), 1u);  // exp(H) ~ 1
  EXPECT_EQ((*plan)[0].module, 3);
  EXPECT_EQ((*plan)[0].rank, 64);  // plenty of budget: the top rank
}

TEST(Placement, SpreadDamageSpreadsAndRespectsBudget) {
  std::vector<double> d(10, 1.0);
  std::vector<ModuleEcCost> costs(10, {50.0, 100.0, 0.0});
  const double budget = 10 * (50 + 100 * 16) + 10;
  auto plan = PlanEcPlacement(d, costs, budget, {8, 16, 32});
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->size(), 10u);
  double used = 0;
  for (const auto& p : *plan) {
    used += p.bytes;
    EXPECT_EQ(p.rank, 16);
  }
  EXPECT_LE(used, budget);
  // Zero budget: nothing; no damage: nothing.
  EXPECT_TRUE(PlanEcPlacement(d, costs, 0.0, {8})->empty());
  EXPECT_TRUE(PlanEcPlacement(std::vector<double>(10, 0.0), costs, budget, {8})->empty());
  EXPECT_FALSE(PlanEcPlacement(d, costs, budget, {}).ok());
  EXPECT_FALSE(PlanEcPlacement({1.0}, costs, budget, {8}).ok());
}

TEST(Placement, RandomCasesNeverExceedBudget) {
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    std::vector<double> d(n);
    std::vector<ModuleEcCost> costs(n);
    for (int i = 0; i < n; ++i) {
      d[i] = u(rng) < 0.2 ? 0.0 : std::pow(u(rng), 4.0);
      costs[i] = {u(rng) * 1000, 50 + u(rng) * 500, u(rng)};
    }
    const double budget = u(rng) * 200000;
    auto plan = PlanEcPlacement(d, costs, budget, {4, 8, 16, 32, 64});
    ASSERT_TRUE(plan.ok());
    auto ent = ComputeDamageEntropy(d);
    double used = 0;
    for (const auto& p : *plan) {
      used += p.bytes;
      EXPECT_GT(d[p.module], 0.0);
      EXPECT_NEAR(p.bytes, costs[p.module].Bytes(p.rank), 1e-9);
    }
    EXPECT_LE(used, budget);
    EXPECT_LE(static_cast<double>(plan->size()), std::max(1.0, std::floor(ent->effective_modules + 0.5)));
  }
}

}  // namespace
}  // namespace spear::quantize
