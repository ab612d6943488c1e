// Small matrix vocabulary of the quantization library: a borrowed row-major
// float view (what callers hand in: weights [n, k], activations [T, k]) and
// an owning row-major float matrix (what the library hands back), plus the
// Eigen maps the implementation uses. Everything is row-major, PyTorch
// layout: a weight W [n, k] has n outputs (rows) and k inputs (columns);
// activations X [T, k] have one token per row.
#pragma once

#include <Eigen/Dense>
#include <cstdint>
#include <vector>

namespace spear::quantize {

using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Borrowed, row-major, contiguous. The caller keeps `data` alive.
struct MatrixView {
  const float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  int64_t size() const { return rows * cols; }
  const float* row(int64_t i) const { return data + i * cols; }
};

// Owning, row-major, contiguous.
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> data;

  Matrix() = default;
  Matrix(int64_t r, int64_t c) : rows(r), cols(c), data(static_cast<size_t>(r * c), 0.0f) {}

  float& at(int64_t i, int64_t j) { return data[static_cast<size_t>(i * cols + j)]; }
  float at(int64_t i, int64_t j) const { return data[static_cast<size_t>(i * cols + j)]; }
  MatrixView view() const { return {data.data(), rows, cols}; }
};

inline Eigen::Map<const RowMatrixXf> AsEigen(MatrixView v) {
  return Eigen::Map<const RowMatrixXf>(v.data, v.rows, v.cols);
}
inline Eigen::Map<RowMatrixXf> AsEigen(Matrix& m) {
  return Eigen::Map<RowMatrixXf>(m.data.data(), m.rows, m.cols);
}
inline Matrix FromEigen(const RowMatrixXf& e) {
  Matrix m(e.rows(), e.cols());
  Eigen::Map<RowMatrixXf>(m.data.data(), m.rows, m.cols) = e;
  return m;
}

}  // namespace spear::quantize
