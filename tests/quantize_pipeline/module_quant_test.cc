// The pipeline's GPTQ backbone: dampening chosen on held-out calibration
// tokens, RTN kept when GPTQ overfits (module_quant.cc).
#include "worker/quantize/pipeline/module_quant.h"

#include <gtest/gtest.h>

#include "tests/quantize/test_helpers.h"
#include "worker/quantize/w4_quant.h"

namespace spear::quantize {
namespace {

using testing::CorrelatedInputs;
using testing::OutputError;
using testing::RandomNormal;

constexpr int64_t kN = 48, kK = 256;

double HeldOutError(const Matrix& w, const kernels::W4Weight& q, const Matrix& x) {
  auto eff = DequantizeW4Effective(q);
  EXPECT_TRUE(eff.ok());
  return OutputError(w.view(), eff->view(), x.view());
}

// fit_tokens calibration rows for the Hessian, 512 held-out rows for the
// selection, 2048 fresh rows (same distribution) to score the result.
void RunBackbones(int64_t fit_tokens, double* e_gptq, double* e_rtn, double* e_sel_gptq,
         double* e_sel_rtn) {
  const Matrix w = RandomNormal(kN, kK, 21, 0.02f);
  const Matrix all = CorrelatedInputs(fit_tokens + 512 + 2048, kK, 22);
  const MatrixView fit{all.data.data(), fit_tokens, kK};
  const Matrix eval = [&] {
    Matrix m(512, kK);
    std::copy_n(all.data.data() + fit_tokens * kK, 512 * kK, m.data.data());
    return m;
  }();
  const Matrix fresh = [&] {
    Matrix m(2048, kK);
    std::copy_n(all.data.data() + (fit_tokens + 512) * kK, 2048 * kK, m.data.data());
    return m;
  }();
  const Eigen::MatrixXd s2 = SecondMoment(fit);
  ModuleData d;
  d.w = w.view();
  d.x_q_fit = fit;
  d.x_q_eval = eval.view();
  d.second_moment = &s2;
  QuantizeOptions o;
  o.backbone = Backbone::kGptq;
  auto q = QuantizeBackbone(d, o);
  ASSERT_TRUE(q.ok()) << q.status();
  auto r = QuantizeRtn(w.view(), MakeW4Format(kN, kK, o));
  ASSERT_TRUE(r.ok());
  *e_gptq = HeldOutError(w, *q, fresh);
  *e_rtn = HeldOutError(w, *r, fresh);
  *e_sel_gptq = HeldOutError(w, *q, eval);
  *e_sel_rtn = HeldOutError(w, *r, eval);
}

TEST(GptqBackbone, BeatsRtnWithEnoughCalibration) {
  double g, r, sg, sr;
  RunBackbones(2048, &g, &r, &sg, &sr);
  EXPECT_LT(g, 0.8 * r) << "GPTQ " << g << " RTN " << r;
}

// 64 tokens for k = 256 inputs: plain GPTQ fits noise. The selection never
// returns something worse than RTN on the held-out rows it chose on, and
// stays close to RTN or better on fresh rows.
TEST(GptqBackbone, NeverWorseThanRtnOnHeldOutWhenCalibrationIsTiny) {
  double g, r, sg, sr;
  RunBackbones(64, &g, &r, &sg, &sr);
  EXPECT_LE(sg, sr * (1 + 1e-9));
  EXPECT_LT(g, 1.1 * r) << "GPTQ " << g << " RTN " << r;
}

}  // namespace
}  // namespace spear::quantize
