// Prometheus series of spear-router, as catalogued in monitoring/metrics.md
// ("Router" table). One RouterMetrics per process; every method is
// thread-safe (prometheus-cpp series are atomic; family lookups are locked
// inside prometheus-cpp).
#pragma once

#include <memory>
#include <string>

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace spear::router {

class RouterMetrics {
 public:
  explicit RouterMetrics(std::string model);

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

  void RequestFinished(const std::string& code_name);
  void Ttft(double seconds);
  void Itl(double seconds);
  void E2e(double seconds);
  void QueueTime(double seconds);
  // decision: admit_full | admit_reduced_ec | queue | reject
  void Admission(const std::string& decision);
  void SetQueueDepth(double depth);
  void SloFinished(const std::string& slo_class, bool met);
  void SetWorkerUp(const std::string& worker, bool up);
  void SetWorkerPredictedTtft(const std::string& worker, double seconds);
  void Retry(const std::string& reason);
  void PromptTokens(double n);
  void GenerationTokens(double n);

  // The latency buckets of monitoring/metrics.md.
  static prometheus::Histogram::BucketBoundaries LatencyBuckets();

 private:
  std::string model_;
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_time_;
  prometheus::Family<prometheus::Counter>* admission_;
  prometheus::Gauge* queue_depth_;
  prometheus::Family<prometheus::Counter>* slo_;
  prometheus::Family<prometheus::Gauge>* worker_up_;
  prometheus::Family<prometheus::Gauge>* worker_ttft_;
  prometheus::Family<prometheus::Counter>* retries_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
};

}  // namespace spear::router
