// Latency prediction for admission: from a worker's Stats (queue, running
// tokens, per-iteration latency table with and without ECs) predict the TTFT
// and ITL a new request would see there at a given EC density. Pure
// functions; no I/O, no clocks.
#pragma once

#include <cstdint>

#include "spear/v1/worker.pb.h"

namespace spear::router {

// Work the router has sent to a worker since that worker's last Stats
// (the Stats cannot count it yet).
struct PendingLoad {
  int32_t requests = 0;
  int64_t prompt_tokens = 0;
};

struct Prediction {
  double ttft_seconds = 0;
  double itl_seconds = 0;
};

// Seconds of one iteration over `tokens` batched tokens at EC density
// `density` (0..1): piecewise-linear interpolation of the table, linear
// extrapolation beyond its last point, blended linearly between the
// no-EC and full-EC columns. `fallback_seconds` (> 0) is used when the table
// is empty or malformed.
double IterationSeconds(const spear::v1::LatencyTable& table, int64_t tokens, double density,
                        double fallback_seconds);

// Predicted TTFT and ITL of a new request with `prompt_tokens` prompt tokens.
// Model: decode tokens = running + pending requests (one token each per
// iteration); the prefill backlog (queued + pending + this prompt) drains
// at max_batch_tokens - decode tokens per iteration; TTFT = number of
// backlog iterations × the time of a full iteration (+ one decode step when
// nothing is queued); ITL = one iteration with the decode batch plus this
// request.
Prediction Predict(const spear::v1::StatsResponse& stats, const PendingLoad& pending,
                   int64_t prompt_tokens, double density);

// The largest density d in [0, max_density] (to 1/64) whose prediction meets
// both targets (a target <= 0 is no target); -1 if even d = 0 misses.
double LargestDensityMeeting(const spear::v1::StatsResponse& stats, const PendingLoad& pending,
                             int64_t prompt_tokens, double ttft_target, double itl_target,
                             double max_density = 1.0);

bool Meets(const Prediction& p, double ttft_target, double itl_target);

}  // namespace spear::router
