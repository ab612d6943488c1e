// Perplexity of a token stream under the model (WikiText-2 style).
//
// Protocol (HF transformers' perplexity guide with stride = ctx): the
// first min(tokens, max_tokens) tokens are cut into non-overlapping
// windows of ctx tokens (a trailing partial window is dropped); each window
// is evaluated from an empty KV cache and scored on its tokens 1..ctx-1,
// each given its own prefix inside the window (token 0 has no context and
// is not scored). No BOS is inserted: the caller tokenizes. Thus
// ppl = exp(nll_sum / tokens_scored), tokens_scored = windows * (ctx - 1).
//
// Memory stays bounded: each window is run as a chunked prefill of at most
// `chunk_tokens` tokens, and the log-softmax of each chunk's logits
// (computed in double) is consumed before the next chunk.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/backend.h"
#include "worker/engine/model_runner.h"

namespace spear::engine {

struct PerplexityResult {
  double ppl = 0;
  double nll_sum = 0;  // natural log
  int64_t tokens_scored = 0;
  int64_t windows = 0;
};

// Called after each window with (windows done, total windows, ppl so far).
using PerplexityProgress = std::function<void(int64_t, int64_t, double)>;

// Runs on any backend (CPU or CUDA) and uses its KV cache (allocates
// ceil(ctx / block_size) blocks for the duration of the call).
// InvalidArgument if ctx < 2 or there is not one full window;
// ResourceExhausted if the cache cannot hold a window.
absl::StatusOr<PerplexityResult> EvalPerplexity(ModelBackend& backend,
                                                const std::vector<int32_t>& tokens, int ctx,
                                                int64_t max_tokens,
                                                const PerplexityProgress& progress = nullptr,
                                                int64_t chunk_tokens = 256);
// The same on a CPU ModelRunner and its cache.
absl::StatusOr<PerplexityResult> EvalPerplexity(ModelRunner& runner,
                                                const std::vector<int32_t>& tokens, int ctx,
                                                int64_t max_tokens,
                                                const PerplexityProgress& progress = nullptr,
                                                int64_t chunk_tokens = 256);

}  // namespace spear::engine
