// spear-worker: hosts one engine behind the internal Worker gRPC API.
//
//   spear-worker --model smollm2-135m [--host 127.0.0.1] [--port 0]
//                [--metrics-port 0] [--device cpu|cuda|auto] [--threads N]
//                [--kv-tokens N] [--max-batch-tokens N] [--max-waiting N]
//                [--itl-slo-ms X] [--worker-id ID] [--tls-cert F --tls-key F]
//
// Start-up: load the model, build the engine on --device (logged, and
// exported as spear_worker_backend_info{backend}), profile the latency table
// (timed forward passes), start gRPC (+ health, reflection) and the
// Prometheus endpoint, then print exactly one line to stdout:
//   LISTENING grpc=<port> metrics=<port>
// SIGTERM / SIGINT: drain (new Execute calls get UNAVAILABLE, health turns
// NOT_SERVING, in-flight requests finish), then exit 0. Bad flags (e.g.
// --device gpu): exit 2. Start-up failures (model, ports, --device cuda
// without a CUDA backend in this build or without a GPU): exit 1, with
// the reason on stderr.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "cli/flags.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#include "worker/engine/engine_factory.h"
#include "worker/engine/engine_loop.h"
#include "worker/server/metrics.h"
#include "worker/server/model_host.h"
#include "worker/server/worker_service.h"

namespace {

using spear::cli::Flags;

int Usage(const std::string& msg, const Flags& f) {
  const bool has_usage = msg.find("usage:") != std::string::npos;
  std::fprintf(stderr, "spear-worker: %s\n%s", msg.c_str(), has_usage ? "" : f.Usage().c_str());
  return 2;
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

int Main(int argc, char** argv) {
  // Signals are taken by sigwait in this thread only: block them before
  // any other thread exists (gRPC, the pool, the loop inherit the mask).
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  // stdout carries only the LISTENING line; logs go to stderr.
  spdlog::set_default_logger(spdlog::stderr_color_mt("spear-worker"));

  Flags f("worker");
  f.Declare("model", "", "model: cache name, .spear dir, HF dir or .gguf")
      .Declare("host", "127.0.0.1", "address to listen on")
      .Declare("port", "0", "gRPC port (0 = any free port)")
      .Declare("metrics-port", "0", "Prometheus /metrics port (0 = any free port)")
      .Declare("device", "cpu", "cpu | cuda | auto (cuda when built with CUDA and a GPU is present)")
      .Declare("threads", "0", "compute threads (0 = all hardware threads)")
      .Declare("kv-tokens", "8192", "KV cache capacity in tokens")
      .Declare("block-size", "16", "KV block size in tokens")
      .Declare("max-batch-tokens", "512", "tokens per iteration across the batch")
      .Declare("max-waiting", "64", "bounded waiting queue (RESOURCE_EXHAUSTED beyond)")
      .Declare("max-running", "64", "sequences in the running batch at most")
      .Declare("itl-slo-ms", "0", "default inter-token latency target (0 = none)")
      .Declare("static-chunk", "0", "fixed prefill chunk instead of the adaptive one (0 = adaptive)")
      .Declare("profile-repeats", "1", "timed runs per latency-table point")
      .Declare("drain-timeout-s", "600", "longest a SIGTERM drain waits for in-flight work")
      .Declare("worker-id", "", "worker id for metrics and Stats (default host:port)")
      .Declare("tls-cert", "", "PEM server certificate (with --tls-key)")
      .Declare("tls-key", "", "PEM server private key (with --tls-cert)")
      .DeclareBool("no-prefix-cache", "disable prefix-hash KV reuse");
  std::vector<std::string> args(argv + 1, argv + argc);
  if (absl::Status s = f.Parse(args); !s.ok()) return Usage(std::string(s.message()), f);
  if (!f.positional().empty()) return Usage("unexpected argument " + f.positional()[0], f);
  if (f.Str("model").empty()) return Usage("--model is required", f);
  auto port = f.Int("port", 0, 65535);
  auto mport = f.Int("metrics-port", 0, 65535);
  auto threads = f.Int("threads", 0, 1024);
  auto kv = f.Int("kv-tokens", 16, int64_t{1} << 30);
  auto bs = f.Int("block-size", 1, 1024);
  auto mbt = f.Int("max-batch-tokens", 1, 1 << 20);
  auto mw = f.Int("max-waiting", 1, 1 << 20);
  auto mr = f.Int("max-running", 1, 1 << 20);
  auto slo = f.Double("itl-slo-ms", 0, 1e7);
  auto sc = f.Int("static-chunk", 0, 1 << 20);
  auto reps = f.Int("profile-repeats", 1, 100);
  auto dt = f.Double("drain-timeout-s", 0, 1e7);
  auto device = spear::engine::ParseDevice(f.Str("device"));
  if (!device.ok()) return Usage(absl::StrCat("--", device.status().message()), f);
  for (const absl::Status& s :
       {port.status(), mport.status(), threads.status(), kv.status(), bs.status(), mbt.status(),
        mw.status(), mr.status(), slo.status(), sc.status(), reps.status(), dt.status()}) {
    if (!s.ok()) return Usage(std::string(s.message()), f);
  }
  if (f.Str("tls-cert").empty() != f.Str("tls-key").empty()) {
    return Usage("--tls-cert and --tls-key go together", f);
  }
  std::string cert, key;
  if (!f.Str("tls-cert").empty() &&
      (!ReadFile(f.Str("tls-cert"), &cert) || !ReadFile(f.Str("tls-key"), &key))) {
    return Usage("cannot read --tls-cert or --tls-key", f);
  }
  const std::string host = f.Str("host");

  spear::server::HostOptions ho;
  ho.model = f.Str("model");
  ho.threads = static_cast<int>(*threads);
  ho.kv_tokens = *kv;
  ho.block_size = static_cast<int>(*bs);
  ho.max_batch_tokens = *mbt;
  ho.device = *device;
  auto host_or = spear::server::OpenModelHost(ho);
  if (!host_or.ok()) {
    std::fprintf(stderr, "spear-worker: %s\n", std::string(host_or.status().message()).c_str());
    return 1;
  }
  spear::server::ModelHost mh = std::move(*host_or);
  spdlog::info("model {} loaded in {:.2f} s ({}); {} EC units, values from {}", mh.name,
               mh.load_seconds, mh.quantization, mh.ec->num_units(), mh.ec->value_source());
  const spear::engine::ModelBackend& backend = mh.engine->backend();
  spdlog::info("engine backend {} (--device {}): {}", backend.name(), f.Str("device"),
               backend.Describe());

  std::string worker_id = f.Str("worker-id");
  spear::server::WorkerMetrics* metrics_ptr = nullptr;
  std::unique_ptr<spear::server::WorkerMetrics> metrics;

  spear::engine::SteadyClock clock;
  spear::engine::EngineLoopOptions lo;
  lo.scheduler.max_batch_tokens = *mbt;
  lo.scheduler.max_waiting = *mw;
  lo.scheduler.max_running = *mr;
  lo.scheduler.default_itl_slo = *slo / 1000.0;
  lo.scheduler.adaptive = *sc == 0;
  lo.scheduler.static_chunk = *sc == 0 ? *mbt : *sc;
  lo.prefix_caching = !f.Bool("no-prefix-cache");
  lo.profile.repeats = static_cast<int>(*reps);
  lo.profile.max_tokens = *mbt;

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!cert.empty()) {
    grpc::SslServerCredentialsOptions so;
    so.pem_key_cert_pairs.push_back({key, cert});
    creds = grpc::SslServerCredentials(so);
  }
  int bound_port = 0;
  builder.AddListeningPort(absl::StrCat(host, ":", *port), creds, &bound_port);
  builder.SetMaxReceiveMessageSize(64 << 20);

  // The loop reports to the metrics, which exist only once the worker id
  // (default host:<bound port>) is known: forward until then.
  struct Forward final : spear::engine::LoopObserver {
    spear::server::WorkerMetrics* m = nullptr;
    void OnIteration(const spear::engine::IterationStats& it,
                     const spear::engine::LoopSnapshot& s) override {
      if (m) m->OnIteration(it, s);
    }
    void OnFirstToken(double v) override {
      if (m) m->OnFirstToken(v);
    }
    void OnInterToken(double v) override {
      if (m) m->OnInterToken(v);
    }
    void OnRequestDone(const spear::engine::FinishInfo& i) override {
      if (m) m->OnRequestDone(i);
    }
    void OnIdle(const spear::engine::LoopSnapshot& s) override {
      if (m) m->OnIdle(s);
    }
  } forward;

  const double t_prof = clock.Now();
  auto loop_or = spear::engine::EngineLoop::Create(mh.engine.get(), mh.ec.get(), lo, &clock,
                                                   &forward);
  if (!loop_or.ok()) {
    std::fprintf(stderr, "spear-worker: %s\n", std::string(loop_or.status().message()).c_str());
    return 1;
  }
  std::unique_ptr<spear::engine::EngineLoop> loop = std::move(*loop_or);
  {
    auto p = loop->latency_points();
    spdlog::info("latency table profiled on {} in {:.2f} s: {} points, 1 token {:.2f} ms, {} "
                 "tokens {:.1f} ms (full EC)",
                 backend.name(), clock.Now() - t_prof, p.tokens.size(), p.seconds_full_ec.front() * 1e3,
                 p.tokens.back(), p.seconds_full_ec.back() * 1e3);
  }

  const spear::model::ModelConfig& c = mh.model->config;
  spear::server::WorkerInfo info;
  info.model = mh.name;
  info.architecture = c.architecture;
  info.quantization = mh.quantization;
  info.limits.vocab_size = c.vocab_size;
  info.limits.max_context = c.max_position;
  info.limits.kv_capacity_tokens = backend.num_blocks() * backend.block_size();
  info.limits.default_itl_slo = *slo / 1000.0;

  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<spear::server::WorkerService> service;
  auto set_health = [&server](bool serving) {
    if (server == nullptr || server->GetHealthCheckService() == nullptr) return;
    server->GetHealthCheckService()->SetServingStatus(serving);
  };
  // The default worker id is host:<bound port>, known only once the server
  // runs: the service starts with a provisional id, fixed before the first
  // request can be served (the loop is not started and the port not
  // announced until then).
  info.worker_id = worker_id.empty() ? absl::StrCat(host, ":", *port) : worker_id;
  service = std::make_unique<spear::server::WorkerService>(loop.get(), info, nullptr,
                                                            [&set_health] { set_health(false); });
  builder.RegisterService(service.get());
  server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    std::fprintf(stderr, "spear-worker: cannot listen on %s:%lld\n", host.c_str(),
                 static_cast<long long>(*port));
    return 1;
  }
  if (worker_id.empty()) worker_id = absl::StrCat(host, ":", bound_port);
  metrics = std::make_unique<spear::server::WorkerMetrics>(mh.name, worker_id, backend.name());
  metrics_ptr = metrics.get();
  auto metrics_port = metrics->Serve(host, static_cast<int>(*mport));
  if (!metrics_port.ok()) {
    std::fprintf(stderr, "spear-worker: %s\n",
                 std::string(metrics_port.status().message()).c_str());
    return 1;
  }
  service->SetIdentity(worker_id, metrics_ptr);
  forward.m = metrics_ptr;
  loop->Start();
  set_health(true);
  spdlog::info("worker {} serving {} on {} at {}:{} (metrics {})", worker_id, mh.name,
               backend.name(), host, bound_port, *metrics_port);
  std::printf("LISTENING grpc=%d metrics=%d\n", bound_port, *metrics_port);
  std::fflush(stdout);

  int sig = 0;
  sigwait(&sigs, &sig);
  spdlog::info("signal {}: draining", sig);
  loop->StartDrain();
  metrics->SetDraining(true);
  set_health(false);
  // Idle engine first, then every Execute stream written out and released
  // by gRPC (the last events of a long answer can still be queued when the
  // loop goes idle) and 0.5 s past the last release, for the clients to read
  // the tails (OpenCalls::WaitDrained), all within --drain-timeout-s; only
  // then the server.
  const absl::Time drain_end = absl::Now() + absl::Seconds(*dt);
  absl::Notification idle;
  loop->WhenIdle([&idle] { idle.Notify(); });
  if (!idle.WaitForNotificationWithDeadline(drain_end)) {
    spdlog::warn("drain timeout: stopping with requests in flight");
  } else if (!service->WaitDrained(absl::Milliseconds(500), drain_end)) {
    spdlog::warn("drain timeout: {} response streams still open", service->open_streams());
  }
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  loop->Stop();
  spdlog::info("drained: {} finished, {} cancelled; exiting", loop->finished_ok(),
               loop->finished_cancelled());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
