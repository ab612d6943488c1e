// GPTQ (Frantar et al., 2023): quantize W [n, k] column by column, each time
// spreading the rounding error of a column over the not-yet-quantized
// columns so that the layer output error ||(W - Q) X^T||^2 is small for the
// calibration inputs X.
//
// Math. H = 2 X^T X / T [k, k] (HessianAccumulator). Dead columns (H_jj = 0,
// input channel always zero) get H_jj = 1; their weights are KEPT and
// quantized plainly (the reference zeroes them; keeping them is harmless for
// calibration data and better for inputs that do use the channel).
// Dampening: H += percdamp * mean(diag H) * I; if the Cholesky still fails the
// dampening is multiplied by 10 (up to 6 times) and the final value reported.
// U = upper Cholesky factor of H^-1 (H^-1 = U^T U). For column c (in
// processing order): q = Q(w_c), err = (w_c - q) / U_cc, and every later
// column c' gets w_c' -= err * U_cc'. Updates are applied lazily: inside a
// block of `block_size` columns immediately, to the columns after the block
// once per block as one GEMM (Err [n, B] x U[block, rest]).
//
// act_order: columns are processed in order of decreasing H_jj (the most
// "important" inputs first, while there is still freedom to compensate).
// Groups with act_order. The W4 format needs the groups of the ORIGINAL
// column order, so the scale/zero of a group cannot come from the permuted
// order. Two choices:
//   static_groups = true  : the reference's "static_groups": every group's
//       scale/zero from the original, un-updated W, before any column moves.
//   static_groups = false (default): a group's scale/zero are fixed when the
//       FIRST of its columns is reached in processing order, from the current
//       (error-updated, including pending lazy updates) values of all its
//       columns -- none of which is quantized yet at that moment. Without
//       act_order this is the reference's behaviour (groups fixed at their
//       first column), computed with exact current values.
// Both produce a plain W4Weight (no permutation is stored).
#pragma once

#include <Eigen/Dense>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/quantize/matrix.h"
#include "worker/quantize/w4_quant.h"

namespace spear::quantize {

// Accumulates input statistics of one linear over calibration batches:
// sum x x^T (float64, both triangles), sum |x| and the token count.
// Not thread-safe; one accumulator per module.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t k);

  // x [m, k], one token per row. InvalidArgument on a column mismatch or a
  // non-finite value (then nothing is added).
  absl::Status Add(MatrixView x);

  int64_t k() const { return k_; }
  int64_t count() const { return count_; }
  // S = E[x x^T] = sum x x^T / count [k, k] (the low-rank fit's S).
  Eigen::MatrixXd SecondMoment() const;
  // H = 2 S, GPTQ's Hessian of ||W X^T||^2 / T.
  Eigen::MatrixXd Hessian() const;
  // mean |x_j| over tokens [k] (AWQ's activation statistic).
  std::vector<double> MeanAbs() const;

 private:
  int64_t k_;
  int64_t count_ = 0;
  Eigen::MatrixXd sum_;
  Eigen::VectorXd abs_sum_;
};

struct GptqOptions {
  double percdamp = 0.01;
  int64_t block_size = 128;
  bool act_order = false;
  bool static_groups = false;
};

struct GptqReport {
  double damp = 0.0;           // absolute dampening added to diag H
  int64_t dead_columns = 0;
  double proxy_loss = 0.0;     // sum over elements of err^2 / U_cc^2 / 2 (reference "Losses")
};

// W [n, k], hessian [k, k] symmetric PSD. InvalidArgument on bad shapes or
// format; FailedPrecondition if H cannot be made positive definite.
absl::StatusOr<W4Weight> QuantizeGptq(MatrixView w, const Eigen::MatrixXd& hessian,
                                      const W4Format& fmt, const GptqOptions& opt = {},
                                      GptqReport* report = nullptr);

}  // namespace spear::quantize
