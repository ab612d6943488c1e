#include "router/admission/admission.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "router/metrics/router_metrics.h"

namespace spear::router {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

AdmissionController::AdmissionController(AdmissionOptions opts, WorkerRegistry* registry,
                                         Balancer* balancer, RouterMetrics* metrics)
    : opts_(opts), registry_(registry), balancer_(balancer), metrics_(metrics) {
  thread_ = std::thread([this] { Run(); });
}

AdmissionController::~AdmissionController() {
  Close();
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

AdmissionController::Decision AdmissionController::Decide(const AdmissionRequest& req) {
  Decision d;
  const double base = req.quality == spear::v1::QUALITY_POLICY_NO_EC ? 0.0 : 1.0;
  const int64_t p = static_cast<int64_t>(req.prompt.size());
  const double spent = Seconds(Clock::now() - req.received);
  const double ttft_t =
      req.ttft_target > 0 ? std::max(1e-3, req.ttft_target * opts_.slo_headroom - spent) : 0;
  const double itl_t = req.itl_target * opts_.slo_headroom;
  struct Option {
    std::shared_ptr<WorkerHandle> worker;
    Candidate cand;
    double density;
    double raw_ttft;
  };
  std::vector<Option> full, reduced;
  d.best_ttft = INFINITY;
  for (const auto& w : registry_->Workers()) {
    if (!w->admissible()) continue;
    d.any_healthy = true;
    if (req.excluded.count(w->address())) continue;
    const spear::v1::StatsResponse s = w->stats();
    const PendingLoad pending = w->pending();
    if (s.waiting() + pending.requests >= opts_.max_worker_waiting) continue;
    // A prompt plus its answer must fit the worker's free KV eventually; a
    // request the worker could never hold is rejected by validation, so
    // here only "not now" matters: skip workers without room.
    if (s.kv_free_tokens() > 0 && s.kv_free_tokens() < p + 1 && s.running() > 0) continue;
    const double corr = w->ttft_correction();
    Prediction pred = Predict(s, pending, p, base, itl_t);
    const double raw_ttft = pred.ttft_seconds;
    pred.ttft_seconds *= corr;
    d.best_ttft = std::min(d.best_ttft, corr * Predict(s, pending, p, 0.0, itl_t).ttft_seconds / opts_.slo_headroom);
    if (Meets(pred, ttft_t, itl_t)) {
      full.push_back({w, {w->address(), pred, w->inflight()}, base, raw_ttft});
      continue;
    }
    if (req.quality == spear::v1::QUALITY_POLICY_AUTO) {
      const double dens = LargestDensityMeeting(s, pending, p, ttft_t / corr, itl_t, base);
      if (dens >= opts_.min_ec_density && dens >= 0) {
        Prediction rp = Predict(s, pending, p, dens, itl_t);
        const double raw = rp.ttft_seconds;
        rp.ttft_seconds *= corr;
        reduced.push_back({w, {w->address(), rp, w->inflight()}, dens, raw});
      }
    }
  }
  auto pick = [&](std::vector<Option>& opts) -> Option& {
    std::vector<Candidate> cands;
    for (const Option& o : opts) cands.push_back(o.cand);
    return opts[balancer_->Pick(cands, req.prompt)];
  };
  if (!full.empty()) {
    Option& o = pick(full);
    d.admitted = true;
    d.admission = {o.worker, o.density, "admit_full", 0, o.raw_ttft};
  } else if (!reduced.empty()) {
    // Keep as much quality as possible: the highest density, then the balancer.
    double best = 0;
    for (const Option& o : reduced) best = std::max(best, o.density);
    std::vector<Option> top;
    for (const Option& o : reduced) {
      if (o.density >= best - 1e-9) top.push_back(o);
    }
    Option& o = pick(top);
    d.admitted = true;
    d.admission = {o.worker, o.density, "admit_reduced_ec", 0, o.raw_ttft};
  }
  if (d.admitted) d.admission.worker->AddDispatched(p);
  return d;
}

int64_t AdmissionController::RetryAfterMs(const Decision& d, const AdmissionRequest& req) const {
  // Time until a worker is predicted to start this request within its TTFT
  // target: the backlog's predicted drain time beyond the target.
  double s = std::isfinite(d.best_ttft) ? d.best_ttft - std::max(0.0, req.ttft_target) : opts_.queue_timeout_seconds;
  s = std::clamp(s, 0.05, 30.0);
  return static_cast<int64_t>(std::ceil(s * 1000));
}

uint64_t AdmissionController::Submit(std::shared_ptr<AdmissionRequest> req) {
  uint64_t id;
  bool closed;
  {
    std::lock_guard<std::mutex> l(mu_);
    id = next_id_++;
    closed = closed_;
  }
  if (closed) {
    req->on_reject(absl::UnavailableError("the router is shutting down"), 0);
    return id;
  }
  Decision d;
  {
    std::lock_guard<std::mutex> dl(decide_mu_);
    d = Decide(*req);
  }
  if (d.admitted) {
    if (metrics_) metrics_->Admission(d.admission.decision);
    req->on_admit(std::move(d.admission));
    return id;
  }
  const auto now = Clock::now();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (static_cast<int>(queue_.size()) < opts_.max_queue) {
      auto deadline = std::min(req->client_deadline,
                               now + std::chrono::microseconds(static_cast<int64_t>(opts_.queue_timeout_seconds * 1e6)));
      if (req->ttft_target > 0) {
        deadline = std::min(deadline, req->received + std::chrono::microseconds(
                                                          static_cast<int64_t>(req->ttft_target * 1e6)));
      }
      Entry e{id, req, now, deadline, d.any_healthy};
      queue_.push_back(std::move(e));
      if (metrics_) {
        metrics_->Admission("queue");
        metrics_->SetQueueDepth(static_cast<double>(queue_.size()));
      }
      cv_.notify_all();
      return id;
    }
  }
  if (metrics_) metrics_->Admission("reject");
  if (!d.any_healthy) {
    req->on_reject(absl::UnavailableError("no healthy worker"), 0);
  } else {
    req->on_reject(absl::ResourceExhaustedError(absl::StrCat(
                       "overloaded: no worker can meet the request's latency target and the "
                       "admission queue is full (", opts_.max_queue, " requests)")),
                   RetryAfterMs(d, *req));
  }
  return id;
}

bool AdmissionController::Cancel(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    if (it->id == id) {
      queue_.erase(it);
      if (metrics_) metrics_->SetQueueDepth(static_cast<double>(queue_.size()));
      return true;
    }
  }
  return false;
}

void AdmissionController::Notify() {
  {
    std::lock_guard<std::mutex> l(mu_);
    dirty_ = true;
  }
  cv_.notify_all();
}

void AdmissionController::Close() {
  std::deque<Entry> drop;
  {
    std::lock_guard<std::mutex> l(mu_);
    closed_ = true;
    drop.swap(queue_);
    if (metrics_) metrics_->SetQueueDepth(0);
  }
  for (Entry& e : drop) e.req->on_reject(absl::UnavailableError("the router is shutting down"), 0);
}

int AdmissionController::queue_depth() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int>(queue_.size());
}

void AdmissionController::RunQueueOnce() {
  std::vector<Entry> work;
  {
    std::lock_guard<std::mutex> l(mu_);
    work.assign(queue_.begin(), queue_.end());
  }
  const auto now = Clock::now();
  for (Entry& e : work) {
    // Still queued? (A cancel may have removed it.)
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = std::find_if(queue_.begin(), queue_.end(), [&](const Entry& q) { return q.id == e.id; });
      if (it == queue_.end()) continue;
    }
    Decision d;
    {
      std::lock_guard<std::mutex> dl(decide_mu_);
      // Decide adds the pending load only when admitting; a concurrent
      // Cancel between here and the erase below is resolved by the erase.
      d = Decide(*e.req);
    }
    const bool expired = now >= e.deadline;
    if (!d.admitted && !expired) {
      if (d.any_healthy) {
        std::lock_guard<std::mutex> l(mu_);
        for (Entry& q : queue_) {
          if (q.id == e.id) q.saw_healthy = true;
        }
      }
      continue;
    }
    bool mine = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = std::find_if(queue_.begin(), queue_.end(), [&](const Entry& q) { return q.id == e.id; });
      if (it != queue_.end()) {
        e.saw_healthy |= it->saw_healthy;
        queue_.erase(it);
        mine = true;
      }
      if (metrics_) metrics_->SetQueueDepth(static_cast<double>(queue_.size()));
    }
    if (!mine) {
      if (d.admitted) d.admission.worker->RequestDone();  // undo the dispatch accounting
      continue;
    }
    const double waited = Seconds(now - e.enqueued);
    if (metrics_) metrics_->QueueTime(waited);
    if (d.admitted) {
      if (metrics_) metrics_->Admission(d.admission.decision);
      d.admission.queue_seconds = waited;
      e.req->on_admit(std::move(d.admission));
    } else if (now >= e.req->client_deadline) {
      e.req->on_reject(absl::DeadlineExceededError("deadline exceeded while queued for admission"), 0);
    } else if (!d.any_healthy && !e.saw_healthy) {
      e.req->on_reject(absl::UnavailableError("no healthy worker"), 0);
    } else {
      if (metrics_) metrics_->Admission("reject");
      e.req->on_reject(absl::ResourceExhaustedError(absl::StrCat(
                           "overloaded: queued ", static_cast<int>(waited * 1000),
                           " ms without a worker able to meet the request's latency target")),
                       RetryAfterMs(d, *e.req));
    }
  }
}

void AdmissionController::Run() {
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_) {
    cv_.wait_for(l, std::chrono::milliseconds(20), [this] { return stop_ || dirty_; });
    if (stop_) break;
    dirty_ = false;
    if (queue_.empty()) continue;
    l.unlock();
    RunQueueOnce();
    l.lock();
  }
}

}  // namespace spear::router
