// A RequestSink for tests: records acceptance, every token and the finish
// (thread-safe: the engine loop's thread calls it); `done` is notified on
// finish. Shared by the engine-loop tests on the CPU (tests/worker) and on
// the GPU (tests/engine/cuda_engine_test.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "worker/engine/engine_loop.h"

namespace spear::testing {

class Collect final : public engine::RequestSink {
 public:
  void OnAccepted(double, int64_t cached) override {
    absl::MutexLock l(&mu);
    accepted = true;
    cached_tokens = cached;
  }
  void OnTokens(const std::vector<int32_t>& ids, double) override {
    absl::MutexLock l(&mu);
    tokens.insert(tokens.end(), ids.begin(), ids.end());
  }
  void OnFinished(const engine::FinishInfo& f) override {
    {
      absl::MutexLock l(&mu);
      info = f;
    }
    done.Notify();
  }
  absl::Mutex mu;
  bool accepted = false;
  int64_t cached_tokens = 0;
  std::vector<int32_t> tokens;
  engine::FinishInfo info;
  absl::Notification done;
};

}  // namespace spear::testing
