// The worker's engine loop: one thread that owns the Engine, the block
// manager and the scheduler and runs iteration after iteration.
//
// Other threads (gRPC handlers) only Submit, Cancel, read Stats and ask to
// be told when the loop is idle; they never block on an iteration. Events
// of a request go to its RequestSink, called on the loop thread (sinks must
// not block: they queue a write and return).
//
// Every submitted request gets exactly one OnFinished: OK with the finish
// reason (stop, length), or CANCELLED (Cancel), DEADLINE_EXCEEDED (its
// deadline passed; its KV is freed in that iteration), UNAVAILABLE (loop
// stopped) or INTERNAL (the engine failed).
//
// Thread-safety: Submit, Cancel, CancelById, Stats, StartDrain, WhenIdle
// and Stop are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/ec_control.h"
#include "worker/engine/engine.h"
#include "worker/engine/latency_table.h"
#include "worker/engine/scheduler.h"

namespace spear::engine {

struct FinishInfo {
  absl::Status status;  // OK, CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, INTERNAL
  FinishReason reason = FinishReason::kNone;
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_prompt_tokens = 0;
  double queue_seconds = 0, ttft_seconds = 0, mean_itl_seconds = 0, max_itl_seconds = 0;
  double e2e_seconds = 0;
  double ec_density = 0;  // mean over the request's tokens
  int preemptions = 0;
};

class RequestSink {
 public:
  virtual ~RequestSink() = default;
  // On the loop thread; must not block.
  virtual void OnAccepted(double queue_seconds, int64_t cached_prompt_tokens) = 0;
  virtual void OnTokens(const std::vector<int32_t>& ids, double ec_density) = 0;
  virtual void OnFinished(const FinishInfo& info) = 0;  // last call
};

struct IterationStats {
  double seconds = 0, predicted_seconds = 0;
  int64_t decode_tokens = 0, prefill_tokens = 0, chunk_limit = 0;
  double ec_density = 0;
  bool shed = false;
  int preempted = 0;
  int64_t prefix_hit_tokens = 0;  // prompt tokens newly served from the prefix cache
  int64_t generated_tokens = 0;   // tokens sampled (streamed) this iteration
  GateStats gate;
};

struct LoopSnapshot {
  int64_t waiting = 0, running = 0, running_tokens = 0, queued_prompt_tokens = 0;
  int64_t kv_used_blocks = 0, kv_total_blocks = 0, kv_free_tokens = 0;
  double kv_usage = 0;
  double recent_ec_density = 0, recent_itl_seconds = 0;
  int64_t last_chunk = 0;
  bool draining = false;
  int64_t iterations = 0, shed_iterations = 0, preemptions = 0;
};

// Metrics hooks (all on the loop thread).
class LoopObserver {
 public:
  virtual ~LoopObserver() = default;
  virtual void OnIteration(const IterationStats& it, const LoopSnapshot& s) = 0;
  virtual void OnFirstToken(double ttft_seconds) = 0;
  virtual void OnInterToken(double itl_seconds) = 0;
  virtual void OnRequestDone(const FinishInfo& info) = 0;
  // After loop turns that ran no iteration (cancellations, idle ticks).
  virtual void OnIdle(const LoopSnapshot& s) = 0;
};

struct ExecuteSpec {
  RequestSpec spec;              // request_id must be unique among live requests
  std::vector<int32_t> prompt;   // validated by the caller (ids in range, non-empty)
  SamplingParams sampling;
  GenerateOptions options;
  double timeout_seconds = 0;    // > 0: deadline = submit time + timeout
};

struct EngineLoopOptions {
  SchedulerOptions scheduler;
  bool prefix_caching = true;
  // Latency table: profiled at Create unless `table` is given (tests).
  ProfileOptions profile;
  std::optional<LatencyPoints> table;
};

class EngineLoop {
 public:
  // Borrows engine, ec (may be null: no EC control), clock and observer
  // (may be null); all must outlive the loop. Profiles the latency table
  // (real forward passes) unless options.table is set. Does not start the
  // thread.
  static absl::StatusOr<std::unique_ptr<EngineLoop>> Create(Engine* engine, EcControl* ec,
                                                            const EngineLoopOptions& options,
                                                            const Clock* clock,
                                                            LoopObserver* observer);
  ~EngineLoop();  // Stop()s

  void Start();
  // Queues a request. Errors (the sink is never called then):
  // UNAVAILABLE draining or stopped; RESOURCE_EXHAUSTED waiting queue full;
  // ALREADY_EXISTS a live request has this id. Returns the internal id.
  absl::StatusOr<int64_t> Submit(ExecuteSpec spec, std::shared_ptr<RequestSink> sink)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Cancels (CANCELLED, KV freed in the next loop turn). False if unknown.
  bool CancelById(const std::string& request_id) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends request `id` with `why` (CANCELLED, or DEADLINE_EXCEEDED when the
  // RPC's deadline cancelled the call); unknown ids are ignored.
  void Cancel(int64_t id, absl::Status why = absl::CancelledError("request cancelled"))
      ABSL_LOCKS_EXCLUDED(mu_);
  // Stop admitting (Submit -> UNAVAILABLE); in-flight work continues.
  void StartDrain() ABSL_LOCKS_EXCLUDED(mu_);
  bool draining() const { return draining_.load(); }
  // `fn` runs once, on the loop thread (or at once on the caller's if the
  // loop is idle now), when nothing is queued, waiting or running.
  void WhenIdle(std::function<void()> fn) ABSL_LOCKS_EXCLUDED(mu_);
  // Finishes whatever is left with UNAVAILABLE and joins the thread.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

  LoopSnapshot Snapshot() const ABSL_LOCKS_EXCLUDED(stats_mu_);
  LatencyPoints latency_points() const { return latency_.Snapshot(); }
  const LatencyTable& latency() const { return latency_; }
  Engine& engine() { return *engine_; }
  int64_t finished_ok() const { return finished_ok_.load(); }
  int64_t finished_cancelled() const { return finished_cancelled_.load(); }

 private:
  EngineLoop(Engine* engine, EcControl* ec, const EngineLoopOptions& options, LatencyTable table,
             const Clock* clock, LoopObserver* observer);
  void Run();
  void Finish(std::unique_ptr<Request> r, absl::Status status);
  void Publish(bool busy);
  FinishInfo MakeInfo(const Request& r, absl::Status status) const;

  Engine* engine_;
  EcControl* ec_;
  EngineLoopOptions options_;
  const Clock* clock_;
  LoopObserver* observer_;
  std::unique_ptr<BlockManager> blocks_;
  LatencyTable latency_;
  std::unique_ptr<Scheduler> scheduler_;  // loop thread only
  std::thread thread_;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> next_id_{0};
  std::atomic<int64_t> finished_ok_{0}, finished_cancelled_{0};

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Request>> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<int64_t, absl::Status>> cancels_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void()>> idle_fns_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int64_t> live_ ABSL_GUARDED_BY(mu_);  // request_id -> id
  int64_t scheduler_waiting_ ABSL_GUARDED_BY(mu_) = 0;
  bool busy_ ABSL_GUARDED_BY(mu_) = false;  // scheduler holds requests
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;

  mutable absl::Mutex stats_mu_;
  LoopSnapshot snapshot_ ABSL_GUARDED_BY(stats_mu_);
  double ewma_density_ = 0, ewma_itl_ = 0;  // loop thread only
  int64_t iterations_ = 0;                  // loop thread only
};

}  // namespace spear::engine
