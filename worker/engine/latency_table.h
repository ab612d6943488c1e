// The scheduler's latency model: predicted seconds of one engine iteration
// as a function of the tokens it batches, with no EC and with every EC.
//
//   Predict(T, d) = no_ec(T) + d * (full_ec(T) - no_ec(T))
//
// where d in [0, 1] is the EC density (the fraction of the model's EC FLOPs
// applied, see EcControl) and no_ec / full_ec are piecewise linear over
// the profiled token counts (flat below the first point, extrapolated
// linearly past the last). The table is whole-model; the per-module EC
// cost is its share of the EC FLOPs (EcControl::share), which is how a
// partial EC mask maps to a density.
//
// Built at start-up by ProfileLatency (timed real forward passes) and
// refreshed online by two EWMAs of measured / predicted: a machine-wide
// speed factor that multiplies every prediction (other processes, clock
// changes: it moves the whole table at once), and the two grid points
// around the measured iteration (the shape), kept non-decreasing in T and
// full_ec >= no_ec. Snapshot returns the effective table (factor applied).
//
// Thread-safety: internally synchronized; Predict is called by the engine
// loop, Snapshot by RPC threads (Stats).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace spear::engine {

class Engine;
class BlockManager;
class EcControl;

struct LatencyPoints {
  std::vector<int32_t> tokens;        // strictly increasing, >= 1
  std::vector<double> seconds_no_ec;  // same length
  std::vector<double> seconds_full_ec;
};

class LatencyTable {
 public:
  // InvalidArgument unless the points are well formed (non-empty, same
  // lengths, tokens strictly increasing and >= 1, seconds finite >= 0).
  static absl::StatusOr<LatencyTable> Create(LatencyPoints points, double ewma_alpha = 0.2);

  LatencyTable(const LatencyTable& other);
  LatencyTable& operator=(const LatencyTable& other);

  double Predict(int64_t tokens, double ec_density) const ABSL_LOCKS_EXCLUDED(mu_);
  // Folds one measured iteration into the table; returns measured/predicted
  // (before the update), or 0 when nothing was predicted.
  double Observe(int64_t tokens, double ec_density, double seconds) ABSL_LOCKS_EXCLUDED(mu_);
  LatencyPoints Snapshot() const ABSL_LOCKS_EXCLUDED(mu_);
  double factor() const ABSL_LOCKS_EXCLUDED(mu_);
  // The q-quantile of measured / predicted over the last kRatioWindow
  // observations: how far above its prediction an iteration lands, which
  // the scheduler's budget must absorb. The first kWarmup observations are
  // left out (they measure how far serving conditions are from the
  // start-up profile, which the speed factor absorbs in a few iterations);
  // until kMinRatios are in the window it returns kColdRatio (plan
  // conservatively while the table settles).
  double RatioQuantile(double q) const ABSL_LOCKS_EXCLUDED(mu_);
  // The same over the iterations of `tokens`' size class (floor(log2 T)):
  // errors depend on the size (decode-only iterations are far more
  // predictable than large prefill chunks). A class with fewer than
  // kMinRatios observations gets max(kColdRatio, the overall quantile).
  double RatioQuantile(double q, int64_t tokens) const ABSL_LOCKS_EXCLUDED(mu_);
  static int SizeClass(int64_t tokens);
  static constexpr int kRatioWindow = 256;
  static constexpr int kWarmup = 16;
  static constexpr int kMinRatios = 8;
  static constexpr double kColdRatio = 1.5;

 private:
  static constexpr double kFactorAlpha = 0.1;
  LatencyTable(LatencyPoints p, double alpha) : p_(std::move(p)), alpha_(alpha) {}
  double PredictLocked(int64_t tokens, double d) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  LatencyPoints p_ ABSL_GUARDED_BY(mu_);
  double factor_ ABSL_GUARDED_BY(mu_) = 1.0;
  std::vector<double> ratios_ ABSL_GUARDED_BY(mu_);  // ring buffer
  std::vector<int> classes_ ABSL_GUARDED_BY(mu_);    // SizeClass of ratios_[i]
  size_t next_ratio_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t observations_ ABSL_GUARDED_BY(mu_) = 0;
  double alpha_;
};

struct ProfileOptions {
  // Token counts to time (clipped to max_tokens; 1 and max_tokens always).
  // 8 and 12 bracket the CPU W4 kernels' switch from the fused GEMV
  // (m <= 8) to dequantized tiles + GEMM, a step the table must not smooth over.
  std::vector<int32_t> tokens = {1, 2, 4, 8, 12, 16, 32, 64, 128, 256, 512, 1024, 2048};
  int64_t max_tokens = 512;
  int repeats = 2;  // the median of `repeats` timed runs per point (one warm-up pass in all;
                    // on CUDA also one untimed run per point and EC mode: graph capture)
};

// Times real forward passes of `engine` on whatever backend it runs (one
// sequence per point, T tokens of prefill, KV blocks from `blocks`,
// released afterwards) with every EC on and with every EC off (once when
// the model has no EC). Restores all ECs on. Needs enough free KV for
// max_tokens positions. A CUDA Forward returns after its result copy and
// host sync, so wall-clock time covers the device work.
absl::StatusOr<LatencyTable> ProfileLatency(Engine* engine, BlockManager* blocks, EcControl* ec,
                                            const ProfileOptions& options);

}  // namespace spear::engine
