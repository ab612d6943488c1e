#include "cli/model_session.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "spdlog/spdlog.h"
#include "worker/engine/engine_factory.h"
#include "worker/model/model_cache.h"
#include "worker/model/tokenizer.h"

namespace spear::cli {

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

absl::StatusOr<engine::Device> DeviceFlag(const std::string& value) {
  auto d = engine::ParseDevice(value);
  if (!d.ok()) return absl::InvalidArgumentError(absl::StrCat("--", d.status().message()));
  return d;
}

absl::StatusOr<ModelSession> OpenModel(const std::string& name_or_path, int threads,
                                       int64_t kv_tokens, engine::Device device, bool quiet) {
  if (name_or_path.empty()) return absl::InvalidArgumentError("--model is required");
  // Fail before loading the model when the device cannot be had.
  if (auto d = engine::ResolveDevice(device); !d.ok()) return d.status();
  auto path = model::ResolveModel(name_or_path);
  if (!path.ok()) return path.status();
  ModelSession s;
  const double t0 = NowSeconds();
  auto loaded = model::LoadModel(*path);
  if (!loaded.ok()) return loaded.status();
  s.model = std::move(*loaded);
  s.load_seconds = NowSeconds() - t0;
  engine::EngineOptions opts;
  opts.num_threads = threads;
  // float32 K and V for every layer, plus one block of slack per 16 blocks.
  const model::ModelConfig& c = s.model->config;
  const int64_t per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4;
  const int64_t tokens = kv_tokens + kv_tokens / 16 + opts.kv_cache.block_size;
  opts.kv_cache.bytes = std::max<int64_t>(int64_t{64} << 20, per_token * tokens);
  auto eng = engine::CreateEngine(s.model.get(), opts, device);
  if (!eng.ok()) return eng.status();
  s.engine = std::move(*eng);
  if (!quiet) spdlog::info("backend {}", s.engine->backend().Describe());
  return s;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::vector<int32_t>> PromptTokens(const model::LoadedModel& m,
                                                  const std::string& text, const std::string& ids,
                                                  bool chat, const std::string& system) {
  if (!ids.empty()) {
    if (!text.empty()) return absl::InvalidArgumentError("give --prompt or --prompt-ids, not both");
    std::vector<int32_t> out;
    for (absl::string_view piece : absl::StrSplit(ids, absl::ByAnyChar(" ,"), absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(piece, &id) || id < 0 || id >= m.config.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("--prompt-ids: '", piece,
                                                       "' is not a token id in [0, ",
                                                       m.config.vocab_size, ")"));
      }
      out.push_back(id);
    }
    if (out.empty()) return absl::InvalidArgumentError("--prompt-ids is empty");
    return out;
  }
  if (m.tokenizer == nullptr) {
    return absl::FailedPreconditionError("this model has no tokenizer; use --prompt-ids");
  }
  if (!chat) return m.tokenizer->Encode(text, /*add_bos=*/true);
  std::vector<model::ChatMessage> msgs;
  if (!system.empty()) msgs.push_back({"system", system});
  msgs.push_back({"user", text});
  auto rendered = model::ApplyChatTemplate(*m.tokenizer, msgs, /*add_generation_prompt=*/true);
  if (!rendered.ok()) return rendered.status();
  return m.tokenizer->Encode(*rendered, /*add_bos=*/true);
}

}  // namespace spear::cli
