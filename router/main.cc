// spear-router: the public gRPC front door of a SPEAR cluster. Prints
// `LISTENING grpc=<port> metrics=<port>` on stdout once serving; SIGTERM or
// SIGINT drains (stop accepting, finish in-flight calls) and exits 0. A bad
// command line exits 2, a start-up failure 1.
#include <signal.h>

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "router/service/router_server.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace {

struct FlagSpec {
  const char* name;
  const char* def;
  const char* help;
};

constexpr FlagSpec kFlags[] = {
    {"model", "", "model path or cache name (its tokenizer is used; required)"},
    {"model-name", "", "public model name (default: derived from --model)"},
    {"host", "0.0.0.0", "listen address"},
    {"port", "0", "gRPC port (0 = pick a free one)"},
    {"metrics-port", "0", "Prometheus /metrics port (0 = pick, -1 = off)"},
    {"workers", "", "static worker list host:port,host:port,..."},
    {"workers-dns", "", "DNS name:port resolving to one address per worker (re-resolved)"},
    {"balancer", "least-latency", "least-latency | prefix-affinity | round-robin"},
    {"max-queue", "64", "bound of the admission queue"},
    {"queue-timeout-ms", "5000", "longest a request waits in the admission queue"},
    {"max-worker-waiting", "8", "router-side cap on each worker's waiting requests"},
    {"min-ec-density", "0", "AUTO quality never sheds EC density below this"},
    {"slo-headroom", "0.8", "admit when predictions are within this fraction of the targets"},
    {"max-attempts", "3", "worker attempts per request (failover before the first token)"},
    {"default-max-tokens", "256", "max_tokens when a request gives 0"},
    {"max-tokens-limit", "4096", "largest max_tokens accepted"},
    {"max-context", "8192", "context length when no worker reported one"},
    {"slo-interactive-ttft-ms", "1000", "INTERACTIVE class TTFT target"},
    {"slo-interactive-itl-ms", "200", "INTERACTIVE class ITL target"},
    {"slo-standard-ttft-ms", "5000", "STANDARD class TTFT target"},
    {"slo-standard-itl-ms", "500", "STANDARD class ITL target"},
    {"health-interval-ms", "500", "grpc.health.v1 probe period per worker"},
    {"stats-interval-ms", "100", "Worker.Stats poll period per worker"},
    {"dns-interval-ms", "5000", "--workers-dns re-resolve period"},
    {"drain-timeout-s", "30", "SIGTERM: longest wait for in-flight calls"},
    {"tls-cert", "", "PEM certificate chain (enables TLS on the public API)"},
    {"tls-key", "", "PEM private key"},
    {"tls-client-ca", "", "PEM CA for client certificates (mutual TLS)"},
    {"auth-token-file", "", "file holding the bearer token clients must send"},
    {"help", "", "show flags"},
};

void Usage(FILE* out) {
  std::fputs("usage: spear-router --model M (--workers H:P,... | --workers-dns NAME:PORT) [flags]\n", out);
  for (const FlagSpec& f : kFlags) {
    std::fprintf(out, "  --%-26s %s%s%s\n", f.name, f.help, *f.def ? "  (default " : "",
                 *f.def ? (std::string(f.def) + ")").c_str() : "");
  }
}

int BadFlag(const std::string& msg) {
  std::fprintf(stderr, "spear-router: %s\n", msg.c_str());
  Usage(stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> v;
  for (const FlagSpec& f : kFlags) v[f.name] = f.def;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) return BadFlag(absl::StrCat("unexpected argument '", a, "'"));
    a = a.substr(2);
    std::string val;
    bool has_val = false;
    if (size_t eq = a.find('='); eq != std::string::npos) {
      val = a.substr(eq + 1), a = a.substr(0, eq), has_val = true;
    }
    if (!v.count(a)) return BadFlag(absl::StrCat("unknown flag --", a));
    if (a == "help") {
      Usage(stdout);
      return 0;
    }
    if (!has_val) {
      if (i + 1 >= argc) return BadFlag(absl::StrCat("--", a, " needs a value"));
      val = argv[++i];
    }
    v[a] = val;
  }
  auto num = [&](const char* name, double lo, double hi, double* out) -> bool {
    if (!absl::SimpleAtod(v[name], out) || *out < lo || *out > hi) {
      BadFlag(absl::StrCat("--", name, " must be a number in [", lo, ", ", hi, "], got '", v[name], "'"));
      return false;
    }
    return true;
  };
  spear::router::RouterOptions o;
  double headroom, port, mport, max_queue, qt, mww, minec, attempts, dmt, mtl, mctx, it, ii, st, si, hi, sti, di, dt;
  if (!num("port", 0, 65535, &port) || !num("metrics-port", -1, 65535, &mport) ||
      !num("max-queue", 0, 1e6, &max_queue) || !num("queue-timeout-ms", 0, 3.6e6, &qt) ||
      !num("max-worker-waiting", 1, 1e6, &mww) || !num("min-ec-density", 0, 1, &minec) || !num("slo-headroom", 0.05, 1, &headroom) ||
      !num("max-attempts", 1, 16, &attempts) || !num("default-max-tokens", 1, 1e6, &dmt) ||
      !num("max-tokens-limit", 1, 1e7, &mtl) || !num("max-context", 1, 1e7, &mctx) ||
      !num("slo-interactive-ttft-ms", 1, 3.6e6, &it) || !num("slo-interactive-itl-ms", 1, 3.6e6, &ii) ||
      !num("slo-standard-ttft-ms", 1, 3.6e6, &st) || !num("slo-standard-itl-ms", 1, 3.6e6, &si) ||
      !num("health-interval-ms", 10, 3.6e6, &hi) || !num("stats-interval-ms", 10, 3.6e6, &sti) ||
      !num("dns-interval-ms", 100, 3.6e6, &di) || !num("drain-timeout-s", 0, 3600, &dt)) {
    return 2;
  }
  if (v["model"].empty()) return BadFlag("--model is required");
  if (v["workers"].empty() == v["workers-dns"].empty()) {
    return BadFlag("give exactly one of --workers or --workers-dns");
  }
  if (dmt > mtl) return BadFlag("--default-max-tokens exceeds --max-tokens-limit");
  o.host = v["host"];
  o.port = static_cast<int>(port);
  o.metrics_port = static_cast<int>(mport);
  o.frontend.model = v["model"];
  o.frontend.model_name = v["model-name"];
  o.frontend.default_max_tokens = static_cast<int32_t>(dmt);
  o.frontend.max_tokens_limit = static_cast<int32_t>(mtl);
  o.frontend.max_context = static_cast<int32_t>(mctx);
  o.frontend.slo = {it / 1000, ii / 1000, st / 1000, si / 1000};
  for (absl::string_view w : absl::StrSplit(v["workers"], ',', absl::SkipWhitespace())) {
    o.registry.static_workers.emplace_back(w);
  }
  o.registry.dns_name = v["workers-dns"];
  o.registry.health_interval_seconds = hi / 1000;
  o.registry.stats_interval_seconds = sti / 1000;
  o.registry.dns_interval_seconds = di / 1000;
  o.admission.max_queue = static_cast<int>(max_queue);
  o.admission.queue_timeout_seconds = qt / 1000;
  o.admission.max_worker_waiting = static_cast<int>(mww);
  o.admission.min_ec_density = minec;
  o.admission.slo_headroom = headroom;
  o.balancer = v["balancer"];
  o.max_attempts = static_cast<int>(attempts);
  o.tls_cert = v["tls-cert"];
  o.tls_key = v["tls-key"];
  o.tls_client_ca = v["tls-client-ca"];
  o.auth_token_file = v["auth-token-file"];
  o.drain_timeout_seconds = dt;
  for (const std::string& w : o.registry.static_workers) {
    if (absl::Status s = spear::router::CheckHostPort(w); !s.ok()) return BadFlag(std::string(s.message()));
  }
  if (!o.registry.dns_name.empty()) {
    if (absl::Status s = spear::router::CheckHostPort(o.registry.dns_name); !s.ok()) {
      return BadFlag(std::string(s.message()));
    }
  }
  if (o.tls_cert.empty() != o.tls_key.empty()) return BadFlag("--tls-cert and --tls-key go together");
  if (!o.tls_client_ca.empty() && o.tls_cert.empty()) return BadFlag("--tls-client-ca needs --tls-cert");
  for (const char* b : {"least-latency", "prefix-affinity", "round-robin"}) {
    if (o.balancer == b) goto balancer_ok;
  }
  return BadFlag(absl::StrCat("unknown --balancer '", o.balancer, "'"));
balancer_ok:

  // Block the stop signals before any thread exists; main waits for them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  // stdout carries only the LISTENING line; logs go to stderr.
  spdlog::set_default_logger(spdlog::stderr_color_mt("spear-router"));
  auto server = spear::router::RouterServer::Start(o);
  if (!server.ok()) {
    std::fprintf(stderr, "spear-router: %s\n", server.status().ToString().c_str());
    return server.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::printf("LISTENING grpc=%d metrics=%d\n", (*server)->port(), (*server)->metrics_port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&sigs, &sig);
  spdlog::info("spear-router: signal {}, draining", sig);
  (*server)->Shutdown();
  spear::router::ExitAfterShutdown(0);
}
