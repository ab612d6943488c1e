#include "router/registry/worker_registry.h"

#include <netdb.h>
#include <sys/socket.h>
#include <arpa/inet.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "router/metrics/router_metrics.h"
#include "spdlog/spdlog.h"

namespace spear::router {
namespace {

using Clock = std::chrono::steady_clock;

std::chrono::system_clock::time_point DeadlineIn(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
}

std::shared_ptr<grpc::Channel> MakeWorkerChannel(const std::string& address) {
  grpc::ChannelArguments args;
  // Notice a dead peer even when no packet would otherwise flow, and
  // reconnect quickly once it is back.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 2000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

absl::Status CheckHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not host:port"));
  }
  int port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port <= 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "': port must be in [1, 65535]"));
  }
  return absl::OkStatus();
}

// ---- WorkerHandle -----------------------------------------------------------

WorkerHandle::WorkerHandle(std::string address)
    : address_(std::move(address)),
      channel_(MakeWorkerChannel(address_)),
      stub_(spear::v1::Worker::NewStub(channel_)) {}

std::string WorkerHandle::name() const {
  std::lock_guard<std::mutex> l(mu_);
  return has_stats_ && !stats_.worker_id().empty() ? stats_.worker_id() : address_;
}
bool WorkerHandle::healthy() const {
  std::lock_guard<std::mutex> l(mu_);
  return health_ok_ && stats_ok_;
}
bool WorkerHandle::admissible() const {
  std::lock_guard<std::mutex> l(mu_);
  return health_ok_ && stats_ok_ && has_stats_ && !stats_.draining() && !removed_.load();
}
bool WorkerHandle::has_stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return has_stats_;
}
spear::v1::StatsResponse WorkerHandle::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_;
}
PendingLoad WorkerHandle::pending() const {
  std::lock_guard<std::mutex> l(mu_);
  return pending_;
}
int32_t WorkerHandle::inflight() const {
  std::lock_guard<std::mutex> l(mu_);
  return inflight_;
}
void WorkerHandle::AddDispatched(int64_t prompt_tokens) {
  std::lock_guard<std::mutex> l(mu_);
  pending_.requests += 1;
  pending_.prompt_tokens += prompt_tokens;
  inflight_ += 1;
}
void WorkerHandle::RequestDone() {
  std::lock_guard<std::mutex> l(mu_);
  inflight_ = std::max(0, inflight_ - 1);
}
void WorkerHandle::ObserveTtft(double predicted, double measured) {
  if (!(predicted > 0) || !(measured > 0)) return;
  constexpr double kAlpha = 0.2;
  std::lock_guard<std::mutex> l(mu_);
  const double r = std::clamp(measured / predicted, 0.5, 10.0);
  ttft_correction_ = std::clamp((1 - kAlpha) * ttft_correction_ + kAlpha * r, 0.5, 10.0);
}
double WorkerHandle::ttft_correction() const {
  std::lock_guard<std::mutex> l(mu_);
  return ttft_correction_;
}
void WorkerHandle::MarkFailed(const std::string& why) {
  std::lock_guard<std::mutex> l(mu_);
  if (health_ok_) spdlog::warn("worker {} out of rotation: {}", address_, why);
  health_ok_ = false;
}
void WorkerHandle::SetHealth(bool serving) {
  std::lock_guard<std::mutex> l(mu_);
  if (health_ok_ != serving) {
    spdlog::info("worker {} is {}", address_, serving ? "healthy" : "unhealthy");
  }
  health_ok_ = serving;
}
void WorkerHandle::SetStats(spear::v1::StatsResponse stats, PendingLoad at_request) {
  std::lock_guard<std::mutex> l(mu_);
  stats_ = std::move(stats);
  has_stats_ = true;
  stats_ok_ = true;
  // What was dispatched before the Stats request is now counted by the
  // worker itself; keep only what came after.
  pending_.requests = std::max(0, pending_.requests - at_request.requests);
  pending_.prompt_tokens = std::max<int64_t>(0, pending_.prompt_tokens - at_request.prompt_tokens);
}
void WorkerHandle::SetStatsFailed() {
  std::lock_guard<std::mutex> l(mu_);
  stats_ok_ = false;
}

// ---- WorkerRegistry ---------------------------------------------------------

absl::StatusOr<std::unique_ptr<WorkerRegistry>> WorkerRegistry::Create(RegistryOptions opts,
                                                                       RouterMetrics* metrics) {
  if (opts.static_workers.empty() == opts.dns_name.empty()) {
    return absl::InvalidArgumentError("give either a static worker list or a DNS name, not both");
  }
  for (const std::string& w : opts.static_workers) {
    if (absl::Status s = CheckHostPort(w); !s.ok()) return s;
  }
  if (!opts.dns_name.empty()) {
    if (absl::Status s = CheckHostPort(opts.dns_name); !s.ok()) return s;
  }
  if (opts.health_interval_seconds <= 0 || opts.stats_interval_seconds <= 0 ||
      opts.rpc_timeout_seconds <= 0 || opts.dns_interval_seconds <= 0) {
    return absl::InvalidArgumentError("registry intervals must be positive");
  }
  return std::unique_ptr<WorkerRegistry>(new WorkerRegistry(std::move(opts), metrics));
}

WorkerRegistry::WorkerRegistry(RegistryOptions opts, RouterMetrics* metrics)
    : opts_(std::move(opts)), metrics_(metrics) {
  std::set<std::string> seen;
  for (const std::string& w : opts_.static_workers) {
    if (seen.insert(w).second) workers_.push_back(std::make_shared<WorkerHandle>(w));
  }
}

WorkerRegistry::~WorkerRegistry() { Stop(); }

void WorkerRegistry::Start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] { Run(); });
}

void WorkerRegistry::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // Outstanding probes hold shared_ptrs to their handles and finish within
  // rpc_timeout; wait so no callback runs after the registry is gone.
  const auto until = Clock::now() + std::chrono::milliseconds(
                                        static_cast<int64_t>(opts_.rpc_timeout_seconds * 1000 + 500));
  for (;;) {
    bool busy = false;
    for (const auto& w : Workers()) busy |= w->health_in_flight.load() || w->stats_in_flight.load();
    if (!busy || Clock::now() > until) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::vector<std::shared_ptr<WorkerHandle>> WorkerRegistry::Workers() const {
  std::lock_guard<std::mutex> l(mu_);
  return workers_;
}

int WorkerRegistry::HealthyCount() const {
  int n = 0;
  for (const auto& w : Workers()) n += w->admissible() ? 1 : 0;
  return n;
}

void WorkerRegistry::SetOnChange(std::function<void()> fn) {
  std::lock_guard<std::mutex> l(mu_);
  on_change_ = std::move(fn);
}

bool WorkerRegistry::WaitForAdmissible(int n, double timeout_seconds) const {
  const auto until = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  while (Clock::now() < until) {
    if (HealthyCount() >= n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return HealthyCount() >= n;
}

void WorkerRegistry::Changed() {
  std::function<void()> fn;
  {
    std::lock_guard<std::mutex> l(mu_);
    fn = on_change_;
  }
  if (fn) fn();
}

void WorkerRegistry::Resolve() {
  const size_t colon = opts_.dns_name.rfind(':');
  const std::string host = opts_.dns_name.substr(0, colon);
  const std::string port = opts_.dns_name.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    spdlog::warn("resolving {}: {}", opts_.dns_name, gai_strerror(rc));
    return;  // keep the last known set
  }
  std::set<std::string> addrs;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (a->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, buf, sizeof(buf));
      addrs.insert(absl::StrCat(buf, ":", port));
    } else if (a->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, buf, sizeof(buf));
      addrs.insert(absl::StrCat("[", buf, "]:", port));
    }
  }
  freeaddrinfo(res);
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::shared_ptr<WorkerHandle>> next;
  for (auto& w : workers_) {
    if (addrs.count(w->address())) {
      next.push_back(w);
      addrs.erase(w->address());
    } else {
      spdlog::info("worker {} left {}", w->address(), opts_.dns_name);
      w->set_removed();
      if (metrics_ && w->has_stats()) metrics_->SetWorkerUp(w->name(), false);
    }
  }
  for (const std::string& a : addrs) {
    spdlog::info("worker {} joined via {}", a, opts_.dns_name);
    next.push_back(std::make_shared<WorkerHandle>(a));
  }
  workers_ = std::move(next);
}

void WorkerRegistry::Poll(bool health) {
  for (const auto& w : Workers()) {
    if (health && !w->health_in_flight.exchange(true)) {
      struct Call {
        grpc::ClientContext ctx;
        grpc::health::v1::HealthCheckRequest req;
        grpc::health::v1::HealthCheckResponse resp;
        std::unique_ptr<grpc::health::v1::Health::Stub> stub;
      };
      auto call = std::make_shared<Call>();
      call->ctx.set_deadline(DeadlineIn(opts_.rpc_timeout_seconds));
      call->stub = grpc::health::v1::Health::NewStub(w->channel());
      call->stub->async()->Check(&call->ctx, &call->req, &call->resp,
                                 [this, w, call](grpc::Status s) {
                                   const bool ok = s.ok() && call->resp.status() ==
                                       grpc::health::v1::HealthCheckResponse::SERVING;
                                   w->SetHealth(ok);
                                   // Series are labelled with the worker's own id, known
                                   // once Stats answered.
                                   if (metrics_ && w->has_stats()) {
                                     metrics_->SetWorkerUp(w->name(), w->admissible());
                                   }
                                   Changed();
                                   // Last: Stop() waits for this flag, and after
                                   // it nothing may touch the registry (Changed()
                                   // reaches the admission controller, which the
                                   // router destroys right after Stop()).
                                   w->health_in_flight.store(false);
                                 });
    }
    if (!w->stats_in_flight.exchange(true)) {
      struct Call {
        grpc::ClientContext ctx;
        spear::v1::StatsRequest req;
        spear::v1::StatsResponse resp;
        PendingLoad at_request;
      };
      auto call = std::make_shared<Call>();
      call->ctx.set_deadline(DeadlineIn(opts_.rpc_timeout_seconds));
      call->at_request = w->pending();
      w->stub()->async()->Stats(&call->ctx, &call->req, &call->resp,
                                [this, w, call](grpc::Status s) {
                                  if (s.ok()) {
                                    w->SetStats(std::move(call->resp), call->at_request);
                                  } else {
                                    w->SetStatsFailed();
                                  }
                                  if (metrics_ && w->has_stats()) {
                                    metrics_->SetWorkerUp(w->name(), w->admissible());
                                    if (s.ok()) {
                                      metrics_->SetWorkerPredictedTtft(
                                          w->name(), Predict(w->stats(), w->pending(), 0, 1.0)
                                                         .ttft_seconds);
                                    }
                                  }
                                  Changed();
                                  w->stats_in_flight.store(false);  // last (see above)
                                });
    }
  }
}

void WorkerRegistry::Run() {
  auto next_health = Clock::now();
  auto next_dns = Clock::now();
  const auto stats_period = std::chrono::microseconds(static_cast<int64_t>(opts_.stats_interval_seconds * 1e6));
  const auto health_period = std::chrono::microseconds(static_cast<int64_t>(opts_.health_interval_seconds * 1e6));
  const auto dns_period = std::chrono::microseconds(static_cast<int64_t>(opts_.dns_interval_seconds * 1e6));
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_) {
    l.unlock();
    const auto now = Clock::now();
    if (!opts_.dns_name.empty() && now >= next_dns) {
      Resolve();
      next_dns = now + dns_period;
    }
    const bool health = now >= next_health;
    if (health) next_health = now + health_period;
    Poll(health);
    l.lock();
    cv_.wait_for(l, stats_period, [this] { return stop_; });
  }
}

}  // namespace spear::router
