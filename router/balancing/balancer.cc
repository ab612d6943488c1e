#include "router/balancing/balancer.h"

#include <algorithm>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"

namespace spear::router {
namespace {

// Tokens of the prompt that key prefix affinity (a chat template's system
// prompt plus the start of the user turn).
constexpr size_t kAffinityTokens = 64;
constexpr double kDecodeStepsInScore = 16;

size_t LeastLatency(const std::vector<Candidate>& c) {
  size_t best = 0;
  for (size_t i = 1; i < c.size(); ++i) {
    const double a = LatencyScore(c[i]), b = LatencyScore(c[best]);
    if (a < b || (a == b && c[i].inflight < c[best].inflight)) best = i;
  }
  return best;
}

class LeastLatencyBalancer : public Balancer {
 public:
  size_t Pick(const std::vector<Candidate>& c, std::span<const int32_t>) override {
    return LeastLatency(c);
  }
  std::string name() const override { return "least-latency"; }
};

class RoundRobinBalancer : public Balancer {
 public:
  size_t Pick(const std::vector<Candidate>& c, std::span<const int32_t>) override {
    // Order by address so the rotation does not depend on snapshot order.
    std::vector<size_t> idx(c.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return c[a].address < c[b].address; });
    return idx[next_.fetch_add(1) % idx.size()];
  }
  std::string name() const override { return "round-robin"; }

 private:
  std::atomic<uint64_t> next_{0};
};

class PrefixAffinityBalancer : public Balancer {
 public:
  size_t Pick(const std::vector<Candidate>& c, std::span<const int32_t> prompt) override {
    const auto prefix = prompt.subspan(0, std::min(prompt.size(), kAffinityTokens));
    const size_t key = absl::HashOf(std::vector<int32_t>(prefix.begin(), prefix.end()));
    size_t best = 0;
    size_t best_h = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      const size_t h = absl::HashOf(key, c[i].address);
      if (i == 0 || h > best_h) best = i, best_h = h;
    }
    // Affinity is a preference, not a reason to pile onto a slow worker.
    const size_t fastest = LeastLatency(c);
    if (LatencyScore(c[best]) > 2 * LatencyScore(c[fastest]) + 0.05) return fastest;
    return best;
  }
  std::string name() const override { return "prefix-affinity"; }
};

}  // namespace

double LatencyScore(const Candidate& c) {
  return c.prediction.ttft_seconds + kDecodeStepsInScore * c.prediction.itl_seconds;
}

absl::StatusOr<std::unique_ptr<Balancer>> MakeBalancer(const std::string& name) {
  if (name == "least-latency") return std::make_unique<LeastLatencyBalancer>();
  if (name == "prefix-affinity") return std::make_unique<PrefixAffinityBalancer>();
  if (name == "round-robin") return std::make_unique<RoundRobinBalancer>();
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown balancer '", name, "' (least-latency, prefix-affinity, round-robin)"));
}

}  // namespace spear::router
