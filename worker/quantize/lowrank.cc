#include "worker/quantize/lowrank.h"

#include <algorithm>
#include <cmath>
#include <limits>
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

// (T - shift I) for a symmetric tridiagonal T (diagonal d, off-diagonal e),
// factored by Gaussian elimination with partial pivoting (LAPACK's dgttrf
// form: U has two superdiagonals), pivots smaller than `tiny` raised to it
// (sign kept), so that a shift at an eigenvalue solves to a large multiple
// of its eigenvector (inverse iteration) instead of dividing by zero.
class ShiftedTridiagonalLu {
 public:
  ShiftedTridiagonalLu(const Eigen::VectorXd& d, const Eigen::VectorXd& e, double shift,
                       double tiny)
      : n_(d.size()), u0_(d.array() - shift), u1_(n_), u2_(n_), l_(n_), swap_(n_, false) {
    u1_.setZero();
    u2_.setZero();
    l_.setZero();
    for (int64_t i = 0; i + 1 < n_; ++i) u1_(i) = e(i);
    for (int64_t i = 0; i + 1 < n_; ++i) {
      const double sub = e(i);  // T(i + 1, i)
      if (std::abs(u0_(i)) >= std::abs(sub)) {
        if (std::abs(u0_(i)) < tiny) u0_(i) = std::copysign(tiny, u0_(i));
        l_(i) = sub / u0_(i);
        u0_(i + 1) -= l_(i) * u1_(i);
      } else {  // rows i and i + 1 trade places
        swap_[static_cast<size_t>(i)] = true;
        l_(i) = u0_(i) / sub;
        const double diag_next = u0_(i + 1);
        u0_(i) = sub;
        const double super = u1_(i);
        u1_(i) = diag_next;
        u0_(i + 1) = super - l_(i) * diag_next;
        if (i + 2 < n_) {
          u2_(i) = u1_(i + 1);
          u1_(i + 1) = -l_(i) * u1_(i + 1);
        }
      }
    }
    if (std::abs(u0_(n_ - 1)) < tiny) u0_(n_ - 1) = std::copysign(tiny, u0_(n_ - 1));
  }

  void Solve(Eigen::VectorXd* b) const {
    Eigen::VectorXd& x = *b;
    for (int64_t i = 0; i + 1 < n_; ++i) {
      if (swap_[static_cast<size_t>(i)]) {
        const double t = x(i);
        x(i) = x(i + 1);
        x(i + 1) = t - l_(i) * x(i);
      } else {
        x(i + 1) -= l_(i) * x(i);
      }
    }
    for (int64_t i = n_ - 1; i >= 0; --i) {
      double v = x(i);
      if (i + 1 < n_) v -= u1_(i) * x(i + 1);
      if (i + 2 < n_) v -= u2_(i) * x(i + 2);
      x(i) = v / u0_(i);
    }
  }

 private:
  int64_t n_;
  Eigen::VectorXd u0_, u1_, u2_, l_;
  std::vector<bool> swap_;
};

// Whether v [n, count] holds orthonormal eigenvectors of g for values(0 ..
// count - 1): residuals within 1e-10 ||g||_F, V^T V = I within 1e-10.
bool EigenpairsHold(const Eigen::MatrixXd& g, const Eigen::VectorXd& values,
                    const Eigen::MatrixXd& v) {
  const double scale = std::max(g.norm(), 1e-300);
  const Eigen::MatrixXd r = g * v - v * values.head(v.cols()).asDiagonal();
  if (!r.allFinite() || r.colwise().norm().maxCoeff() > 1e-10 * scale) return false;
  const Eigen::MatrixXd gram = v.transpose() * v;
  return (gram - Eigen::MatrixXd::Identity(v.cols(), v.cols())).cwiseAbs().maxCoeff() <= 1e-10;
}

// From a Gram's eigenvalues (all, descending; clamped at 0): the fit's
// singular values sqrt(lambda) and energies, and returns the top `rank`
// lambda^{1/4} (Sigma_r^{1/2}, floored at 1e-12 of the largest lambda) that
// split the balanced B and A.
Eigen::VectorXd SetSpectrum(const Eigen::VectorXd& values, int64_t rank, LowRankFit* fit) {
  const Eigen::VectorXd lambda = values.cwiseMax(0.0);
  const int64_t count = lambda.size();
  fit->singular_values.resize(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) fit->singular_values[i] = std::sqrt(lambda(i));
  fit->total_energy = lambda.sum();
  fit->residual_energy = lambda.tail(count - rank).sum();
  const double floor = std::max(lambda(0), 1e-300) * 1e-12;
  return lambda.head(rank).cwiseMax(floor).array().pow(0.25).matrix();
}

TopEigen FullEigen(const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>& eig, int64_t count) {
  TopEigen out;
  out.values = eig.eigenvalues().reverse();
  out.vectors = eig.eigenvectors().rowwise().reverse().leftCols(count);
  out.full = true;
  return out;
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

absl::StatusOr<TopEigen> TopEigenpairs(const Eigen::MatrixXd& g, int64_t count) {
  const int64_t n = g.rows();
  if (n < 1 || g.cols() != n || !g.allFinite()) {
    return absl::InvalidArgumentError("TopEigenpairs: g must be a finite, non-empty square matrix");
  }
  if (count < 1 || count > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("TopEigenpairs: count ", count, " not in [1, ", n, "]"));
  }
  auto full = [&]() -> absl::StatusOr<TopEigen> {
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(g);
    if (eig.info() != Eigen::Success) {
      return absl::InternalError("TopEigenpairs: eigendecomposition failed");
    }
    return FullEigen(eig, count);
  };
  if (count * 4 > n) return full();
  const Eigen::Tridiagonalization<Eigen::MatrixXd> tri(g);
  const Eigen::VectorXd d = tri.diagonal();
  const Eigen::VectorXd e = tri.subDiagonal();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> ev;
  ev.computeFromTridiagonal(d, e, Eigen::EigenvaluesOnly);
  if (ev.info() != Eigen::Success) return full();
  TopEigen out;
  out.values = ev.eigenvalues().reverse();
  // ||T||_1: the scale of the pivot floor and of the cluster test (LAPACK's
  // dstein: eigenvalues within 1e-3 ||T|| are orthogonalized against each other).
  double norm1 = 0;
  for (int64_t i = 0; i < n; ++i) {
    double c = std::abs(d(i));
    if (i > 0) c += std::abs(e(i - 1));
    if (i + 1 < n) c += std::abs(e(i));
    norm1 = std::max(norm1, c);
  }
  if (norm1 == 0) return full();  // g = 0: any basis
  const double tiny = std::numeric_limits<double>::epsilon() * norm1;
  Eigen::MatrixXd y(n, count);
  uint64_t state = 0x9E3779B97F4A7C15ull;  // fixed start vectors: same bits every run
  for (int64_t j = 0; j < count; ++j) {
    const double lambda = out.values(j);
    const ShiftedTridiagonalLu lu(d, e, lambda, tiny);
    Eigen::VectorXd x(n);
    for (int64_t i = 0; i < n; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      x(i) = static_cast<double>(state >> 11) * 0x1.0p-53 - 0.5;
    }
    int64_t cluster = j;  // first earlier vector of this eigenvalue's cluster
    while (cluster > 0 && out.values(cluster - 1) - lambda <= 1e-3 * norm1) --cluster;
    for (int it = 0; it < 3; ++it) {
      x /= x.cwiseAbs().maxCoeff();  // keeps the solves' growth in range
      lu.Solve(&x);
      for (int64_t c = cluster; c < j; ++c) x -= y.col(c).dot(x) * y.col(c);
      const double nrm = x.norm();
      if (!(nrm > 0) || !std::isfinite(nrm)) return full();
      x /= nrm;
    }
    y.col(j) = x;
  }
  out.vectors = tri.matrixQ() * y;
  // Checked on the matrix the solvers read: g's lower triangle, mirrored.
  if (!EigenpairsHold(Eigen::MatrixXd(g.selfadjointView<Eigen::Lower>()), out.values,
                      out.vectors)) {
    return full();
  }
  return out;
}

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
    g = (0.5 * (g + g.transpose())).eval();  // eval: g.transpose() aliases g
    auto top = TopEigenpairs(g, rank);
    if (!top.ok()) return top.status();
    const int64_t n = e.rows;
    const Eigen::MatrixXd& u = top->vectors;
    const Eigen::VectorXd q4 = SetSpectrum(top->values, rank, &fit);
    fit.b = Matrix(n, rank);
    AsEigen(fit.b) = (u * q4.asDiagonal()).cast<float>();
    fit.a = Matrix(rank, k);
    AsEigen(fit.a) =
        (q4.cwiseInverse().asDiagonal() * u.transpose() * ef.cast<double>()).cast<float>();
    return fit;
  }
  const Eigen::MatrixXd ed = AsEigen(e).cast<double>();
  Eigen::LLT<Eigen::MatrixXd> llt(sd);
  if (llt.info() == Eigen::Success && llt.matrixL().toDenseMatrix().diagonal().minCoeff() > 0) {
    // n > k (gate / up_proj 1536 x 576): the SVD E L = U Sigma V^T from the
    // k-side Gram M = (E L)^T (E L) = V Sigma^2 V^T [k, k]:
    //   B = U_r Sigma_r^{1/2} = E L V_r Sigma_r^{-1/2},  A^T = L^-T V_r Sigma_r^{1/2},
    // in float64 throughout (E L and M by triangular / rank-k products:
    // ~0.14 s at 1536 x 576 on an AVX2 core, where the thin SVD took ~0.59).
    const Eigen::MatrixXd el = ed * llt.matrixL();
    Eigen::MatrixXd m = Eigen::MatrixXd::Zero(k, k);
    m.selfadjointView<Eigen::Lower>().rankUpdate(el.transpose());
    m = Eigen::MatrixXd(m.selfadjointView<Eigen::Lower>());
    auto top = TopEigenpairs(m, rank);
    if (!top.ok()) return top.status();
    const Eigen::MatrixXd& v = top->vectors;
    const Eigen::VectorXd q4 = SetSpectrum(top->values, rank, &fit);
    fit.b = Matrix(e.rows, rank);
    AsEigen(fit.b) = (el * v * q4.cwiseInverse().asDiagonal()).cast<float>();
    const Eigen::MatrixXd at = llt.matrixU().solve(Eigen::MatrixXd(v * q4.asDiagonal()));
    fit.a = Matrix(rank, k);
    AsEigen(fit.a) = at.transpose().cast<float>();
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
