#include "router/service/request_call.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "router/metrics/router_metrics.h"
#include "spdlog/spdlog.h"

namespace spear::router {

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK: return "OK";
    case grpc::CANCELLED: return "CANCELLED";
    case grpc::UNKNOWN: return "UNKNOWN";
    case grpc::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::NOT_FOUND: return "NOT_FOUND";
    case grpc::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::ABORTED: return "ABORTED";
    case grpc::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::INTERNAL: return "INTERNAL";
    case grpc::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::DATA_LOSS: return "DATA_LOSS";
    case grpc::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

// ---- WorkerStream -------------------------------------------------------------

WorkerStream::WorkerStream(std::shared_ptr<RequestCall> call, std::shared_ptr<WorkerHandle> worker,
                           spear::v1::ExecuteRequest req,
                           std::chrono::system_clock::time_point deadline)
    : call_(std::move(call)), worker_(std::move(worker)), req_(std::move(req)) {
  if (deadline != std::chrono::system_clock::time_point::max()) ctx_.set_deadline(deadline);
}

void WorkerStream::Start(const std::shared_ptr<WorkerStream>& s) {
  s->self_ = s;
  s->worker_->stub()->async()->Execute(&s->ctx_, &s->req_, s.get());
  s->StartRead(&s->ev_);
  s->StartCall();
}

void WorkerStream::OnReadDone(bool ok) {
  if (!ok) return;  // OnDone follows with the status
  call_->OnEvent(this, ev_);
  StartRead(&ev_);
}

void WorkerStream::OnDone(const grpc::Status& s) {
  worker_->RequestDone();
  call_->OnWorkerDone(this, s);
  call_.reset();
  self_.reset();  // may delete this
}

// ---- RequestCall --------------------------------------------------------------

RequestCall::RequestCall(const CallEnv* env, PreparedRequest req, std::shared_ptr<ResponseSink> sink,
                         std::chrono::system_clock::time_point deadline, Clock::time_point received)
    : env_(env), req_(std::move(req)), deadline_(deadline), received_(received), sink_(std::move(sink)) {
  for (const std::string& s : req_.stop) max_stop_len_ = std::max(max_stop_len_, s.size());
}

RequestCall::~RequestCall() = default;

double RequestCall::Since(Clock::time_point t) const {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

void RequestCall::Start() { Submit(); }

void RequestCall::Submit() {
  auto areq = std::make_shared<AdmissionRequest>();
  areq->prompt = req_.prompt;
  areq->max_tokens = req_.sampling.max_tokens();
  areq->ttft_target = req_.ttft_target;
  areq->itl_target = req_.itl_target;
  areq->quality = req_.quality;
  areq->received = received_;
  if (deadline_ != std::chrono::system_clock::time_point::max()) {
    areq->client_deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                               deadline_ - std::chrono::system_clock::now());
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (finished_) return;
    areq->excluded = tried_;
    queued_ = true;
  }
  std::weak_ptr<RequestCall> weak = weak_from_this();
  areq->on_admit = [weak](Admission a) {
    if (auto self = weak.lock()) {
      self->Admitted(std::move(a));
    } else {
      a.worker->RequestDone();
    }
  };
  areq->on_reject = [weak](absl::Status s, int64_t retry_ms) {
    if (auto self = weak.lock()) self->Rejected(s, retry_ms);
  };
  const uint64_t id = env_->admission->Submit(std::move(areq));
  std::lock_guard<std::mutex> l(mu_);
  admission_id_ = id;
}

void RequestCall::Admitted(Admission a) {
  Outbox out;
  std::shared_ptr<WorkerStream> stream;
  {
    std::lock_guard<std::mutex> l(mu_);
    queued_ = false;
    if (finished_) {
      a.worker->RequestDone();
      return;
    }
    router_queue_s_ += a.queue_seconds;
    if (attempts_ == 0 && env_->metrics) {
      env_->metrics->PromptTokens(static_cast<double>(req_.prompt.size()));
    }
    attempts_ += 1;
    tried_.insert(a.worker->address());
    worker_ = a.worker;
    admitted_density_ = a.max_ec_density;
    predicted_ttft_ = a.predicted_ttft;
    dispatched_ = Clock::now();
    spear::v1::ExecuteRequest ex;
    ex.set_request_id(req_.request_id);
    ex.mutable_prompt_tokens()->Assign(req_.prompt.begin(), req_.prompt.end());
    *ex.mutable_sampling() = req_.sampling;
    ex.mutable_slo()->set_ttft_seconds(req_.ttft_target);
    ex.mutable_slo()->set_itl_seconds(req_.itl_target);
    ex.set_quality(req_.quality);
    ex.set_max_ec_density(a.max_ec_density);
    ex.set_arrival_unix_seconds(
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count() -
        Since(received_));
    if (env_->frontend->tokenizer()) {
      decoder_ = std::make_unique<model::StreamingDecoder>(env_->frontend->tokenizer());
    }
    stream = std::make_shared<WorkerStream>(shared_from_this(), a.worker, std::move(ex), deadline_);
    stream_ = stream;
  }
  WorkerStream::Start(stream);
}

void RequestCall::Rejected(const absl::Status& s, int64_t retry_after_ms) {
  Outbox out;
  {
    std::lock_guard<std::mutex> l(mu_);
    queued_ = false;
    if (finished_) return;
    FinishError(ToGrpc(s), retry_after_ms, &out);
  }
  Flush(out);
}

void RequestCall::ClientCancelled() {
  Outbox out;
  bool dequeue = false;
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    cancelled_ = true;
    if (finished_) return;
    dequeue = queued_;
    id = admission_id_;
    FinishError(grpc::Status(grpc::CANCELLED, "cancelled by the client"), 0, &out);
  }
  if (dequeue) env_->admission->Cancel(id);
  Flush(out);
}

bool RequestCall::AppendText(const std::string& piece, std::string* emit) {
  // proto3 strings must be UTF-8: bytes that cannot form a character (token
  // sequences the model may emit, e.g. a lone continuation byte) become
  // U+FFFD. The decoder already holds back incomplete trailing characters.
  pending_text_ += SanitizeUtf8(piece);
  if (req_.stop.empty()) {
    *emit += pending_text_;
    pending_text_.clear();
    return false;
  }
  size_t hit = std::string::npos;
  for (const std::string& s : req_.stop) hit = std::min(hit, pending_text_.find(s));
  if (hit != std::string::npos) {
    *emit += pending_text_.substr(0, hit);
    pending_text_.clear();
    return true;
  }
  // Hold back the longest suffix that could still grow into a stop string.
  size_t hold = 0;
  for (const std::string& s : req_.stop) {
    for (size_t k = std::min(s.size() - 1, pending_text_.size()); k > hold; --k) {
      if (pending_text_.compare(pending_text_.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  *emit += pending_text_.substr(0, pending_text_.size() - hold);
  pending_text_.erase(0, pending_text_.size() - hold);
  return false;
}

void RequestCall::ProcessTokens(const spear::v1::Tokens& t, Outbox* out) {
  if (t.ids().empty()) return;
  const auto now = Clock::now();
  spear::v1::GenerateStreamResponse chunk;
  chunk.set_request_id(req_.request_id);
  chunk.set_ec_density(t.ec_density());
  chunk.set_worker(worker_ ? worker_->name() : "");
  std::string text;
  bool stopped = false;
  for (int32_t id : t.ids()) {
    chunk.add_token_ids(id);
    completion_tokens_ += 1;
    density_sum_ += t.ec_density();
    if (decoder_ && AppendText(decoder_->Push(id), &text)) {
      stopped = true;
      break;
    }
  }
  chunk.set_text(std::move(text));
  const int n = chunk.token_ids_size();
  if (!sent_any_) {
    first_token_ = now;
    if (worker_) {
      worker_->ObserveTtft(predicted_ttft_, std::chrono::duration<double>(now - dispatched_).count());
    }
    if (env_->metrics) env_->metrics->Ttft(Since(received_));
  } else {
    const double gap = std::chrono::duration<double>(now - last_token_).count() / n;
    itl_sum_ += gap * n;
    itl_n_ += n;
    itl_max_ = std::max(itl_max_, gap);
    if (env_->metrics) {
      for (int i = 0; i < n; ++i) env_->metrics->Itl(gap);
    }
  }
  last_token_ = now;
  sent_any_ = true;
  if (env_->metrics) env_->metrics->GenerationTokens(n);
  out->chunks.push_back(std::move(chunk));
  if (stopped) {
    out->cancel_stream = stream_;  // the worker may stop now
    FinishOk(spear::v1::FINISH_REASON_STOP, out);
  }
}

void RequestCall::OnEvent(WorkerStream* s, const spear::v1::ExecuteEvent& ev) {
  Outbox out;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (finished_ || stream_.get() != s) return;
    switch (ev.event_case()) {
      case spear::v1::ExecuteEvent::kAccepted:
        worker_queue_s_ = ev.accepted().queue_seconds();
        cached_prompt_tokens_ = ev.accepted().cached_prompt_tokens();
        break;
      case spear::v1::ExecuteEvent::kTokens:
        ProcessTokens(ev.tokens(), &out);
        break;
      case spear::v1::ExecuteEvent::kFinished: {
        got_finished_ = true;
        worker_final_density_ = ev.finished().ec_density();
        if (ev.finished().usage().cached_prompt_tokens() > 0) {
          cached_prompt_tokens_ = ev.finished().usage().cached_prompt_tokens();
        }
        // The rest of the text: what the decoder held back, stop-checked.
        std::string text;
        bool stopped = false;
        if (decoder_) stopped = AppendText(decoder_->Flush(), &text);
        if (!stopped) text += pending_text_;
        pending_text_.clear();
        if (!text.empty()) {
          spear::v1::GenerateStreamResponse chunk;
          chunk.set_request_id(req_.request_id);
          chunk.set_text(std::move(text));
          out.chunks.push_back(std::move(chunk));
        }
        spear::v1::FinishReason r = ev.finished().finish_reason();
        if (stopped) r = spear::v1::FINISH_REASON_STOP;
        FinishOk(r, &out);
        break;
      }
      default:
        break;
    }
  }
  Flush(out);
}

void RequestCall::OnWorkerDone(WorkerStream* s, const grpc::Status& status) {
  Outbox out;
  bool retry = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stream_.get() != s) return;
    stream_.reset();
    if (env_->admission) env_->admission->Notify();
    if (finished_) return;
    if (status.ok()) {
      if (!got_finished_) {
        FinishError(grpc::Status(grpc::UNAVAILABLE, absl::StrCat("worker ", worker_->name(),
                                                                 " ended the stream without a result")),
                    0, &out);
      }
    } else {
      const grpc::StatusCode c = status.error_code();
      const bool transient = c == grpc::UNAVAILABLE || c == grpc::RESOURCE_EXHAUSTED ||
                             c == grpc::ABORTED || c == grpc::UNKNOWN || c == grpc::INTERNAL;
      if (c == grpc::UNAVAILABLE || c == grpc::UNKNOWN || c == grpc::INTERNAL) {
        worker_->MarkFailed(status.error_message());
      }
      const bool before_deadline = deadline_ == std::chrono::system_clock::time_point::max() ||
                                   std::chrono::system_clock::now() < deadline_;
      bool others = false;
      for (const auto& w : env_->registry->Workers()) {
        others |= w->admissible() && !tried_.count(w->address());
      }
      if (!sent_any_ && transient && !cancelled_ && before_deadline && others &&
          attempts_ < env_->max_attempts) {
        retry = true;
        spdlog::info("request {}: worker {} failed before the first token ({}: {}); retrying",
                     req_.request_id, worker_->name(), CodeName(c), status.error_message());
        if (env_->metrics) env_->metrics->Retry("worker_unavailable");
        decoder_.reset();
        pending_text_.clear();
        completion_tokens_ = 0;
        density_sum_ = 0;
        got_finished_ = false;
      } else if (sent_any_) {
        FinishError(grpc::Status(grpc::UNAVAILABLE,
                                 absl::StrCat("worker ", worker_->name(), " failed mid-stream (",
                                              CodeName(c), ": ", status.error_message(), ")")),
                    0, &out);
      } else if (c == grpc::UNKNOWN || c == grpc::INTERNAL) {
        FinishError(grpc::Status(grpc::UNAVAILABLE, absl::StrCat("worker ", worker_->name(), ": ",
                                                                 status.error_message())),
                    0, &out);
      } else {
        // A worker's own overload answer keeps its meaning, with a short hint.
        FinishError(status, c == grpc::RESOURCE_EXHAUSTED ? 250 : 0, &out);
      }
    }
  }
  if (retry) {
    Submit();
    return;
  }
  Flush(out);
}

void RequestCall::FinishOk(spear::v1::FinishReason reason, Outbox* out) {
  finished_ = true;
  spear::v1::GenerateStreamResponse last;
  last.set_request_id(req_.request_id);
  last.set_finish_reason(reason);
  last.mutable_usage()->set_prompt_tokens(static_cast<int32_t>(req_.prompt.size()));
  last.mutable_usage()->set_completion_tokens(completion_tokens_);
  last.mutable_usage()->set_cached_prompt_tokens(cached_prompt_tokens_);
  const double e2e = Since(received_);
  spear::v1::Timings* t = last.mutable_timings();
  t->set_queue_seconds(router_queue_s_ + worker_queue_s_);
  t->set_ttft_seconds(sent_any_ ? std::chrono::duration<double>(first_token_ - received_).count() : e2e);
  t->set_mean_itl_seconds(itl_n_ ? itl_sum_ / itl_n_ : 0);
  t->set_max_itl_seconds(itl_max_);
  t->set_e2e_seconds(e2e);
  last.set_ec_density(completion_tokens_ ? density_sum_ / completion_tokens_
                                         : std::max(0.0, worker_final_density_));
  last.set_worker(worker_ ? worker_->name() : "");
  out->chunks.push_back(std::move(last));
  out->close = true;
  out->status = grpc::Status::OK;
  if (env_->metrics) {
    env_->metrics->E2e(e2e);
    env_->metrics->RequestFinished("OK");
    if (req_.ttft_target > 0 || req_.itl_target > 0) {
      const bool met = (req_.ttft_target <= 0 || t->ttft_seconds() <= req_.ttft_target) &&
                       (req_.itl_target <= 0 || itl_max_ <= req_.itl_target);
      env_->metrics->SloFinished(req_.slo_class, met);
    }
  }
}

void RequestCall::FinishError(const grpc::Status& status, int64_t retry_after_ms, Outbox* out) {
  finished_ = true;
  out->close = true;
  out->status = status;
  out->retry_after_ms = retry_after_ms;
  out->cancel_stream = stream_;
  if (env_->metrics) {
    env_->metrics->E2e(Since(received_));
    env_->metrics->RequestFinished(CodeName(status.error_code()));
    // An admitted request that failed did not get its latency target.
    if (attempts_ > 0 && (req_.ttft_target > 0 || req_.itl_target > 0) &&
        status.error_code() != grpc::CANCELLED) {
      env_->metrics->SloFinished(req_.slo_class, false);
    }
  }
}

void RequestCall::Flush(Outbox& out) {
  std::shared_ptr<ResponseSink> sink;
  {
    std::lock_guard<std::mutex> l(mu_);
    sink = sink_;
    if (out.close) sink_.reset();
  }
  if (out.cancel_stream) out.cancel_stream->Cancel();
  if (!sink) return;
  for (auto& c : out.chunks) sink->Send(std::move(c));
  if (out.close) {
    sink->Close(out.status, out.retry_after_ms);
    if (env_->on_call_done) env_->on_call_done();
  }
}

}  // namespace spear::router
