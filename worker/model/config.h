// LLaMA-family model configuration, from an HF config.json or GGUF metadata.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::model {

class GgufFile;

struct RopeScaling {
  enum class Kind { kNone, kLinear, kLlama3, kDynamic, kYarn } kind = Kind::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;              // llama3
  double high_freq_factor = 4.0;             // llama3
  int64_t original_max_position = 8192;      // llama3 / yarn
};

struct ModelConfig {
  std::string architecture = "llama";  // llama, mistral, qwen2 (same forward)
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_heads unless given
  double rms_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position = 2048;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // qwen2-style q/k/v biases
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  // InvalidArgument with a precise message if sizes are missing or
  // inconsistent (heads not dividing, kv heads not dividing heads, ...).
  absl::Status Validate() const;
  // inv_freq[j] for j < head_dim/2, with rope_scaling applied (linear and
  // llama3 exactly as HF transformers computes them).
  std::vector<float> RopeInvFreq() const;
};

absl::StatusOr<ModelConfig> ConfigFromHfJson(const std::string& json_text);
absl::StatusOr<ModelConfig> ConfigFromHfJsonFile(const std::string& path);
absl::StatusOr<ModelConfig> ConfigFromGguf(const GgufFile& gguf);

}  // namespace spear::model
