// One public Generate / GenerateStream request from validation to the last
// byte: admission, the Execute stream to a worker (gRPC callback client),
// streaming detokenization, stop strings, retries on another worker before
// the first token, deadline and cancellation propagation, metrics.
//
// Ownership: a RequestCall is shared by its response sink (the server
// reactor) and its current worker stream; both drop it when done. All
// state is guarded by mu_; sink methods are called outside mu_.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "router/admission/admission.h"
#include "router/service/model_frontend.h"
#include "spear/v1/generation.pb.h"
#include "spear/v1/worker.grpc.pb.h"

namespace spear::router {

class RouterMetrics;

// Where a request's output goes (streaming reactor or unary accumulator).
// Send is never called after Close; Close is called exactly once.
class ResponseSink {
 public:
  virtual ~ResponseSink() = default;
  virtual void Send(spear::v1::GenerateStreamResponse chunk) = 0;
  // retry_after_ms > 0: sent as "retry-after-ms" trailing metadata.
  virtual void Close(const grpc::Status& status, int64_t retry_after_ms) = 0;
};

// Shared by every call of a router.
struct CallEnv {
  const ModelFrontend* frontend = nullptr;
  AdmissionController* admission = nullptr;
  WorkerRegistry* registry = nullptr;
  RouterMetrics* metrics = nullptr;
  int max_attempts = 3;
  std::function<void()> on_call_done;  // after the sink was closed
};

grpc::Status ToGrpc(const absl::Status& s);
const char* CodeName(grpc::StatusCode code);

class WorkerStream;

class RequestCall : public std::enable_shared_from_this<RequestCall> {
 public:
  using Clock = std::chrono::steady_clock;
  RequestCall(const CallEnv* env, PreparedRequest req, std::shared_ptr<ResponseSink> sink,
              std::chrono::system_clock::time_point deadline, Clock::time_point received);
  ~RequestCall();

  void Start();
  // The client went away or its deadline passed.
  void ClientCancelled();

  // Called by WorkerStream (gRPC callback threads).
  void OnEvent(WorkerStream* s, const spear::v1::ExecuteEvent& ev);
  void OnWorkerDone(WorkerStream* s, const grpc::Status& status);

 private:
  struct Outbox {
    std::vector<spear::v1::GenerateStreamResponse> chunks;
    bool close = false;
    grpc::Status status;
    int64_t retry_after_ms = 0;
    std::shared_ptr<WorkerStream> cancel_stream;
  };
  void Submit();
  void Admitted(Admission a);
  void Rejected(const absl::Status& s, int64_t retry_after_ms);
  void ProcessTokens(const spear::v1::Tokens& t, Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Appends decoded text; returns true when a stop string ended the text.
  bool AppendText(const std::string& piece, std::string* emit) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishOk(spear::v1::FinishReason reason, Outbox* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishError(const grpc::Status& status, int64_t retry_after_ms, Outbox* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Flush(Outbox& out);
  double Since(Clock::time_point t) const;

  const CallEnv* env_;
  const PreparedRequest req_;
  const std::chrono::system_clock::time_point deadline_;
  const Clock::time_point received_;
  size_t max_stop_len_ = 0;

  std::mutex mu_;
  std::shared_ptr<ResponseSink> sink_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t admission_id_ ABSL_GUARDED_BY(mu_) = 0;
  bool queued_ ABSL_GUARDED_BY(mu_) = false;
  int attempts_ ABSL_GUARDED_BY(mu_) = 0;
  std::set<std::string> tried_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<WorkerStream> stream_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<WorkerHandle> worker_ ABSL_GUARDED_BY(mu_);
  double admitted_density_ ABSL_GUARDED_BY(mu_) = 1;
  double predicted_ttft_ ABSL_GUARDED_BY(mu_) = 0;  // of the current attempt
  Clock::time_point dispatched_ ABSL_GUARDED_BY(mu_);
  // Output state (reset on a retry before anything was sent).
  std::unique_ptr<model::StreamingDecoder> decoder_ ABSL_GUARDED_BY(mu_);
  std::string pending_text_ ABSL_GUARDED_BY(mu_);  // decoded, held back for stop matching
  bool sent_any_ ABSL_GUARDED_BY(mu_) = false;
  bool got_finished_ ABSL_GUARDED_BY(mu_) = false;
  int32_t completion_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t cached_prompt_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  double router_queue_s_ ABSL_GUARDED_BY(mu_) = 0;
  double worker_queue_s_ ABSL_GUARDED_BY(mu_) = 0;
  double density_sum_ ABSL_GUARDED_BY(mu_) = 0;
  double worker_final_density_ ABSL_GUARDED_BY(mu_) = -1;
  Clock::time_point first_token_ ABSL_GUARDED_BY(mu_);
  Clock::time_point last_token_ ABSL_GUARDED_BY(mu_);
  double itl_sum_ ABSL_GUARDED_BY(mu_) = 0, itl_max_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t itl_n_ ABSL_GUARDED_BY(mu_) = 0;
};

// The client side of one Worker.Execute stream.
class WorkerStream : public grpc::ClientReadReactor<spear::v1::ExecuteEvent> {
 public:
  WorkerStream(std::shared_ptr<RequestCall> call, std::shared_ptr<WorkerHandle> worker,
               spear::v1::ExecuteRequest req, std::chrono::system_clock::time_point deadline);
  // Starts the call; keeps itself alive until OnDone.
  static void Start(const std::shared_ptr<WorkerStream>& s);
  void Cancel() { ctx_.TryCancel(); }
  const std::shared_ptr<WorkerHandle>& worker() const { return worker_; }

  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& s) override;

 private:
  std::shared_ptr<RequestCall> call_;
  std::shared_ptr<WorkerHandle> worker_;
  spear::v1::ExecuteRequest req_;
  spear::v1::ExecuteEvent ev_;
  grpc::ClientContext ctx_;
  std::shared_ptr<WorkerStream> self_;
};

}  // namespace spear::router
