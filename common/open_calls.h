// The drain's count of open gRPC calls, shared by spear-worker (Execute
// streams) and spear-router (Generate / GenerateStream calls).
#pragma once

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace spear {

// Calls whose reactor gRPC has not released yet (constructor to OnDone; a
// closed call can still have its last bytes queued). gRPC releases a call
// once those bytes are handed to the socket, not once the client has read
// them, and a process that exits at once can reset the connection under the
// client's unread tail (a close with unread bytes sends RST): so a drain
// waits for every call to be released and then lingers a moment after the
// last release. Held by shared_ptr: reactors can outlive their service's
// shutdown deadline. Thread-safe.
class OpenCalls {
 public:
  void Opened();
  void Released();  // also stamps the release time
  int count() const;

  // Blocks until no call is open and `linger` has passed since the last
  // release (a call opened meanwhile is waited for too), or until
  // `deadline`, which may cut the linger short. True when no call was open
  // at the end.
  bool WaitDrained(absl::Duration linger, absl::Time deadline) const;

 private:
  mutable absl::Mutex mu_;
  int count_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_release_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

}  // namespace spear
