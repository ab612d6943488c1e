// Prometheus metrics of spear-worker, exactly the "Worker" table of
// monitoring/metrics.md (names, types, labels, buckets). Every series has
// the labels model and worker.
//
// WorkerMetrics is the engine loop's LoopObserver (gauges and histograms
// updated on the loop thread) and is also called by RPC threads for
// requests rejected before they reach the loop. prometheus-cpp metric
// objects are thread-safe.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "worker/engine/engine_loop.h"

namespace spear::server {

class WorkerMetrics final : public engine::LoopObserver {
 public:
  // `backend`: the engine's backend ("cpu" or "cuda"), exported as
  // spear_worker_backend_info{backend=...} = 1.
  WorkerMetrics(const std::string& model, const std::string& worker,
                const std::string& backend = "cpu");
  // Stops serving /metrics without civetweb's 2-3.5 s shutdown wait
  // (metrics_http::StopExposer).
  ~WorkerMetrics() override;

  // Serves /metrics on host:port (0 = any free port). Returns the port.
  absl::StatusOr<int> Serve(const std::string& host, int port);

  std::shared_ptr<prometheus::Registry> registry() { return registry_; }

  // A finished Execute call (also the ones rejected before the loop).
  void CountRequest(absl::StatusCode code);
  void SetDraining(bool draining) { draining_->Set(draining ? 1 : 0); }

  // LoopObserver.
  void OnIteration(const engine::IterationStats& it, const engine::LoopSnapshot& s) override;
  void OnFirstToken(double ttft_seconds) override { ttft_->Observe(ttft_seconds); }
  void OnInterToken(double itl_seconds) override { itl_->Observe(itl_seconds); }
  void OnRequestDone(const engine::FinishInfo& info) override;
  void OnIdle(const engine::LoopSnapshot& s) override;

 private:
  void SetGauges(const engine::LoopSnapshot& s);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string host_;  // the address exposer_ is bound to
  prometheus::Labels labels_;
  prometheus::Family<prometheus::Counter>* requests_family_;
  prometheus::Gauge *waiting_, *running_, *kv_usage_, *kv_blocks_, *chunk_, *ec_density_,
      *gate_mean_, *gate_stddev_, *pred_error_, *draining_;
  prometheus::Counter *prefix_hits_, *prefill_tokens_, *decode_tokens_, *preemptions_, *shed_;
  prometheus::Histogram *iteration_seconds_, *iteration_tokens_, *ttft_, *itl_;
};

}  // namespace spear::server
