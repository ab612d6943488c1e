// A synchronous generation engine over a LoadedModel on one ModelBackend
// (backend.h: the CPU ModelRunner, or the CUDA runner through
// engine_factory.h).
//
// Generate() streams one request; GenerateBatch() runs several together:
// prompts are prefilled in chunks under a per-step token budget, decoding
// sequences get one token each per step, and sequences finish
// independently. Both are built on Step(), the per-iteration primitive a
// continuous-batching scheduler calls with its own choice of sequences and
// chunk sizes.
//
// Ownership: the engine borrows the model (must outlive it) and owns the
// thread pool (the CPU backend's compute threads; sampling on every
// backend) and the backend (its KV cache included). Thread-safety: one call at
// a time (Generate, GenerateBatch and Step are not re-entrant); callbacks
// run on the calling thread and must not call back into the engine.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "worker/engine/backend.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/engine/sampler.h"
#include "worker/engine/sequence.h"
#include "worker/model/weights.h"

namespace spear::engine {

struct EngineOptions {
  int num_threads = 0;  // <= 0: all hardware threads
  // The KV cache of the CPU backend that Create(model, options) builds
  // (engine_factory.h maps it onto the CUDA runner's cache: same
  // block_size and num_blocks; `bytes` at fp16, so twice the blocks).
  KvCacheOptions kv_cache;
  // Tokens per step across the batch; prompts longer than this are
  // prefilled in chunks.
  int64_t max_batch_tokens = 512;
};

// Called with each generated token; return false to stop the request.
using TokenCallback = std::function<bool(int32_t token)>;
// Called with the final-normed hidden states (what lm_head sees) of
// positions [first_pos, first_pos + count) of the sequence (prompt and
// generated tokens, as they are computed: a prompt chunk, then one per
// decode step), `rows` [count, dim] valid during the call only.
using HiddenCallback =
    std::function<void(int64_t first_pos, const float* rows, int64_t count, int64_t dim)>;

struct GenerateRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  GenerateOptions options;
  TokenCallback on_token;  // may be empty
  // May be empty. Only on a backend that returns hidden states
  // (ModelBackend::returns_hidden: the CPU backend); elsewhere the request
  // fails with InvalidArgument. The last generated token is never run, so
  // positions up to prompt + generated - 2 are reported.
  HiddenCallback on_hidden;
};

struct GenerateResult {
  absl::Status status;  // per request: InvalidArgument, ResourceExhausted, ...
  std::vector<int32_t> tokens;  // generated, stop token excluded
  FinishReason finish_reason = FinishReason::kNone;
  int64_t prompt_tokens = 0;
};

// One entry of a Step: run up to max_tokens of seq's pending tokens.
struct StepItem {
  Sequence* seq;
  int64_t max_tokens;
  // Also return the final-normed hidden states of the chunk's tokens
  // (StepOutput::hidden); InvalidArgument on a backend that does not
  // return them.
  bool hidden = false;
};
struct StepOutput {
  Sequence* seq;
  int32_t token;  // appended to seq (stream it), or -1 (mid-prefill / stopped)
  // With StepItem::hidden: [hidden_rows, hidden_dim] for positions
  // [hidden_pos, hidden_pos + hidden_rows), valid until the next Step.
  const float* hidden = nullptr;
  int64_t hidden_pos = 0, hidden_rows = 0, hidden_dim = 0;
};

class Engine {
 public:
  // An engine on the CPU backend (ModelRunner over a KvCache of
  // options.kv_cache, computing on the engine's thread pool).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const model::LoadedModel* model,
                                                        const EngineOptions& options);
  // An engine on `backend`, which must run `model`; options.kv_cache is
  // unused (the backend has its own cache). InvalidArgument for a null
  // backend or one over another model.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const model::LoadedModel* model,
                                                        const EngineOptions& options,
                                                        std::unique_ptr<ModelBackend> backend);

  // Streams tokens of one request to `on_token`. Errors: InvalidArgument
  // (bad prompt or parameters), ResourceExhausted (request larger than the
  // KV cache), or a kernel failure.
  absl::StatusOr<GenerateResult> Generate(const std::vector<int32_t>& prompt,
                                          const SamplingParams& sampling,
                                          const GenerateOptions& options,
                                          const TokenCallback& on_token = nullptr);

  // Runs the requests together; results in request order, each with its
  // own status. Requests are admitted first come first served while their
  // worst-case KV need (prompt + max_new_tokens) fits; the rest wait.
  std::vector<GenerateResult> GenerateBatch(const std::vector<GenerateRequest>& requests);

  // --- the building blocks --------------------------------------------------
  // Validates a request and wraps it; holds no KV blocks yet.
  absl::StatusOr<std::unique_ptr<Sequence>> NewSequence(std::vector<int32_t> prompt,
                                                        const SamplingParams& sampling,
                                                        const GenerateOptions& options);
  // KV blocks a sequence can need at most (prompt + max_new_tokens).
  int64_t MaxBlocksNeeded(const Sequence& seq) const;
  // One forward over the items: allocates KV blocks as positions grow,
  // runs the chunk of each, and for every sequence whose pending tokens are
  // all computed samples the next token (finishing it on a stop token or
  // max_new_tokens). Items must name distinct, unfinished sequences.
  // On error nothing is sampled; blocks allocated so far stay with their
  // sequences (Release frees them).
  absl::Status Step(const std::vector<StepItem>& items, std::vector<StepOutput>* outputs);
  // Returns a sequence's KV blocks to the cache.
  void Release(Sequence* seq);

  const model::LoadedModel& model() const { return *model_; }
  ModelBackend& backend() { return *backend_; }
  const ModelBackend& backend() const { return *backend_; }
  int64_t num_free_blocks() const { return backend_->allocator().num_free(); }
  int num_threads() const { return pool_->size(); }
  const EngineOptions& options() const { return options_; }

 private:
  Engine(const model::LoadedModel* model, const EngineOptions& options);
  bool IsStopToken(const Sequence& seq, int32_t token) const;

  const model::LoadedModel* model_;
  EngineOptions options_;
  std::unique_ptr<kernels::ThreadPool> pool_;
  std::unique_ptr<ModelBackend> backend_;
  int64_t next_id_ = 0;
  // Step scratch, reused.
  std::vector<SeqChunk> chunks_;
  ForwardOutput out_;
  std::vector<int32_t> sampled_;
  std::vector<RowSampling> rows_;      // device sampling: one per logits row
  std::vector<int32_t> row_tokens_;
};

}  // namespace spear::engine
