// SLO-aware EC admission. For each request the controller predicts TTFT and
// ITL on every admissible worker (predictor.h) and
//   1. admits at the request's EC level to the best worker that meets the
//      SLO (the balancer picks among those)             -> admit_full
//   2. else, when the quality policy is AUTO, admits with the largest
//      reduced EC density (max_ec_density < 1) that meets it -> admit_reduced_ec
//   3. else queues it (bounded; each entry with a deadline) and re-runs the
//      decision whenever worker stats change or a request finishes -> queue
//   4. else (queue full) rejects RESOURCE_EXHAUSTED with a retry hint -> reject
// A queued entry that reaches its deadline fails with DEADLINE_EXCEEDED (the
// client's deadline) or RESOURCE_EXHAUSTED (the queue timeout), or
// UNAVAILABLE when no worker was healthy the whole time.
//
// Threads: Submit/Cancel/Notify from any thread; callbacks run on the
// caller's thread or on the controller's own thread, never under its lock.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "router/balancing/balancer.h"
#include "router/registry/worker_registry.h"
#include "spear/v1/generation.pb.h"

namespace spear::router {

class RouterMetrics;

struct Admission {
  std::shared_ptr<WorkerHandle> worker;
  double max_ec_density = 1.0;
  std::string decision;  // admit_full | admit_reduced_ec
  double queue_seconds = 0;
  double predicted_ttft = 0;  // uncorrected model value, for calibration
};

struct AdmissionRequest {
  std::vector<int32_t> prompt;  // token ids (for prediction and prefix affinity)
  int64_t max_tokens = 0;
  double ttft_target = 0;  // seconds; 0 = none
  double itl_target = 0;
  spear::v1::QualityPolicy quality = spear::v1::QUALITY_POLICY_AUTO;
  std::set<std::string> excluded;  // worker addresses already tried
  std::chrono::steady_clock::time_point client_deadline = std::chrono::steady_clock::time_point::max();
  // When the router received the request: time already spent (queue,
  // earlier attempts) comes off the TTFT target, and a request with a TTFT
  // target leaves the queue once it can no longer meet it.
  std::chrono::steady_clock::time_point received = std::chrono::steady_clock::now();
  std::function<void(Admission)> on_admit;
  // status: RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / UNAVAILABLE;
  // retry_after_ms > 0 for RESOURCE_EXHAUSTED.
  std::function<void(absl::Status, int64_t retry_after_ms)> on_reject;
};

struct AdmissionOptions {
  int max_queue = 64;                 // router queue bound
  double queue_timeout_seconds = 5;   // longest a request waits in the queue
  int max_worker_waiting = 8;         // router-side cap on a worker's queue
  double min_ec_density = 0.0;        // AUTO never goes below this
  // Admission compares predictions with headroom x the targets: the latency
  // model is an estimate and later arrivals share the batch.
  double slo_headroom = 0.8;
};

class AdmissionController {
 public:
  AdmissionController(AdmissionOptions opts, WorkerRegistry* registry, Balancer* balancer,
                      RouterMetrics* metrics);
  ~AdmissionController();

  // Returns an id for Cancel. Exactly one of on_admit / on_reject runs
  // (unless Cancel wins first).
  uint64_t Submit(std::shared_ptr<AdmissionRequest> req);
  // Drops a queued request (its callbacks never run). False if not queued.
  bool Cancel(uint64_t id);
  // Worker stats changed or a request finished: re-run the queue.
  void Notify();
  // Rejects every queued request with UNAVAILABLE and every later Submit.
  void Close();
  int queue_depth() const;

 private:
  struct Decision {
    bool admitted = false;
    Admission admission;
    bool any_healthy = false;
    double best_ttft = 0;  // for the retry hint
  };
  struct Entry {
    uint64_t id;
    std::shared_ptr<AdmissionRequest> req;
    std::chrono::steady_clock::time_point enqueued;
    std::chrono::steady_clock::time_point deadline;
    bool saw_healthy = false;
  };
  Decision Decide(const AdmissionRequest& req);
  int64_t RetryAfterMs(const Decision& d, const AdmissionRequest& req) const;
  void Run();
  void RunQueueOnce();

  const AdmissionOptions opts_;
  WorkerRegistry* registry_;
  Balancer* balancer_;
  RouterMetrics* metrics_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool dirty_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::mutex decide_mu_;  // one decision at a time: pending-load accounting stays exact
  std::thread thread_;
};

}  // namespace spear::router
