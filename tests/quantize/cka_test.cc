#include "worker/quantize/cka.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "tests/quantize/test_helpers.h"
#include "worker/quantize/placement.h"

namespace spear::quantize {
namespace {

// The modules a plan at rank 4 gives (a failed plan fails the test).
std::vector<int64_t> PlannedModules(const std::vector<double>& d,
                                    const std::vector<ModuleEcCost>& costs, double budget,
                                    const PlacementOptions& o = {}) {
  auto plan = PlanEcPlacement(d, costs, budget, {4}, o);
  EXPECT_TRUE(plan.ok()) << plan.status();
  std::vector<int64_t> m;
  if (plan.ok()) {
    for (const auto& p : *plan) m.push_back(p.module);
  }
  return m;
}

// Two plans with the same modules at the same ranks.
void ExpectSamePlan(const std::vector<EcPlacement>& a, const std::vector<EcPlacement>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t k = 0; k < a.size(); ++k) {
    EXPECT_EQ(a[k].module, b[k].module);
    EXPECT_EQ(a[k].rank, b[k].rank);
  }
}

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
    // Without launch groups the selection is rule 2's static order: a
    // reference greedy over the stable-sorted keys picks the same modules.
    const int64_t cap = std::min<int64_t>(
        std::count_if(d.begin(), d.end(), [](double x) { return x > 0; }),
        std::max<int64_t>(1, static_cast<int64_t>(std::floor(ent->effective_modules + 0.5))));
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int i) { return d[i] / (costs[i].Bytes(4) * (1.0 + costs[i].relative_latency)); };
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) > key(b); });
    std::vector<int64_t> want;
    double ref_used = 0;
    for (int i : order) {
      if (static_cast<int64_t>(want.size()) >= cap) break;
      if (d[i] <= 0 || ref_used + costs[i].Bytes(4) > budget) continue;
      ref_used += costs[i].Bytes(4);
      want.push_back(i);
    }
    std::sort(want.begin(), want.end());
    std::vector<int64_t> got;
    for (const auto& p : *plan) got.push_back(p.module);
    EXPECT_EQ(got, want) << "trial " << trial;
    // With random launch groups: still within the budget and the cap.
    for (int i = 0; i < n; ++i) costs[i].launch_group = static_cast<int64_t>(rng() % 5) - 1;
    auto grouped = PlanEcPlacement(d, costs, budget, {4, 8, 16, 32, 64});
    ASSERT_TRUE(grouped.ok());
    double gused = 0;
    for (const auto& p : *grouped) gused += p.bytes;
    EXPECT_LE(gused, budget);
    EXPECT_LE(grouped->size(), static_cast<size_t>(cap));
    // With a launch cap: at most that many distinct launches (a group, or a
    // module of group -1 alone), within the budget and the module cap; a cap
    // at least the number of launches changes nothing.
    PlacementOptions capped;
    capped.max_launches = static_cast<int64_t>(rng() % 4);
    auto lc = PlanEcPlacement(d, costs, budget, {4, 8, 16, 32, 64}, capped);
    ASSERT_TRUE(lc.ok());
    std::set<int64_t> launches;
    double lused = 0;
    for (const auto& p : *lc) {
      lused += p.bytes;
      const int64_t g = costs[static_cast<size_t>(p.module)].launch_group;
      launches.insert(g >= 0 ? g : 1000 + p.module);
    }
    EXPECT_LE(static_cast<int64_t>(launches.size()), capped.max_launches) << "trial " << trial;
    EXPECT_LE(lused, budget);
    EXPECT_LE(lc->size(), static_cast<size_t>(cap));
    capped.max_launches = n;
    auto loose = PlanEcPlacement(d, costs, budget, {4, 8, 16, 32, 64}, capped);
    ASSERT_TRUE(loose.ok());
    ExpectSamePlan(*loose, *grouped);
  }
}

// The launch cap (rule 2): once the cap's launches are taken, only modules of
// those launches stay eligible. Damages 0.6 (group 3), 0.5 (alone), 0.2
// (group 3), 0.4 (alone); equal costs, no latency, a budget and module cap
// for all four. Cap 1: module 0 opens group 3, then only its partner 2
// fits the cap: {0, 2}. Cap 2: {0, 1, 2} (module 3 would be a third).
// Cap 0: nothing. A cap below -1 is refused.
TEST(Placement, LaunchCapKeepsToTakenLaunches) {
  const std::vector<double> d = {0.6, 0.5, 0.2, 0.4};
  std::vector<ModuleEcCost> costs(4, ModuleEcCost{0.0, 250.0, 0.0});
  costs[0].launch_group = costs[2].launch_group = 3;
  PlacementOptions o;
  o.breadth = 10.0;
  EXPECT_EQ(PlannedModules(d, costs, 1e6, o), (std::vector<int64_t>{0, 1, 2, 3}));
  o.max_launches = 1;
  EXPECT_EQ(PlannedModules(d, costs, 1e6, o), (std::vector<int64_t>{0, 2}));
  o.max_launches = 2;
  EXPECT_EQ(PlannedModules(d, costs, 1e6, o), (std::vector<int64_t>{0, 1, 2}));
  o.max_launches = 0;
  EXPECT_TRUE(PlannedModules(d, costs, 1e6, o).empty());
  o.max_launches = -2;
  EXPECT_TRUE(absl::IsInvalidArgument(PlanEcPlacement(d, costs, 1e6, {4}, o).status()));
}

// Launch groups (rule 2): modules fused into one GEMM share one EC launch,
// so once one of them has an EC the others pay no latency. Damages 0.6,
// 0.5, 0.55, equal bytes (1,000 at rank 4) and latency 1, a budget for two
// ECs: without groups the keys 0.3, 0.25, 0.275 pick {0, 2}; with modules 0
// and 1 in one group, module 1's key becomes 0.5 once 0 is taken: {0, 1}.
TEST(Placement, LaunchGroupsShareTheLatency) {
  const std::vector<double> d = {0.6, 0.5, 0.55};
  std::vector<ModuleEcCost> costs(3, ModuleEcCost{0.0, 250.0, 1.0});
  EXPECT_EQ(PlannedModules(d, costs, 2100), (std::vector<int64_t>{0, 2}));
  costs[0].launch_group = costs[1].launch_group = 7;
  EXPECT_EQ(PlannedModules(d, costs, 2100), (std::vector<int64_t>{0, 1}));
  costs[2].launch_group = -2;
  EXPECT_TRUE(absl::IsInvalidArgument(PlanEcPlacement(d, costs, 2100, {4}).status()));
}

}  // namespace
}  // namespace spear::quantize
