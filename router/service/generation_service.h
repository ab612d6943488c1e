// The public spear.v1.Generation service (gRPC callback API): Generate
// (unary reactor), GenerateStream (ServerWriteReactor), Tokenize,
// ListModels. Bearer-token auth (when configured) is checked per call;
// while the router drains, new calls get UNAVAILABLE.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "common/open_calls.h"
#include "router/service/model_frontend.h"
#include "router/service/request_call.h"
#include "spear/v1/generation.grpc.pb.h"

namespace spear::router {

class GenerationService final : public spear::v1::Generation::CallbackService {
 public:
  // `auth_token` empty = no auth. `env` outlives the service.
  GenerationService(const CallEnv* env, std::string auth_token);

  void StartDraining() { draining_.store(true); }
  // Generate / GenerateStream calls whose reactor gRPC has not released yet
  // (OnDone): a closed call can still have chunks queued for the client, so
  // the drain waits for them (common/open_calls.h) before it shuts the
  // server down.
  int open_reactors() const { return open_->count(); }
  bool WaitDrained(absl::Duration linger, absl::Time deadline) const {
    return open_->WaitDrained(linger, deadline);
  }

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* ctx,
                                     const spear::v1::GenerateRequest* req,
                                     spear::v1::GenerateResponse* resp) override;
  grpc::ServerWriteReactor<spear::v1::GenerateStreamResponse>* GenerateStream(
      grpc::CallbackServerContext* ctx, const spear::v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const spear::v1::TokenizeRequest* req,
                                     spear::v1::TokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const spear::v1::ListModelsRequest* req,
                                       spear::v1::ListModelsResponse* resp) override;

 private:
  // Auth and draining; OK when the call may proceed.
  grpc::Status Gate(grpc::CallbackServerContext* ctx) const;
  // Validates and resolves a generate request against the workers' facts.
  absl::StatusOr<PreparedRequest> Prepare(const spear::v1::GenerateRequest& req) const;
  void StartCall(grpc::CallbackServerContext* ctx, const spear::v1::GenerateRequest& req,
                 const std::shared_ptr<ResponseSink>& sink,
                 std::shared_ptr<RequestCall>* call_out);

  const CallEnv* env_;
  const std::string auth_token_;
  std::atomic<bool> draining_{false};
  std::shared_ptr<OpenCalls> open_ = std::make_shared<OpenCalls>();
};

}  // namespace spear::router
