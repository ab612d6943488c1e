#include "worker/quantize/pipeline/fast_stats.h"

#include <vector>

#include "kernels/ops.h"

namespace spear::quantize {

absl::StatusOr<Eigen::MatrixXd> SecondMomentGemm(MatrixView x, kernels::ThreadPool* pool) {
  const int64_t k = x.cols, T = x.rows;
  Eigen::MatrixXd out = Eigen::MatrixXd::Zero(k, k);
  if (T == 0 || k == 0) return out;
  // xt [k, T]; y = xt xt^T = X^T X [k, k] (cpu::Linear computes y = x w^T).
  std::vector<float> xt(static_cast<size_t>(k * T));
  for (int64_t t = 0; t < T; ++t) {
    const float* r = x.row(t);
    for (int64_t j = 0; j < k; ++j) xt[j * T + t] = r[j];
  }
  std::vector<float> y(static_cast<size_t>(k * k));
  kernels::LinearParams p;
  p.x = xt.data();
  p.m = k;
  p.k = T;
  p.ldx = T;
  p.w = xt.data();
  p.w_dtype = kernels::DType::kF32;
  p.n = k;
  p.y = y.data();
  p.ldy = k;
  if (auto s = kernels::cpu::Linear(p, pool); !s.ok()) return s;
  const double inv = 1.0 / static_cast<double>(T);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const double v = 0.5 * (static_cast<double>(y[i * k + j]) + y[j * k + i]) * inv;
      out(i, j) = out(j, i) = v;
    }
  }
  return out;
}

}  // namespace spear::quantize
