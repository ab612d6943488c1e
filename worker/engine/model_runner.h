// One forward pass of a LLaMA-family model over a batch of sequences on
// the CPU, with a paged KV cache.
//
// Every linear layer runs once over ALL tokens of the batch (one GEMM with
// m = total new tokens); RoPE, the KV write and attention are per token /
// per sequence. Prefill chunks and single decode tokens mix freely.
//
// Ownership: the runner borrows the model, the KV cache and the thread pool
// (all must outlive it) and owns its scratch buffers, which grow to the
// largest batch seen and are reused (no allocation in steady state).
// Thread-safety: one Forward at a time (not re-entrant).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kernels/thread_pool.h"
#include "worker/engine/kv_cache.h"
#include "worker/model/weights.h"

namespace spear::engine {

enum class LogitsMode { kNone, kLast, kAll };

// The new tokens of one sequence in this forward pass.
struct SeqChunk {
  // Token ids at positions start_pos .. start_pos + size - 1 (size >= 1).
  std::span<const int32_t> tokens;
  // Positions [0, start_pos) are already in the KV cache.
  int64_t start_pos = 0;
  // Blocks of this sequence; must cover start_pos + tokens.size() positions.
  std::span<const int32_t> block_table;
  LogitsMode logits = LogitsMode::kLast;
  // Also return the final-normed hidden state (what lm_head sees) of every
  // token of the chunk in ForwardOutput::hidden. The CPU runner only (the
  // CUDA runner rejects it: InvalidArgument).
  bool hidden = false;
};

struct ForwardOutput {
  int64_t vocab = 0;
  int64_t num_rows = 0;
  // [num_rows, vocab]; may be larger than needed (reused across calls).
  std::vector<float> logits;
  // First logits row of batch[i] (kLast: 1 row, kAll: tokens.size() rows),
  // -1 for kNone.
  std::vector<int64_t> first_row;
  // Chunks with SeqChunk::hidden: [num_hidden_rows, hidden_dim], one row
  // per token; first_hidden_row[i] is batch[i]'s first row (-1 without).
  int64_t hidden_dim = 0;
  int64_t num_hidden_rows = 0;
  std::vector<float> hidden;
  std::vector<int64_t> first_hidden_row;

  const float* row(int64_t r) const { return logits.data() + r * vocab; }
  const float* hidden_row(int64_t r) const { return hidden.data() + r * hidden_dim; }
};

// The seven linear modules of a decoder layer, in forward order (the order
// of LlamaWeights::ForEachLinear).
enum class LayerModule { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kModulesPerLayer = 7;

// Called by RunLayers just before each linear module runs, with that
// module's input x [m, ldx] (m = all tokens of the batch, row stride ldx =
// in_features). q/k/v see the same x; so do gate/up. Return false to stop
// the run right there (the module does not run; see RunLayers).
using LinearObserver =
    std::function<bool(int64_t layer, LayerModule module, const float* x, int64_t m, int64_t ldx)>;

// The batch checks of Forward shared by ModelRunner and the CUDA runner:
// InvalidArgument for an empty batch or chunk, a token id outside [0,
// vocab), a negative start, an end position above max_end, a block table
// shorter than ceil(end / block_size) or naming a block outside [0,
// num_blocks). *total_tokens = the batch's tokens.
absl::Status ValidateBatch(const std::vector<SeqChunk>& batch, int64_t vocab, int64_t max_end,
                           int64_t block_size, int64_t num_blocks, int64_t* total_tokens);

class ModelRunner {
 public:
  ModelRunner(const model::LoadedModel* model, KvCache* cache, kernels::ThreadPool* pool);

  // Runs the batch, writes its K/V into the cache and the requested logits
  // into *out. InvalidArgument (before touching the cache) for an empty
  // batch or chunk, a token id outside the vocabulary, a negative start, or
  // a block table too short or naming a block outside the cache.
  // Precondition (not checked): block tables of different sequences in one
  // batch are disjoint.
  absl::Status Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out);

  // --- layer-wise execution (calibration, diagnostics) ----------------------
  // The same computation as Forward, split into pieces over a residual
  // stream h [T, d] (T = total tokens of `batch`, rows in batch order) that
  // the caller owns. Validation as in Forward.
  // Embed: h = token embeddings.
  absl::Status Embed(const std::vector<SeqChunk>& batch, float* h);
  // Advances h through decoder layers [first, last) (0 <= first <= last <=
  // num_layers), writing those layers' K/V for the batch into the cache
  // (the block tables must be valid as in Forward). `observer`, if set,
  // sees every linear's input; if it returns false the run stops at once,
  // h is left UNCHANGED and *stopped (if given) is set to true.
  absl::Status RunLayers(const std::vector<SeqChunk>& batch, int64_t first, int64_t last,
                         float* h, const LinearObserver& observer = nullptr,
                         bool* stopped = nullptr);
  // y [T, d] = the final RMSNorm of h [T, d] (what lm_head sees). h and y
  // may be the same buffer.
  absl::Status FinalNorm(const float* h, int64_t T, float* y);
  // logits [T, vocab] = lm_head(y), y [T, d] final-normed.
  absl::Status LmHead(const float* y, int64_t T, float* logits);

  const model::LoadedModel& model() const { return *model_; }
  KvCache& kv_cache() { return *cache_; }
  kernels::ThreadPool* pool() { return pool_; }

 private:
  absl::Status Validate(const std::vector<SeqChunk>& batch, int64_t* total_tokens) const;
  // Runs layer l on h_ (x_ = its normed input on entry). With an observer
  // that stops the run, sets *stopped and returns OK early.
  absl::Status RunLayer(int64_t layer, const std::vector<SeqChunk>& batch, int64_t T,
                        const LinearObserver* observer = nullptr, bool* stopped = nullptr);
  void EnsureScratch(int64_t T);
  void SetPositions(const std::vector<SeqChunk>& batch);

  const model::LoadedModel* model_;
  KvCache* cache_;
  kernels::ThreadPool* pool_;
  std::vector<float> inv_freq_;
  float attn_scale_ = 1.f;

  // Scratch, sized for the largest batch so far (row-major, tight strides).
  int64_t capacity_tokens_ = 0;
  std::vector<float> h_;       // [T, d] residual stream
  std::vector<float> x_;       // [T, d] normed input of a block
  std::vector<float> delta_;   // [T, d] block output before the residual add
  std::vector<float> q_, k_, v_;  // [T, qd], [T, kvd], [T, kvd]
  std::vector<float> attn_;    // [T, qd]
  std::vector<float> gate_, up_;  // [T, ff]
  std::vector<float> sel_;     // [rows, d] hidden rows that need logits
  std::vector<int32_t> positions_;  // [T]
  std::vector<int64_t> seq_offsets_;  // [batch + 1] first token of each sequence
  std::vector<absl::Status> seq_status_;
};

}  // namespace spear::engine
