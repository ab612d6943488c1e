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

// Predicted TTFT and ITL of a new request with `prompt_tokens` prompt tokens
// and ITL target `itl_target` (0 = none). Model of the worker's scheduler:
// decode tokens = running + pending requests (one token each per
// iteration); prefill is chunked, c tokens per iteration, the largest c
// within the batch budget whose iteration meets the ITL target; the
// backlog (queued prompt tokens + pending + this prompt) drains FIFO, so
// TTFT = ceil(backlog / c) iterations. ITL = one iteration with a prefill
// chunk while a backlog exists, else one decode step. Every time is scaled
// by the worker's measured slowdown against its table (recent ITL / table
// time of a decode step at the current batch, in [1, 4]): a table profiled
// on an idle machine underestimates a busy one.
Prediction Predict(const spear::v1::StatsResponse& stats, const PendingLoad& pending,
                   int64_t prompt_tokens, double density, double itl_target = 0);

// The largest density d in [0, max_density] (to 1/64) whose prediction meets
// both targets (a target <= 0 is no target); -1 if even d = 0 misses.
double LargestDensityMeeting(const spear::v1::StatsResponse& stats, const PendingLoad& pending,
                             int64_t prompt_tokens, double ttft_target, double itl_target,
                             double max_density = 1.0);

bool Meets(const Prediction& p, double ttft_target, double itl_target);

}  // namespace spear::router
