// CUDA backend ops (built when SPEAR_WITH_CUDA; sm_90a by default).
// Same semantics as the CPU ops of ops.h; pointers are device pointers and
// the op is enqueued on `stream` (nothing synchronises). The GPU issue adds
// the W4(+EC) GEMMs, attention and the rest of the layer.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/op_params.h"

typedef struct CUstream_st* cudaStream_t;

namespace spear::kernels::cuda {

// Number of usable CUDA devices; an error status (never a crash) when the
// driver or runtime is missing, so callers can skip or fall back.
absl::StatusOr<int> DeviceCount();

// RMSNorm (with the optional fused residual add) of RmsNormParams, device
// pointers. One thread block per row.
absl::Status RmsNorm(const RmsNormParams& p, cudaStream_t stream);

}  // namespace spear::kernels::cuda
