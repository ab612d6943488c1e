#include "router/metrics/router_metrics.h"

namespace spear::router {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

prometheus::Histogram::BucketBoundaries RouterMetrics::LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15,
          0.2,   0.3,    0.5,   0.75, 1,    2.5,  5,    10,   20,  40};
}

RouterMetrics::RouterMetrics(std::string model)
    : model_(std::move(model)), registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  requests_ = &BuildCounter().Name("spear_requests_total")
                   .Help("Finished public requests by gRPC status code").Register(r);
  ttft_ = &BuildHistogram().Name("spear_time_to_first_token_seconds")
               .Help("Request received to first token sent").Register(r)
               .Add({{"model", model_}}, LatencyBuckets());
  itl_ = &BuildHistogram().Name("spear_inter_token_latency_seconds")
              .Help("Time between consecutive streamed tokens").Register(r)
              .Add({{"model", model_}}, LatencyBuckets());
  e2e_ = &BuildHistogram().Name("spear_e2e_request_latency_seconds")
              .Help("Request received to last byte sent").Register(r)
              .Add({{"model", model_}}, LatencyBuckets());
  queue_time_ = &BuildHistogram().Name("spear_queue_time_seconds")
                     .Help("Time in the router's admission queue").Register(r)
                     .Add({{"model", model_}}, LatencyBuckets());
  admission_ = &BuildCounter().Name("spear_admission_decisions_total")
                    .Help("Admission decisions by kind").Register(r);
  for (const char* d : {"admit_full", "admit_reduced_ec", "queue", "reject"}) {
    admission_->Add({{"model", model_}, {"decision", d}});
  }
  queue_depth_ = &BuildGauge().Name("spear_router_queue_depth")
                      .Help("Requests waiting in the router's bounded queue").Register(r)
                      .Add({{"model", model_}});
  slo_ = &BuildCounter().Name("spear_slo_requests_total")
              .Help("Finished requests with a latency target, by whether it was met").Register(r);
  worker_up_ = &BuildGauge().Name("spear_worker_up")
                    .Help("1 when the registry sees the worker healthy").Register(r);
  worker_ttft_ = &BuildGauge().Name("spear_worker_predicted_ttft_seconds")
                      .Help("Admission model's TTFT prediction for a new request").Register(r);
  retries_ = &BuildCounter().Name("spear_retries_total")
                  .Help("Requests retried on another worker").Register(r);
  retries_->Add({{"model", model_}, {"reason", "worker_unavailable"}});
  prompt_tokens_ = &BuildCounter().Name("spear_prompt_tokens_total")
                        .Help("Prompt tokens of admitted requests").Register(r)
                        .Add({{"model", model_}});
  generation_tokens_ = &BuildCounter().Name("spear_generation_tokens_total")
                            .Help("Tokens streamed to clients").Register(r)
                            .Add({{"model", model_}});
}

void RouterMetrics::RequestFinished(const std::string& code_name) {
  requests_->Add({{"model", model_}, {"code", code_name}}).Increment();
}
void RouterMetrics::Ttft(double s) { ttft_->Observe(s); }
void RouterMetrics::Itl(double s) { itl_->Observe(s); }
void RouterMetrics::E2e(double s) { e2e_->Observe(s); }
void RouterMetrics::QueueTime(double s) { queue_time_->Observe(s); }
void RouterMetrics::Admission(const std::string& decision) {
  admission_->Add({{"model", model_}, {"decision", decision}}).Increment();
}
void RouterMetrics::SetQueueDepth(double depth) { queue_depth_->Set(depth); }
void RouterMetrics::SloFinished(const std::string& slo_class, bool met) {
  slo_->Add({{"model", model_}, {"slo_class", slo_class}, {"met", met ? "true" : "false"}})
      .Increment();
}
void RouterMetrics::SetWorkerUp(const std::string& worker, bool up) {
  worker_up_->Add({{"model", model_}, {"worker", worker}}).Set(up ? 1 : 0);
}
void RouterMetrics::SetWorkerPredictedTtft(const std::string& worker, double seconds) {
  worker_ttft_->Add({{"model", model_}, {"worker", worker}}).Set(seconds);
}
void RouterMetrics::Retry(const std::string& reason) {
  retries_->Add({{"model", model_}, {"reason", reason}}).Increment();
}
void RouterMetrics::PromptTokens(double n) { prompt_tokens_->Increment(n); }
void RouterMetrics::GenerationTokens(double n) { generation_tokens_->Increment(n); }

}  // namespace spear::router
