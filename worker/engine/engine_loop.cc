#include "worker/engine/engine_loop.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace spear::engine {

EngineLoop::EngineLoop(Engine* engine, EcControl* ec, const EngineLoopOptions& options,
                       LatencyTable table, const Clock* clock, LoopObserver* observer)
    : engine_(engine),
      ec_(ec),
      options_(options),
      clock_(clock),
      observer_(observer),
      latency_(std::move(table)) {}

absl::StatusOr<std::unique_ptr<EngineLoop>> EngineLoop::Create(Engine* engine, EcControl* ec,
                                                               const EngineLoopOptions& options,
                                                               const Clock* clock,
                                                               LoopObserver* observer) {
  if (engine == nullptr || clock == nullptr) {
    return absl::InvalidArgumentError("EngineLoop: null engine or clock");
  }
  const SchedulerOptions& so = options.scheduler;
  if (so.max_batch_tokens < 1 || so.max_waiting < 1 || so.max_running < 1 ||
      so.static_chunk < 1 || so.default_itl_slo < 0 || !(so.slo_headroom > 0) ||
      so.slo_headroom > 1) {
    return absl::InvalidArgumentError("EngineLoop: bad scheduler options");
  }
  BlockManager::Options bo;
  bo.prefix_caching = options.prefix_caching;
  auto blocks = std::make_unique<BlockManager>(&engine->backend().allocator(),
                                               engine->backend().block_size(), bo);
  absl::StatusOr<LatencyTable> table = absl::UnknownError("unset");
  if (options.table.has_value()) {
    table = LatencyTable::Create(*options.table);
  } else {
    ProfileOptions po = options.profile;
    po.max_tokens = std::min<int64_t>(po.max_tokens, so.max_batch_tokens);
    table = ProfileLatency(engine, blocks.get(), ec, po);
  }
  if (!table.ok()) return table.status();
  std::unique_ptr<EngineLoop> loop(
      new EngineLoop(engine, ec, options, std::move(*table), clock, observer));
  loop->blocks_ = std::move(blocks);
  EcProfile prof;
  if (ec != nullptr) {
    for (const EcUnit& u : ec->units()) prof.share.push_back(u.share);
    prof.shed_order = ec->shed_order();
  }
  loop->scheduler_ = std::make_unique<Scheduler>(so, loop->blocks_.get(), &loop->latency_,
                                                 std::move(prof), clock);
  loop->Publish(false);
  return loop;
}

EngineLoop::~EngineLoop() { Stop(); }

void EngineLoop::Start() {
  absl::MutexLock lock(&mu_);
  if (started_ || stop_) return;
  started_ = true;
  thread_ = std::thread([this] { Run(); });
}

absl::StatusOr<int64_t> EngineLoop::Submit(ExecuteSpec spec, std::shared_ptr<RequestSink> sink) {
  if (draining_.load()) return absl::UnavailableError("worker is draining");
  if (spec.prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  auto r = std::make_unique<Request>();
  const int64_t id = next_id_++;
  r->spec = std::move(spec.spec);
  if (spec.timeout_seconds > 0) r->spec.deadline = clock_->Now() + spec.timeout_seconds;
  r->seq = std::make_unique<Sequence>(id, std::move(spec.prompt), spec.sampling, spec.options);
  r->sink = std::move(sink);
  absl::MutexLock lock(&mu_);
  if (stop_) return absl::UnavailableError("worker is stopping");
  if (static_cast<int64_t>(inbox_.size()) + scheduler_waiting_ >=
      options_.scheduler.max_waiting) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "worker queue full (", inbox_.size() + scheduler_waiting_, " of ",
        options_.scheduler.max_waiting, " waiting); retry later or on another worker"));
  }
  if (!r->spec.request_id.empty()) {
    if (live_.contains(r->spec.request_id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("request id '", r->spec.request_id, "' is already running"));
    }
    live_[r->spec.request_id] = id;
  }
  inbox_.push_back(std::move(r));
  return id;
}

bool EngineLoop::CancelById(const std::string& request_id) {
  absl::MutexLock lock(&mu_);
  auto it = live_.find(request_id);
  if (it == live_.end()) return false;
  cancels_.push_back({it->second, absl::CancelledError("request cancelled")});
  return true;
}

void EngineLoop::Cancel(int64_t id, absl::Status why) {
  absl::MutexLock lock(&mu_);
  cancels_.push_back({id, std::move(why)});
}

void EngineLoop::StartDrain() {
  draining_.store(true);
  absl::MutexLock lock(&stats_mu_);
  snapshot_.draining = true;
}

void EngineLoop::WhenIdle(std::function<void()> fn) {
  {
    absl::MutexLock lock(&mu_);
    if (busy_ || !inbox_.empty() || (started_ && !stop_ && !cancels_.empty())) {
      idle_fns_.push_back(std::move(fn));
      return;
    }
  }
  fn();
}

void EngineLoop::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  // Never started (or already stopped): finish what is queued here.
  std::vector<std::unique_ptr<Request>> left;
  {
    absl::MutexLock lock(&mu_);
    left.swap(inbox_);
  }
  for (auto& r : left) Finish(std::move(r), absl::UnavailableError("worker stopped"));
  std::vector<std::function<void()>> fns;
  {
    absl::MutexLock lock(&mu_);
    fns.swap(idle_fns_);
  }
  for (auto& f : fns) f();
}

LoopSnapshot EngineLoop::Snapshot() const {
  absl::MutexLock lock(&stats_mu_);
  return snapshot_;
}

FinishInfo EngineLoop::MakeInfo(const Request& r, absl::Status status) const {
  FinishInfo f;
  const double now = clock_->Now();
  f.status = std::move(status);
  f.reason = r.seq->finish_reason();
  if (!f.status.ok()) {
    f.reason = absl::IsCancelled(f.status) ? FinishReason::kCancelled : FinishReason::kError;
  }
  f.prompt_tokens = r.seq->num_prompt_tokens();
  f.completion_tokens = r.seq->num_generated();
  f.cached_prompt_tokens = r.cached_prompt_tokens;
  f.queue_seconds = (r.scheduled >= 0 ? r.scheduled : now) - r.arrival;
  f.ttft_seconds = r.first_token >= 0 ? r.first_token - r.arrival : 0;
  f.mean_itl_seconds = r.itl_count ? r.itl_sum / r.itl_count : 0;
  f.max_itl_seconds = r.itl_max;
  f.e2e_seconds = now - r.arrival;
  f.ec_density = r.ec_density_tokens ? r.ec_density_sum / r.ec_density_tokens : 0;
  f.preemptions = r.preemptions;
  return f;
}

void EngineLoop::Finish(std::unique_ptr<Request> r, absl::Status status) {
  if (r == nullptr) return;
  if (status.ok()) {
    ++finished_ok_;
  } else if (absl::IsCancelled(status)) {
    ++finished_cancelled_;
  }
  FinishInfo info = MakeInfo(*r, std::move(status));
  {
    absl::MutexLock lock(&mu_);
    auto it = live_.find(r->spec.request_id);
    if (it != live_.end() && it->second == r->seq->id()) live_.erase(it);
  }
  if (observer_ != nullptr) observer_->OnRequestDone(info);
  if (r->sink != nullptr) r->sink->OnFinished(info);
}

void EngineLoop::Publish(bool busy) {
  LoopSnapshot s;
  s.waiting = scheduler_ ? scheduler_->num_waiting() : 0;
  s.running = scheduler_ ? scheduler_->num_running() : 0;
  s.running_tokens = scheduler_ ? scheduler_->running_tokens() : 0;
  s.queued_prompt_tokens = scheduler_ ? scheduler_->queued_prompt_tokens() : 0;
  s.kv_used_blocks = blocks_->num_used();
  s.kv_total_blocks = blocks_->num_blocks();
  s.kv_usage = blocks_->usage();
  s.kv_free_tokens = (blocks_->num_blocks() - s.kv_used_blocks) * blocks_->block_size();
  s.recent_ec_density = ewma_density_;
  s.recent_itl_seconds = ewma_itl_;
  s.draining = draining_.load();
  s.iterations = iterations_;
  s.shed_iterations = scheduler_ ? scheduler_->shed_iterations() : 0;
  s.preemptions = scheduler_ ? scheduler_->total_preemptions() : 0;
  {
    absl::MutexLock lock(&stats_mu_);
    s.last_chunk = snapshot_.last_chunk;
    snapshot_ = s;
  }
  absl::MutexLock lock(&mu_);
  scheduler_waiting_ = s.waiting;
  busy_ = busy;
}

void EngineLoop::Run() {
  std::vector<StepOutput> outs;
  std::vector<std::unique_ptr<Request>> finished;
  for (;;) {
    std::vector<std::unique_ptr<Request>> adds;
    std::vector<std::pair<int64_t, absl::Status>> cancels;
    bool stop = false;
    {
      absl::MutexLock lock(&mu_);
      auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !inbox_.empty() || !cancels_.empty() || !scheduler_->idle();
      };
      if (!has_work()) {
        // Nothing runs: tell whoever waits for idleness, then sleep.
        std::vector<std::function<void()>> fns;
        fns.swap(idle_fns_);
        busy_ = false;
        if (!fns.empty()) {
          mu_.Unlock();
          for (auto& f : fns) f();
          mu_.Lock();
        }
        mu_.AwaitWithTimeout(absl::Condition(&has_work), absl::Milliseconds(200));
      }
      adds.swap(inbox_);
      cancels.swap(cancels_);
      stop = stop_;
      if (!adds.empty()) busy_ = true;
    }
    for (auto& r : adds) {
      if (r->seq->options().max_new_tokens == 0) {
        r->seq->Finish(FinishReason::kLength);
        Finish(std::move(r), absl::OkStatus());
      } else if (scheduler_->full()) {
        // Preempted requests went back to the queue since Submit checked.
        Finish(std::move(r), absl::ResourceExhaustedError("worker queue full; retry later"));
      } else {
        (void)scheduler_->Add(std::move(r));
      }
    }
    for (auto& [id, why] : cancels) Finish(scheduler_->Remove(id), why);
    for (auto& r : scheduler_->ExpireDeadlines(clock_->Now())) {
      Finish(std::move(r), absl::DeadlineExceededError("request deadline exceeded"));
    }
    if (stop) {
      for (auto& r : scheduler_->TakeAll()) {
        Finish(std::move(r), absl::UnavailableError("worker stopped"));
      }
      Publish(false);
      return;
    }

    IterationPlan plan = scheduler_->Schedule();
    if (plan.empty()) {
      Publish(!scheduler_->idle());
      if (observer_) observer_->OnIdle(Snapshot());
      if (!scheduler_->idle()) {
        // Requests wait for KV that nothing running will free soon; do not spin.
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(+[](bool* b) { return *b; }, &stop_),
                             absl::Milliseconds(2));
      }
      continue;
    }
    IterationStats it;
    for (Request* r : plan.requests) {
      if (!r->accepted_sent) {
        r->accepted_sent = true;
        it.prefix_hit_tokens += r->cached_prompt_tokens;
        if (r->sink) r->sink->OnAccepted(r->scheduled - r->arrival, r->cached_prompt_tokens);
      }
    }
    if (ec_ != nullptr) {
      ec_->Apply(plan.ec_mask);
      ec_->ResetGateStats();
    }
    const double t0 = clock_->Now();
    absl::Status st = engine_->Step(plan.items, &outs);
    const double t1 = clock_->Now();
    if (ec_ != nullptr) it.gate = ec_->gate_stats();
    finished.clear();
    if (!st.ok()) {
      std::vector<int64_t> ids;
      for (Request* r : plan.requests) ids.push_back(r->seq->id());
      for (int64_t id : ids) {
        Finish(scheduler_->Remove(id), absl::InternalError(absl::StrCat("engine step failed: ",
                                                                         st.message())));
      }
    } else {
      for (size_t k = 0; k < outs.size(); ++k) {
        if (outs[k].token < 0) continue;
        Request* r = plan.requests[k];
        if (r->first_token < 0) {
          r->first_token = t1;
          if (observer_) observer_->OnFirstToken(t1 - r->arrival);
        } else {
          const double itl = t1 - r->last_token;
          r->itl_sum += itl;
          r->itl_max = std::max(r->itl_max, itl);
          ++r->itl_count;
          ewma_itl_ = ewma_itl_ == 0 ? itl : 0.9 * ewma_itl_ + 0.1 * itl;
          if (observer_) observer_->OnInterToken(itl);
        }
        r->last_token = t1;
        ++it.generated_tokens;
        r->ec_density_sum += plan.ec_density;
        ++r->ec_density_tokens;
        if (r->sink) r->sink->OnTokens({outs[k].token}, plan.ec_density);
      }
      scheduler_->Complete(plan, t1 - t0, &finished);
      for (auto& r : finished) {
        absl::Status fs = r->seq->status();
        if (r->seq->finish_reason() == FinishReason::kCancelled) {
          fs = absl::CancelledError("request cancelled");
        }
        Finish(std::move(r), fs);
      }
    }
    ++iterations_;
    ewma_density_ = iterations_ == 1 ? plan.ec_density : 0.9 * ewma_density_ + 0.1 * plan.ec_density;
    it.seconds = t1 - t0;
    it.predicted_seconds = plan.predicted_seconds;
    it.decode_tokens = plan.decode_tokens;
    it.prefill_tokens = plan.prefill_tokens;
    it.chunk_limit = plan.chunk_limit;
    it.ec_density = plan.ec_density;
    it.shed = plan.shed;
    it.preempted = plan.preempted;
    {
      absl::MutexLock lock(&stats_mu_);
      snapshot_.last_chunk = plan.chunk_limit;
    }
    Publish(!scheduler_->idle());
    if (observer_) observer_->OnIteration(it, Snapshot());
    if (scheduler_->idle() && observer_) observer_->OnIdle(Snapshot());
  }
}

}  // namespace spear::engine
