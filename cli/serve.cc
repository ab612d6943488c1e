// spear serve: a local cluster in one command. Workers are child processes
// (spear-worker, port 0; their LISTENING lines give the ports); the router
// runs in this process. SIGTERM/SIGINT: the router drains, then each worker
// gets SIGTERM (and drains itself), then exit 0.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/serve.h"
#include "router/balancing/balancer.h"
#include "router/service/router_server.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#include "worker/engine/engine_factory.h"
#include "worker/model/model_cache.h"

extern char** environ;

namespace spear::cli {
namespace {
namespace fs = std::filesystem;

volatile sig_atomic_t g_stop_signal = 0;

void OnStopSignal(int sig) { g_stop_signal = sig; }

void InstallStopHandler() {
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

struct Child {
  pid_t pid = -1;
  int grpc_port = 0;
  int metrics_port = 0;
};

std::string DefaultWorkerBinary() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    // build/cli/spear -> build/worker/spear-worker
    const fs::path p = self.parent_path().parent_path() / "worker" / "spear-worker";
    if (fs::exists(p)) return p.string();
  }
  return "spear-worker";  // from $PATH
}

// Spawns `argv` with stdout to a pipe and reads its LISTENING line.
absl::StatusOr<Child> SpawnWorker(const std::vector<std::string>& argv, double timeout_s) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);  // Ctrl-C goes to us; we forward it
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  Child c;
  const int rc = posix_spawnp(&c.pid, cargv[0], &fa, &attr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    return absl::NotFoundError(absl::StrCat("cannot start ", argv[0], ": ", strerror(rc)));
  }
  std::string line;
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  while (line.find('\n') == std::string::npos) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{fds[0], POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
    char buf[256];
    const ssize_t n = read(fds[0], buf, sizeof(buf));
    if (n <= 0) break;
    line.append(buf, static_cast<size_t>(n));
  }
  close(fds[0]);  // the worker prints nothing else on stdout
  if (std::sscanf(line.c_str(), "LISTENING grpc=%d metrics=%d", &c.grpc_port, &c.metrics_port) != 2) {
    kill(c.pid, SIGKILL);
    waitpid(c.pid, nullptr, 0);
    return absl::UnavailableError(absl::StrCat(argv[0], " did not print its LISTENING line (got '",
                                               line.substr(0, line.find('\n')), "')"));
  }
  return c;
}

// SIGTERM, then SIGKILL after `grace_s`.
void StopChild(Child& c, double grace_s) {
  if (c.pid <= 0) return;
  kill(c.pid, SIGTERM);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000));
  int status = 0;
  while (std::chrono::steady_clock::now() < until) {
    if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
      c.pid = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::fprintf(stderr, "spear serve: worker %d did not stop in %.0f s; killing it\n", c.pid, grace_s);
  kill(c.pid, SIGKILL);
  waitpid(c.pid, &status, 0);
  c.pid = -1;
}

}  // namespace

int CmdServe(const std::vector<std::string>& args) {
  Flags f("serve");
  f.Declare("model", "", "model path or cache name (e.g. a .spear directory)")
      .Declare("port", "0", "public gRPC port of the router (0 = pick a free one)")
      .Declare("metrics-port", "0", "router /metrics port (0 = pick)")
      .Declare("host", "127.0.0.1", "listen address of the router (workers always use 127.0.0.1)")
      .Declare("workers", "2", "spear-worker processes to start")
      .Declare("device", "cpu", "workers' backend: cpu | cuda | auto (cuda when built with CUDA and a GPU is present; all workers share GPU 0)")
      .Declare("threads", "0", "CPU threads per worker (0 = cores / workers)")
      .Declare("kv-tokens", "16384", "KV cache capacity per worker, in tokens")
      .Declare("max-batch-tokens", "512", "tokens per engine iteration per worker")
      .Declare("max-waiting", "64", "bound of each worker's waiting queue")
      .Declare("itl-slo-ms", "0", "worker scheduler ITL target (0 = worker default)")
      .Declare("balancer", "least-latency", "least-latency | prefix-affinity | round-robin")
      .Declare("max-queue", "64", "router admission queue bound")
      .Declare("queue-timeout-ms", "5000", "longest wait in the router queue")
      .Declare("auth-token-file", "", "bearer token required on the public API")
      .Declare("tls-cert", "", "PEM certificate (TLS on the public API)")
      .Declare("tls-key", "", "PEM key")
      .Declare("tls-client-ca", "", "PEM CA for client certificates (mutual TLS)")
      .Declare("worker-binary", "", "path of spear-worker (default: beside this build, then $PATH)")
      .Declare("start-timeout-s", "300", "longest wait for a worker to load the model")
      .DeclareBool("help", "show flags");
  if (absl::Status s = f.Parse(args); !s.ok()) return Fail("serve", s, true);
  if (f.Bool("help")) return std::printf("%s", f.Usage().c_str()), 0;
  if (f.Str("model").empty()) return Fail("serve", absl::InvalidArgumentError("--model is required"), true);
  auto port = f.Int("port", 0, 65535);
  auto mport = f.Int("metrics-port", -1, 65535);
  auto nworkers = f.Int("workers", 1, 64);
  auto threads = f.Int("threads", 0, 1024);
  auto kv = f.Int("kv-tokens", 16, int64_t{1} << 30);
  auto mbt = f.Int("max-batch-tokens", 1, 1 << 20);
  auto mw = f.Int("max-waiting", 1, 1 << 20);
  auto itl = f.Double("itl-slo-ms", 0, 1e6);
  auto mq = f.Int("max-queue", 0, 1 << 20);
  auto qt = f.Double("queue-timeout-ms", 0, 3.6e6);
  auto st = f.Double("start-timeout-s", 1, 3600);
  for (const absl::Status& s : {port.status(), mport.status(), nworkers.status(), threads.status(),
                                kv.status(), mbt.status(), mw.status(), itl.status(), mq.status(),
                                qt.status(), st.status()}) {
    if (!s.ok()) return Fail("serve", s, true);
  }
  auto device = engine::ParseDevice(f.Str("device"));
  if (!device.ok()) {
    return Fail("serve", absl::InvalidArgumentError(absl::StrCat("--", device.status().message())),
                true);
  }
  // --device cuda: fail here, before any worker starts, when this build or
  // machine has no CUDA (each worker would fail the same way).
  if (*device == engine::Device::kCuda) {
    if (absl::Status s = engine::CudaUsable(); !s.ok()) return Fail("serve", s);
  }
  auto model_path = model::ResolveModel(f.Str("model"));
  if (!model_path.ok()) return Fail("serve", model_path.status());

  router::RouterOptions ro;
  ro.host = f.Str("host");
  ro.port = static_cast<int>(*port);
  ro.metrics_port = static_cast<int>(*mport);
  // Router and workers get the model as given, so both derive the same
  // `model` label from it.
  ro.frontend.model = f.Str("model");
  ro.balancer = f.Str("balancer");
  ro.admission.max_queue = static_cast<int>(*mq);
  ro.admission.queue_timeout_seconds = *qt / 1000;
  ro.tls_cert = f.Str("tls-cert");
  ro.tls_key = f.Str("tls-key");
  ro.tls_client_ca = f.Str("tls-client-ca");
  ro.auth_token_file = f.Str("auth-token-file");
  if (ro.tls_cert.empty() != ro.tls_key.empty()) {
    return Fail("serve", absl::InvalidArgumentError("--tls-cert and --tls-key go together"), true);
  }
  if (auto b = router::MakeBalancer(ro.balancer); !b.ok()) return Fail("serve", b.status(), true);

  // Stop signals set a flag that the main loop polls. (A handler rather than
  // sigwait: libraries may have started threads before this point, and a
  // signal delivered to one of them must not take the default action.)
  InstallStopHandler();
  // stdout carries only the LISTENING line; logs go to stderr.
  spdlog::set_default_logger(spdlog::stderr_color_mt("spear-serve"));

  const std::string worker_bin = f.Has("worker-binary") ? f.Str("worker-binary") : DefaultWorkerBinary();
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t per_worker = *threads > 0 ? *threads : std::max<int64_t>(1, cores / *nworkers);
  std::vector<Child> children;
  auto stop_all = [&] {
    for (Child& c : children) kill(c.pid, SIGTERM);
    for (Child& c : children) StopChild(c, 30);
  };
  for (int64_t i = 0; i < *nworkers; ++i) {
    std::vector<std::string> argv = {worker_bin, "--model", f.Str("model"), "--host", "127.0.0.1",
                                     "--port", "0", "--metrics-port", "0",
                                     "--device", f.Str("device"),
                                     "--threads", std::to_string(per_worker),
                                     "--kv-tokens", std::to_string(*kv),
                                     "--max-batch-tokens", std::to_string(*mbt),
                                     "--max-waiting", std::to_string(*mw),
                                     "--worker-id", absl::StrCat("worker-", i)};
    if (*itl > 0) argv.insert(argv.end(), {"--itl-slo-ms", absl::StrCat(*itl)});
    auto c = SpawnWorker(argv, *st);
    if (!c.ok()) {
      stop_all();
      return Fail("serve", c.status());
    }
    std::fprintf(stderr, "spear serve: worker-%lld pid %d grpc=%d metrics=%d\n",
                 static_cast<long long>(i), c->pid, c->grpc_port, c->metrics_port);
    children.push_back(*c);
    ro.registry.static_workers.push_back(absl::StrCat("127.0.0.1:", c->grpc_port));
  }
  auto server = router::RouterServer::Start(ro);
  if (!server.ok()) {
    stop_all();
    return Fail("serve", server.status());
  }
  std::vector<std::string> wm;
  for (const Child& c : children) wm.push_back(std::to_string(c.metrics_port));
  std::printf("LISTENING grpc=%d metrics=%d worker_metrics=%s\n", (*server)->port(),
              (*server)->metrics_port(), absl::StrJoin(wm, ",").c_str());
  std::fflush(stdout);

  // Wait for a stop signal; report workers that exit on their own (the
  // router takes them out of rotation through its health checks).
  while (g_stop_signal == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    for (Child& c : children) {
      int status = 0;
      if (c.pid > 0 && waitpid(c.pid, &status, WNOHANG) == c.pid) {
        std::fprintf(stderr, "spear serve: worker pid %d exited (%s %d)\n", c.pid,
                     WIFSIGNALED(status) ? "signal" : "status",
                     WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
        c.pid = -1;
      }
    }
  }
  std::fprintf(stderr, "spear serve: signal %d, draining\n", static_cast<int>(g_stop_signal));
  (*server)->Shutdown();  // drained; destroyed at exit (see ExitAfterShutdown)
  for (Child& c : children) {
    if (c.pid > 0) kill(c.pid, SIGTERM);
  }
  for (Child& c : children) StopChild(c, 30);
  std::fprintf(stderr, "spear serve: stopped\n");
  router::ExitAfterShutdown(0);
}

}  // namespace spear::cli
