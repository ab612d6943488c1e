// A fake spear.v1.Worker for router unit tests (tests only): echoes the
// prompt's tokens back one per event with a delay, with switches for the
// failure modes the router must handle. Serves grpc.health.v1 too.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "spear/v1/worker.grpc.pb.h"

namespace spear::testing {

class FakeWorker final : public spear::v1::Worker::Service {
 public:
  // Behaviour switches (set before or during a test).
  std::atomic<int> token_delay_ms{5};
  std::atomic<bool> fail_before_first{false};    // Execute -> UNAVAILABLE at once
  std::atomic<int> fail_after_tokens{-1};        // >= 0: UNAVAILABLE after N tokens
  std::atomic<bool> resource_exhausted{false};
  std::atomic<int> waiting{0};
  std::atomic<double> iteration_seconds{0.01};   // flat latency table value (full EC)
  std::atomic<bool> draining{false};
  std::atomic<int> executes{0};
  std::atomic<int> cancelled{0};
  std::atomic<int> active{0};
  std::mutex mu;
  std::vector<spear::v1::ExecuteRequest> requests;  // guarded by mu

  explicit FakeWorker(std::string id) : id_(std::move(id)) {}

  void Start() {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(this);
    server_ = b.BuildAndStart();
    server_->GetHealthCheckService()->SetServingStatus(true);
  }
  void Stop() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    server_.reset();
  }
  ~FakeWorker() override { Stop(); }
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  grpc::Status Execute(grpc::ServerContext* ctx, const spear::v1::ExecuteRequest* req,
                       grpc::ServerWriter<spear::v1::ExecuteEvent>* w) override {
    executes++;
    {
      std::lock_guard<std::mutex> l(mu);
      requests.push_back(*req);
    }
    if (fail_before_first) return grpc::Status(grpc::UNAVAILABLE, "fake: down");
    if (resource_exhausted) return grpc::Status(grpc::RESOURCE_EXHAUSTED, "fake: full");
    active++;
    struct Dec {
      std::atomic<int>* a;
      ~Dec() { (*a)--; }
    } dec{&active};
    spear::v1::ExecuteEvent ev;
    ev.mutable_accepted()->set_queue_seconds(0.001);
    w->Write(ev);
    const int n = req->sampling().max_tokens();
    for (int i = 0; i < n; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(token_delay_ms.load()));
      if (ctx->IsCancelled()) {
        cancelled++;
        return grpc::Status(grpc::CANCELLED, "cancelled");
      }
      if (fail_after_tokens.load() >= 0 && i == fail_after_tokens.load()) {
        return grpc::Status(grpc::UNAVAILABLE, "fake: crashed mid-stream");
      }
      spear::v1::ExecuteEvent t;
      t.mutable_tokens()->add_ids(req->prompt_tokens(i % req->prompt_tokens_size()));
      t.mutable_tokens()->set_ec_density(req->max_ec_density());
      if (!w->Write(t)) {
        cancelled++;
        return grpc::Status(grpc::CANCELLED, "client gone");
      }
    }
    spear::v1::ExecuteEvent f;
    f.mutable_finished()->set_finish_reason(spear::v1::FINISH_REASON_LENGTH);
    f.mutable_finished()->mutable_usage()->set_prompt_tokens(req->prompt_tokens_size());
    f.mutable_finished()->mutable_usage()->set_completion_tokens(n);
    f.mutable_finished()->set_ec_density(req->max_ec_density());
    w->Write(f);
    return grpc::Status::OK;
  }

  grpc::Status Cancel(grpc::ServerContext*, const spear::v1::CancelRequest*,
                      spear::v1::CancelResponse* r) override {
    r->set_found(false);
    return grpc::Status::OK;
  }

  grpc::Status Stats(grpc::ServerContext*, const spear::v1::StatsRequest*,
                     spear::v1::StatsResponse* s) override {
    s->set_worker_id(id_);
    s->set_model("fake");
    s->set_waiting(waiting.load());
    s->set_running(active.load());
    s->set_max_batch_tokens(256);
    s->set_vocab_size(0);
    s->set_max_context(4096);
    s->set_kv_free_tokens(100000);
    s->set_draining(draining.load());
    s->set_architecture("llama");
    s->set_quantization("fake");
    const double t = iteration_seconds.load();
    for (int n : {1, 256}) {
      s->mutable_latency()->add_tokens(n);
      s->mutable_latency()->add_seconds_no_ec(t * 0.5);
      s->mutable_latency()->add_seconds_full_ec(t);
    }
    return grpc::Status::OK;
  }

  grpc::Status Drain(grpc::ServerContext*, const spear::v1::DrainRequest*,
                     spear::v1::DrainResponse*) override {
    draining = true;
    return grpc::Status::OK;
  }

 private:
  std::string id_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace spear::testing
