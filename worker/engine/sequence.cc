#include "worker/engine/sequence.h"

#include <utility>

namespace spear::engine {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

Sequence::Sequence(int64_t id, std::vector<int32_t> prompt, const SamplingParams& sampling,
                   const GenerateOptions& options)
    : id_(id),
      tokens_(std::move(prompt)),
      num_prompt_(static_cast<int64_t>(tokens_.size())),
      options_(options),
      sampler_(sampling) {}

}  // namespace spear::engine
