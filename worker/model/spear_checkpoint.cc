// .spear: manifest (spear.json) <-> structs, served-bytes accounting, save.
// Loading and tensor validation live in spear_checkpoint_load.cc.
#include "worker/model/spear_checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"
#include "worker/model/safetensors.h"
#include "worker/model/sha256.h"
#include "worker/model/spear_checkpoint_internal.h"
#include "worker/model/w4_linear.h"

namespace spear::model {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

// Buffers backing the tensors being written.
class TensorList {
 public:
  void AddBytes(const std::string& name, TensorType type, std::vector<int64_t> shape,
                std::vector<uint8_t> bytes) {
    bufs_.push_back(std::make_unique<std::vector<uint8_t>>(std::move(bytes)));
    tensors_.push_back({name, type, std::move(shape), bufs_.back()->data(), bufs_.back()->size()});
  }
  void AddF16(const std::string& name, std::vector<int64_t> shape, const float* v, size_t n) {
    std::vector<uint8_t> b(2 * n);
    for (size_t i = 0; i < n; ++i) {
      const uint16_t h = kernels::FloatToHalf(v[i]);
      std::memcpy(b.data() + 2 * i, &h, 2);
    }
    AddBytes(name, TensorType::kF16, std::move(shape), std::move(b));
  }
  void AddF16(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    AddF16(name, std::move(shape), v.data(), v.size());
  }
  void AddHalfWords(const std::string& name, TensorType type, std::vector<int64_t> shape,
                    const uint16_t* v, size_t n) {
    std::vector<uint8_t> b(2 * n);
    std::memcpy(b.data(), v, b.size());
    AddBytes(name, type, std::move(shape), std::move(b));
  }
  void AddF32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    std::vector<uint8_t> b(4 * v.size());
    std::memcpy(b.data(), v.data(), b.size());
    AddBytes(name, TensorType::kF32, std::move(shape), std::move(b));
  }
  // A [rows, cols] matrix of `dtype`: BF16 and F16 kept, F32 converted to F16.
  TensorType AddMatrix(const std::string& name, const void* data, kernels::DType dtype,
                       int64_t rows, int64_t cols) {
    const size_t n = static_cast<size_t>(rows * cols);
    if (dtype == kernels::DType::kF32) {
      AddF16(name, {rows, cols}, static_cast<const float*>(data), n);
      return TensorType::kF16;
    }
    const TensorType t = dtype == kernels::DType::kBF16 ? TensorType::kBF16 : TensorType::kF16;
    AddHalfWords(name, t, {rows, cols}, static_cast<const uint16_t*>(data), n);
    return t;
  }
  const std::vector<TensorToWrite>& tensors() const { return tensors_; }

 private:
  std::vector<std::unique_ptr<std::vector<uint8_t>>> bufs_;
  std::vector<TensorToWrite> tensors_;
};

absl::StatusOr<json> ParseObject(const std::string& text, const char* what) {
  if (text.empty()) return json::object();
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("provenance ", what, " is not a JSON object"));
  }
  return j;
}

// SHA-256 of the source: one file, or every regular file of a directory.
absl::StatusOr<json> HashSource(const std::string& path) {
  json files = json::array();
  std::vector<fs::path> paths;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    for (const auto& e : fs::directory_iterator(path, ec)) {
      if (e.is_regular_file()) paths.push_back(e.path());
    }
    std::sort(paths.begin(), paths.end());
  } else if (fs::is_regular_file(path, ec)) {
    paths.push_back(path);
  }
  for (const fs::path& p : paths) {
    auto h = Sha256File(p.string());
    if (!h.ok()) return h.status();
    files.push_back({{"name", p.filename().string()},
                     {"bytes", static_cast<int64_t>(fs::file_size(p, ec))},
                     {"sha256", *h}});
  }
  return files;
}

absl::Status WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

absl::Status WriteCheckpointFiles(const LoadedModel& model, const SpearProvenance& prov,
                                  const fs::path& dir) {
  const ModelConfig& c = model.config;
  const LlamaWeights& w = model.weights;
  TensorList t;
  json modules = json::array();
  const TensorType embed_type =
      t.AddMatrix("model.embed_tokens.weight", w.embed, w.embed_dtype, c.vocab_size, c.hidden_size);
  t.AddF16("model.norm.weight", {c.hidden_size}, w.final_norm, c.hidden_size);
  if (!w.tied_embeddings) {
    const auto* head = dynamic_cast<const DenseLinear*>(w.lm_head.get());
    if (head == nullptr) {
      return absl::FailedPreconditionError("lm_head is not a dense layer; cannot save it");
    }
    t.AddMatrix("lm_head.weight", head->weight(), head->dtype(), c.vocab_size, c.hidden_size);
  }
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const std::string p = absl::StrCat("model.layers.", i);
    t.AddF16(p + ".input_layernorm.weight", {c.hidden_size}, w.layers[i].attn_norm, c.hidden_size);
    t.AddF16(p + ".post_attention_layernorm.weight", {c.hidden_size}, w.layers[i].ffn_norm,
             c.hidden_size);
  }
  absl::Status status;
  // ForEachLinear is non-const only because its callback may replace layers;
  // this one only reads.
  const_cast<LlamaWeights&>(w).ForEachLinear(
      [&](const std::string& name, std::unique_ptr<Linear>& lin) {
        if (!status.ok()) return;
        const auto* q = dynamic_cast<const W4Linear*>(lin.get());
        if (q == nullptr) {
          status = absl::FailedPreconditionError(absl::StrCat(
              name, " is not quantized (", lin->DebugString(),
              "); only W4 models can be saved as .spear (run `spear quantize`)"));
          return;
        }
        const kernels::W4Weight& qw = q->weight();
        const int64_t n = qw.fmt.n, k = qw.fmt.k, g = qw.fmt.num_groups();
        t.AddBytes(name + ".qweight", TensorType::kU8, {n, qw.fmt.packed_row_bytes()}, qw.packed);
        t.AddHalfWords(name + ".scales", TensorType::kF16, {n, g}, qw.scales.data(),
                       qw.scales.size());
        t.AddBytes(name + ".zeros", TensorType::kU8, {n, g}, qw.zeros);
        if (!qw.act_scale.empty()) t.AddF16(name + ".act_scale", {k}, qw.act_scale);
        if (!q->bias().empty()) t.AddF32(name + ".bias", {n}, q->bias());
        json ec = nullptr;
        if (q->ec().has_value()) {
          const kernels::EcWeights& e = *q->ec();
          const int64_t r = e.rank, h = e.gated ? e.gate_hidden : 0;
          const bool i8 = e.factors == kernels::EcFactors::kI8;
          if (i8) {
            // Re-encoded from the floats, which a quantizer (RoundEcFactorsI8)
            // put on the grid (the same codes), or, for a loaded checkpoint's
            // compact EC, its codes as they are.
            kernels::EcI8Factors f;
            if (absl::Status s = kernels::EncodeEcFactorsI8(e, &f); !s.ok()) {
              status = absl::Status(s.code(), absl::StrCat(name, ": ", s.message()));
              return;
            }
            t.AddBytes(name + ".ec.a", TensorType::kI8, {r, k},
                       std::vector<uint8_t>(f.a.begin(), f.a.end()));
            t.AddHalfWords(name + ".ec.a_scales", TensorType::kF16,
                           {r, kernels::EcI8Groups(k)}, f.a_scales.data(), f.a_scales.size());
            t.AddBytes(name + ".ec.b", TensorType::kI8, {n, r},
                       std::vector<uint8_t>(f.b.begin(), f.b.end()));
            t.AddHalfWords(name + ".ec.b_scales", TensorType::kF16,
                           {kernels::EcI8Groups(n), r}, f.b_scales.data(), f.b_scales.size());
          } else {
            t.AddF16(name + ".ec.a", {r, k}, e.a);
            t.AddF16(name + ".ec.b", {n, r}, e.b);
          }
          if (e.gated && e.compact_i8()) {  // fp16 as loaded
            const kernels::EcWeights::Gate16& g = e.gate16;
            t.AddHalfWords(name + ".ec.w1", TensorType::kF16, {h, r}, g.w1.data(), g.w1.size());
            t.AddHalfWords(name + ".ec.b1", TensorType::kF16, {h}, g.b1.data(), g.b1.size());
            t.AddHalfWords(name + ".ec.w2", TensorType::kF16, {r, h}, g.w2.data(), g.w2.size());
            t.AddHalfWords(name + ".ec.b2", TensorType::kF16, {r}, g.b2.data(), g.b2.size());
          } else if (e.gated) {
            t.AddF16(name + ".ec.w1", {h, r}, e.w1);
            t.AddF16(name + ".ec.b1", {h}, e.b1);
            t.AddF16(name + ".ec.w2", {r, h}, e.w2);
            t.AddF16(name + ".ec.b2", {r}, e.b2);
          }
          ec = {{"rank", r},
                {"gate_hidden", h},
                {"gated", e.gated},
                {"factors", i8 ? "i8" : "f16"}};
        }
        modules.push_back({{"name", name},
                           {"shape", {n, k}},
                           {"quantization",
                            {{"bits", 4},
                             {"group_size", qw.fmt.group_size},
                             {"symmetric", qw.fmt.symmetric},
                             {"act_scale", !qw.act_scale.empty()}}},
                           {"bias", !q->bias().empty()},
                           {"ec", ec}});
      });
  if (!status.ok()) return status;

  auto calib = ParseObject(prov.calibration_json, "calibration");
  auto opts = ParseObject(prov.quantize_options_json, "quantize options");
  auto diag = ParseObject(prov.diagnostic_json, "diagnostic");
  auto measured = ParseObject(prov.measured_json, "measured");
  for (const auto* s : {&calib, &opts, &diag, &measured}) {
    if (!s->ok()) return s->status();
  }
  auto files = HashSource(prov.source_path);
  if (!files.ok()) return files.status();

  std::string tokenizer_file;
  if (model.tokenizer != nullptr) {
    auto exported = ExportHfTokenizer(*model.tokenizer);
    if (exported.ok()) {
      tokenizer_file = kSpearTokenizerFile;
      if (auto s = WriteText(dir / kSpearTokenizerFile, exported->tokenizer_json); !s.ok()) return s;
      if (auto s = WriteText(dir / "tokenizer_config.json", exported->tokenizer_config_json);
          !s.ok()) {
        return s;
      }
    } else {
      spdlog::warn("saving {} without a tokenizer: {}", dir.string(), exported.status().ToString());
    }
  }

  const fs::path weights = dir / kSpearWeightsFile;
  if (auto s = WriteSafetensors(weights.string(), t.tensors(),
                                {{"format", "spear"},
                                 {"format_version", std::to_string(kSpearFormatVersion)}});
      !s.ok()) {
    return s;
  }
  const ServedBytes bytes = ComputeServedBytes(model);
  json manifest = {
      {"format", "spear"},
      {"format_version", kSpearFormatVersion},
      {"architecture", internal::ConfigToJson(c)},
      {"weights", {{"file", kSpearWeightsFile}, {"embedding_dtype",
                                                 std::string(TensorTypeName(embed_type))}}},
      {"tokenizer", tokenizer_file.empty() ? json(nullptr) : json(tokenizer_file)},
      {"sizes",
       {{"w4_model_bytes", bytes.w4_model_bytes},
        {"ec_bytes", bytes.ec_bytes},
        {"ec_pct", bytes.ec_pct()}}},
      {"modules", std::move(modules)},
      {"provenance",
       {{"source", prov.source_path},
        {"source_files", *files},
        {"command", prov.command},
        {"created_unix", std::chrono::duration_cast<std::chrono::seconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count()},
        {"calibration", *calib},
        {"quantize_options", *opts},
        {"diagnostic", *diag}}}};
  if (!prov.measured_json.empty()) manifest["measured"] = *measured;
  // The manifest last: a directory with spear.json has all its files.
  return WriteText(dir / kSpearManifestFile, manifest.dump(2));
}

}  // namespace

ServedBytes ComputeServedBytes(const LoadedModel& model) {
  const ModelConfig& c = model.config;
  ServedBytes b;
  b.w4_model_bytes = 2 * c.vocab_size * c.hidden_size + 2 * c.hidden_size * (1 + 2 * c.num_layers);
  if (!model.weights.tied_embeddings) b.w4_model_bytes += 2 * c.vocab_size * c.hidden_size;
  const_cast<LlamaWeights&>(model.weights)
      .ForEachLinear([&](const std::string&, std::unique_ptr<Linear>& lin) {
        if (const auto* q = dynamic_cast<const W4Linear*>(lin.get())) {
          b.w4_model_bytes += static_cast<int64_t>(q->weight().bytes() + 4 * q->bias().size());
          b.ec_bytes += q->ec_bytes();
        } else if (lin != nullptr) {
          b.w4_model_bytes += 2 * lin->in_features() * lin->out_features();
        }
      });
  return b;
}

bool IsSpearDir(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && fs::exists(fs::path(path) / kSpearManifestFile, ec);
}

absl::Status SaveSpearModel(const LoadedModel& model, const SpearProvenance& provenance,
                            const std::string& dir_in, bool overwrite) {
  std::error_code ec;
  fs::path dir = fs::path(dir_in).lexically_normal();
  if (dir.filename().empty()) dir = dir.parent_path();  // "out/" -> "out"
  if (dir.empty()) return absl::InvalidArgumentError("empty output directory");
  const bool exists = fs::exists(dir, ec);
  if (exists && !fs::is_directory(dir, ec)) {
    return absl::AlreadyExistsError(absl::StrCat(dir.string(), " exists and is not a directory"));
  }
  if (exists && !fs::is_empty(dir, ec) && !overwrite) {
    return absl::AlreadyExistsError(absl::StrCat(dir.string(), " exists and is not empty"));
  }
  const fs::path tmp = dir.string() + ".tmp";
  fs::remove_all(tmp, ec);
  if (!fs::create_directories(tmp, ec)) {
    return absl::PermissionDeniedError(absl::StrCat("cannot create ", tmp.string(), ": ",
                                                    ec.message()));
  }
  if (auto s = WriteCheckpointFiles(model, provenance, tmp); !s.ok()) {
    fs::remove_all(tmp, ec);
    return s;
  }
  // Replace: move the old one aside, move the new one in, then delete the old.
  fs::path old;
  if (exists) {
    old = dir.string() + absl::StrCat(".old-", ::getpid());
    fs::remove_all(old, ec);
    fs::rename(dir, old, ec);
    if (ec) {
      fs::remove_all(tmp, ec);
      return absl::InternalError(absl::StrCat("cannot move ", dir.string(), " aside"));
    }
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    const std::string msg = ec.message();
    if (!old.empty()) fs::rename(old, dir, ec);
    return absl::InternalError(absl::StrCat("cannot rename ", tmp.string(), " to ", dir.string(),
                                            ": ", msg));
  }
  if (!old.empty()) fs::remove_all(old, ec);
  return absl::OkStatus();
}

}  // namespace spear::model
