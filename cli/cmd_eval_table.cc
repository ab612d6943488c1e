// spear eval --models A,B,C: one perplexity table over several models (FP16,
// W4, W4+SPEAR, ...), with the share of the FP16-W4 gap each one closes and
// the memory its error compensators add.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/model_session.h"
#include "nlohmann/json.hpp"
#include "worker/engine/perplexity.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/tokenizer.h"

namespace spear::cli {
namespace {

struct Row {
  std::string label, model;
  std::string path;  // resolved
  double ppl = 0;
  int64_t tokens = 0;
  int64_t w4_model_bytes = 0, ec_bytes = 0;
  bool quantized = false;  // any W4 layer
  double seconds = 0;
};

// Index of `ref` among labels or model names; -1 if absent.
int FindRef(const std::string& ref, const std::vector<std::string>& labels,
            const std::vector<std::string>& models) {
  for (size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] == ref || models[i] == ref) return static_cast<int>(i);
  }
  return -1;
}

}  // namespace

int EvalModelsTable(const Flags& f) {
  const std::vector<std::string> models = absl::StrSplit(f.Str("models"), ',', absl::SkipEmpty());
  std::vector<std::string> labels;
  if (f.Has("labels")) {
    labels = absl::StrSplit(f.Str("labels"), ',');
    if (labels.size() != models.size()) {
      return Fail("eval", absl::InvalidArgumentError(absl::StrCat(
                              "--labels has ", labels.size(), " entries but --models has ",
                              models.size())), true);
    }
  } else {
    labels = models;
  }
  if (models.size() < 2) {
    return Fail("eval", absl::InvalidArgumentError("--models needs at least two models (FP16,W4,...)"), true);
  }
  const int ref_fp16 = f.Has("reference-fp16") ? FindRef(f.Str("reference-fp16"), labels, models) : 0;
  const int ref_w4 = f.Has("reference-w4") ? FindRef(f.Str("reference-w4"), labels, models) : 1;
  if (ref_fp16 < 0 || ref_w4 < 0) {
    return Fail("eval", absl::InvalidArgumentError(
                            "--reference-fp16 / --reference-w4 must name a label or a model of --models"),
                true);
  }
  if (ref_fp16 == ref_w4) {
    return Fail("eval", absl::InvalidArgumentError("the FP16 and W4 references must differ"), true);
  }
  auto ctx = f.Int("ctx", 2, 1 << 20);
  auto max_tokens = f.Int("max-tokens", 0, INT64_MAX);
  auto threads = f.Int("threads", 0, 1024);
  auto device = DeviceFlag(f.Str("device"));
  for (const absl::Status& s : {ctx.status(), max_tokens.status(), threads.status(), device.status()}) {
    if (!s.ok()) return Fail("eval", s, true);
  }
  if (f.Str("text").empty()) return Fail("eval", absl::InvalidArgumentError("--text is required"), true);
  auto text_or = ReadTextFile(f.Str("text"));
  if (!text_or.ok()) return Fail("eval", text_or.status());
  const std::string text = std::move(*text_or);
  const bool json = f.Bool("json");
  const bool tty = isatty(fileno(stderr));

  // One model at a time (loaded, scored, released). The text is tokenized by
  // the first model with a tokenizer; the others must share its vocabulary.
  std::vector<Row> rows;
  std::vector<int32_t> tokens;
  int64_t vocab = -1;
  for (size_t i = 0; i < models.size(); ++i) {
    auto session = OpenModel(models[i], static_cast<int>(*threads), *ctx, *device);
    if (!session.ok()) {
      return Fail("eval", absl::Status(session.status().code(),
                                       absl::StrCat(models[i], ": ", session.status().message())));
    }
    const model::LoadedModel& m = *session->model;
    if (tokens.empty()) {
      if (m.tokenizer == nullptr) {
        return Fail("eval", absl::FailedPreconditionError(
                                absl::StrCat(models[i], " has no tokenizer (the first model needs one)")));
      }
      tokens = m.tokenizer->Encode(text, /*add_bos=*/false);
      vocab = m.config.vocab_size;
    } else if (m.config.vocab_size != vocab) {
      return Fail("eval", absl::FailedPreconditionError(absl::StrCat(
                              models[i], " has vocabulary ", m.config.vocab_size, ", the first model ",
                              vocab, "; the models must share a tokenizer")));
    }
    Row row;
    row.label = labels[i];
    row.model = models[i];
    row.path = session->model->source_path;
    const model::ServedBytes sb = model::ComputeServedBytes(m);
    row.w4_model_bytes = sb.w4_model_bytes;
    row.ec_bytes = sb.ec_bytes;
    row.quantized = model::IsSpearDir(session->model->source_path) || sb.ec_bytes > 0;
    const double t0 = NowSeconds();
    auto progress = [&](int64_t done, int64_t total, double ppl) {
      if (!tty && json) return;
      if (tty || done == total) {
        std::fprintf(stderr, "%s%-12s %lld/%lld windows  ppl %.4f%s", tty ? "\r" : "",
                     row.label.c_str(), static_cast<long long>(done), static_cast<long long>(total),
                     ppl, done == total || !tty ? "\n" : "");
      }
    };
    auto r = engine::EvalPerplexity(session->engine->backend(), tokens, static_cast<int>(*ctx),
                                    *max_tokens > 0 ? *max_tokens : static_cast<int64_t>(tokens.size()),
                                    progress);
    if (!r.ok()) {
      return Fail("eval", absl::Status(r.status().code(),
                                       absl::StrCat(models[i], ": ", r.status().message())));
    }
    row.ppl = r->ppl;
    row.tokens = r->windows * (*ctx);
    row.seconds = NowSeconds() - t0;
    rows.push_back(std::move(row));
  }

  const double p16 = rows[ref_fp16].ppl, pw4 = rows[ref_w4].ppl;
  const bool gap_defined = pw4 - p16 > 0;
  auto gap = [&](const Row& r) -> std::optional<double> {
    if (!gap_defined) return std::nullopt;
    return 100.0 * (pw4 - r.ppl) / (pw4 - p16);
  };
  // Added memory relative to the served W4 model (dense models: none).
  auto added = [](const Row& r) -> std::optional<double> {
    if (!r.quantized || r.w4_model_bytes == 0) return std::nullopt;
    return 100.0 * r.ec_bytes / r.w4_model_bytes;
  };
  if (f.Bool("record")) {
    // measured["<text file>@ctx<N>"] in every .spear of the table.
    const std::string key = absl::StrCat(
        std::filesystem::path(f.Str("text")).filename().string(), "@ctx", *ctx);
    for (const Row& r : rows) {
      if (!model::IsSpearDir(r.path)) continue;
      const auto g = gap(r);
      nlohmann::ordered_json v = {{"ppl", r.ppl}, {"tokens", r.tokens},
                                  {"gap_closed_pct", g ? nlohmann::ordered_json(*g) : nullptr},
                                  {"reference_fp16", rows[ref_fp16].model},
                                  {"reference_fp16_ppl", p16},
                                  {"reference_w4", rows[ref_w4].model},
                                  {"reference_w4_ppl", pw4}};
      if (auto s = model::RecordSpearMeasurement(r.path, key, v.dump()); !s.ok()) {
        return Fail("eval", s);
      }
      if (!json) std::fprintf(stderr, "recorded %s in %s/spear.json\n", key.c_str(), r.path.c_str());
    }
  }
  if (json) {
    nlohmann::ordered_json arr = nlohmann::ordered_json::array();
    for (const Row& r : rows) {
      const auto g = gap(r);
      const auto a = added(r);
      arr.push_back({{"label", r.label},
                     {"model", r.model},
                     {"ppl", r.ppl},
                     {"gap_closed_pct", g ? nlohmann::ordered_json(*g) : nullptr},
                     {"added_memory_pct", a ? nlohmann::ordered_json(*a) : nullptr},
                     {"ec_bytes", r.ec_bytes},
                     {"served_bytes", r.w4_model_bytes},
                     {"tokens", r.tokens},
                     {"ctx", *ctx},
                     {"seconds", r.seconds}});
    }
    std::printf("%s\n", arr.dump().c_str());
    return 0;
  }
  std::printf("%-16s %12s %12s %14s %10s\n", "model", "perplexity", "gap closed", "added memory",
              "tokens");
  for (const Row& r : rows) {
    const auto g = gap(r);
    const auto a = added(r);
    std::printf("%-16s %12.4f %12s %14s %10lld\n", r.label.c_str(), r.ppl,
                g ? absl::StrFormat("%.1f%%", *g).c_str() : "-",
                a ? absl::StrFormat("%.3f%%", *a).c_str() : "-", static_cast<long long>(r.tokens));
  }
  std::printf("gap closed = (PPL_W4 - PPL) / (PPL_W4 - PPL_FP16) with FP16 = %s, W4 = %s%s; "
              "added memory = EC bytes / served W4 model bytes; ctx %lld\n",
              rows[ref_fp16].label.c_str(), rows[ref_w4].label.c_str(),
              gap_defined ? "" : " (undefined: W4 is not worse than FP16)",
              static_cast<long long>(*ctx));
  return 0;
}

}  // namespace spear::cli
