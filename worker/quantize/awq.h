// AWQ-style activation-aware scaling (Lin et al., 2024) for one linear.
//
// Scaling search. Per input channel statistic m_j = mean_t |x_tj| (the whole
// calibration set, or the sample). For alpha in {0, 1/grid, ..., 1}:
//   s_j = max(m_j, 1e-4)^alpha, normalised so that sqrt(max s * min s) = 1
//   (AutoAWQ); W_eff(alpha) = Q(W diag(s)) diag(s)^-1;
//   err(alpha) = ||(W_eff - W) X^T||_F^2 / m over the sampled rows X [m, k].
// The alpha with the smallest error wins (alpha = 0 is plain RTN, so AWQ never
// does worse than RTN on the sample).
// Clip search (optional, after scaling): per (row, group) the quantization
// range of W diag(s) is shrunk by rho in {1, 1 - 0.5/clip_grid, ..., 0.5}
// (asymmetric: lo and hi both scaled by rho; symmetric: max|w|), keeping for
// each (row, group) the rho with the smallest output error
// ||d_g X_g^T||^2, d = effective-weight error of that group.
// Output: codes/scales of Q(W diag(s)) with act_scale = s; the layer computes
// y = Q (x / s) (see w4_quant.h; the caller may instead fold 1/s into the
// previous RMSNorm weight and clear act_scale).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/quantize/matrix.h"
#include "worker/quantize/w4_quant.h"

namespace spear::quantize {

struct AwqOptions {
  int grid = 20;             // alpha steps: 21 values 0, 0.05, ..., 1
  int64_t max_rows = 512;    // calibration rows used by the searches (even stride)
  bool clip_search = true;
  int clip_grid = 10;        // rho in {1, 0.95, ..., 0.5}
};

struct AwqReport {
  double best_alpha = 0.0;
  double rtn_error = 0.0;      // err(alpha = 0), per sampled row
  double scaled_error = 0.0;   // err(best alpha) before the clip search
  double final_error = 0.0;    // after the clip search
  std::vector<double> alpha_errors;  // err per alpha step
};

// W [n, k]; x [T, k] calibration inputs of this linear (T >= 1). mean_abs, if
// non-empty, is [k] mean |x| over the full calibration set (e.g.
// HessianAccumulator::MeanAbs()); otherwise it is computed from x.
absl::StatusOr<W4Weight> QuantizeAwq(MatrixView w, MatrixView x, const W4Format& fmt,
                                     const AwqOptions& opt = {}, AwqReport* report = nullptr,
                                     const std::vector<double>& mean_abs = {});

}  // namespace spear::quantize
