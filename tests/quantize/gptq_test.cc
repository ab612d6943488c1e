#include "worker/quantize/gptq.h"

#include <gtest/gtest.h>

#include "tests/quantize/test_helpers.h"

namespace spear::quantize {
namespace {

using testing::CorrelatedInputs;
using testing::OutputError;
using testing::RandomNormal;

constexpr int64_t kN = 48, kK = 256, kT = 1024;

class GptqTest : public ::testing::Test {
 protected:
  void SetUp() override {
    w_ = RandomNormal(kN, kK, 11, 0.02f);
    x_ = CorrelatedInputs(kT, kK, 12);
    HessianAccumulator acc(kK);
    ASSERT_TRUE(acc.Add({x_.data.data(), 400, kK}).ok());  // two batches
    ASSERT_TRUE(acc.Add({x_.data.data() + 400 * kK, kT - 400, kK}).ok());
    h_ = acc.Hessian();
  }
  double Error(const W4Weight& q) {
    auto eff = DequantizeW4Effective(q);
    EXPECT_TRUE(eff.ok());
    return OutputError(w_.view(), eff->view(), x_.view());
  }
  Matrix w_, x_;
  Eigen::MatrixXd h_;
};

TEST_F(GptqTest, AccumulatorMatchesDirect) {
  const RowMatrixXd xd = AsEigen(x_.view()).cast<double>();
  const Eigen::MatrixXd direct = 2.0 * xd.transpose() * xd / static_cast<double>(kT);
  EXPECT_LT((h_ - direct).norm() / direct.norm(), 1e-6);
  HessianAccumulator acc(kK);
  EXPECT_FALSE(acc.Add({x_.data.data(), 2, kK - 1}).ok());
}

TEST_F(GptqTest, BeatsRtnOnCorrelatedInputs) {
  // 96 is ragged on k = 256 (groups of 96, 96, 64).
  for (int64_t group : {kK, int64_t{32}, int64_t{128}, int64_t{96}}) {
    for (bool sym : {false, true}) {
      const W4Format fmt{kN, kK, group, sym};
      auto rtn = QuantizeRtn(w_.view(), fmt);
      ASSERT_TRUE(rtn.ok());
      const double e_rtn = Error(*rtn);
      for (bool act_order : {false, true}) {
        for (bool static_groups : {false, true}) {
          if (static_groups && group == kK) continue;
          GptqOptions opt;
          opt.act_order = act_order;
          opt.static_groups = static_groups;
          opt.block_size = 64;  // several lazy blocks
          GptqReport rep;
          auto q = QuantizeGptq(w_.view(), h_, fmt, opt, &rep);
          ASSERT_TRUE(q.ok()) << q.status();
          const double e = Error(*q);
          EXPECT_LT(e, 0.7 * e_rtn) << "group " << group << " sym " << sym << " act_order "
                                    << act_order << " static " << static_groups;
          EXPECT_GT(rep.damp, 0.0);
        }
      }
    }
  }
}

TEST_F(GptqTest, IdentityHessianEqualsRtn) {
  for (int64_t group : {kK, int64_t{64}, int64_t{96}}) {
    const W4Format fmt{kN, kK, group, false};
    auto rtn = QuantizeRtn(w_.view(), fmt);
    GptqOptions opt;
    opt.act_order = true;  // ties in diag: stable order = identity
    auto q = QuantizeGptq(w_.view(), Eigen::MatrixXd::Identity(kK, kK), fmt, opt);
    ASSERT_TRUE(rtn.ok() && q.ok());
    EXPECT_EQ(q->packed, rtn->packed);
    EXPECT_EQ(q->scales, rtn->scales);
    EXPECT_EQ(q->zeros, rtn->zeros);
  }
}

TEST_F(GptqTest, DeadColumnsAndErrors) {
  Matrix x = x_;
  for (int64_t t = 0; t < kT; ++t) x.at(t, 5) = 0.0f;  // dead input channel
  HessianAccumulator acc(kK);
  ASSERT_TRUE(acc.Add(x.view()).ok());
  GptqReport rep;
  auto q = QuantizeGptq(w_.view(), acc.Hessian(), {kN, kK, 64, false}, {}, &rep);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(rep.dead_columns, 1);
  auto eff = DequantizeW4Effective(*q);
  ASSERT_TRUE(eff.ok());
  for (float v : eff->data) EXPECT_TRUE(std::isfinite(v));
  EXPECT_FALSE(QuantizeGptq(w_.view(), Eigen::MatrixXd::Identity(3, 3), {kN, kK, 64, false}).ok());
  EXPECT_FALSE(QuantizeGptq(w_.view(), h_, {kN, kK, 300, false}).ok());  // group > k
  EXPECT_FALSE(QuantizeGptq(w_.view(), h_, {kN, kK, 0, false}).ok());
}

}  // namespace
}  // namespace spear::quantize
