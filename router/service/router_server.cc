#include "router/service/router_server.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/metrics_http.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "prometheus/exposer.h"
#include "router/balancing/balancer.h"
#include "router/metrics/router_metrics.h"
#include "router/service/generation_service.h"
#include "spdlog/spdlog.h"

namespace spear::router {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

struct RouterServer::Impl {
  RouterOptions opts;
  std::unique_ptr<ModelFrontend> frontend;
  std::unique_ptr<RouterMetrics> metrics;
  std::unique_ptr<prometheus::Exposer> exposer;
  std::unique_ptr<WorkerRegistry> registry;
  std::unique_ptr<Balancer> balancer;
  std::unique_ptr<AdmissionController> admission;
  CallEnv env;
  std::unique_ptr<GenerationService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  int metrics_port = -1;
  bool shut = false;
};

RouterServer::RouterServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RouterServer::~RouterServer() { Shutdown(); }
int RouterServer::port() const { return impl_->port; }
int RouterServer::metrics_port() const { return impl_->metrics_port; }

absl::StatusOr<std::unique_ptr<RouterServer>> RouterServer::Start(RouterOptions opts) {
  auto impl = std::make_unique<Impl>();
  impl->opts = opts;
  if (opts.port < 0 || opts.port > 65535) return absl::InvalidArgumentError("--port must be in [0, 65535]");
  if (opts.tls_cert.empty() != opts.tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!opts.tls_client_ca.empty() && opts.tls_cert.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  if (opts.max_attempts < 1) return absl::InvalidArgumentError("max attempts must be >= 1");
  auto balancer = MakeBalancer(opts.balancer);
  if (!balancer.ok()) return balancer.status();
  impl->balancer = std::move(*balancer);

  std::string token;
  if (!opts.auth_token_file.empty()) {
    auto t = ReadFile(opts.auth_token_file, "auth token file");
    if (!t.ok()) return t.status();
    token = std::string(absl::StripAsciiWhitespace(*t));
    if (token.empty()) return absl::InvalidArgumentError("the auth token file is empty");
  }

  auto frontend = ModelFrontend::Load(opts.frontend);
  if (!frontend.ok()) return frontend.status();
  impl->frontend = std::move(*frontend);
  impl->metrics = std::make_unique<RouterMetrics>(impl->frontend->name());

  auto registry = WorkerRegistry::Create(opts.registry, impl->metrics.get());
  if (!registry.ok()) return registry.status();
  impl->registry = std::move(*registry);
  impl->admission = std::make_unique<AdmissionController>(opts.admission, impl->registry.get(),
                                                          impl->balancer.get(), impl->metrics.get());
  AdmissionController* adm = impl->admission.get();
  impl->registry->SetOnChange([adm] { adm->Notify(); });

  impl->env.frontend = impl->frontend.get();
  impl->env.admission = impl->admission.get();
  impl->env.registry = impl->registry.get();
  impl->env.metrics = impl->metrics.get();
  impl->env.max_attempts = opts.max_attempts;
  impl->service = std::make_unique<GenerationService>(&impl->env, token);
  impl->env.on_call_done = [adm] { adm->Notify(); };

  if (opts.metrics_port >= 0) {
    try {
      impl->exposer = std::make_unique<prometheus::Exposer>(
          absl::StrCat(opts.host, ":", opts.metrics_port));
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("metrics endpoint on port ", opts.metrics_port, ": ", e.what()));
    }
    impl->exposer->RegisterCollectable(impl->metrics->registry());
    auto ports = impl->exposer->GetListeningPorts();
    impl->metrics_port = ports.empty() ? -1 : ports[0];
  }

  std::shared_ptr<grpc::ServerCredentials> creds;
  if (!opts.tls_cert.empty()) {
    auto cert = ReadFile(opts.tls_cert, "TLS certificate");
    if (!cert.ok()) return cert.status();
    auto key = ReadFile(opts.tls_key, "TLS key");
    if (!key.ok()) return key.status();
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({*key, *cert});
    if (!opts.tls_client_ca.empty()) {
      auto ca = ReadFile(opts.tls_client_ca, "TLS client CA");
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *ca;
      ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    creds = grpc::SslServerCredentials(ssl);
  } else {
    creds = grpc::InsecureServerCredentials();
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(opts.host, ":", opts.port), creds, &impl->port);
  builder.RegisterService(impl->service.get());
  builder.SetMaxReceiveMessageSize(8 << 20);
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", opts.host, ":", opts.port));
  }
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  impl->registry->Start();
  spdlog::info("router serving '{}' on port {} (metrics {}), {} balancer, {} workers{}",
               impl->frontend->name(), impl->port, impl->metrics_port, impl->balancer->name(),
               opts.registry.dns_name.empty() ? std::to_string(opts.registry.static_workers.size())
                                              : "dns:" + opts.registry.dns_name,
               opts.tls_cert.empty() ? "" : (opts.tls_client_ca.empty() ? ", TLS" : ", mutual TLS"));
  return std::unique_ptr<RouterServer>(new RouterServer(std::move(impl)));
}

void ExitAfterShutdown(int code) {
  spdlog::shutdown();
  std::fflush(nullptr);
  std::_Exit(code);
}

void RouterServer::Shutdown() {
  Impl& i = *impl_;
  if (i.shut) return;
  i.shut = true;
  spdlog::info("router draining: {} calls in flight", i.service->open_reactors());
  i.server->GetHealthCheckService()->SetServingStatus(false);
  i.service->StartDraining();
  // In-flight calls finish on their own and their responses are written out
  // to the last chunk: every reactor released, then 0.5 s more for the
  // clients to read them (OpenCalls::WaitDrained). Shutdown cancels what is
  // left at the deadline.
  const absl::Time deadline = absl::Now() + absl::Seconds(i.opts.drain_timeout_seconds);
  i.service->WaitDrained(absl::Milliseconds(500), deadline);
  i.admission->Close();
  i.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  i.server->Wait();
  i.registry->Stop();
  i.admission.reset();
  metrics_http::StopExposer(i.exposer, i.opts.host);
  spdlog::info("router stopped");
}

}  // namespace spear::router
