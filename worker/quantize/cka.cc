#include "worker/quantize/cka.h"

#include <cmath>

namespace spear::quantize {
namespace {

absl::StatusOr<RowMatrixXd> Centered(MatrixView x) {
  if (x.rows < 2 || x.cols < 1 || x.data == nullptr) {
    return absl::InvalidArgumentError("CKA: need at least 2 tokens and 1 feature");
  }
  RowMatrixXd c = AsEigen(x).cast<double>();
  if (!c.allFinite()) return absl::InvalidArgumentError("CKA: non-finite value");
  c.rowwise() -= c.colwise().mean();
  return c;
}

// ||Xc^T Xc||_F via a symmetric rank update (half the flops of a GEMM).
double GramNorm(const RowMatrixXd& xc) {
  Eigen::MatrixXd g = Eigen::MatrixXd::Zero(xc.cols(), xc.cols());
  g.selfadjointView<Eigen::Lower>().rankUpdate(xc.transpose());
  const double diag = g.diagonal().squaredNorm();
  const double lower = g.triangularView<Eigen::StrictlyLower>().toDenseMatrix().squaredNorm();
  return std::sqrt(diag + 2.0 * lower);
}

}  // namespace

absl::StatusOr<CkaReference> CkaReference::Create(MatrixView x) {
  auto c = Centered(x);
  if (!c.ok()) return c.status();
  CkaReference ref;
  ref.xc_ = std::move(*c);
  ref.x_norm_ = GramNorm(ref.xc_);
  return ref;
}

absl::StatusOr<double> CkaReference::Cka(MatrixView y) const {
  if (y.rows != xc_.rows()) return absl::InvalidArgumentError("CKA: X and Y have different token counts");
  auto yc = Centered(y);
  if (!yc.ok()) return yc.status();
  const double y_norm = GramNorm(*yc);
  if (x_norm_ == 0.0 || y_norm == 0.0) return 0.0;
  const double cross = (yc->transpose() * xc_).squaredNorm();
  return cross / (x_norm_ * y_norm);
}

absl::StatusOr<double> LinearCka(MatrixView x, MatrixView y) {
  auto ref = CkaReference::Create(x);
  if (!ref.ok()) return ref.status();
  return ref->Cka(y);
}

absl::StatusOr<DamageEntropy> ComputeDamageEntropy(const std::vector<double>& damages) {
  if (damages.empty()) return absl::InvalidArgumentError("damage entropy: no modules");
  double sum = 0.0;
  for (double d : damages) {
    if (!std::isfinite(d) || d < 0.0) return absl::InvalidArgumentError("damage entropy: damages must be finite and >= 0");
    sum += d;
  }
  DamageEntropy out;
  out.p.assign(damages.size(), 0.0);
  if (sum == 0.0) return out;
  for (size_t i = 0; i < damages.size(); ++i) {
    out.p[i] = damages[i] / sum;
    if (out.p[i] > 0.0) out.entropy -= out.p[i] * std::log(out.p[i]);
  }
  out.normalized_entropy = damages.size() > 1 ? out.entropy / std::log(static_cast<double>(damages.size())) : 0.0;
  out.effective_modules = std::exp(out.entropy);
  return out;
}

}  // namespace spear::quantize
