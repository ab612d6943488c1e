// Validation of internal Worker API requests and their translation into
// engine terms. Every rejection is INVALID_ARGUMENT with a message naming
// the field and the allowed range; nothing here allocates KV or touches the
// engine, so RPC threads call it directly.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "spear/v1/worker.pb.h"
#include "worker/engine/engine_loop.h"

namespace spear::server {

struct ModelLimits {
  int64_t vocab_size = 0;
  int64_t max_context = 0;      // prompt + generated positions (0 = unbounded)
  int64_t kv_capacity_tokens = 0;  // positions the whole KV cache holds
  int64_t default_max_tokens = 256;
  double default_itl_slo = 0;   // seconds (scheduler default when the request has none)
};

inline constexpr int kMaxRequestIdBytes = 128;
inline constexpr int kMaxStopStrings = 16;
inline constexpr int kMaxStopBytes = 256;

// InvalidArgument for a malformed request; otherwise the engine spec
// (deadline not set: the caller adds the RPC's deadline).
absl::StatusOr<engine::ExecuteSpec> ValidateExecute(const v1::ExecuteRequest& req,
                                                    const ModelLimits& limits);

}  // namespace spear::server
