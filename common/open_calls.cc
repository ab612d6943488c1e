#include "common/open_calls.h"

#include <algorithm>

namespace spear {

void OpenCalls::Opened() {
  absl::MutexLock lock(&mu_);
  ++count_;
}

void OpenCalls::Released() {
  absl::MutexLock lock(&mu_);
  --count_;
  last_release_ = absl::Now();
}

int OpenCalls::count() const {
  absl::MutexLock lock(&mu_);
  return count_;
}

bool OpenCalls::WaitDrained(absl::Duration linger, absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  const auto none =
      +[](const OpenCalls* c) ABSL_NO_THREAD_SAFETY_ANALYSIS { return c->count_ == 0; };
  const auto some =
      +[](const OpenCalls* c) ABSL_NO_THREAD_SAFETY_ANALYSIS { return c->count_ > 0; };
  for (;;) {
    if (!mu_.AwaitWithDeadline(absl::Condition(none, this), deadline)) return false;
    // Linger; a call that opens meanwhile wakes this, and is waited for.
    const absl::Time until = std::min(last_release_ + linger, deadline);
    if (!mu_.AwaitWithDeadline(absl::Condition(some, this), until)) return true;
  }
}

}  // namespace spear
