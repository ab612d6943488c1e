#include "router/admission/predictor.h"

#include <algorithm>
#include <cmath>

namespace spear::router {
namespace {

// Default iteration time when a worker reports no table yet: generous, so
// an unprofiled worker is not flooded.
constexpr double kFallbackIterationSeconds = 0.05;
constexpr int32_t kDefaultMaxBatchTokens = 512;

double Interp(const google::protobuf::RepeatedField<int32_t>& xs,
              const google::protobuf::RepeatedField<double>& ys, double x) {
  const int n = xs.size();
  if (n == 1) return ys[0] * std::max(1.0, x / std::max(1, xs[0]));
  int i = 1;
  while (i < n - 1 && xs[i] < x) ++i;
  const double x0 = xs[i - 1], x1 = xs[i], y0 = ys[i - 1], y1 = ys[i];
  if (x1 <= x0) return y1;
  const double y = y0 + (y1 - y0) * (x - x0) / (x1 - x0);
  return std::max(y, std::min(y0, y1) * 0.5);  // no negative extrapolation below the table
}

}  // namespace

double IterationSeconds(const spear::v1::LatencyTable& t, int64_t tokens, double density,
                        double fallback_seconds) {
  const int n = t.tokens_size();
  const bool ok = n > 0 && t.seconds_no_ec_size() == n && t.seconds_full_ec_size() == n &&
                  std::is_sorted(t.tokens().begin(), t.tokens().end());
  const double x = static_cast<double>(std::max<int64_t>(1, tokens));
  if (!ok) return fallback_seconds * std::max(1.0, x / kDefaultMaxBatchTokens * 4);
  const double no_ec = Interp(t.tokens(), t.seconds_no_ec(), x);
  const double full = Interp(t.tokens(), t.seconds_full_ec(), x);
  const double d = std::clamp(density, 0.0, 1.0);
  return no_ec + d * (full - no_ec);
}

Prediction Predict(const spear::v1::StatsResponse& s, const PendingLoad& pending,
                   int64_t prompt_tokens, double density, double itl_target) {
  const double fallback =
      s.recent_itl_seconds() > 0 ? s.recent_itl_seconds() : kFallbackIterationSeconds;
  const auto& table = s.latency();
  auto t = [&](int64_t tokens) { return IterationSeconds(table, tokens, density, fallback); };
  const int64_t budget = s.max_batch_tokens() > 0 ? s.max_batch_tokens() : kDefaultMaxBatchTokens;
  const int64_t decode = static_cast<int64_t>(s.running()) + pending.requests;
  // Slowdown of the machine against the table, from a clean signal: the
  // recent ITL against a decode step of the running batch.
  double k = 1;
  if (s.running() > 0 && s.recent_itl_seconds() > 0) {
    k = std::clamp(s.recent_itl_seconds() / IterationSeconds(table, s.running() + 1, s.ec_density(), fallback),
                   1.0, 4.0);
  }
  int64_t chunk = std::max<int64_t>(1, budget - decode);
  if (itl_target > 0 && k * t(decode + chunk) > itl_target) {
    int64_t lo = 1, hi = chunk;  // largest chunk whose iteration meets the target
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (k * t(decode + mid) <= itl_target) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    chunk = lo;
  }
  const int64_t backlog =
      std::max<int64_t>(0, s.queued_prompt_tokens()) + pending.prompt_tokens + prompt_tokens;
  const int64_t iters = (backlog + chunk - 1) / chunk;
  const double iter = k * t(decode + std::min(chunk, std::max<int64_t>(1, backlog)));
  Prediction p;
  p.ttft_seconds = static_cast<double>(iters) * iter;
  const bool more_prefill = s.queued_prompt_tokens() + pending.prompt_tokens > 0 || s.waiting() > 0;
  p.itl_seconds = more_prefill ? iter : k * t(decode + 1);
  return p;
}

bool Meets(const Prediction& p, double ttft_target, double itl_target) {
  return (ttft_target <= 0 || p.ttft_seconds <= ttft_target) &&
         (itl_target <= 0 || p.itl_seconds <= itl_target);
}

double LargestDensityMeeting(const spear::v1::StatsResponse& s, const PendingLoad& pending,
                             int64_t prompt_tokens, double ttft_target, double itl_target,
                             double max_density) {
  const double hi_d = std::clamp(max_density, 0.0, 1.0);
  if (Meets(Predict(s, pending, prompt_tokens, hi_d, itl_target), ttft_target, itl_target)) return hi_d;
  if (!Meets(Predict(s, pending, prompt_tokens, 0.0, itl_target), ttft_target, itl_target)) return -1;
  double lo = 0, hi = hi_d;  // lo meets, hi misses (latency is monotone in density)
  while (hi - lo > 1.0 / 64) {
    const double mid = 0.5 * (lo + hi);
    if (Meets(Predict(s, pending, prompt_tokens, mid, itl_target), ttft_target, itl_target)) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace spear::router
