#include "worker/server/metrics.h"

#include "absl/strings/str_cat.h"
#include "common/metrics_http.h"
#include "prometheus/counter.h"

namespace spear::server {
namespace {

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15,
      0.2,   0.3,    0.5,   0.75, 1,    2.5,  5,    10,   20,  40};
  return *b;
}

const char* CodeName(absl::StatusCode c) {
  switch (c) {
    case absl::StatusCode::kOk: return "OK";
    case absl::StatusCode::kCancelled: return "CANCELLED";
    case absl::StatusCode::kUnknown: return "UNKNOWN";
    case absl::StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case absl::StatusCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case absl::StatusCode::kNotFound: return "NOT_FOUND";
    case absl::StatusCode::kAlreadyExists: return "ALREADY_EXISTS";
    case absl::StatusCode::kPermissionDenied: return "PERMISSION_DENIED";
    case absl::StatusCode::kResourceExhausted: return "RESOURCE_EXHAUSTED";
    case absl::StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case absl::StatusCode::kAborted: return "ABORTED";
    case absl::StatusCode::kOutOfRange: return "OUT_OF_RANGE";
    case absl::StatusCode::kUnimplemented: return "UNIMPLEMENTED";
    case absl::StatusCode::kInternal: return "INTERNAL";
    case absl::StatusCode::kUnavailable: return "UNAVAILABLE";
    case absl::StatusCode::kDataLoss: return "DATA_LOSS";
    case absl::StatusCode::kUnauthenticated: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

}  // namespace

WorkerMetrics::WorkerMetrics(const std::string& model, const std::string& worker,
                             const std::string& backend)
    : registry_(std::make_shared<prometheus::Registry>()),
      labels_{{"model", model}, {"worker", worker}} {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  auto gauge = [&](const char* name, const char* help) {
    return &BuildGauge().Name(name).Help(help).Register(*registry_).Add(labels_);
  };
  auto counter = [&](const char* name, const char* help) {
    return &BuildCounter().Name(name).Help(help).Register(*registry_).Add(labels_);
  };
  auto hist = [&](const char* name, const char* help,
                  const prometheus::Histogram::BucketBoundaries& b) {
    return &BuildHistogram().Name(name).Help(help).Register(*registry_).Add(labels_, b);
  };
  waiting_ = gauge("spear_num_requests_waiting", "Accepted requests not yet scheduled");
  running_ = gauge("spear_num_requests_running", "Requests in the running batch");
  kv_usage_ = gauge("spear_kv_cache_usage_perc", "Used KV blocks / all blocks (0..1)");
  kv_blocks_ = gauge("spear_kv_cache_blocks_used", "Used KV blocks");
  prefix_hits_ = counter("spear_prefix_cache_hits_total",
                         "Prompt tokens served from the prefix cache");
  prefill_tokens_ = counter("spear_prefill_tokens_total", "Prompt tokens computed");
  decode_tokens_ = counter("spear_decode_tokens_total", "Tokens generated");
  preemptions_ = counter("spear_preemptions_total",
                         "Sequences preempted (recompute) when KV ran out");
  iteration_seconds_ = hist("spear_iteration_seconds", "One engine iteration (forward + sample)",
                            LatencyBuckets());
  iteration_tokens_ = hist("spear_iteration_tokens", "Tokens per iteration",
                           {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048});
  chunk_ = gauge("spear_prefill_chunk_tokens", "Prefill chunk the scheduler chose last iteration");
  ec_density_ = gauge("spear_ec_density",
                      "Fraction of EC FLOPs applied in the last iteration (0..1)");
  shed_ = counter("spear_ec_shed_iterations_total",
                  "Iterations where the scheduler shed EC density to keep the ITL SLO");
  gate_mean_ = gauge("spear_gate_mean", "Mean gate value g(u) over the last iteration");
  gate_stddev_ = gauge("spear_gate_stddev", "Standard deviation of g(u) over the last iteration");
  ttft_ = hist("spear_worker_time_to_first_token_seconds", "Worker-side TTFT (accepted -> first token)",
               LatencyBuckets());
  itl_ = hist("spear_worker_inter_token_latency_seconds", "Worker-side inter-token latency",
              LatencyBuckets());
  requests_family_ = &BuildCounter()
                          .Name("spear_worker_requests_total")
                          .Help("Finished Execute calls by status code")
                          .Register(*registry_);
  pred_error_ = gauge("spear_predicted_iteration_error_ratio",
                      "Measured / predicted iteration time (latency table health)");
  draining_ = gauge("spear_draining", "1 while draining");
  prometheus::Labels bl = labels_;
  bl["backend"] = backend;
  BuildGauge()
      .Name("spear_worker_backend_info")
      .Help("1, labelled with the engine backend that runs the model (cpu or cuda)")
      .Register(*registry_)
      .Add(bl)
      .Set(1);
}

WorkerMetrics::~WorkerMetrics() { metrics_http::StopExposer(exposer_, host_); }

absl::StatusOr<int> WorkerMetrics::Serve(const std::string& host, int port) {
  host_ = host;
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", port));
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", host, ":", port, ": ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  auto ports = exposer_->GetListeningPorts();
  if (ports.empty()) return absl::InternalError("metrics exposer has no listening port");
  return ports[0];
}

void WorkerMetrics::CountRequest(absl::StatusCode code) {
  prometheus::Labels l = labels_;
  l["code"] = CodeName(code);
  requests_family_->Add(l).Increment();
}

void WorkerMetrics::SetGauges(const engine::LoopSnapshot& s) {
  waiting_->Set(static_cast<double>(s.waiting));
  running_->Set(static_cast<double>(s.running));
  kv_usage_->Set(s.kv_usage);
  kv_blocks_->Set(static_cast<double>(s.kv_used_blocks));
  draining_->Set(s.draining ? 1 : 0);
}

void WorkerMetrics::OnIteration(const engine::IterationStats& it, const engine::LoopSnapshot& s) {
  SetGauges(s);
  iteration_seconds_->Observe(it.seconds);
  iteration_tokens_->Observe(static_cast<double>(it.decode_tokens + it.prefill_tokens));
  prefill_tokens_->Increment(static_cast<double>(it.prefill_tokens));
  decode_tokens_->Increment(static_cast<double>(it.generated_tokens));
  prefix_hits_->Increment(static_cast<double>(it.prefix_hit_tokens));
  preemptions_->Increment(it.preempted);
  chunk_->Set(static_cast<double>(it.chunk_limit));
  ec_density_->Set(it.ec_density);
  if (it.shed) shed_->Increment();
  if (it.gate.count > 0) {
    gate_mean_->Set(it.gate.mean);
    gate_stddev_->Set(it.gate.stddev);
  }
  if (it.predicted_seconds > 0) pred_error_->Set(it.seconds / it.predicted_seconds);
}

void WorkerMetrics::OnRequestDone(const engine::FinishInfo& info) {
  CountRequest(info.status.code());
}

void WorkerMetrics::OnIdle(const engine::LoopSnapshot& s) { SetGauges(s); }

}  // namespace spear::server
