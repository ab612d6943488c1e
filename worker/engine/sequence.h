// One generation request's state inside the engine.
//
// tokens() = prompt followed by generated tokens. num_computed() of them
// have their K/V in the cache; the rest are pending (the prompt remainder
// during prefill, the last sampled token during decode).
// Thread-safety: owned and touched by the engine loop only.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "worker/engine/sampler.h"

namespace spear::engine {

struct GenerateOptions {
  int64_t max_new_tokens = 128;  // >= 0
  bool stop_on_eos = true;       // stop at the model's EOS token(s)
  std::vector<int32_t> stop_token_ids;
};

enum class FinishReason {
  kNone,       // still running
  kLength,     // max_new_tokens reached
  kStop,       // EOS or a stop token sampled (not included in the output)
  kCancelled,  // the caller asked to stop (callback returned false, Cancel)
  kError,      // see Sequence::status()
};
const char* FinishReasonName(FinishReason r);

class Sequence {
 public:
  Sequence(int64_t id, std::vector<int32_t> prompt, const SamplingParams& sampling,
           const GenerateOptions& options);

  int64_t id() const { return id_; }
  std::span<const int32_t> tokens() const { return tokens_; }
  int64_t num_prompt_tokens() const { return num_prompt_; }
  int64_t num_generated() const { return static_cast<int64_t>(tokens_.size()) - num_prompt_; }
  std::span<const int32_t> generated() const {
    return std::span<const int32_t>(tokens_).subspan(num_prompt_);
  }
  int64_t num_computed() const { return num_computed_; }
  int64_t num_pending() const { return static_cast<int64_t>(tokens_.size()) - num_computed_; }
  bool in_prefill() const { return num_computed_ < num_prompt_; }

  bool finished() const { return finish_ != FinishReason::kNone; }
  FinishReason finish_reason() const { return finish_; }
  const absl::Status& status() const { return status_; }
  void Finish(FinishReason r, absl::Status status = absl::OkStatus()) {
    if (finish_ == FinishReason::kNone) {
      finish_ = r;
      status_ = std::move(status);
    }
  }

  const GenerateOptions& options() const { return options_; }
  Sampler& sampler() { return sampler_; }
  std::vector<int32_t>& block_table() { return block_table_; }
  const std::vector<int32_t>& block_table() const { return block_table_; }

  // Engine bookkeeping.
  void MarkComputed(int64_t n) { num_computed_ += n; }
  // Preemption by recompute: forget every computed position (the caller
  // has released the KV blocks); prompt and generated tokens are all
  // pending again and are recomputed as one prefill. The sampler keeps its
  // state, so the continuation is the same as without preemption.
  void ResetComputed() { num_computed_ = 0; }
  void Append(int32_t token) { tokens_.push_back(token); }

 private:
  int64_t id_;
  std::vector<int32_t> tokens_;
  int64_t num_prompt_;
  int64_t num_computed_ = 0;
  GenerateOptions options_;
  Sampler sampler_;
  std::vector<int32_t> block_table_;
  FinishReason finish_ = FinishReason::kNone;
  absl::Status status_;
};

}  // namespace spear::engine
