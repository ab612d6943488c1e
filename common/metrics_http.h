// The /metrics HTTP endpoint's shutdown, shared by spear-worker and
// spear-router (both serve Prometheus metrics through prometheus-cpp's
// Exposer, an embedded civetweb server).
#pragma once

#include <memory>
#include <string>

#include "prometheus/exposer.h"

namespace spear::metrics_http {

// Destroys `exposer` (no-op when null) without civetweb's shutdown wait:
// mg_stop sets its stop flag and then waits for its master thread, whose
// poll on the listening socket only times out every 2 s (a compile-time
// quantum), so a plain destruction holds the caller 2-3.5 s (measured:
// spear-worker exited 3.6 s after its drain had finished). A connection to
// the listening port wakes that poll at once: a helper thread connects and
// closes every 10 ms until the destruction returns. `host` is the address
// the exposer was bound to; a wildcard or empty host is reached through
// 127.0.0.1. Where no connection can be made the destruction still
// completes, after civetweb's own wait. Thread-compatible.
void StopExposer(std::unique_ptr<prometheus::Exposer>& exposer, const std::string& host);

}  // namespace spear::metrics_http
