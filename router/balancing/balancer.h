// Pluggable choice of a worker among the admissible candidates that meet a
// request's SLO. Implementations: least predicted latency (default), prefix
// affinity (rendezvous hashing of the prompt's first tokens, so repeated
// prefixes land where the worker's prefix cache has them), round robin.
// Pick is called concurrently; implementations are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "router/admission/predictor.h"

namespace spear::router {

struct Candidate {
  std::string address;  // stable worker key
  Prediction prediction;
  int32_t inflight = 0;
};

class Balancer {
 public:
  virtual ~Balancer() = default;
  // Index into `candidates` (non-empty).
  virtual size_t Pick(const std::vector<Candidate>& candidates,
                      std::span<const int32_t> prompt_tokens) = 0;
  virtual std::string name() const = 0;
};

// "least-latency" | "prefix-affinity" | "round-robin"; InvalidArgument otherwise.
absl::StatusOr<std::unique_ptr<Balancer>> MakeBalancer(const std::string& name);

// Score used by least-latency: predicted TTFT plus a short run of decode steps.
double LatencyScore(const Candidate& c);

}  // namespace spear::router
