// Iteration-level continuous batching: the SLO-constrained, EC-aware
// scheduler.
//
// Each call to Schedule() plans ONE engine iteration:
//  1. Every running sequence that is decoding gets one token. Its KV block
//     is allocated now; when the cache is full the youngest running
//     sequence is preempted by recompute (its blocks released, its
//     computed positions forgotten, back to the FRONT of the waiting
//     queue; its prompt + generated tokens are prefilled again later, and
//     its own cached prefix blocks usually make that cheap).
//  2. The EC mask of the iteration is the union of what its sequences
//     need (ECs are per layer per iteration, shared by the whole batch):
//     any FULL_EC sequence -> every EC, and no shedding this iteration;
//     AUTO sequences -> ECs up to the largest max_ec_density among them
//     (the lowest-value units are dropped to get under a cap < 1);
//     only NO_EC sequences -> no EC. A NO_EC sequence batched with EC
//     sequences therefore gets the ECs of that iteration (never worse
//     quality, no extra cost to it); its Tokens events report the density
//     actually used.
//  3. The ITL budget is the tightest ITL target among the decoding
//     sequences (a request's own, else the worker default; 0 = none),
//     times slo_headroom. A binary search over the latency table picks
//     the largest prefill chunk P in [0, min(max_batch_tokens - decodes,
//     pending prefill)] with Predict(decodes + P, density) x (recent
//     prediction error of that size class) <= budget.
//     When prefill waits, P is at least min_prefill_chunk (progress
//     guarantee), even if that breaks the budget.
//  4. If the smallest iteration allowed (the decodes, plus the progress
//     minimum when prefill was starved) breaks the budget, no FULL_EC
//     request is among the iteration's candidates and plain W4 would fit,
//     ECs are shed, lowest value first (EcControl::shed_order), until the
//     prediction fits; the iteration counts as shed. (If even plain W4
//     misses the budget, shedding cannot save the target: quality is kept.)
//  5. The chunk goes first to running sequences still prefilling (oldest
//     first), then admits waiting requests FCFS (prefix cache lookup
//     first) while KV blocks and the running limit allow.
// Complete() does the bookkeeping after the engine ran the plan: latency
// table update (EWMA), prefix-cache commit, finished sequences released.
//
// Cancellation and deadlines: Remove() frees a request's KV at once;
// ExpireDeadlines() removes every request whose deadline has passed.
//
// Thread-safety: NOT thread-safe: owned by the engine loop thread (the
// loop publishes snapshots for other threads). The BlockManager and
// LatencyTable it uses are internally synchronized.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/engine.h"
#include "worker/engine/latency_table.h"
#include "worker/engine/sequence.h"

namespace spear::engine {

// Seconds on a monotonic clock. Injectable so tests can fake time.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual double Now() const = 0;
};
class SteadyClock final : public Clock {
 public:
  double Now() const override;
};

enum class QualityPolicy { kAuto, kFullEc, kNoEc };

// Per-request inputs the scheduler reads.
struct RequestSpec {
  std::string request_id;
  QualityPolicy quality = QualityPolicy::kAuto;
  double max_ec_density = 1.0;  // AUTO's cap, (0, 1]
  double itl_slo = 0;           // seconds; 0 = the scheduler default
  double ttft_slo = 0;          // seconds; 0 = none (informational)
  double deadline = 0;          // Clock time; 0 = none
};

class RequestSink;  // engine_loop.h; opaque here

struct Request {
  RequestSpec spec;
  std::unique_ptr<Sequence> seq;
  std::shared_ptr<RequestSink> sink;  // where the loop sends events
  double arrival = 0;                 // Clock time Add() saw it
  double scheduled = -1;              // first scheduled (left the waiting queue)
  double first_token = -1;
  double last_token = -1;
  int64_t cached_prompt_tokens = 0;
  int preemptions = 0;
  bool accepted_sent = false;
  // Per-token ITL and EC density accounting.
  double itl_sum = 0, itl_max = 0;
  int64_t itl_count = 0;
  double ec_density_sum = 0;
  int64_t ec_density_tokens = 0;
};

struct SchedulerOptions {
  int64_t max_batch_tokens = 512;
  int64_t max_waiting = 256;       // bounded waiting queue
  int64_t max_running = 256;       // sequences in the running batch
  double default_itl_slo = 0;      // seconds; 0 = no ITL target
  // The chunk search plans iterations to headroom x the ITL target: the
  // table predicts a typical iteration, the margin absorbs its variance
  // (other processes, attention over growing contexts). In (0, 1].
  double slo_headroom = 0.85;
  // Every prediction the budget is checked against is multiplied by the
  // error_quantile of measured/predicted over recent iterations of the
  // same size class (LatencyTable::RatioQuantile(q, T)), so a noisy
  // machine, or a size whose predictions run late, gets smaller chunks
  // instead of missed targets. 1 = the worst error in the window: a p99
  // ITL target tolerates ~1% of iterations over it. 0 disables.
  double error_quantile = 1.0;
  // Progress guarantee: when prefill work waits, an iteration carries at
  // least this many prefill tokens even if the prediction then exceeds the
  // budget. Without it a prompt starves for as long as the decodes alone
  // fill the budget (e.g. a busy machine making every iteration slow).
  int64_t min_prefill_chunk = 4;
  // false: a fixed prefill chunk of static_chunk tokens (the baseline the
  // adaptive chunk is compared with); no SLO search and no shedding.
  bool adaptive = true;
  int64_t static_chunk = 512;
  bool allow_shedding = true;
};

// The EC facts the scheduler needs (from EcControl, or made up in tests).
struct EcProfile {
  std::vector<double> share;    // per unit, sums to 1 (empty: no EC)
  std::vector<int> shed_order;  // unit indices, shed first first
};

struct IterationPlan {
  std::vector<StepItem> items;
  std::vector<Request*> requests;  // requests[i] owns items[i].seq
  int64_t decode_tokens = 0;
  int64_t prefill_tokens = 0;
  int64_t chunk_limit = 0;     // the P the search allowed
  std::vector<bool> ec_mask;   // per unit; empty = no EC units
  double ec_density = 0;
  double itl_budget = 0;       // headroom x tightest target; 0 = none
  double predicted_seconds = 0;
  bool shed = false;           // ECs shed below the batch's need for the SLO
  int preempted = 0;
  bool has_full_ec = false;
  bool empty() const { return items.empty(); }
};

class Scheduler {
 public:
  // Borrows everything; all must outlive the scheduler.
  Scheduler(const SchedulerOptions& options, BlockManager* blocks, LatencyTable* latency,
            EcProfile ec, const Clock* clock);

  // Queues a request (seq holds no blocks). ResourceExhausted when the
  // waiting queue is full.
  absl::Status Add(std::unique_ptr<Request> r);
  // Takes a request out (waiting or running), releasing its KV at once.
  // nullptr if unknown.
  std::unique_ptr<Request> Remove(int64_t seq_id);
  Request* Find(int64_t seq_id) const;
  // Takes every request out (waiting and running), releasing their KV.
  std::vector<std::unique_ptr<Request>> TakeAll();
  bool full() const { return static_cast<int64_t>(waiting_.size()) >= options_.max_waiting; }
  // Removes every request whose deadline is <= now.
  std::vector<std::unique_ptr<Request>> ExpireDeadlines(double now);

  IterationPlan Schedule();
  // After the engine ran `plan` in `measured_seconds` (Step updated the
  // sequences): timings, latency table, prefix cache; finished sequences
  // are released and moved to *finished. Returns measured/predicted.
  double Complete(const IterationPlan& plan, double measured_seconds,
                  std::vector<std::unique_ptr<Request>>* finished);

  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t running_tokens() const;         // context tokens of running sequences
  int64_t queued_prompt_tokens() const;   // pending tokens of waiting requests
  int64_t total_preemptions() const { return preemptions_; }
  int64_t shed_iterations() const { return shed_iterations_; }
  const SchedulerOptions& options() const { return options_; }
  bool idle() const { return waiting_.empty() && running_.empty(); }

  // Exposed for tests: the binary search of step 3.
  int64_t LargestChunk(int64_t decodes, int64_t max_chunk, double density, double budget) const;
  // Predicted seconds of a `tokens` iteration times its size class's recent
  // error quantile: what the budget is checked against.
  double Risky(int64_t tokens, double density) const;

 private:
  static bool IsDecoding(const Sequence& s);
  double ItlTarget(const Request& r) const;
  void Preempt(Request* r);
  // Mask with the lowest-value units dropped until density <= cap.
  std::vector<bool> MaskForCap(double cap) const;
  double DensityOf(const std::vector<bool>& mask) const;

  SchedulerOptions options_;
  BlockManager* blocks_;
  LatencyTable* latency_;
  EcProfile ec_;
  const Clock* clock_;
  std::deque<std::unique_ptr<Request>> waiting_;
  std::vector<std::unique_ptr<Request>> running_;  // admission order
  int64_t preemptions_ = 0;
  int64_t shed_iterations_ = 0;
};

}  // namespace spear::engine
