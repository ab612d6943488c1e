#include "worker/engine/latency_table.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/ec_control.h"
#include "worker/engine/engine.h"

namespace spear::engine {
namespace {

// Index i such that tokens[i] <= t < tokens[i + 1] (clamped to the ends)
// and the weight of point i + 1.
void Bracket(const std::vector<int32_t>& tokens, int64_t t, size_t* i, double* w) {
  const size_t n = tokens.size();
  if (n == 1 || t <= tokens[0]) {
    *i = 0;
    *w = 0;
    return;
  }
  size_t j = 0;
  while (j + 2 < n && t >= tokens[j + 1]) ++j;
  *i = j;
  *w = static_cast<double>(t - tokens[j]) / (tokens[j + 1] - tokens[j]);  // > 1 past the end
}

double Interp(const std::vector<double>& v, size_t i, double w) {
  if (v.size() == 1) return v[0];
  return v[i] + w * (v[i + 1] - v[i]);
}

}  // namespace

absl::StatusOr<LatencyTable> LatencyTable::Create(LatencyPoints p, double alpha) {
  const size_t n = p.tokens.size();
  if (n == 0 || p.seconds_no_ec.size() != n || p.seconds_full_ec.size() != n) {
    return absl::InvalidArgumentError("LatencyTable: empty or mismatched columns");
  }
  for (size_t i = 0; i < n; ++i) {
    if (p.tokens[i] < 1 || (i > 0 && p.tokens[i] <= p.tokens[i - 1])) {
      return absl::InvalidArgumentError("LatencyTable: tokens must be >= 1 and increasing");
    }
    for (double s : {p.seconds_no_ec[i], p.seconds_full_ec[i]}) {
      if (!std::isfinite(s) || s < 0) {
        return absl::InvalidArgumentError("LatencyTable: seconds must be finite and >= 0");
      }
    }
  }
  if (!(alpha > 0 && alpha <= 1)) return absl::InvalidArgumentError("LatencyTable: alpha");
  return LatencyTable(std::move(p), alpha);
}

LatencyTable::LatencyTable(const LatencyTable& other) : alpha_(other.alpha_) {
  absl::ReaderMutexLock lock(&other.mu_);
  p_ = other.p_;
  factor_ = other.factor_;
  ratios_ = other.ratios_;
  classes_ = other.classes_;
  next_ratio_ = other.next_ratio_;
  observations_ = other.observations_;
}

LatencyTable& LatencyTable::operator=(const LatencyTable& other) {
  if (this == &other) return *this;
  LatencyPoints copy;
  double factor;
  {
    absl::ReaderMutexLock lock(&other.mu_);
    copy = other.p_;
    factor = other.factor_;
  }
  absl::MutexLock lock(&mu_);
  p_ = std::move(copy);
  factor_ = factor;
  alpha_ = other.alpha_;
  return *this;
}

double LatencyTable::PredictLocked(int64_t t, double d) const {
  size_t i;
  double w;
  Bracket(p_.tokens, std::max<int64_t>(t, 1), &i, &w);
  const double a = Interp(p_.seconds_no_ec, i, w);
  const double b = Interp(p_.seconds_full_ec, i, w);
  return factor_ * std::max(0.0, a + std::clamp(d, 0.0, 1.0) * (b - a));
}

double LatencyTable::Predict(int64_t tokens, double ec_density) const {
  absl::ReaderMutexLock lock(&mu_);
  return PredictLocked(tokens, ec_density);
}

double LatencyTable::Observe(int64_t t, double d, double seconds) {
  if (t <= 0 || !std::isfinite(seconds) || seconds <= 0) return 0;
  absl::MutexLock lock(&mu_);
  const double pred = PredictLocked(t, d);
  if (pred <= 0) return 0;
  const double ratio = seconds / pred;
  if (++observations_ <= kWarmup) {
    // Not in the error window (see RatioQuantile).
  } else if (static_cast<int>(ratios_.size()) < kRatioWindow) {
    ratios_.push_back(ratio);
    classes_.push_back(SizeClass(t));
  } else {
    ratios_[next_ratio_] = ratio;
    classes_[next_ratio_] = SizeClass(t);
    next_ratio_ = (next_ratio_ + 1) % kRatioWindow;
  }
  // Machine-wide speed first (other processes, frequency), then the shape.
  factor_ = std::clamp(factor_ * (1.0 + kFactorAlpha * (ratio - 1.0)), 0.25, 4.0);
  size_t i;
  double w;
  Bracket(p_.tokens, t, &i, &w);
  const size_t n = p_.tokens.size();
  // Scale the bracketing points towards the measurement, each by its share
  // of the interpolation (a measurement past the last point moves the last).
  auto move = [&](size_t k, double weight) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (k >= n || weight <= 0) return;
    const double f = 1.0 + alpha_ * std::min(1.0, weight) * (ratio - 1.0);
    p_.seconds_no_ec[k] *= f;
    p_.seconds_full_ec[k] *= f;
  };
  if (n == 1) {
    move(0, 1.0);
  } else {
    move(i, 1.0 - std::min(w, 1.0));
    move(i + 1, std::min(w, 1.0) + std::max(0.0, w - 1.0));
  }
  // Keep the table monotone in T and full >= no EC.
  for (size_t k = 1; k < n; ++k) {
    p_.seconds_no_ec[k] = std::max(p_.seconds_no_ec[k], p_.seconds_no_ec[k - 1]);
    p_.seconds_full_ec[k] = std::max(p_.seconds_full_ec[k], p_.seconds_full_ec[k - 1]);
  }
  for (size_t k = 0; k < n; ++k) {
    p_.seconds_full_ec[k] = std::max(p_.seconds_full_ec[k], p_.seconds_no_ec[k]);
  }
  return ratio;
}

LatencyPoints LatencyTable::Snapshot() const {
  absl::ReaderMutexLock lock(&mu_);
  LatencyPoints p = p_;
  for (double& x : p.seconds_no_ec) x *= factor_;
  for (double& x : p.seconds_full_ec) x *= factor_;
  return p;
}

double LatencyTable::RatioQuantile(double q) const {
  std::vector<double> r;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (static_cast<int>(ratios_.size()) < kMinRatios) return kColdRatio;
    r = ratios_;
  }
  const size_t k = std::min(r.size() - 1, static_cast<size_t>(std::clamp(q, 0.0, 1.0) * r.size()));
  std::nth_element(r.begin(), r.begin() + k, r.end());
  return r[k];
}

int LatencyTable::SizeClass(int64_t tokens) {
  int c = 0;
  while (tokens > 1) {
    tokens >>= 1;
    ++c;
  }
  return c;
}

double LatencyTable::RatioQuantile(double q, int64_t tokens) const {
  const int c = SizeClass(tokens);
  std::vector<double> r;
  {
    absl::ReaderMutexLock lock(&mu_);
    for (size_t i = 0; i < ratios_.size(); ++i) {
      if (classes_[i] == c) r.push_back(ratios_[i]);
    }
  }
  if (static_cast<int>(r.size()) < kMinRatios) return std::max(kColdRatio, RatioQuantile(q));
  const size_t k = std::min(r.size() - 1, static_cast<size_t>(std::clamp(q, 0.0, 1.0) * r.size()));
  std::nth_element(r.begin(), r.begin() + k, r.end());
  return r[k];
}

double LatencyTable::factor() const {
  absl::ReaderMutexLock lock(&mu_);
  return factor_;
}

absl::StatusOr<LatencyTable> ProfileLatency(Engine* engine, BlockManager* blocks, EcControl* ec,
                                            const ProfileOptions& o) {
  if (o.max_tokens < 1 || o.repeats < 1) {
    return absl::InvalidArgumentError("ProfileLatency: max_tokens and repeats must be >= 1");
  }
  std::vector<int32_t> points;
  for (int32_t t : o.tokens) {
    if (t >= 1 && t < o.max_tokens) points.push_back(t);
  }
  points.push_back(static_cast<int32_t>(o.max_tokens));
  std::sort(points.begin(), points.end());
  points.erase(std::unique(points.begin(), points.end()), points.end());
  if (points.front() != 1) points.insert(points.begin(), 1);

  const int32_t vocab = static_cast<int32_t>(engine->model().config.vocab_size);
  std::vector<int32_t> prompt(o.max_tokens);
  for (int64_t i = 0; i < o.max_tokens; ++i) prompt[i] = static_cast<int32_t>((i * 7 + 3) % vocab);
  // A scratch sequence (id far from the worker's ids) holding the blocks.
  Sequence seq(-1, prompt, SamplingParams(), GenerateOptions());
  if (absl::Status s = blocks->EnsureCapacity(&seq, o.max_tokens); !s.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "ProfileLatency: the KV cache cannot hold ", o.max_tokens, " tokens: ", s.message()));
  }
  ModelBackend& runner = engine->backend();
  ForwardOutput out;
  auto time_once = [&](int32_t t) -> absl::StatusOr<double> {
    SeqChunk ch;
    ch.tokens = std::span<const int32_t>(prompt).subspan(0, t);
    ch.start_pos = 0;
    ch.block_table = seq.block_table();
    ch.logits = LogitsMode::kLast;
    const auto t0 = std::chrono::steady_clock::now();
    if (absl::Status s = runner.Forward({ch}, &out); !s.ok()) return s;
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // The median of `repeats` timed runs: a typical iteration (the minimum
  // would be optimistic on a busy machine). One warm-up pass for the whole
  // profile (weights paged in, scratch grown), not one per point: start-up
  // time is what a worker pays for its table. Except on CUDA, whose runner
  // captures a CUDA graph on the first forward of each shape and again
  // after every EC-mask change: there each point (per EC mode) gets one
  // untimed run first, or the capture lands in the table (the H200's
  // 1-token point read 7.46 ms against a measured 1.4 ms inter-token
  // latency; docs/results/gpu.md).
  const bool warm_each_point = runner.device() == Device::kCuda;
  auto time_point = [&](int32_t t) -> absl::StatusOr<double> {
    if (warm_each_point) {
      if (auto w = time_once(t); !w.ok()) return w.status();
    }
    std::vector<double> runs;
    for (int r = 0; r < o.repeats; ++r) {
      auto s = time_once(t);
      if (!s.ok()) return s.status();
      runs.push_back(*s);
    }
    std::sort(runs.begin(), runs.end());
    return runs[runs.size() / 2];
  };
  if (auto w = time_once(std::min<int32_t>(64, points.back())); !w.ok()) {
    blocks->Release(&seq);
    return w.status();
  }
  LatencyPoints p;
  p.tokens = points;
  absl::Status status;
  const bool has_ec = ec != nullptr && ec->num_units() > 0;
  for (int32_t t : points) {
    if (has_ec) ec->EnableAll();
    auto full = time_point(t);
    if (!full.ok()) {
      status = full.status();
      break;
    }
    double none = *full;
    if (has_ec) {
      ec->DisableAll();
      auto n = time_point(t);
      if (!n.ok()) {
        status = n.status();
        break;
      }
      none = std::min(*n, *full);
    }
    p.seconds_no_ec.push_back(none);
    p.seconds_full_ec.push_back(*full);
  }
  if (has_ec) ec->EnableAll();
  blocks->Release(&seq);
  if (!status.ok()) return status;
  for (size_t k = 1; k < p.tokens.size(); ++k) {
    p.seconds_no_ec[k] = std::max(p.seconds_no_ec[k], p.seconds_no_ec[k - 1]);
    p.seconds_full_ec[k] = std::max(p.seconds_full_ec[k], p.seconds_full_ec[k - 1]);
  }
  return LatencyTable::Create(std::move(p));
}

}  // namespace spear::engine
