#include "worker/server/worker_service.h"

#include <chrono>
#include <deque>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace spear::server {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

namespace {

v1::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kError: return v1::FINISH_REASON_ERROR;
    case engine::FinishReason::kNone: break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

class ExecuteReactor;

// State shared by the reactor (gRPC threads) and the sink (loop thread).
// Invariant: Finish is called once, and never while a write is in flight,
// so the reactor (deleted in OnDone, which gRPC runs only after Finish and
// all writes completed) is alive whenever an action is performed.
struct Stream {
  enum class Action { kNone, kWrite, kFinish };

  absl::Mutex mu;
  ExecuteReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
  std::deque<v1::ExecuteEvent> queue ABSL_GUARDED_BY(mu);
  v1::ExecuteEvent current;  // owned by whoever set `writing`
  bool writing ABSL_GUARDED_BY(mu) = false;
  bool finish_called ABSL_GUARDED_BY(mu) = false;
  std::optional<grpc::Status> final_status ABSL_GUARDED_BY(mu);
  grpc::Status finish_with;  // set together with finish_called

  // Decides the next action; caller holds mu.
  Action NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (writing || finish_called) return Action::kNone;
    if (!queue.empty()) {
      current = std::move(queue.front());
      queue.pop_front();
      writing = true;
      return Action::kWrite;
    }
    if (final_status.has_value()) {
      finish_called = true;
      finish_with = *final_status;
      return Action::kFinish;
    }
    return Action::kNone;
  }
  void Perform(Action a);  // without mu
  void Push(std::optional<v1::ExecuteEvent> ev, std::optional<grpc::Status> final) {
    Action a;
    {
      absl::MutexLock lock(&mu);
      if (finish_called) return;
      if (ev.has_value()) queue.push_back(std::move(*ev));
      if (final.has_value()) final_status = std::move(final);
      a = NextLocked();
    }
    Perform(a);
  }
};

class StreamSink final : public engine::RequestSink {
 public:
  explicit StreamSink(std::shared_ptr<Stream> s) : s_(std::move(s)) {}
  void OnAccepted(double queue_seconds, int64_t cached) override {
    v1::ExecuteEvent ev;
    ev.mutable_accepted()->set_queue_seconds(queue_seconds);
    ev.mutable_accepted()->set_cached_prompt_tokens(static_cast<int32_t>(cached));
    s_->Push(std::move(ev), std::nullopt);
  }
  void OnTokens(const std::vector<int32_t>& ids, double density) override {
    v1::ExecuteEvent ev;
    for (int32_t t : ids) ev.mutable_tokens()->add_ids(t);
    ev.mutable_tokens()->set_ec_density(density);
    s_->Push(std::move(ev), std::nullopt);
  }
  void OnFinished(const engine::FinishInfo& f) override {
    if (!f.status.ok()) {
      s_->Push(std::nullopt, ToGrpc(f.status));
      return;
    }
    v1::ExecuteEvent ev;
    v1::Finished* fin = ev.mutable_finished();
    fin->set_finish_reason(ToProto(f.reason));
    fin->mutable_usage()->set_prompt_tokens(static_cast<int32_t>(f.prompt_tokens));
    fin->mutable_usage()->set_completion_tokens(static_cast<int32_t>(f.completion_tokens));
    fin->mutable_usage()->set_cached_prompt_tokens(static_cast<int32_t>(f.cached_prompt_tokens));
    v1::Timings* t = fin->mutable_timings();
    t->set_queue_seconds(f.queue_seconds);
    t->set_ttft_seconds(f.ttft_seconds);
    t->set_mean_itl_seconds(f.mean_itl_seconds);
    t->set_max_itl_seconds(f.max_itl_seconds);
    t->set_e2e_seconds(f.e2e_seconds);
    fin->set_ec_density(f.ec_density);
    s_->Push(std::move(ev), grpc::Status::OK);
  }

 private:
  std::shared_ptr<Stream> s_;
};

class ExecuteReactor final : public grpc::ServerWriteReactor<v1::ExecuteEvent> {
 public:
  ExecuteReactor(engine::EngineLoop* loop, WorkerMetrics* metrics, std::shared_ptr<OpenCalls> open)
      : loop_(loop), metrics_(metrics), stream_(std::make_shared<Stream>()), open_(std::move(open)) {
    open_->Opened();
    absl::MutexLock lock(&stream_->mu);
    stream_->reactor = this;
  }

  void Begin(grpc::CallbackServerContext* ctx, const v1::ExecuteRequest& req,
             const ModelLimits& limits) {
    absl::StatusOr<engine::ExecuteSpec> spec = ValidateExecute(req, limits);
    if (spec.ok()) {
      const auto deadline = ctx->deadline();
      deadline_ = deadline;
      if (deadline != std::chrono::system_clock::time_point::max()) {
        const double left =
            std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
        // An already passed deadline still gets a positive timeout: the loop
        // expires it in its next turn with DEADLINE_EXCEEDED.
        spec->timeout_seconds = std::max(left, 1e-6);
      }
      absl::StatusOr<int64_t> id =
          loop_->Submit(std::move(*spec), std::make_shared<StreamSink>(stream_));
      if (id.ok()) {
        bool cancel_now;
        {
          absl::MutexLock lock(&mu_);
          id_ = *id;
          cancel_now = cancelled_;
        }
        if (cancel_now) loop_->Cancel(*id);
        return;
      }
      spec = id.status();
    }
    if (metrics_ != nullptr) metrics_->CountRequest(spec.status().code());
    stream_->Push(std::nullopt, ToGrpc(spec.status()));
  }

  void StartWriteFromStream(const v1::ExecuteEvent* ev) { StartWrite(ev); }
  void FinishFromStream(const grpc::Status& s) { Finish(s); }

  void OnWriteDone(bool ok) override {
    Stream::Action a;
    bool cancel = false;
    {
      absl::MutexLock lock(&stream_->mu);
      stream_->writing = false;
      if (!ok) {
        // The client is gone (cancelled or its deadline passed).
        stream_->queue.clear();
        cancel = !stream_->finish_called;
        if (!stream_->finish_called) {
          stream_->finish_called = true;
          stream_->finish_with = grpc::Status(grpc::StatusCode::CANCELLED, "stream write failed");
          a = Stream::Action::kFinish;
        } else {
          a = Stream::Action::kNone;
        }
      } else {
        a = stream_->NextLocked();
      }
    }
    if (cancel) CancelInLoop();
    stream_->Perform(a);
  }

  void OnCancel() override {
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
    }
    CancelInLoop();
    Stream::Action a = Stream::Action::kNone;
    {
      absl::MutexLock lock(&stream_->mu);
      stream_->queue.clear();
      if (!stream_->writing && !stream_->finish_called) {
        stream_->finish_called = true;
        stream_->finish_with = grpc::Status(grpc::StatusCode::CANCELLED, "request cancelled");
        a = Stream::Action::kFinish;
      }
    }
    stream_->Perform(a);
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&stream_->mu);
      stream_->reactor = nullptr;
    }
    std::shared_ptr<OpenCalls> open = std::move(open_);
    delete this;
    open->Released();
  }

 private:
  void CancelInLoop() {
    int64_t id;
    {
      absl::MutexLock lock(&mu_);
      id = id_;
    }
    if (id < 0) return;
    // gRPC cancels the call when its deadline passes: say so in the metrics.
    // (Its timer and this clock differ slightly: 100 ms of tolerance.)
    if (deadline_ != std::chrono::system_clock::time_point::max() &&
        std::chrono::system_clock::now() + std::chrono::milliseconds(100) >= deadline_) {
      loop_->Cancel(id, absl::DeadlineExceededError("request deadline exceeded"));
    } else {
      loop_->Cancel(id);
    }
  }

  engine::EngineLoop* loop_;
  WorkerMetrics* metrics_;
  std::shared_ptr<Stream> stream_;
  std::shared_ptr<OpenCalls> open_;
  std::chrono::system_clock::time_point deadline_ = std::chrono::system_clock::time_point::max();
  absl::Mutex mu_;
  int64_t id_ ABSL_GUARDED_BY(mu_) = -1;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

void Stream::Perform(Action a) {
  if (a == Action::kNone) return;
  ExecuteReactor* r;
  {
    absl::MutexLock lock(&mu);
    r = reactor;
  }
  if (r == nullptr) return;
  if (a == Action::kWrite) {
    r->StartWriteFromStream(&current);
  } else {
    r->FinishFromStream(finish_with);
  }
}

}  // namespace

WorkerService::WorkerService(engine::EngineLoop* loop, WorkerInfo info, WorkerMetrics* metrics,
                             std::function<void()> on_drain)
    : loop_(loop), info_(std::move(info)), metrics_(metrics), on_drain_(std::move(on_drain)) {}

grpc::ServerWriteReactor<v1::ExecuteEvent>* WorkerService::Execute(
    grpc::CallbackServerContext* ctx, const v1::ExecuteRequest* req) {
  ModelLimits limits;
  {
    absl::MutexLock lock(&mu_);
    limits = info_.limits;
  }
  auto* r = new ExecuteReactor(loop_, metrics(), open_);
  r->Begin(ctx, *req, limits);
  return r;
}

grpc::ServerUnaryReactor* WorkerService::Cancel(grpc::CallbackServerContext* ctx,
                                                const v1::CancelRequest* req,
                                                v1::CancelResponse* resp) {
  resp->set_found(!req->request_id().empty() && loop_->CancelById(req->request_id()));
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void WorkerService::SetIdentity(const std::string& worker_id, WorkerMetrics* metrics) {
  absl::MutexLock lock(&mu_);
  info_.worker_id = worker_id;
  metrics_.store(metrics);
}

void WorkerService::FillStats(v1::StatsResponse* resp) const {
  const engine::LoopSnapshot s = loop_->Snapshot();
  absl::MutexLock lock(&mu_);
  resp->set_worker_id(info_.worker_id);
  resp->set_model(info_.model);
  resp->set_waiting(static_cast<int32_t>(s.waiting));
  resp->set_running(static_cast<int32_t>(s.running));
  resp->set_running_tokens(s.running_tokens);
  resp->set_queued_prompt_tokens(s.queued_prompt_tokens);
  resp->set_kv_usage(s.kv_usage);
  resp->set_kv_free_tokens(s.kv_free_tokens);
  resp->set_ec_density(s.recent_ec_density);
  resp->set_recent_itl_seconds(s.recent_itl_seconds);
  resp->set_draining(s.draining || loop_->draining());
  const engine::LatencyPoints p = loop_->latency_points();
  v1::LatencyTable* t = resp->mutable_latency();
  for (size_t i = 0; i < p.tokens.size(); ++i) {
    t->add_tokens(p.tokens[i]);
    t->add_seconds_no_ec(p.seconds_no_ec[i]);
    t->add_seconds_full_ec(p.seconds_full_ec[i]);
  }
  resp->set_max_batch_tokens(
      static_cast<int32_t>(loop_->engine().options().max_batch_tokens));
  resp->set_vocab_size(static_cast<int32_t>(info_.limits.vocab_size));
  resp->set_max_context(static_cast<int32_t>(info_.limits.max_context));
  resp->set_architecture(info_.architecture);
  resp->set_quantization(info_.quantization);
}

grpc::ServerUnaryReactor* WorkerService::Stats(grpc::CallbackServerContext* ctx,
                                               const v1::StatsRequest*,
                                               v1::StatsResponse* resp) {
  FillStats(resp);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Drain(grpc::CallbackServerContext* ctx,
                                               const v1::DrainRequest*,
                                               v1::DrainResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const int64_t ok0 = loop_->finished_ok(), cancelled0 = loop_->finished_cancelled();
  loop_->StartDrain();
  if (metrics() != nullptr) metrics()->SetDraining(true);
  if (on_drain_) on_drain_();
  engine::EngineLoop* loop = loop_;
  loop_->WhenIdle([reactor, resp, loop, ok0, cancelled0] {
    resp->set_finished(static_cast<int32_t>(loop->finished_ok() - ok0));
    resp->set_cancelled(static_cast<int32_t>(loop->finished_cancelled() - cancelled0));
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

}  // namespace spear::server
