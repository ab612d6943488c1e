// spear-router as a library: the public gRPC server (Generation service,
// grpc.health.v1, reflection; optional TLS / mutual TLS and bearer-token
// auth), the worker registry, admission and the Prometheus endpoint.
// Used by router/main.cc and by `spear serve` (in-process).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "router/admission/admission.h"
#include "router/registry/worker_registry.h"
#include "router/service/model_frontend.h"

namespace spear::router {

struct RouterOptions {
  std::string host = "0.0.0.0";
  int port = 0;          // 0 = pick a free port
  int metrics_port = 0;  // 0 = pick; -1 = no metrics endpoint
  FrontendOptions frontend;
  RegistryOptions registry;
  AdmissionOptions admission;
  std::string balancer = "least-latency";
  int max_attempts = 3;  // worker attempts per request (failover before the first token)
  // TLS on the public API: cert + key enable it; client_ca requires and
  // verifies client certificates (mutual TLS).
  std::string tls_cert, tls_key, tls_client_ca;
  std::string auth_token_file;  // bearer token; empty = no auth
  double drain_timeout_seconds = 30;
};

class RouterServer {
 public:
  // Loads the tokenizer, starts the registry and both servers.
  static absl::StatusOr<std::unique_ptr<RouterServer>> Start(RouterOptions opts);
  ~RouterServer();

  int port() const;
  int metrics_port() const;
  // Stops accepting (health NOT_SERVING, new calls UNAVAILABLE), waits for
  // in-flight calls up to the drain timeout, then stops everything.
  void Shutdown();

  struct Impl;

 private:
  explicit RouterServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Ends the process with `code` after RouterServer::Shutdown() returned,
// without running destructors. By then no call is in flight, the server has
// shut down and waited and the registry has stopped; what is left is the
// teardown of gRPC objects, where Debian's libgrpc 1.51 can abort on one of
// its own executor threads (grpc_cq_internal_unref, seen in about 1 of 5
// router exits in tests/python: a core showed the main thread in
// ~RouterServer and a gRPC thread aborting). Flushes stdio and the logs.
[[noreturn]] void ExitAfterShutdown(int code);

}  // namespace spear::router
