// Parameter checks shared by every backend (ref, cpu, later cuda), so that
// all of them reject exactly the same inputs. Private to spear_kernels.
#pragma once

#include "absl/status/status.h"
#include "kernels/ops.h"

namespace spear::kernels::internal {

absl::Status ValidateLinear(const LinearParams& p);
absl::Status ValidateRmsNorm(const RmsNormParams& p);
absl::Status ValidateRope(const RopeParams& p);
absl::Status ValidateAttention(const AttentionParams& p);
absl::Status ValidateSiluMul(const SiluMulParams& p);

}  // namespace spear::kernels::internal
