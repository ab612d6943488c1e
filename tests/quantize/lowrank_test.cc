#include "worker/quantize/lowrank.h"

#include <gtest/gtest.h>

#include "tests/quantize/test_helpers.h"
#include "worker/quantize/ec_train.h"

namespace spear::quantize {
namespace {

using testing::CorrelatedInputs;
using testing::RandomNormal;

TEST(LowRank, IdentityCovarianceIsTruncatedSvd) {
  const int64_t n = 40, k = 30, r = 7;
  const Matrix e = RandomNormal(n, k, 41, 0.01f);
  const Eigen::MatrixXd id = Eigen::MatrixXd::Identity(k, k);
  LowRankOptions opt;
  opt.eps = 0.0;
  auto aware = FitLowRankActivationAware(e.view(), id, r, opt);
  auto plain = FitLowRankPlain(e.view(), r);
  ASSERT_TRUE(aware.ok() && plain.ok());
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(AsEigen(e.view()).cast<double>());
  const Eigen::VectorXd sv = svd.singularValues();
  const double discarded = sv.tail(k - r).squaredNorm();
  EXPECT_NEAR(aware->residual_energy, discarded, 1e-9 * sv.squaredNorm());
  EXPECT_NEAR(ExpectedResidual(e.view(), *aware, id), discarded, 1e-5 * sv.squaredNorm());
  EXPECT_NEAR(ExpectedResidual(e.view(), *plain, id), discarded, 1e-5 * sv.squaredNorm());
  for (int64_t i = 0; i < k; ++i) EXPECT_NEAR(plain->singular_values[i], sv(i), 1e-9);
  // Balanced split: ||B_:,j|| = ||A_j,:|| = sqrt(sigma_j).
  for (int64_t j = 0; j < r; ++j) {
    double bn = 0, an = 0;
    for (int64_t i = 0; i < n; ++i) bn += double(plain->b.at(i, j)) * plain->b.at(i, j);
    for (int64_t i = 0; i < k; ++i) an += double(plain->a.at(j, i)) * plain->a.at(j, i);
    EXPECT_NEAR(std::sqrt(bn), std::sqrt(sv(j)), 1e-5);
    EXPECT_NEAR(std::sqrt(an), std::sqrt(sv(j)), 1e-5);
  }
}

TEST(LowRank, ActivationAwareBeatsPlainUnderCorrelatedInputs) {
  const int64_t n = 64, k = 48, r = 8;
  const Matrix e = RandomNormal(n, k, 42, 0.01f);
  const Matrix x = CorrelatedInputs(2048, k, 43);
  const RowMatrixXd xd = AsEigen(x.view()).cast<double>();
  const Eigen::MatrixXd s = xd.transpose() * xd / 2048.0;
  auto aware = FitLowRankActivationAware(e.view(), s, r);
  auto plain = FitLowRankPlain(e.view(), r);
  ASSERT_TRUE(aware.ok() && plain.ok());
  const double ea = ExpectedResidual(e.view(), *aware, s);
  const double ep = ExpectedResidual(e.view(), *plain, s);
  EXPECT_LT(ea, 0.8 * ep);
  EXPECT_NEAR(ea, aware->residual_energy, 1e-3 * aware->total_energy);
}

// The activation-aware fit of a random n x k error under correlated inputs
// against the SVD of E L (S = L L^T): the optimum, the energies, the
// leading singular values (to `tol` of the total), and balanced scales:
// column i of B and row i of A, measured through L, both sqrt(sigma_i).
void ExpectFitIsOptimal(int64_t n, int64_t k, int64_t r, uint64_t seed, double tol) {
  SCOPED_TRACE(::testing::Message() << n << " x " << k << " rank " << r);
  const Matrix e = RandomNormal(n, k, seed, 0.01f);
  const Matrix x = CorrelatedInputs(4096, k, seed + 1);
  const RowMatrixXd xd = AsEigen(x.view()).cast<double>();
  const Eigen::MatrixXd s = xd.transpose() * xd / 4096.0;
  LowRankOptions opt;
  opt.eps = 0;
  auto fit = FitLowRankActivationAware(e.view(), s, r, opt);
  ASSERT_TRUE(fit.ok()) << fit.status();
  Eigen::LLT<Eigen::MatrixXd> llt(s);
  const Eigen::MatrixXd el = AsEigen(e.view()).cast<double>() * Eigen::MatrixXd(llt.matrixL());
  const Eigen::VectorXd sv = Eigen::JacobiSVD<Eigen::MatrixXd>(el).singularValues();
  const double optimum = sv.tail(sv.size() - r).squaredNorm();
  EXPECT_NEAR(fit->residual_energy, optimum, tol * sv.squaredNorm());
  EXPECT_NEAR(fit->total_energy, sv.squaredNorm(), tol * sv.squaredNorm());
  EXPECT_NEAR(ExpectedResidual(e.view(), *fit, s), optimum, 1e-4 * sv.squaredNorm());
  ASSERT_EQ(fit->singular_values.size(), static_cast<size_t>(std::min(n, k)));
  for (int64_t i = 0; i < r + 2; ++i) EXPECT_NEAR(fit->singular_values[i], sv(i), tol * sv(0));
  const Eigen::MatrixXd al = AsEigen(fit->a.view()).cast<double>() * Eigen::MatrixXd(llt.matrixL());
  for (int64_t i = 0; i < r; ++i) {
    EXPECT_NEAR(AsEigen(fit->b.view()).col(i).norm(), al.row(i).norm(), 1e-3 * al.row(i).norm());
    EXPECT_NEAR(AsEigen(fit->b.view()).col(i).norm(), std::sqrt(sv(i)), 1e-3 * std::sqrt(sv(i)));
  }
}

// n <= k takes the Gram route (E S E^T [n, n], its product in float: 1e-4);
// n > k the k-side Gram (E L)^T (E L) [k, k] in float64 (1e-9). Both give
// the SVD's optimum.
TEST(LowRank, GramRoutesAreOptimal) {
  ExpectFitIsOptimal(24, 56, 5, 52, 1e-4);  // wide
  ExpectFitIsOptimal(72, 40, 6, 54, 1e-9);  // tall
}

// A symmetric matrix with the given spectrum in a random orthonormal basis.
Eigen::MatrixXd WithSpectrum(const Eigen::VectorXd& lambda, uint64_t seed) {
  const int64_t n = lambda.size();
  const Matrix z = RandomNormal(n, n, seed);
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(AsEigen(z.view()).cast<double>());
  const Eigen::MatrixXd q = qr.householderQ();
  return q * lambda.asDiagonal() * q.transpose();
}

// Checks top against the full eigendecomposition of g: every eigenvalue
// within 1e-12 ||g||, residuals, orthonormality, and the span of the top
// `count` (the full solver's vectors project onto top's span in full).
void ExpectTopEigenMatchesFull(const Eigen::MatrixXd& g, int64_t count, const TopEigen& top) {
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(g);
  const Eigen::VectorXd ref = eig.eigenvalues().reverse();
  const double scale = g.norm();
  ASSERT_EQ(top.values.size(), g.rows());
  ASSERT_EQ(top.vectors.rows(), g.rows());
  ASSERT_EQ(top.vectors.cols(), count);
  EXPECT_LT((top.values - ref).cwiseAbs().maxCoeff(), 1e-12 * scale);
  const Eigen::MatrixXd& v = top.vectors;
  const Eigen::MatrixXd res = g * v - v * top.values.head(count).asDiagonal();
  EXPECT_LT(res.colwise().norm().maxCoeff(), 1e-10 * scale);
  EXPECT_LT((v.transpose() * v - Eigen::MatrixXd::Identity(count, count)).cwiseAbs().maxCoeff(),
            1e-10);
  // Where the count-th eigenvalue is apart from the next, the subspaces agree.
  if (count == g.rows() || ref(count - 1) - ref(count) > 1e-6 * scale) {
    const Eigen::MatrixXd u = eig.eigenvectors().rowwise().reverse().leftCols(count);
    const Eigen::MatrixXd proj = v.transpose() * u;  // [count, count], orthogonal if equal spans
    for (int64_t j = 0; j < count; ++j) EXPECT_NEAR(proj.col(j).norm(), 1.0, 1e-10) << j;
  }
}

TEST(TopEigenpairs, MatchesTheFullEigendecomposition) {
  // Indefinite, distinct eigenvalues; then PSD with repeated ones (a cluster
  // of three at the top, ties at zero), and a rank-3 Gram (zeros below).
  Eigen::VectorXd distinct(80);
  for (int64_t i = 0; i < 80; ++i) distinct(i) = std::sin(1.7 * i) * (1.0 + 0.1 * i);
  Eigen::VectorXd repeated = Eigen::VectorXd::Zero(64);
  repeated.head(7) << 5, 5, 5, 2, 1, 1, 0.5;
  const Matrix x = RandomNormal(3, 96, 61);
  const Eigen::MatrixXd xd = AsEigen(x.view()).cast<double>();
  const std::vector<Eigen::MatrixXd> cases = {
      WithSpectrum(distinct, 62), WithSpectrum(repeated, 63), xd.transpose() * xd,
      WithSpectrum(Eigen::VectorXd::LinSpaced(200, 1, 2), 64)};
  for (size_t c = 0; c < cases.size(); ++c) {
    const Eigen::MatrixXd& g = cases[c];
    for (int64_t count : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{5}, g.rows() / 4}) {
      SCOPED_TRACE(::testing::Message() << "case " << c << " count " << count);
      auto top = TopEigenpairs(g, count);
      ASSERT_TRUE(top.ok()) << top.status();
      EXPECT_FALSE(top->full);  // the tridiagonal path held
      ExpectTopEigenMatchesFull(g, count, *top);
    }
  }
}

// Only the lower triangle is read (as by Eigen's solvers): a Gram summed in
// float, whose two triangles differ in the last bits, keeps the fast path.
TEST(TopEigenpairs, ReadsTheLowerTriangle) {
  Eigen::VectorXd lambda(96);
  for (int64_t i = 0; i < 96; ++i) lambda(i) = 1.0 / (1.0 + i);
  const Eigen::MatrixXd g = WithSpectrum(lambda, 66);
  Eigen::MatrixXd noisy = g;
  const Matrix z = RandomNormal(96, 96, 67);
  for (int64_t j = 1; j < 96; ++j) {
    for (int64_t i = 0; i < j; ++i) noisy(i, j) += 1e-7 * z.at(i, j);  // upper triangle only
  }
  auto top = TopEigenpairs(noisy, 4);
  ASSERT_TRUE(top.ok());
  EXPECT_FALSE(top->full);
  ExpectTopEigenMatchesFull(g, 4, *top);
}

TEST(TopEigenpairs, FullSolverWhereItPaysAndBadInput) {
  const Eigen::MatrixXd g = WithSpectrum(Eigen::VectorXd::LinSpaced(12, -3, 4), 65);
  for (int64_t count : {4, 12}) {  // count > n / 4: the full eigendecomposition
    auto top = TopEigenpairs(g, count);
    ASSERT_TRUE(top.ok());
    EXPECT_TRUE(top->full);
    ExpectTopEigenMatchesFull(g, count, *top);
  }
  auto zero = TopEigenpairs(Eigen::MatrixXd::Zero(20, 20), 2);  // any basis
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->values.cwiseAbs().maxCoeff(), 0.0);
  EXPECT_NEAR((zero->vectors.transpose() * zero->vectors - Eigen::MatrixXd::Identity(2, 2)).norm(),
              0, 1e-12);
  auto one = TopEigenpairs(Eigen::MatrixXd::Constant(1, 1, 3.0), 1);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->values(0), 3.0);
  EXPECT_EQ(std::abs(one->vectors(0, 0)), 1.0);
  EXPECT_EQ(TopEigenpairs(g, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TopEigenpairs(g, 13).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TopEigenpairs(Eigen::MatrixXd::Zero(3, 4), 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TopEigenpairs(Eigen::MatrixXd(0, 0), 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  Eigen::MatrixXd nan = g;
  nan(3, 5) = std::nan("");
  EXPECT_EQ(TopEigenpairs(nan, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LowRank, SingularCovarianceFallsBackToEigen) {
  // A dead input channel and eps = 0: S is singular, Cholesky fails, the
  // clamped eigen-decomposition path must still give the optimum.
  const int64_t n = 16, k = 10, r = 3;
  const Matrix e = RandomNormal(n, k, 48);
  Matrix x = CorrelatedInputs(256, k, 49);
  for (int64_t t = 0; t < 256; ++t) x.at(t, 4) = 0.0f;
  const RowMatrixXd xd = AsEigen(x.view()).cast<double>();
  const Eigen::MatrixXd s = xd.transpose() * xd / 256.0;
  LowRankOptions opt;
  opt.eps = 0.0;
  auto fit = FitLowRankActivationAware(e.view(), s, r, opt);
  ASSERT_TRUE(fit.ok());
  EXPECT_NEAR(ExpectedResidual(e.view(), *fit, s), fit->residual_energy, 1e-4 * fit->total_energy);
  auto damped = FitLowRankActivationAware(e.view(), s, r);  // eps 1e-6: Cholesky path
  ASSERT_TRUE(damped.ok());
  EXPECT_NEAR(ExpectedResidual(e.view(), *damped, s), fit->residual_energy,
              1e-4 * fit->total_energy);
}

TEST(LowRank, FullRankIsExact) {
  const int64_t n = 20, k = 12;
  const Matrix e = RandomNormal(n, k, 44);
  const Matrix x = CorrelatedInputs(512, k, 45);
  const RowMatrixXd xd = AsEigen(x.view()).cast<double>();
  const Eigen::MatrixXd s = xd.transpose() * xd / 512.0;
  auto fit = FitLowRankActivationAware(e.view(), s, k);
  ASSERT_TRUE(fit.ok());
  EXPECT_LT(ExpectedResidual(e.view(), *fit, s), 1e-9 * fit->total_energy);
  const RowMatrixXf ba = AsEigen(fit->b.view()) * AsEigen(fit->a.view());
  EXPECT_LT((ba - AsEigen(e.view())).norm(), 1e-4 * AsEigen(e.view()).norm());
  EXPECT_FALSE(FitLowRankActivationAware(e.view(), s, k + 1).ok());
  EXPECT_FALSE(FitLowRankPlain(e.view(), 0).ok());
  EXPECT_FALSE(FitLowRankActivationAware(e.view(), Eigen::MatrixXd::Identity(3, 3), 2).ok());
}

TEST(LowRank, GatedEcStartsAtGateOne) {
  const Matrix e = RandomNormal(16, 24, 46);
  auto fit = FitLowRankPlain(e.view(), 4);
  ASSERT_TRUE(fit.ok());
  const EcWeights st = MakeStaticEc(*fit);
  const EcWeights gated = MakeGatedEc(*fit, 8, 1);
  EXPECT_FALSE(st.gated);
  EXPECT_TRUE(gated.gated);
  EXPECT_EQ(gated.w1.size(), 32u);
  EXPECT_TRUE(ValidateEc(st).ok());
  EXPECT_TRUE(ValidateEc(gated).ok());
  const Matrix x = RandomNormal(10, 24, 47);
  auto ys = ApplyEc(st, x.view());
  auto yg = ApplyEc(gated, x.view());
  ASSERT_TRUE(ys.ok() && yg.ok());
  EXPECT_EQ(ys->data, yg->data);
}

}  // namespace
}  // namespace spear::quantize
