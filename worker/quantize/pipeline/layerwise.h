// Layer-wise execution of a model over a FIXED set of token sequences: the
// calibration workhorse of the quantization pipeline.
//
// The caller owns residual streams h [T, d] whose rows are the tokens of all
// sequences concatenated in order (T = total tokens). The runner advances a
// stream through a range of decoder layers, micro-batch by micro-batch
// (whole sequences, at most `micro_batch_tokens` per batch unless a single
// sequence is longer), each sequence from position 0 with its own KV blocks
// in a cache the runner owns (sized for the largest micro-batch; blocks are
// reused by the next micro-batch, because a layer's attention only reads
// that layer's K/V, written in the same call).
//
// Capture hook: RunLayers' observer sees every linear module's input, with
// the row offset of the micro-batch inside the full token set, so callers
// can gather module inputs of all tokens into [T, k] buffers.
//
// Ownership: borrows the model (which may be modified between calls, e.g.
// linears replaced) and the pool. Thread-safety: one call at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/model/weights.h"

namespace spear::quantize {

using engine::LayerModule;

// (layer, module, x [m, ldx], row offset of x's first row in the full token
// set, m). Return false to stop this micro-batch at this point (its rows of
// h stay unchanged; the other micro-batches still run).
using StreamObserver = std::function<bool(int64_t layer, LayerModule module, const float* x,
                                          int64_t row0, int64_t m, int64_t ldx)>;

class LayerwiseRunner {
 public:
  // InvalidArgument for no sequences, an empty sequence or a bad token id.
  static absl::StatusOr<std::unique_ptr<LayerwiseRunner>> Create(
      const model::LoadedModel* model, kernels::ThreadPool* pool,
      std::vector<std::vector<int32_t>> sequences, int64_t micro_batch_tokens = 2048);

  int64_t num_tokens() const { return total_tokens_; }
  int64_t hidden() const { return model_->config.hidden_size; }
  const std::vector<std::vector<int32_t>>& sequences() const { return seqs_; }
  // First row of sequence i (size num_sequences + 1).
  const std::vector<int64_t>& seq_offsets() const { return seq_offsets_; }

  // h [T, d] = embeddings.
  absl::Status Embed(float* h);
  // Advances h through layers [first, last).
  absl::Status RunLayers(int64_t first, int64_t last, float* h,
                         const StreamObserver& observer = nullptr);
  // y [T, d] = final RMSNorm(h) (may alias).
  absl::Status FinalNorm(const float* h, float* y);

 private:
  LayerwiseRunner(const model::LoadedModel* model, kernels::ThreadPool* pool)
      : model_(model), pool_(pool) {}

  struct MicroBatch {
    int64_t row0 = 0, tokens = 0;
    std::vector<engine::SeqChunk> chunks;
  };

  const model::LoadedModel* model_;
  kernels::ThreadPool* pool_;
  std::vector<std::vector<int32_t>> seqs_;
  std::vector<int64_t> seq_offsets_;
  int64_t total_tokens_ = 0;
  std::vector<std::vector<int32_t>> block_tables_;  // per slot within a micro-batch
  std::vector<MicroBatch> batches_;
  std::unique_ptr<engine::KvCache> cache_;
  std::unique_ptr<engine::ModelRunner> runner_;
};

}  // namespace spear::quantize
