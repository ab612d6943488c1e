// Shared by the CLI commands that run a model: resolve, load, build an
// engine, tokenize prompts.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/backend.h"
#include "worker/engine/engine.h"
#include "worker/model/weights.h"

namespace spear::cli {

struct ModelSession {
  std::unique_ptr<model::LoadedModel> model;
  std::unique_ptr<engine::Engine> engine;
  double load_seconds = 0;
};

// Resolves `name_or_path` (path or cache name), loads it and creates an
// engine on `device` (engine_factory.h: cuda fails with FailedPrecondition
// / Unavailable when this build or machine has none; auto picks) with
// `threads` threads (<= 0: all) and a KV cache sized from the model's own
// config to hold `kv_tokens` positions (at least 64 MiB at fp32). The
// backend is logged (stderr) unless `quiet`.
absl::StatusOr<ModelSession> OpenModel(const std::string& name_or_path, int threads,
                                       int64_t kv_tokens, engine::Device device = engine::Device::kCpu,
                                       bool quiet = false);

// The --device flag's value (cpu | cuda | auto); InvalidArgument otherwise.
absl::StatusOr<engine::Device> DeviceFlag(const std::string& value);

// The whole file as bytes; NotFound naming the path if it cannot be read.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

// Token ids of a prompt: `ids` ("1 2 3", for models without tokenizer), or
// `text`, formatted with the chat template when `chat` (with an optional
// system message).
absl::StatusOr<std::vector<int32_t>> PromptTokens(const model::LoadedModel& m,
                                                  const std::string& text, const std::string& ids,
                                                  bool chat, const std::string& system);

double NowSeconds();

}  // namespace spear::cli
