// Seeded random matrices for the quantize tests.
#pragma once

#include <cstdint>
#include <random>

#include "worker/quantize/matrix.h"

namespace spear::quantize::testing {

inline Matrix RandomNormal(int64_t rows, int64_t cols, uint64_t seed, float stddev = 1.0f) {
  Matrix m(rows, cols);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  for (float& v : m.data) v = d(rng);
  return m;
}

// Tokens with a strong covariance structure: X = Z M, M with a decaying
// spectrum and random rotation, so inputs are highly correlated.
inline Matrix CorrelatedInputs(int64_t tokens, int64_t k, uint64_t seed) {
  const Matrix z = RandomNormal(tokens, k, seed);
  const Matrix g = RandomNormal(k, k, seed + 1);
  Eigen::HouseholderQR<Eigen::MatrixXf> qr(AsEigen(g.view()));
  const Eigen::MatrixXf q = qr.householderQ();
  Eigen::VectorXf spec(k);
  for (int64_t i = 0; i < k; ++i) spec(i) = std::pow(0.95f, static_cast<float>(i)) * 3.0f + 0.05f;
  RowMatrixXf x = AsEigen(z.view()) * spec.asDiagonal() * q.transpose();
  return FromEigen(x);
}

// ||(W - Weff) X^T||_F^2 / T.
inline double OutputError(MatrixView w, MatrixView weff, MatrixView x) {
  const RowMatrixXf d = AsEigen(w) - AsEigen(weff);
  return static_cast<double>((d * AsEigen(x).transpose()).squaredNorm()) / static_cast<double>(x.rows);
}

}  // namespace spear::quantize::testing
