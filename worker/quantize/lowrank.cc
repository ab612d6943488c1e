#include "worker/quantize/lowrank.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"

namespace spear::quantize {
namespace {

absl::Status CheckRank(MatrixView e, int64_t rank) {
  if (e.rows <= 0 || e.cols <= 0 || e.data == nullptr) {
    return absl::InvalidArgumentError("low-rank fit: empty error matrix");
  }
  if (rank < 1 || rank > std::min(e.rows, e.cols)) {
    return absl::InvalidArgumentError(absl::StrCat("low-rank fit: rank ", rank, " not in [1, ",
                                                   std::min(e.rows, e.cols), "]"));
  }
  return absl::OkStatus();
}

// Fills fit from the SVD of m = E R (R = I for the plain fit). rinv_t(v)
// returns R^-T v (identity for the plain fit).
template <typename RInvT>
void FromSvd(const Eigen::MatrixXd& m, RInvT rinv_t, int64_t rank, LowRankFit* fit) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd sv = svd.singularValues();
  fit->singular_values.assign(sv.data(), sv.data() + sv.size());
  fit->total_energy = sv.squaredNorm();
  fit->residual_energy = sv.tail(sv.size() - rank).squaredNorm();
  const Eigen::VectorXd root = sv.head(rank).cwiseSqrt();
  const Eigen::MatrixXd b = svd.matrixU().leftCols(rank) * root.asDiagonal();
  // A^T = R^-T V_r Sigma_r^{1/2}.
  const Eigen::MatrixXd at = rinv_t(Eigen::MatrixXd(svd.matrixV().leftCols(rank) * root.asDiagonal()));
  const int64_t n = m.rows(), k = m.cols();
  fit->a = Matrix(rank, k);
  fit->b = Matrix(n, rank);
  AsEigen(fit->a) = at.transpose().cast<float>();
  AsEigen(fit->b) = b.cast<float>();
}

}  // namespace

absl::StatusOr<LowRankFit> FitLowRankActivationAware(MatrixView e, const Eigen::MatrixXd& s,
                                                     int64_t rank, const LowRankOptions& opt) {
  if (auto st = CheckRank(e, rank); !st.ok()) return st;
  const int64_t k = e.cols;
  if (s.rows() != k || s.cols() != k || !s.allFinite()) {
    return absl::InvalidArgumentError("FitLowRankActivationAware: S must be a finite [k, k] matrix");
  }
  if (opt.eps < 0) return absl::InvalidArgumentError("FitLowRankActivationAware: eps < 0");
  Eigen::MatrixXd sd = 0.5 * (s + s.transpose());
  const double mean_diag = sd.diagonal().mean();
  sd.diagonal().array() += opt.eps * (mean_diag > 0 ? mean_diag : 1.0);
  LowRankFit fit;
  if (e.rows <= e.cols) {
    // Gram route (n <= k, e.g. down_proj 576 x 1536): the same optimum from
    // the eigendecomposition of G = E S' E^T [n, n] = U Sigma^2 U^T, with
    //   B = U_r Sigma_r^{1/2},  A = Sigma_r^{-1/2} U_r^T E
    // (A is independent of the factor R, see the header), without the
    // Cholesky factor, the SVD of E R [n, k] or R^-1: ~5x less work for
    // down_proj. The large product E S' runs in float (as the second moment
    // itself is accumulated), the eigensolver in double.
    const RowMatrixXf ef = AsEigen(e);
    const RowMatrixXf es = ef * sd.cast<float>();
    Eigen::MatrixXd g = (es * ef.transpose()).cast<double>();
    g = 0.5 * (g + g.transpose());
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(g);
    if (eig.info() != Eigen::Success) {
      return absl::InternalError("FitLowRankActivationAware: eigendecomposition failed");
    }
    const int64_t n = e.rows;
    const Eigen::VectorXd lambda = eig.eigenvalues().reverse().cwiseMax(0.0);  // descending
    const Eigen::MatrixXd u = eig.eigenvectors().rowwise().reverse().leftCols(rank);
    fit.singular_values.resize(n);
    for (int64_t i = 0; i < n; ++i) fit.singular_values[i] = std::sqrt(lambda(i));
    fit.total_energy = lambda.sum();
    fit.residual_energy = lambda.tail(n - rank).sum();
    const double floor = std::max(lambda(0), 1e-300) * 1e-12;
    const Eigen::VectorXd q4 = lambda.head(rank).cwiseMax(floor).array().pow(0.25).matrix();
    fit.b = Matrix(n, rank);
    AsEigen(fit.b) = (u * q4.asDiagonal()).cast<float>();
    fit.a = Matrix(rank, k);
    AsEigen(fit.a) = (q4.cwiseInverse().asDiagonal() * u.transpose() * ef.cast<double>()).cast<float>();
    return fit;
  }
  const Eigen::MatrixXd ed = AsEigen(e).cast<double>();
  Eigen::LLT<Eigen::MatrixXd> llt(sd);
  if (llt.info() == Eigen::Success && llt.matrixL().toDenseMatrix().diagonal().minCoeff() > 0) {
    const Eigen::MatrixXd l = llt.matrixL();
    FromSvd(ed * l, [&](const Eigen::MatrixXd& v) { return Eigen::MatrixXd(llt.matrixU().solve(v)); },
            rank, &fit);
    return fit;
  }
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(sd);
  if (eig.info() != Eigen::Success) {
    return absl::InternalError("FitLowRankActivationAware: eigendecomposition failed");
  }
  Eigen::VectorXd lambda = eig.eigenvalues();
  const double floor = std::max(lambda.maxCoeff(), 1e-300) * 1e-12;
  lambda = lambda.cwiseMax(floor);
  const Eigen::MatrixXd& q = eig.eigenvectors();
  const Eigen::MatrixXd r = q * lambda.cwiseSqrt().asDiagonal() * q.transpose();
  const Eigen::MatrixXd r_inv = q * lambda.cwiseSqrt().cwiseInverse().asDiagonal() * q.transpose();
  FromSvd(ed * r, [&](const Eigen::MatrixXd& v) { return Eigen::MatrixXd(r_inv * v); }, rank, &fit);
  return fit;
}

absl::StatusOr<LowRankFit> FitLowRankPlain(MatrixView e, int64_t rank) {
  if (auto st = CheckRank(e, rank); !st.ok()) return st;
  LowRankFit fit;
  FromSvd(AsEigen(e).cast<double>(), [](const Eigen::MatrixXd& v) { return v; }, rank, &fit);
  return fit;
}

double ExpectedResidual(MatrixView e, const LowRankFit& fit, const Eigen::MatrixXd& s) {
  const Eigen::MatrixXd a = AsEigen(fit.a.view()).cast<double>();
  const Eigen::MatrixXd b = AsEigen(fit.b.view()).cast<double>();
  const Eigen::MatrixXd d = AsEigen(e).cast<double>() - b * a;
  return (d * s).cwiseProduct(d).sum();
}

EcWeights MakeStaticEc(const LowRankFit& fit) {
  EcWeights ec;
  ec.n = fit.b.rows;
  ec.k = fit.a.cols;
  ec.rank = fit.a.rows;
  ec.gate_hidden = 0;
  ec.gated = false;
  ec.a = fit.a.data;
  ec.b = fit.b.data;
  return ec;
}

EcWeights MakeGatedEc(const LowRankFit& fit, int64_t gate_hidden, uint64_t seed, float w1_std) {
  EcWeights ec = MakeStaticEc(fit);
  ec.gated = true;
  ec.gate_hidden = gate_hidden;
  const int64_t r = ec.rank, h = gate_hidden;
  if (w1_std <= 0.0f) w1_std = 1.0f / std::sqrt(static_cast<float>(r));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, w1_std);
  ec.w1.resize(static_cast<size_t>(h * r));
  for (float& v : ec.w1) v = normal(rng);
  ec.b1.assign(static_cast<size_t>(h), 0.0f);
  ec.w2.assign(static_cast<size_t>(r * h), 0.0f);
  ec.b2.assign(static_cast<size_t>(r), 0.0f);
  return ec;
}

}  // namespace spear::quantize
