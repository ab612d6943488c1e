// Static low-rank compensation of a weight error E = W - Q(W) [n, k]
// (stage 1 of the EC fit; also the "QERA-exact" static baseline).
//
// Activation-aware fit. With S = E[x x^T] [k, k] from calibration
// (HessianAccumulator::SecondMoment), damped S' = S + eps * mean(diag S) * I,
// the expected output error of a correction C = B A is
//     E_x ||(E - B A) x||^2 = ||(E - B A) R||_F^2,   S' = R R^T.
// Any factor R with S' = R R^T gives the same norm, the same U, Sigma (E R R^T
// E^T = E S' E^T) and the same A (A = Sigma_r^{-1/2} U_r^T E, independent of
// R). We use the Cholesky factor R = L (k^3/3 flops, ~25x cheaper than the
// symmetric square root Q diag(sqrt(lambda)) Q^T that QERA writes), and fall
// back to that eigen-decomposition, eigenvalues clamped at 1e-12 * max, when S'
// is not numerically positive definite. The SVD's top r triplets come from the
// smaller Gram (TopEigenpairs below): (E L)^T (E L) [k, k] = V Sigma^2 V^T
// when n > k, E S' E^T [n, n] = U Sigma^2 U^T when n <= k (all eigenvalues
// for the energies, vectors for the top r only). With the SVD E R = U Sigma V^T the
// best rank-r product is (E R)_r R^-1 (Eckart-Young in the R-weighted norm):
//     B = U_r Sigma_r^{1/2}         [n, r]
//     A = Sigma_r^{1/2} V_r^T R^-1   [r, k]
// Scale balance: any B D, D^-1 A gives the same product; splitting
// Sigma_r^{1/2} to both sides makes the r-th column of B and row of A
// (measured through R) equally large, which keeps fp16 storage accurate and
// gives Adam (stage 2) factors of comparable scale.
// The minimum (for S') is sum_{i > r} sigma_i^2: residual_energy below.
//
// Plain fit (S = I, the data-free LoRC/ZeroQuant-V2 baseline):
//     B = U_r Sigma_r^{1/2}, A = Sigma_r^{1/2} V_r^T from the SVD of E itself.
#pragma once

#include <Eigen/Dense>
#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/w4_format.h"
#include "worker/quantize/matrix.h"

namespace spear::quantize {

using kernels::EcWeights;

struct LowRankFit {
  Matrix a;  // [r, k]
  Matrix b;  // [n, r]
  std::vector<double> singular_values;  // all min(n, k) sigma_i (of E R, or of E)
  double total_energy = 0.0;     // ||E R||_F^2 (= E_x ||E x||^2 under S')
  double residual_energy = 0.0;  // sum_{i > r} sigma_i^2
};

struct LowRankOptions {
  double eps = 1e-6;  // dampening of S, relative to mean(diag S)
};

// e [n, k], s [k, k] symmetric PSD, 1 <= rank <= min(n, k).
absl::StatusOr<LowRankFit> FitLowRankActivationAware(MatrixView e, const Eigen::MatrixXd& s,
                                                     int64_t rank, const LowRankOptions& opt = {});
// Plain truncated SVD of e [n, k].
absl::StatusOr<LowRankFit> FitLowRankPlain(MatrixView e, int64_t rank);

// Every eigenvalue of a symmetric g [n, n] (descending) and orthonormal
// eigenvectors of the `count` largest [n, count], for the fits above, which
// use the top r <= 8 directions of Grams of n = 192..1536: Householder
// tridiagonalization (4/3 n^3 flops), the tridiagonal's eigenvalues (implicit
// QR, no vectors), inverse iteration on the tridiagonal for the `count`
// largest (pivoted LU, three solves each, orthogonalized within clusters),
// back-transformed by the Householder vectors. Every pair is then checked on
// g itself (||g v - lambda v|| <= 1e-10 ||g||, V^T V = I to 1e-10; g's lower
// triangle is what is read, as by Eigen's solvers); if any
// check fails, or count > n / 4, the full eigendecomposition (~6x the work at
// n = 576: 0.28 s against 0.04 s on an AVX2 core) gives the answer instead
// (`full` is then true). InvalidArgument for a non-square, non-finite g or a
// count outside [1, n].
struct TopEigen {
  Eigen::VectorXd values;   // all n eigenvalues, descending
  Eigen::MatrixXd vectors;  // [n, count], column j for values(j)
  bool full = false;        // the full eigendecomposition answered
};
absl::StatusOr<TopEigen> TopEigenpairs(const Eigen::MatrixXd& g, int64_t count);

// E_x ||(E - B A) x||^2 = tr((E - BA) S (E - BA)^T), float64 (S undamped).
double ExpectedResidual(MatrixView e, const LowRankFit& fit, const Eigen::MatrixXd& s);

// EC with the gate absent (gated = false): y = Q(W) x + B A x.
EcWeights MakeStaticEc(const LowRankFit& fit);
// EC with a gate that starts at exactly 1: W1 ~ N(0, w1_std^2) [h, r]
// (seeded), b1 = 0, W2 = 0, b2 = 0. Training then moves W2 first.
EcWeights MakeGatedEc(const LowRankFit& fit, int64_t gate_hidden, uint64_t seed,
                      float w1_std = 0.0f);  // 0: 1/sqrt(r)

}  // namespace spear::quantize
