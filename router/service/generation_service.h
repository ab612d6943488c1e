// The public spear.v1.Generation service (gRPC callback API): Generate
// (unary reactor), GenerateStream (ServerWriteReactor), Tokenize,
// ListModels. Bearer-token auth (when configured) is checked per call;
// while the router drains, new calls get UNAVAILABLE.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

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
  // (OnDone): a closed call can still have chunks queued for the client. A
  // drain waits for 0 before it shuts the server down and the process
  // exits, so that no stream loses its tail.
  int open_reactors() const { return open_->count.load(); }
  // When the last of them was released (steady clock; its epoch if none
  // was): gRPC releases a call once its last bytes are handed to the
  // socket, not once the client has read them, so the drain lingers a
  // moment after this before the process can close the connection.
  std::chrono::steady_clock::time_point last_release() const {
    return std::chrono::steady_clock::time_point(
        std::chrono::steady_clock::duration(open_->last_release.load()));
  }

  // Shared with the reactors (they can outlive a Shutdown deadline).
  struct OpenReactors {
    std::atomic<int> count{0};
    std::atomic<std::chrono::steady_clock::rep> last_release{0};
    void Opened() { count.fetch_add(1); }
    void Released() {
      last_release.store(std::chrono::steady_clock::now().time_since_epoch().count());
      count.fetch_sub(1);
    }
  };

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
  std::shared_ptr<OpenReactors> open_ = std::make_shared<OpenReactors>();
};

}  // namespace spear::router
