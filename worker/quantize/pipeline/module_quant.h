// One module of the sequential pipeline: quantize its weight into W4 and,
// when it is placed, fit its EC (stage 1 closed form, optional stage 2
// training against the sequential target). Also the small helpers the
// pipeline shares (weights as float matrices, input statistics).
//
// The sequential target. Module W [n, k] sees x_fp on the FP16 model's
// stream and x_q on the current (quantized + compensated below) stream for
// the same token. The compensated module should reproduce what the FP16
// model computes there, so stage 2 fits EC(x_q) to
//     r = W x_fp - Qeff(W) x_q                          (SequentialTarget)
// which is the weight error Qeff's plus the upstream drift W (x_fp - x_q):
// the EC also learns to undo what the layers below got wrong. (Stage 1 fits
// only the weight error E = W - Qeff, weighted by E[x_q x_q^T].)
// Thread-safety: pure functions; QuantizeModule may run concurrently on
// different modules.
#pragma once

#include <Eigen/Dense>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/w4_format.h"
#include "worker/model/linear.h"
#include "worker/quantize/matrix.h"
#include "worker/quantize/pipeline/quantize_model.h"

namespace spear::quantize {

// Gate hidden size when QuantizeOptions::gate_hidden == 0: a FIXED 16
// (not proportional to the rank), so an EC's bytes are affine in its rank,
// exactly the cost model PlanEcPlacement assumes; 16 hidden units cost
// 2*16*r + 16 + r parameters, small next to r*(n + k).
inline constexpr int64_t kDefaultGateHidden = 16;
int64_t GateHidden(const QuantizeOptions& o);

// W4 format of an [n, k] module under the options (group_size -1 -> k).
kernels::W4Format MakeW4Format(int64_t n, int64_t k, const QuantizeOptions& o);

// Float32 copy of a DenseLinear's weight [out, in] and bias (empty if none).
// InvalidArgument if `lin` is not a DenseLinear (e.g. already quantized).
absl::StatusOr<Matrix> DenseWeightMatrix(const model::Linear& lin);
std::vector<float> DenseBias(const model::Linear& lin);

// E[x x^T] [k, k] over the rows of x (float64 accumulation of float
// blocks); mean |x_j| [k].
Eigen::MatrixXd SecondMoment(MatrixView x);
std::vector<double> MeanAbs(MatrixView x);

// r = x_fp W^T - x_q Qeff^T [T, n] (see the header comment); Qeff is q with
// act_scale folded. InvalidArgument on shape mismatches.
absl::StatusOr<Matrix> SequentialTarget(MatrixView w, const kernels::W4Weight& q,
                                        MatrixView x_fp, MatrixView x_q);
// Mean over rows of the squared row norm.
double MeanSquaredNorm(MatrixView r);

struct ModuleData {
  MatrixView w;          // FP16 weight [n, k]
  MatrixView x_q_fit;    // current-stream inputs, fit tokens [T_fit, k]
  MatrixView x_fp_fit;   // FP16-stream inputs, same tokens (may be empty if !train)
  MatrixView x_q_eval;   // held-out tokens (may be empty: no errors reported)
  MatrixView x_fp_eval;
  const Eigen::MatrixXd* second_moment = nullptr;  // of x_q_fit; needed by GPTQ and ECs
  const std::vector<double>* mean_abs = nullptr;   // of x_q_fit; AWQ
};

struct ModulePlan {
  int64_t index = 0;     // module index (seed)
  int64_t ec_rank = 0;   // 0: no EC
  bool gated = false;    // EC with a gate
  bool train = false;    // stage 2
};

struct ModuleResult {
  kernels::W4Weight q;
  std::optional<kernels::EcWeights> ec;
  double err_w4 = 0, err_static = 0, err_final = 0;  // on the eval tokens
};

absl::StatusOr<ModuleResult> QuantizeModule(const ModuleData& data, const ModulePlan& plan,
                                            const QuantizeOptions& options);

// Backbone only (RTN needs no data; AWQ/GPTQ read data.x_q_fit and stats).
absl::StatusOr<kernels::W4Weight> QuantizeBackbone(const ModuleData& data,
                                                   const QuantizeOptions& options);

}  // namespace spear::quantize
