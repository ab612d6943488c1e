// The internal Worker gRPC service (worker.proto) over an EngineLoop, on
// the gRPC callback API.
//
// Execute: validates on the RPC thread (INVALID_ARGUMENT), submits to the
// loop (RESOURCE_EXHAUSTED when the waiting queue is full, UNAVAILABLE while
// draining, ALREADY_EXISTS for a live request id) and streams the loop's
// events through a ServerWriteReactor: the loop thread queues an event and
// starts a write if none is in flight; OnWriteDone starts the next. No
// reactor method blocks. A client cancel (or its deadline) cancels the
// request in the loop, which frees its KV in its next turn.
// Cancel: cancels by request id. Stats: the loop's snapshot, the latency
// table and the model's limits. Drain: stops admitting and answers when
// nothing is left in flight (or the call's deadline passes).
//
// Thread-safety: all methods are called by gRPC threads; the service holds
// no lock while calling into gRPC.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/open_calls.h"
#include "spear/v1/worker.grpc.pb.h"
#include "worker/engine/engine_loop.h"
#include "worker/server/metrics.h"
#include "worker/server/validate.h"

namespace spear::server {

struct WorkerInfo {
  std::string worker_id;
  std::string model;
  std::string architecture;
  std::string quantization;
  ModelLimits limits;
};

class WorkerService final : public v1::Worker::CallbackService {
 public:
  // Borrows loop and metrics (may be null); both must outlive the server.
  // `on_drain` (optional) runs when a Drain call starts (health status).
  WorkerService(engine::EngineLoop* loop, WorkerInfo info, WorkerMetrics* metrics,
                std::function<void()> on_drain = nullptr);

  grpc::ServerWriteReactor<v1::ExecuteEvent>* Execute(grpc::CallbackServerContext* ctx,
                                                      const v1::ExecuteRequest* req) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx,
                                   const v1::CancelRequest* req,
                                   v1::CancelResponse* resp) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* req,
                                  v1::StatsResponse* resp) override;
  grpc::ServerUnaryReactor* Drain(grpc::CallbackServerContext* ctx, const v1::DrainRequest* req,
                                  v1::DrainResponse* resp) override;

  // Fills a StatsResponse (also used by tests and the benchmark).
  void FillStats(v1::StatsResponse* resp) const ABSL_LOCKS_EXCLUDED(mu_);
  // Sets the worker id and the metrics once they are known (thread-safe).
  void SetIdentity(const std::string& worker_id, WorkerMetrics* metrics) ABSL_LOCKS_EXCLUDED(mu_);

  // Execute streams whose reactor gRPC has not yet released (OnDone): an
  // idle engine loop can still have events queued for the network, so the
  // drain waits for them (common/open_calls.h) before it shuts the server
  // down and the process exits.
  int open_streams() const { return open_->count(); }
  // The drain's wait for them (OpenCalls::WaitDrained).
  bool WaitDrained(absl::Duration linger, absl::Time deadline) const {
    return open_->WaitDrained(linger, deadline);
  }

 private:
  WorkerMetrics* metrics() const { return metrics_.load(); }

  engine::EngineLoop* loop_;
  mutable absl::Mutex mu_;
  WorkerInfo info_ ABSL_GUARDED_BY(mu_);
  std::atomic<WorkerMetrics*> metrics_;
  std::function<void()> on_drain_;
  std::shared_ptr<OpenCalls> open_ = std::make_shared<OpenCalls>();
};

// absl -> grpc status (same numeric codes).
grpc::Status ToGrpc(const absl::Status& s);

}  // namespace spear::server
