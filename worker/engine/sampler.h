// Token sampling: greedy, temperature, top-k, top-p, repetition penalty.
//
// Determinism: a Sampler with a given seed produces the same tokens for the
// same logits on every run and platform (its own RNG arithmetic, no
// std:: distributions). Ties are broken towards the lower token id.
// Thread-safety: a Sampler is per sequence and not thread-safe.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace spear::engine {

struct SamplingParams {
  float temperature = 0.f;  // 0 = greedy (argmax); must be >= 0
  int top_k = 0;            // 0 = off; else keep the k most likely tokens
  float top_p = 1.f;        // nucleus mass in (0, 1]; 1 = off
  uint64_t seed = 0;
  // > 0; 1 = off. CTRL-style: for each token already in the sequence,
  // logit /= penalty if positive, *= penalty if negative.
  float repetition_penalty = 1.f;

  // InvalidArgument with the offending field named.
  absl::Status Validate() const;
};

// One logits row to be sampled on a backend's device (ModelBackend::
// ForwardSample): the sequence's parameters, the uniform draw Sample would
// have used (Sampler::Next), and the tokens the repetition penalty sees
// (empty when it is off). The span must outlive the ForwardSample call.
struct RowSampling {
  SamplingParams params;
  double uniform = 0.0;
  std::span<const int32_t> history;
};

class Sampler {
 public:
  // `params` must have passed Validate().
  explicit Sampler(const SamplingParams& params);

  // Picks the next token from logits[0, vocab). `history` (prompt and
  // generated tokens) is used only by the repetition penalty. Ids in
  // history outside [0, vocab) are ignored. Draws one uniform from the
  // sampler's RNG unless greedy; = Pick(logits, vocab, history, draw).
  int32_t Sample(const float* logits, int64_t vocab, std::span<const int32_t> history);

  // The pick for a given uniform draw u in [0, 1) (u unused when greedy);
  // no RNG state is touched. The reference of the device sampler
  // (kernels::cuda::SampleRows).
  int32_t Pick(const float* logits, int64_t vocab, std::span<const int32_t> history, double u);

  // What a device needs to sample this sequence's next row as Sample
  // would: consumes the RNG exactly as Sample does (one draw unless
  // greedy), so host and device sampling give the same token stream.
  RowSampling Next(std::span<const int32_t> history);

  const SamplingParams& params() const { return params_; }

 private:
  double Uniform();  // [0, 1)

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<float> work_;                       // penalised logits
  std::vector<std::pair<float, int32_t>> cand_;   // candidates, sorted
  std::vector<double> probs_;
  // Top-p without top-k: the vocabulary's mass buckets and the histogram
  // of the masses by bucket (MassBucket, sampler.cc).
  static constexpr int kMassBuckets = 4096;
  std::vector<uint16_t> bucket_;
  std::vector<double> hist_ = std::vector<double>(kMassBuckets);
};

}  // namespace spear::engine
