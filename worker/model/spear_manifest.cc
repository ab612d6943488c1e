// spear.json: architecture <-> ModelConfig and strict manifest parsing.
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/spear_checkpoint_internal.h"

namespace spear::model {
namespace internal {
namespace {

using json = nlohmann::ordered_json;

constexpr std::pair<RopeScaling::Kind, const char*> kRopeKinds[] = {
    {RopeScaling::Kind::kNone, "none"},     {RopeScaling::Kind::kLinear, "linear"},
    {RopeScaling::Kind::kLlama3, "llama3"}, {RopeScaling::Kind::kDynamic, "dynamic"},
    {RopeScaling::Kind::kYarn, "yarn"}};

// Typed field access with a precise error ("architecture.hidden_size: ...").
class Reader {
 public:
  Reader(const json& j, std::string where) : j_(j), where_(std::move(where)) {}
  const json* Field(const char* key, absl::Status* st) const {
    auto it = j_.find(key);
    if (it == j_.end()) {
      *st = absl::InvalidArgumentError(absl::StrCat("spear.json: ", where_, ".", key, " missing"));
      return nullptr;
    }
    return &*it;
  }
  template <typename T>
  bool Get(const char* key, T* out, absl::Status* st) const {
    const json* f = Field(key, st);
    if (f == nullptr) return false;
    bool ok;
    if constexpr (std::is_same_v<T, bool>) {
      ok = f->is_boolean();
    } else if constexpr (std::is_integral_v<T>) {
      ok = f->is_number_integer();
    } else if constexpr (std::is_floating_point_v<T>) {
      ok = f->is_number();
    } else {
      ok = f->is_string();
    }
    if (!ok) {
      *st = absl::InvalidArgumentError(
          absl::StrCat("spear.json: ", where_, ".", key, " has the wrong type"));
      return false;
    }
    *out = f->get<T>();
    return true;
  }

 private:
  const json& j_;
  std::string where_;
};

}  // namespace

json ConfigToJson(const ModelConfig& c) {
  const char* kind = "none";
  for (const auto& [k, name] : kRopeKinds) {
    if (k == c.rope_scaling.kind) kind = name;
  }
  return {{"architecture", c.architecture},
          {"vocab_size", c.vocab_size},
          {"hidden_size", c.hidden_size},
          {"intermediate_size", c.intermediate_size},
          {"num_layers", c.num_layers},
          {"num_heads", c.num_heads},
          {"num_kv_heads", c.num_kv_heads},
          {"head_dim", c.head_dim},
          {"rms_eps", c.rms_eps},
          {"rope_theta", c.rope_theta},
          {"rope_scaling",
           {{"kind", kind},
            {"factor", c.rope_scaling.factor},
            {"low_freq_factor", c.rope_scaling.low_freq_factor},
            {"high_freq_factor", c.rope_scaling.high_freq_factor},
            {"original_max_position", c.rope_scaling.original_max_position}}},
          {"max_position", c.max_position},
          {"tie_word_embeddings", c.tie_word_embeddings},
          {"attention_bias", c.attention_bias},
          {"bos_token_id", c.bos_token_id},
          {"eos_token_ids", c.eos_token_ids}};
}

absl::StatusOr<ModelConfig> ConfigFromJson(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("spear.json: architecture is not an object");
  ModelConfig c;
  absl::Status st;
  Reader r(j, "architecture");
  const bool ok = r.Get("architecture", &c.architecture, &st) &&
                  r.Get("vocab_size", &c.vocab_size, &st) &&
                  r.Get("hidden_size", &c.hidden_size, &st) &&
                  r.Get("intermediate_size", &c.intermediate_size, &st) &&
                  r.Get("num_layers", &c.num_layers, &st) && r.Get("num_heads", &c.num_heads, &st) &&
                  r.Get("num_kv_heads", &c.num_kv_heads, &st) &&
                  r.Get("head_dim", &c.head_dim, &st) && r.Get("rms_eps", &c.rms_eps, &st) &&
                  r.Get("rope_theta", &c.rope_theta, &st) &&
                  r.Get("max_position", &c.max_position, &st) &&
                  r.Get("tie_word_embeddings", &c.tie_word_embeddings, &st) &&
                  r.Get("attention_bias", &c.attention_bias, &st) &&
                  r.Get("bos_token_id", &c.bos_token_id, &st);
  if (!ok) return st;
  const json* rs = r.Field("rope_scaling", &st);
  if (rs == nullptr) return st;
  if (!rs->is_object()) return absl::InvalidArgumentError("spear.json: bad rope_scaling");
  Reader rr(*rs, "architecture.rope_scaling");
  std::string kind;
  if (!(rr.Get("kind", &kind, &st) && rr.Get("factor", &c.rope_scaling.factor, &st) &&
        rr.Get("low_freq_factor", &c.rope_scaling.low_freq_factor, &st) &&
        rr.Get("high_freq_factor", &c.rope_scaling.high_freq_factor, &st) &&
        rr.Get("original_max_position", &c.rope_scaling.original_max_position, &st))) {
    return st;
  }
  bool known = false;
  for (const auto& [k, name] : kRopeKinds) {
    if (kind == name) c.rope_scaling.kind = k, known = true;
  }
  if (!known) return absl::InvalidArgumentError(absl::StrCat("spear.json: unknown rope kind '", kind, "'"));
  const json* eos = r.Field("eos_token_ids", &st);
  if (eos == nullptr) return st;
  if (!eos->is_array()) return absl::InvalidArgumentError("spear.json: eos_token_ids not an array");
  for (const json& e : *eos) {
    if (!e.is_number_integer()) return absl::InvalidArgumentError("spear.json: bad eos_token_ids");
    c.eos_token_ids.push_back(e.get<int64_t>());
  }
  if (auto s = c.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("spear.json: architecture: ", s.message()));
  }
  return c;
}

std::vector<ModuleShape> ExpectedModules(const ModelConfig& c) {
  const int64_t d = c.hidden_size, qd = c.num_heads * c.head_dim,
                kvd = c.num_kv_heads * c.head_dim, ff = c.intermediate_size;
  std::vector<ModuleShape> out;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i);
    out.push_back({p + ".self_attn.q_proj", qd, d});
    out.push_back({p + ".self_attn.k_proj", kvd, d});
    out.push_back({p + ".self_attn.v_proj", kvd, d});
    out.push_back({p + ".self_attn.o_proj", d, qd});
    out.push_back({p + ".mlp.gate_proj", ff, d});
    out.push_back({p + ".mlp.up_proj", ff, d});
    out.push_back({p + ".mlp.down_proj", d, ff});
  }
  return out;
}

}  // namespace internal

namespace {

using json = nlohmann::ordered_json;

absl::StatusOr<SpearModuleInfo> ParseModule(const json& m, size_t index) {
  if (!m.is_object()) return absl::InvalidArgumentError(absl::StrCat("spear.json: modules[", index, "] is not an object"));
  SpearModuleInfo info;
  absl::Status st;
  internal::Reader r(m, absl::StrCat("modules[", index, "]"));
  if (!r.Get("name", &info.name, &st) || !r.Get("bias", &info.bias, &st)) return st;
  const json* shape = r.Field("shape", &st);
  if (shape == nullptr) return st;
  if (!shape->is_array() || shape->size() != 2 || !(*shape)[0].is_number_integer() ||
      !(*shape)[1].is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat("spear.json: ", info.name, ": bad shape"));
  }
  info.n = (*shape)[0].get<int64_t>();
  info.k = (*shape)[1].get<int64_t>();
  const json* q = r.Field("quantization", &st);
  if (q == nullptr) return st;
  internal::Reader qr(*q, info.name + ".quantization");
  int64_t bits = 0;
  if (!q->is_object() || !qr.Get("bits", &bits, &st) ||
      !qr.Get("group_size", &info.group_size, &st) || !qr.Get("symmetric", &info.symmetric, &st) ||
      !qr.Get("act_scale", &info.act_scale, &st)) {
    return st.ok() ? absl::InvalidArgumentError("spear.json: bad quantization") : st;
  }
  if (bits != 4) {
    return absl::InvalidArgumentError(absl::StrCat("spear.json: ", info.name, ": ", bits,
                                                   "-bit weights are not supported (only 4)"));
  }
  if (info.group_size <= 0 || info.group_size > info.k) {
    return absl::InvalidArgumentError(absl::StrCat("spear.json: ", info.name, ": group_size ",
                                                   info.group_size, " not in [1, k=", info.k, "]"));
  }
  const json* ec = r.Field("ec", &st);
  if (ec == nullptr) return st;
  if (!ec->is_null()) {
    internal::Reader er(*ec, info.name + ".ec");
    if (!ec->is_object() || !er.Get("rank", &info.ec_rank, &st) ||
        !er.Get("gate_hidden", &info.ec_gate_hidden, &st) || !er.Get("gated", &info.ec_gated, &st)) {
      return st.ok() ? absl::InvalidArgumentError("spear.json: bad ec") : st;
    }
    if (ec->contains("factors")) {
      std::string f;
      if (!er.Get("factors", &f, &st)) return st;
      if (f == "i8") {
        info.ec_factors = kernels::EcFactors::kI8;
      } else if (f != "f16") {
        return absl::InvalidArgumentError(absl::StrCat("spear.json: ", info.name,
                                                       ".ec.factors is '", f, "', not f16 or i8"));
      }
    }
    if (info.ec_rank <= 0 || info.ec_rank > std::min(info.n, info.k) ||
        (info.ec_gated && info.ec_gate_hidden <= 0) || (!info.ec_gated && info.ec_gate_hidden != 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spear.json: ", info.name, ": bad EC (rank ", info.ec_rank, ", gate_hidden ",
          info.ec_gate_hidden, ", gated ", info.ec_gated, ")"));
    }
  }
  return info;
}

}  // namespace

absl::StatusOr<SpearManifest> ReadSpearManifest(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / kSpearManifestFile).string();
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("no ", kSpearManifestFile, " in ", dir));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseSpearManifest(ss.str(), path);
}

absl::StatusOr<SpearManifest> ParseSpearManifest(const std::string& text, const std::string& path) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  SpearManifest m;
  absl::Status st;
  internal::Reader r(j, "");
  std::string format;
  if (!r.Get("format", &format, &st) || !r.Get("format_version", &m.format_version, &st)) return st;
  if (format != "spear") return absl::InvalidArgumentError(absl::StrCat(path, ": format is '", format, "', not 'spear'"));
  if (m.format_version != kSpearFormatVersion) {
    return absl::UnimplementedError(absl::StrCat(path, ": unsupported format_version ",
                                                 m.format_version, " (this build reads ",
                                                 kSpearFormatVersion, ")"));
  }
  const json* arch = r.Field("architecture", &st);
  if (arch == nullptr) return st;
  auto cfg = internal::ConfigFromJson(*arch);
  if (!cfg.ok()) return cfg.status();
  m.config = *cfg;
  const json* tok = r.Field("tokenizer", &st);
  if (tok == nullptr) return st;
  if (tok->is_string()) {
    m.tokenizer_file = tok->get<std::string>();
    if (m.tokenizer_file.empty() || m.tokenizer_file.find('/') != std::string::npos) {
      return absl::InvalidArgumentError("spear.json: tokenizer must be a file name in the directory");
    }
  } else if (!tok->is_null()) {
    return absl::InvalidArgumentError("spear.json: tokenizer must be a file name or null");
  }
  if (const json* sizes = r.Field("sizes", &st); sizes != nullptr && sizes->is_object()) {
    internal::Reader sr(*sizes, "sizes");
    if (!sr.Get("w4_model_bytes", &m.w4_model_bytes, &st) || !sr.Get("ec_bytes", &m.ec_bytes, &st)) {
      return st;
    }
  } else {
    return st.ok() ? absl::InvalidArgumentError("spear.json: sizes is not an object") : st;
  }
  if (auto it = j.find("provenance"); it != j.end()) m.provenance_json = it->dump();
  if (auto it = j.find("measured"); it != j.end() && !it->is_null()) m.measured_json = it->dump();

  const json* mods = r.Field("modules", &st);
  if (mods == nullptr) return st;
  if (!mods->is_array()) return absl::InvalidArgumentError("spear.json: modules is not an array");
  const std::vector<internal::ModuleShape> expected = internal::ExpectedModules(m.config);
  std::map<std::string, const internal::ModuleShape*> by_name;
  for (const auto& e : expected) by_name[e.name] = &e;
  std::set<std::string> seen;
  for (size_t i = 0; i < mods->size(); ++i) {
    auto info = ParseModule((*mods)[i], i);
    if (!info.ok()) return info.status();
    auto it = by_name.find(info->name);
    if (it == by_name.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spear.json: module ", info->name, " is not a linear layer of this architecture"));
    }
    if (!seen.insert(info->name).second) {
      return absl::InvalidArgumentError(absl::StrCat("spear.json: module ", info->name, " listed twice"));
    }
    if (info->n != it->second->n || info->k != it->second->k) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spear.json: module ", info->name, " has shape [", info->n, ", ", info->k,
          "], the architecture implies [", it->second->n, ", ", it->second->k, "]"));
    }
    m.modules.push_back(*std::move(info));
  }
  for (const auto& e : expected) {
    if (!seen.contains(e.name)) {
      return absl::InvalidArgumentError(absl::StrCat("spear.json: module ", e.name, " missing"));
    }
  }
  return m;
}

absl::Status RecordSpearMeasurement(const std::string& dir, const std::string& key,
                                    const std::string& value_json) {
  namespace fs = std::filesystem;
  const fs::path path = fs::path(dir) / kSpearManifestFile;
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("no ", kSpearManifestFile, " in ", dir));
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  }
  json value = json::parse(value_json, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) return absl::InvalidArgumentError("measurement is not valid JSON");
  if (!j.contains("measured") || !j["measured"].is_object()) j["measured"] = json::object();
  j["measured"][key] = std::move(value);
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << j.dump(2);
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp.string()));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat("rename to ", path.string(), ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace spear::model
