// The model side of the public API, shared by every request: the model's
// public name, its tokenizer (tokenize, chat template, streaming detokenize)
// and request validation. Immutable after Load; thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spear/v1/generation.pb.h"
#include "worker/model/tokenizer.h"

namespace spear::router {

struct SloDefaults {
  double interactive_ttft = 1.0, interactive_itl = 0.2;
  double standard_ttft = 5.0, standard_itl = 0.5;
};

struct FrontendOptions {
  std::string model;       // path or cache name (the tokenizer comes from it)
  std::string model_name;  // public name; empty = derived from `model`
  int32_t default_max_tokens = 256;
  int32_t max_tokens_limit = 4096;
  int32_t max_context = 8192;  // when no worker has reported one
  SloDefaults slo;
};

// A validated request with every default resolved.
struct PreparedRequest {
  std::string request_id;
  std::vector<int32_t> prompt;
  spear::v1::SamplingParams sampling;  // max_tokens resolved; stop moved out
  std::vector<std::string> stop;
  double ttft_target = 0, itl_target = 0;
  std::string slo_class;  // interactive | standard | batch (metric label)
  spear::v1::QualityPolicy quality = spear::v1::QUALITY_POLICY_AUTO;
};

class ModelFrontend {
 public:
  static absl::StatusOr<std::unique_ptr<ModelFrontend>> Load(FrontendOptions opts);

  const std::string& name() const { return name_; }
  // nullptr when the model has no tokenizer (then only prompt_tokens work).
  const model::Tokenizer* tokenizer() const { return tok_.get(); }
  const FrontendOptions& options() const { return opts_; }

  // NotFound for an unknown model name (empty = this one).
  absl::Status CheckModel(const std::string& requested, const std::string& worker_model) const;

  // Validates every field and resolves defaults. `vocab_size` / `max_context`
  // come from the workers' Stats when known (<= 0: unknown).
  absl::StatusOr<PreparedRequest> Prepare(const spear::v1::GenerateRequest& req,
                                          int64_t vocab_size, int64_t max_context) const;

  // Tokenize RPC.
  absl::StatusOr<spear::v1::TokenizeResponse> Tokenize(const spear::v1::TokenizeRequest& req) const;

 private:
  explicit ModelFrontend(FrontendOptions opts) : opts_(std::move(opts)) {}
  FrontendOptions opts_;
  std::string name_;
  std::unique_ptr<model::Tokenizer> tok_;
};

bool IsValidUtf8(std::string_view s);
// `s` with every byte that does not start a valid UTF-8 character (or
// belongs to an invalid one) replaced by U+FFFD.
std::string SanitizeUtf8(std::string_view s);

}  // namespace spear::router
