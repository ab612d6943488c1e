#include "worker/engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace spear::engine {

double SteadyClock::Now() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Scheduler::Scheduler(const SchedulerOptions& options, BlockManager* blocks,
                     LatencyTable* latency, EcProfile ec, const Clock* clock)
    : options_(options), blocks_(blocks), latency_(latency), ec_(std::move(ec)), clock_(clock) {}

absl::Status Scheduler::Add(std::unique_ptr<Request> r) {
  if (static_cast<int64_t>(waiting_.size()) >= options_.max_waiting) {
    return absl::ResourceExhaustedError(absl::StrCat("worker queue full (", waiting_.size(),
                                                     " requests waiting)"));
  }
  r->arrival = clock_->Now();
  waiting_.push_back(std::move(r));
  return absl::OkStatus();
}

Request* Scheduler::Find(int64_t id) const {
  for (const auto& r : waiting_) {
    if (r->seq->id() == id) return r.get();
  }
  for (const auto& r : running_) {
    if (r->seq->id() == id) return r.get();
  }
  return nullptr;
}

std::unique_ptr<Request> Scheduler::Remove(int64_t id) {
  std::unique_ptr<Request> out;
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if ((*it)->seq->id() == id) {
      out = std::move(*it);
      waiting_.erase(it);
      break;
    }
  }
  if (out == nullptr) {
    for (auto it = running_.begin(); it != running_.end(); ++it) {
      if ((*it)->seq->id() == id) {
        out = std::move(*it);
        running_.erase(it);
        break;
      }
    }
  }
  if (out != nullptr) blocks_->Release(out->seq.get());
  return out;
}

std::vector<std::unique_ptr<Request>> Scheduler::TakeAll() {
  std::vector<std::unique_ptr<Request>> out;
  for (auto& r : running_) out.push_back(std::move(r));
  for (auto& r : waiting_) out.push_back(std::move(r));
  running_.clear();
  waiting_.clear();
  for (auto& r : out) blocks_->Release(r->seq.get());
  return out;
}

std::vector<std::unique_ptr<Request>> Scheduler::ExpireDeadlines(double now) {
  std::vector<int64_t> ids;
  for (const auto& r : waiting_) {
    if (r->spec.deadline > 0 && r->spec.deadline <= now) ids.push_back(r->seq->id());
  }
  for (const auto& r : running_) {
    if (r->spec.deadline > 0 && r->spec.deadline <= now) ids.push_back(r->seq->id());
  }
  std::vector<std::unique_ptr<Request>> out;
  for (int64_t id : ids) out.push_back(Remove(id));
  return out;
}

int64_t Scheduler::running_tokens() const {
  int64_t n = 0;
  for (const auto& r : running_) n += static_cast<int64_t>(r->seq->tokens().size());
  return n;
}

int64_t Scheduler::queued_prompt_tokens() const {
  int64_t n = 0;
  for (const auto& r : waiting_) n += r->seq->num_pending();
  return n;
}

bool Scheduler::IsDecoding(const Sequence& s) {
  return s.num_computed() >= s.num_prompt_tokens() && s.num_pending() == 1;
}

double Scheduler::ItlTarget(const Request& r) const {
  return r.spec.itl_slo > 0 ? r.spec.itl_slo : options_.default_itl_slo;
}

void Scheduler::Preempt(Request* r) {
  for (auto it = running_.begin(); it != running_.end(); ++it) {
    if (it->get() != r) continue;
    std::unique_ptr<Request> owned = std::move(*it);
    running_.erase(it);
    blocks_->Release(owned->seq.get());
    owned->seq->ResetComputed();
    ++owned->preemptions;
    ++preemptions_;
    waiting_.push_front(std::move(owned));
    return;
  }
}

double Scheduler::DensityOf(const std::vector<bool>& mask) const {
  if (ec_.share.empty()) return 0;
  double d = 0;
  for (size_t i = 0; i < mask.size() && i < ec_.share.size(); ++i) {
    if (mask[i]) d += ec_.share[i];
  }
  return std::min(1.0, d);
}

std::vector<bool> Scheduler::MaskForCap(double cap) const {
  std::vector<bool> mask(ec_.share.size(), true);
  if (cap >= 1.0) return mask;
  double d = DensityOf(mask);
  for (int u : ec_.shed_order) {
    if (d <= cap + 1e-12) break;
    mask[u] = false;
    d -= ec_.share[u];
  }
  return mask;
}

double Scheduler::Risky(int64_t tokens, double density) const {
  const double t = latency_->Predict(tokens, density);
  if (options_.error_quantile <= 0) return t;
  return t * std::max(1.0, latency_->RatioQuantile(options_.error_quantile, tokens));
}

int64_t Scheduler::LargestChunk(int64_t decodes, int64_t max_chunk, double density,
                                double budget) const {
  if (max_chunk <= 0) return 0;
  if (budget <= 0) return max_chunk;
  if (Risky(decodes + max_chunk, density) <= budget) return max_chunk;
  // lo only ever moves to a chunk that was checked to fit (0 always may),
  // so the answer fits even where the error margin makes the predicate
  // non-monotone across size classes.
  int64_t lo = 0, hi = max_chunk - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (Risky(decodes + mid, density) <= budget) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

namespace {

// EC density a request asks for: FULL_EC 1, NO_EC 0, AUTO its cap.
double Need(const Request& r) {
  switch (r.spec.quality) {
    case QualityPolicy::kFullEc: return 1.0;
    case QualityPolicy::kNoEc: return 0.0;
    case QualityPolicy::kAuto: return std::clamp(r.spec.max_ec_density, 0.0, 1.0);
  }
  return 1.0;
}

}  // namespace

IterationPlan Scheduler::Schedule() {
  IterationPlan plan;
  const double now = clock_->Now();

  // 1. One token per decoding sequence; preempt the youngest when KV runs out.
  std::vector<Request*> decodes;
  for (size_t i = 0; i < running_.size(); ++i) {
    Request* r = running_[i].get();
    if (!IsDecoding(*r->seq)) continue;
    bool ok = true;
    while (!blocks_->EnsureCapacity(r->seq.get(), r->seq->num_computed() + 1).ok()) {
      if (running_.size() > i + 1) {
        Preempt(running_.back().get());
        ++plan.preempted;
      } else {
        Preempt(r);
        ++plan.preempted;
        ok = false;
        break;
      }
    }
    if (!ok) break;  // r was the last running sequence
    decodes.push_back(r);
  }
  const int64_t D = static_cast<int64_t>(decodes.size());

  // 2. The batch's EC need and ITL budget.
  double need = 0;
  bool full_in_decodes = false;
  double budget = std::numeric_limits<double>::infinity();
  for (Request* r : decodes) {
    need = std::max(need, Need(*r));
    full_in_decodes |= r->spec.quality == QualityPolicy::kFullEc;
    if (ItlTarget(*r) > 0) budget = std::min(budget, ItlTarget(*r));
  }
  // Prefill candidates: running sequences still prefilling, then waiting.
  std::vector<Request*> prefilling;
  int64_t work = 0;
  for (const auto& r : running_) {
    if (!IsDecoding(*r->seq)) {
      prefilling.push_back(r.get());
      work += r->seq->num_pending();
    }
  }
  for (const auto& r : waiting_) work += r->seq->num_pending();
  double base_need = need;
  // FULL_EC anywhere in what this iteration may run forbids shedding.
  bool full_candidates = full_in_decodes;
  for (Request* r : prefilling) {
    base_need = std::max(base_need, Need(*r));
    full_candidates |= r->spec.quality == QualityPolicy::kFullEc;
  }
  if (!waiting_.empty()) {
    base_need = std::max(base_need, Need(*waiting_.front()));
    full_candidates |= waiting_.front()->spec.quality == QualityPolicy::kFullEc;
  }
  if (ec_.share.empty()) base_need = 0;
  std::vector<bool> mask = MaskForCap(base_need);
  double density = DensityOf(mask);
  plan.itl_budget = std::isinf(budget) ? 0 : budget * options_.slo_headroom;

  // 3. Prefill chunk.
  const int64_t room = std::max<int64_t>(0, options_.max_batch_tokens - D);
  int64_t P;
  if (!options_.adaptive) {
    P = std::min({options_.static_chunk, room, work});
  } else {
    P = LargestChunk(D, std::min(room, work), density, plan.itl_budget);
  }
  const bool starved = P == 0 && work > 0;
  if (options_.adaptive) P = std::max(P, std::min({options_.min_prefill_chunk, room, work}));
  plan.chunk_limit = P;

  // 4. Shed ECs when even the smallest iteration allowed (the decodes, plus
  // the progress minimum when prefill is starved) breaks the budget.
  const int64_t T0 = D + (starved ? P : 0);
  if (options_.adaptive && options_.allow_shedding && (starved || work == 0) && D > 0 &&
      plan.itl_budget > 0 && !full_candidates && !ec_.share.empty() &&
      Risky(T0, DensityOf(MaskForCap(std::max(need, base_need)))) > plan.itl_budget &&
      Risky(T0, 0.0) <= plan.itl_budget) {
    // Only when shedding can restore the budget: if even plain W4 misses
    // it, the target is lost this iteration anyway and quality is kept.
    std::vector<bool> dmask = MaskForCap(need);
    double d = DensityOf(dmask);
    if (Risky(T0, d) > plan.itl_budget) {
      for (int u : ec_.shed_order) {
        if (!dmask[u]) continue;
        dmask[u] = false;
        d -= ec_.share[u];
        plan.shed = true;
        if (Risky(T0, std::max(0.0, d)) <= plan.itl_budget) break;
      }
    }
    mask = std::move(dmask);
    density = std::max(0.0, d);
  }

  for (Request* r : decodes) {
    plan.items.push_back({r->seq.get(), 1});
    plan.requests.push_back(r);
  }
  plan.decode_tokens = D;

  // 5. Hand the chunk out: running prefills first, then admit FCFS.
  int64_t left = P;
  double actual_need = need;
  bool has_full = full_in_decodes;
  const int bs = blocks_->block_size();
  auto fit = [&](Sequence* s, int64_t want, int64_t reserve) -> int64_t {
    const int64_t avail = blocks_->num_available() - reserve;
    const int64_t max_pos =
        (static_cast<int64_t>(s->block_table().size()) + std::max<int64_t>(0, avail)) * bs;
    const int64_t n = std::min(want, max_pos - s->num_computed());
    if (n <= 0) return 0;
    if (!blocks_->EnsureCapacity(s, s->num_computed() + n).ok()) return 0;
    return n;
  };
  for (Request* r : prefilling) {
    if (left <= 0) break;
    const int64_t n = fit(r->seq.get(), std::min(left, r->seq->num_pending()), 0);
    if (n <= 0) break;
    plan.items.push_back({r->seq.get(), n});
    plan.requests.push_back(r);
    actual_need = std::max(actual_need, Need(*r));
    has_full |= r->spec.quality == QualityPolicy::kFullEc;
    left -= n;
  }
  while (left > 0 && !waiting_.empty() &&
         static_cast<int64_t>(running_.size()) < options_.max_running) {
    Request* r = waiting_.front().get();
    // A request that needs more EC than this iteration runs waits its turn.
    if (!ec_.share.empty() && Need(*r) > base_need + 1e-12) break;
    if (plan.shed && r->spec.quality == QualityPolicy::kFullEc) break;
    const int64_t cached = blocks_->AcquirePrefix(r->seq.get());
    const int64_t reserve = static_cast<int64_t>(running_.size());
    const int64_t n = fit(r->seq.get(), std::min(left, r->seq->num_pending()), reserve);
    if (n <= 0) {
      blocks_->Release(r->seq.get());
      r->seq->ResetComputed();
      break;
    }
    if (r->scheduled < 0) {
      r->scheduled = now;
      r->cached_prompt_tokens = cached;
    }
    std::unique_ptr<Request> owned = std::move(waiting_.front());
    waiting_.pop_front();
    running_.push_back(std::move(owned));
    plan.items.push_back({r->seq.get(), n});
    plan.requests.push_back(r);
    actual_need = std::max(actual_need, Need(*r));
    has_full |= r->spec.quality == QualityPolicy::kFullEc;
    left -= n;
  }
  plan.prefill_tokens = P - left;
  plan.has_full_ec = has_full;
  if (!plan.shed && !ec_.share.empty()) {
    mask = MaskForCap(actual_need);
    density = DensityOf(mask);
  }
  plan.ec_mask = std::move(mask);
  plan.ec_density = ec_.share.empty() ? 0 : density;
  plan.predicted_seconds =
      latency_->Predict(plan.decode_tokens + plan.prefill_tokens, plan.ec_density);
  if (plan.shed) ++shed_iterations_;
  return plan;
}

double Scheduler::Complete(const IterationPlan& plan, double measured_seconds,
                           std::vector<std::unique_ptr<Request>>* finished) {
  const int64_t T = plan.decode_tokens + plan.prefill_tokens;
  const double ratio = T > 0 ? latency_->Observe(T, plan.ec_density, measured_seconds) : 0;
  for (Request* r : plan.requests) blocks_->CommitComputed(*r->seq);
  for (auto it = running_.begin(); it != running_.end();) {
    if ((*it)->seq->finished()) {
      blocks_->Release((*it)->seq.get());
      finished->push_back(std::move(*it));
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
  return ratio;
}

}  // namespace spear::engine
