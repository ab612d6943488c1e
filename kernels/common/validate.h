// Parameter checks shared by every backend (ref, cpu, later cuda), so that
// all of them reject exactly the same inputs. Private to spear_kernels.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/ops.h"

namespace spear::kernels::internal {

// Every size and stride is bounded so that products such as m * ldx cannot
// overflow int64 in any backend's index arithmetic.
inline constexpr int64_t kMaxDim = int64_t{1} << 31;

inline bool InRange(int64_t v, int64_t lo) { return v >= lo && v < kMaxDim; }

absl::Status ValidateLinear(const LinearParams& p);
absl::Status ValidateRmsNorm(const RmsNormParams& p);
absl::Status ValidateRope(const RopeParams& p);
absl::Status ValidateAttention(const AttentionParams& p);
absl::Status ValidateSiluMul(const SiluMulParams& p);
absl::Status ValidateLogSumExp(const LogSumExpParams& p);
absl::Status ValidateKlDivergence(const KlDivergenceParams& p);

}  // namespace spear::kernels::internal
