// The router's view of its workers: a static address list or a DNS name
// re-resolved periodically (one worker per address), each probed with
// grpc.health.v1 Check and polled with Worker.Stats. Admission reads
// snapshots; the request path reports failures.
//
// Threads: one poller thread owned by the registry issues asynchronous RPCs
// (gRPC callback API); every public method is thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/channel.h"
#include "router/admission/predictor.h"
#include "spear/v1/worker.grpc.pb.h"

namespace spear::router {

class RouterMetrics;

// One worker endpoint. Stub and channel are immutable; the rest is guarded.
class WorkerHandle {
 public:
  explicit WorkerHandle(std::string address);

  const std::string& address() const { return address_; }
  spear::v1::Worker::Stub* stub() const { return stub_.get(); }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

  // The worker's own id once Stats answered, else its address.
  std::string name() const;
  bool healthy() const;
  // Healthy, has stats, not draining: may receive new requests.
  bool admissible() const;
  spear::v1::StatsResponse stats() const;
  bool has_stats() const;
  PendingLoad pending() const;
  int32_t inflight() const;

  // Request path: a request was sent to / finished on this worker.
  void AddDispatched(int64_t prompt_tokens);
  void RequestDone();
  // Online calibration of the admission model: the router measured a TTFT
  // (dispatch -> first token) where it had predicted `predicted`. The
  // EWMA of measured / predicted (in [0.5, 10]) scales later predictions.
  void ObserveTtft(double predicted, double measured);
  double ttft_correction() const;
  // The request path saw the worker fail (connection refused/reset): it is
  // out of rotation until the next successful health check.
  void MarkFailed(const std::string& why);

  // Poller side.
  void SetHealth(bool serving);
  void SetStats(spear::v1::StatsResponse stats, PendingLoad pending_at_request);
  void SetStatsFailed();
  bool removed() const { return removed_.load(); }
  void set_removed() { removed_.store(true); }
  std::atomic<bool> health_in_flight{false};
  std::atomic<bool> stats_in_flight{false};

 private:
  const std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<spear::v1::Worker::Stub> stub_;
  std::atomic<bool> removed_{false};
  mutable std::mutex mu_;
  bool health_ok_ ABSL_GUARDED_BY(mu_) = false;
  bool stats_ok_ ABSL_GUARDED_BY(mu_) = false;
  bool has_stats_ ABSL_GUARDED_BY(mu_) = false;
  spear::v1::StatsResponse stats_ ABSL_GUARDED_BY(mu_);
  PendingLoad pending_ ABSL_GUARDED_BY(mu_);
  int32_t inflight_ ABSL_GUARDED_BY(mu_) = 0;
  double ttft_correction_ ABSL_GUARDED_BY(mu_) = 1.0;
};

struct RegistryOptions {
  std::vector<std::string> static_workers;  // host:port
  std::string dns_name;                     // name:port, re-resolved
  double health_interval_seconds = 0.5;
  double stats_interval_seconds = 0.1;
  double dns_interval_seconds = 5.0;
  double rpc_timeout_seconds = 1.0;
};

class WorkerRegistry {
 public:
  // Validates the options (InvalidArgument for a malformed host:port).
  static absl::StatusOr<std::unique_ptr<WorkerRegistry>> Create(RegistryOptions opts,
                                                                RouterMetrics* metrics);
  ~WorkerRegistry();

  void Start();
  void Stop();

  // All current (not removed) workers.
  std::vector<std::shared_ptr<WorkerHandle>> Workers() const;
  int HealthyCount() const;
  // Called after every stats or health update (the admission queue re-runs).
  void SetOnChange(std::function<void()> fn);
  // Blocks until at least `n` workers are admissible or the timeout passes.
  bool WaitForAdmissible(int n, double timeout_seconds) const;

 private:
  WorkerRegistry(RegistryOptions opts, RouterMetrics* metrics);
  void Run();
  void Resolve();
  void Poll(bool health);
  void Changed();

  const RegistryOptions opts_;
  RouterMetrics* metrics_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::vector<std::shared_ptr<WorkerHandle>> workers_ ABSL_GUARDED_BY(mu_);
  std::function<void()> on_change_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Splits "host:port" ([v6]:port accepted); InvalidArgument when malformed.
absl::Status CheckHostPort(const std::string& address);

}  // namespace spear::router
