// spear pull / spear info.
#include <cstdio>
#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "nlohmann/json.hpp"
#include "worker/model/config.h"
#include "worker/model/gguf.h"
#include "worker/model/model_cache.h"
#include "worker/model/safetensors.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/tokenizer.h"
#include "worker/model/weights.h"

namespace spear::cli {

int Fail(const std::string& cmd, const absl::Status& status, bool usage_error) {
  std::fprintf(stderr, "spear %s: %s\n", cmd.c_str(), std::string(status.message()).c_str());
  return usage_error ? 2 : 1;
}

int CmdPull(const std::vector<std::string>& args) {
  Flags flags("pull NAME");
  if (absl::Status s = flags.Parse(args); !s.ok()) return Fail("pull", s, true);
  if (flags.positional().size() != 1) {
    std::string names;
    for (const auto& m : model::KnownModels()) absl::StrAppend(&names, "\n  ", m.name, "  ", m.description);
    std::fprintf(stderr, "usage: spear pull NAME\nknown models:%s\n", names.c_str());
    return 2;
  }
  auto path = model::PullModel(flags.positional()[0]);
  if (!path.ok()) return Fail("pull", path.status(), absl::IsNotFound(path.status()));
  std::printf("%s\n", path->c_str());
  return 0;
}

namespace {

void PrintConfig(const model::ModelConfig& c) {
  std::printf("architecture     %s\n", c.architecture.c_str());
  std::printf("layers           %lld\n", static_cast<long long>(c.num_layers));
  std::printf("hidden           %lld\n", static_cast<long long>(c.hidden_size));
  std::printf("intermediate     %lld\n", static_cast<long long>(c.intermediate_size));
  std::printf("heads / kv heads %lld / %lld (head_dim %lld)\n", static_cast<long long>(c.num_heads),
              static_cast<long long>(c.num_kv_heads), static_cast<long long>(c.head_dim));
  std::printf("vocab            %lld\n", static_cast<long long>(c.vocab_size));
  std::printf("rope theta       %g\n", c.rope_theta);
  std::printf("rms eps          %g\n", c.rms_eps);
  std::printf("max position     %lld\n", static_cast<long long>(c.max_position));
  std::printf("tied embeddings  %s\n", c.tie_word_embeddings ? "yes" : "no");
}

void PrintTensorSummary(const std::vector<const model::TensorInfo*>& tensors) {
  std::map<std::string, std::pair<int64_t, int64_t>> by_type;  // count, bytes
  int64_t params = 0;
  for (const model::TensorInfo* t : tensors) {
    auto& e = by_type[std::string(model::TensorTypeName(t->type))];
    e.first++;
    e.second += static_cast<int64_t>(t->nbytes);
    params += t->numel();
  }
  std::printf("tensors          %zu (%.1f M parameters)\n", tensors.size(), params / 1e6);
  for (const auto& [type, e] : by_type) {
    std::printf("  %-8s %5lld tensors %10.1f MiB\n", type.c_str(), static_cast<long long>(e.first),
                e.second / 1048576.0);
  }
}

// A .spear directory: the manifest (checked), then the tensors.
int InfoSpear(const std::string& path) {
  namespace fs = std::filesystem;
  auto man = model::ReadSpearManifest(path);
  if (!man.ok()) return Fail("info", man.status());
  std::printf("directory        %s (.spear v%d)\n", path.c_str(), man->format_version);
  PrintConfig(man->config);
  std::map<std::string, int> formats;
  int with_ec = 0, gated = 0;
  for (const model::SpearModuleInfo& m : man->modules) {
    formats[absl::StrCat(m.group_size == m.k ? "per-channel" : absl::StrCat("g", m.group_size),
                         m.symmetric ? " sym" : " asym", m.act_scale ? " +act_scale" : "")]++;
    with_ec += m.ec_rank > 0;
    gated += m.ec_gated;
  }
  for (const auto& [fmt, n] : formats) std::printf("W4 modules       %d x %s\n", n, fmt.c_str());
  std::printf("ECs              %d of %zu modules (%d gated)\n", with_ec, man->modules.size(), gated);
  std::printf("served bytes     W4 model %.2f MiB, EC %.3f MiB (%.3f%%)\n",
              man->w4_model_bytes / 1048576.0, man->ec_bytes / 1048576.0,
              man->w4_model_bytes ? 100.0 * man->ec_bytes / man->w4_model_bytes : 0.0);
  const auto prov = nlohmann::json::parse(man->provenance_json, nullptr, false);
  if (prov.is_object()) {
    std::printf("source           %s\n", prov.value("source", std::string("?")).c_str());
    if (auto it = prov.find("source_files"); it != prov.end() && it->is_array()) {
      for (const auto& f : *it) {
        std::printf("  %s sha256 %s\n", f.value("name", std::string()).c_str(),
                    f.value("sha256", std::string()).c_str());
      }
    }
    std::printf("command          %s\n", prov.value("command", std::string()).c_str());
  }
  if (!man->measured_json.empty()) std::printf("measured         %s\n", man->measured_json.c_str());
  std::printf("tokenizer        %s\n", man->tokenizer_file.empty() ? "none" : man->tokenizer_file.c_str());
  auto ckpt = model::SafetensorsCheckpoint::Open((fs::path(path) / model::kSpearWeightsFile).string());
  if (!ckpt.ok()) return Fail("info", ckpt.status());
  PrintTensorSummary((*ckpt)->tensors());
  return 0;
}

}  // namespace

int CmdInfo(const std::vector<std::string>& args) {
  Flags flags("info");
  flags.Declare("model", "", "model path or cache name");
  if (absl::Status s = flags.Parse(args); !s.ok()) return Fail("info", s, true);
  if (flags.Str("model").empty()) return Fail("info", absl::InvalidArgumentError("--model is required"), true);
  auto path = model::ResolveModel(flags.Str("model"));
  if (!path.ok()) return Fail("info", path.status());
  namespace fs = std::filesystem;
  if (fs::is_regular_file(*path) && fs::path(*path).extension() == ".gguf") {
    auto gguf = model::GgufFile::Open(*path);
    if (!gguf.ok()) return Fail("info", gguf.status());
    std::printf("file             %s (GGUF v%u)\n", path->c_str(), (*gguf)->version());
    auto cfg = model::ConfigFromGguf(**gguf);
    if (!cfg.ok()) return Fail("info", cfg.status());
    PrintConfig(*cfg);
    std::vector<const model::TensorInfo*> ts;
    for (const auto& t : (*gguf)->tensors()) ts.push_back(&t);
    PrintTensorSummary(ts);
    auto tok = model::TokenizerFromGguf(**gguf);
    if (tok.ok()) {
      std::printf("tokenizer        %lld tokens, bos %d, eos %d, chat template %s\n",
                  static_cast<long long>((*tok)->vocab_size()), (*tok)->bos_id(), (*tok)->eos_id(),
                  (*tok)->chat_template().empty() ? "no" : "yes");
    } else {
      std::printf("tokenizer        none (%s)\n", std::string(tok.status().message()).c_str());
    }
    return 0;
  }
  if (model::IsSpearDir(*path)) return InfoSpear(*path);
  if (absl::Status st = model::CheckHfModelDir(*path); !st.ok()) return Fail("info", st);
  auto cfg = model::ConfigFromHfJsonFile((fs::path(*path) / "config.json").string());
  if (!cfg.ok()) return Fail("info", cfg.status());
  std::printf("directory        %s\n", path->c_str());
  PrintConfig(*cfg);
  auto ckpt = model::SafetensorsCheckpoint::Open(*path);
  if (!ckpt.ok()) return Fail("info", ckpt.status());
  PrintTensorSummary((*ckpt)->tensors());
  return 0;
}

}  // namespace spear::cli
