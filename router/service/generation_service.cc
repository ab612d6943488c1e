#include "router/service/generation_service.h"

#include <deque>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "router/metrics/router_metrics.h"

namespace spear::router {
namespace {

using spear::v1::GenerateStreamResponse;

// Streams chunks; one write in flight at a time, the rest queued.
class StreamReactor : public grpc::ServerWriteReactor<GenerateStreamResponse>,
                      public ResponseSink {
 public:
  StreamReactor(grpc::CallbackServerContext* ctx,
                std::shared_ptr<OpenCalls> open)
      : ctx_(ctx), open_(std::move(open)) {
    open_->Opened();
  }

  void Bind(std::shared_ptr<StreamReactor> self, std::shared_ptr<RequestCall> call) {
    std::lock_guard<std::mutex> l(mu_);
    self_ = std::move(self);
    call_ = std::move(call);
  }

  void Send(GenerateStreamResponse chunk) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (closed_) return;
      queue_.push_back(std::move(chunk));
    }
    Pump();
  }

  void Close(const grpc::Status& status, int64_t retry_after_ms) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (closed_) return;
      closed_ = true;
      status_ = status;
      if (retry_after_ms > 0) {
        ctx_->AddTrailingMetadata("retry-after-ms", std::to_string(retry_after_ms));
      }
    }
    Pump();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      writing_ = false;
      if (!ok) {  // the client is gone; stop writing
        queue_.clear();
        if (!closed_) {
          closed_ = true;
          status_ = grpc::Status(grpc::CANCELLED, "the client went away");
        }
      }
    }
    Pump();
  }

  void OnCancel() override {
    std::shared_ptr<RequestCall> call;
    {
      std::lock_guard<std::mutex> l(mu_);
      call = call_;
    }
    if (call) call->ClientCancelled();
  }

  void OnDone() override {
    std::shared_ptr<StreamReactor> keep;
    {
      std::lock_guard<std::mutex> l(mu_);
      call_.reset();
      keep.swap(self_);
    }
    open_->Released();
  }

 private:
  // Starts the next write, or Finish once closed and drained. Never calls
  // into gRPC under mu_.
  void Pump() {
    enum { kNone, kWrite, kFinish } action = kNone;
    grpc::Status st;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (writing_ || finished_) return;
      if (!queue_.empty()) {
        current_ = std::move(queue_.front());
        queue_.pop_front();
        writing_ = true;
        action = kWrite;
      } else if (closed_) {
        finished_ = true;
        st = status_;
        action = kFinish;
      }
    }
    if (action == kWrite) StartWrite(&current_);
    if (action == kFinish) Finish(st);
  }

  grpc::CallbackServerContext* ctx_;
  std::mutex mu_;
  std::deque<GenerateStreamResponse> queue_;
  GenerateStreamResponse current_;
  bool writing_ = false, closed_ = false, finished_ = false;
  grpc::Status status_;
  std::shared_ptr<StreamReactor> self_;
  std::shared_ptr<RequestCall> call_;
  std::shared_ptr<OpenCalls> open_;
};

// Accumulates chunks into one GenerateResponse.
class UnaryReactor : public grpc::ServerUnaryReactor, public ResponseSink {
 public:
  UnaryReactor(grpc::CallbackServerContext* ctx, spear::v1::GenerateResponse* resp,
               std::string model, std::shared_ptr<OpenCalls> open)
      : ctx_(ctx), resp_(resp), open_(std::move(open)) {
    resp_->set_model(std::move(model));
    open_->Opened();
  }
  void Bind(std::shared_ptr<UnaryReactor> self, std::shared_ptr<RequestCall> call) {
    std::lock_guard<std::mutex> l(mu_);
    self_ = std::move(self);
    call_ = std::move(call);
  }
  void Send(GenerateStreamResponse c) override {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_) return;
    resp_->set_request_id(c.request_id());
    resp_->mutable_text()->append(c.text());
    for (int32_t id : c.token_ids()) resp_->add_token_ids(id);
    if (c.finish_reason() != spear::v1::FINISH_REASON_UNSPECIFIED) {
      resp_->set_finish_reason(c.finish_reason());
      *resp_->mutable_usage() = c.usage();
      *resp_->mutable_timings() = c.timings();
      resp_->set_ec_density(c.ec_density());
      resp_->set_worker(c.worker());
    }
  }
  void Close(const grpc::Status& status, int64_t retry_after_ms) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (closed_) return;
      closed_ = true;
      if (retry_after_ms > 0) {
        ctx_->AddTrailingMetadata("retry-after-ms", std::to_string(retry_after_ms));
      }
    }
    Finish(status);
  }
  void OnCancel() override {
    std::shared_ptr<RequestCall> call;
    {
      std::lock_guard<std::mutex> l(mu_);
      call = call_;
    }
    if (call) call->ClientCancelled();
  }
  void OnDone() override {
    std::shared_ptr<UnaryReactor> keep;
    {
      std::lock_guard<std::mutex> l(mu_);
      call_.reset();
      keep.swap(self_);
    }
    open_->Released();
  }

 private:
  grpc::CallbackServerContext* ctx_;
  spear::v1::GenerateResponse* resp_;
  std::mutex mu_;
  bool closed_ = false;
  std::shared_ptr<UnaryReactor> self_;
  std::shared_ptr<RequestCall> call_;
  std::shared_ptr<OpenCalls> open_;
};

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

}  // namespace

GenerationService::GenerationService(const CallEnv* env, std::string auth_token)
    : env_(env), auth_token_(std::move(auth_token)) {}

grpc::Status GenerationService::Gate(grpc::CallbackServerContext* ctx) const {
  if (!auth_token_.empty()) {
    const auto& md = ctx->client_metadata();
    auto it = md.find("authorization");
    const std::string want = "Bearer " + auth_token_;
    if (it == md.end()) {
      return grpc::Status(grpc::UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata");
    }
    if (!ConstantTimeEquals(std::string_view(it->second.data(), it->second.size()), want)) {
      return grpc::Status(grpc::UNAUTHENTICATED, "wrong bearer token");
    }
  }
  if (draining_.load()) return grpc::Status(grpc::UNAVAILABLE, "the router is shutting down");
  return grpc::Status::OK;
}

absl::StatusOr<PreparedRequest> GenerationService::Prepare(
    const spear::v1::GenerateRequest& req) const {
  int64_t vocab = 0, max_ctx = 0;
  std::string worker_model;
  for (const auto& w : env_->registry->Workers()) {
    if (!w->admissible()) continue;
    const auto s = w->stats();
    vocab = s.vocab_size();
    max_ctx = s.max_context();
    worker_model = s.model();
    break;
  }
  if (absl::Status s = env_->frontend->CheckModel(req.model(), worker_model); !s.ok()) return s;
  return env_->frontend->Prepare(req, vocab, max_ctx);
}

void GenerationService::StartCall(grpc::CallbackServerContext* ctx,
                                  const spear::v1::GenerateRequest& req,
                                  const std::shared_ptr<ResponseSink>& sink,
                                  std::shared_ptr<RequestCall>* call_out) {
  const auto received = RequestCall::Clock::now();
  grpc::Status gate = Gate(ctx);
  absl::StatusOr<PreparedRequest> prepared = absl::InternalError("unset");
  if (gate.ok()) {
    prepared = Prepare(req);
    if (!prepared.ok()) gate = ToGrpc(prepared.status());
  }
  if (!gate.ok()) {
    if (env_->metrics) env_->metrics->RequestFinished(CodeName(gate.error_code()));
    sink->Close(gate, 0);
    return;
  }
  auto deadline = ctx->deadline();
  if (deadline > std::chrono::system_clock::now() + std::chrono::hours(24 * 365)) {
    deadline = std::chrono::system_clock::time_point::max();
  }
  auto call = std::make_shared<RequestCall>(env_, std::move(*prepared), sink, deadline, received);
  *call_out = call;
}

grpc::ServerUnaryReactor* GenerationService::Generate(grpc::CallbackServerContext* ctx,
                                                      const spear::v1::GenerateRequest* req,
                                                      spear::v1::GenerateResponse* resp) {
  auto r = std::make_shared<UnaryReactor>(ctx, resp, env_->frontend->name(), open_);
  std::shared_ptr<RequestCall> call;
  StartCall(ctx, *req, r, &call);
  r->Bind(r, call);
  if (call) call->Start();
  return r.get();
}

grpc::ServerWriteReactor<GenerateStreamResponse>* GenerationService::GenerateStream(
    grpc::CallbackServerContext* ctx, const spear::v1::GenerateRequest* req) {
  auto r = std::make_shared<StreamReactor>(ctx, open_);
  std::shared_ptr<RequestCall> call;
  StartCall(ctx, *req, r, &call);
  r->Bind(r, call);
  if (call) call->Start();
  return r.get();
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* ctx,
                                                      const spear::v1::TokenizeRequest* req,
                                                      spear::v1::TokenizeResponse* resp) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  grpc::Status gate = Gate(ctx);
  if (gate.ok()) {
    auto out = env_->frontend->Tokenize(*req);
    if (out.ok()) {
      *resp = std::move(*out);
    } else {
      gate = ToGrpc(out.status());
    }
  }
  r->Finish(gate);
  return r;
}

grpc::ServerUnaryReactor* GenerationService::ListModels(grpc::CallbackServerContext* ctx,
                                                        const spear::v1::ListModelsRequest*,
                                                        spear::v1::ListModelsResponse* resp) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  grpc::Status gate = Gate(ctx);
  if (gate.ok()) {
    spear::v1::ModelInfo* m = resp->add_models();
    m->set_name(env_->frontend->name());
    m->set_max_tokens_limit(env_->frontend->options().max_tokens_limit);
    m->set_max_context(env_->frontend->options().max_context);
    if (env_->frontend->tokenizer()) {
      m->set_vocab_size(static_cast<int32_t>(env_->frontend->tokenizer()->vocab_size()));
    }
    int healthy = 0;
    for (const auto& w : env_->registry->Workers()) {
      if (!w->admissible()) continue;
      const auto s = w->stats();
      if (healthy++ == 0) {
        m->set_architecture(s.architecture());
        m->set_quantization(s.quantization());
        if (s.vocab_size() > 0) m->set_vocab_size(s.vocab_size());
        if (s.max_context() > 0) m->set_max_context(s.max_context());
      }
    }
    m->set_healthy_workers(healthy);
  }
  r->Finish(gate);
  return r;
}

}  // namespace spear::router
