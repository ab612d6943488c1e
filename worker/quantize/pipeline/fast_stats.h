// Calibration statistics on the engine's packed GEMM (kernels::cpu::Linear:
// run-time AVX2/AVX-512, thread pool) instead of Eigen's portable (SSE2)
// product: E[x x^T] of a module's inputs is the largest product of the
// closed-form pass (T x k^2; k = 1536 for down_proj).
// Thread-safety: uses the pool (one caller at a time).
#pragma once

#include <Eigen/Dense>

#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "worker/quantize/matrix.h"

namespace spear::quantize {

// E[x x^T] [k, k] over the rows of x [T, k] (float products accumulated
// over all T in float by the GEMM, then float64; symmetric). Same value as
// module_quant.h's SecondMoment up to float rounding.
absl::StatusOr<Eigen::MatrixXd> SecondMomentGemm(MatrixView x, kernels::ThreadPool* pool);

}  // namespace spear::quantize
