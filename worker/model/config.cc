#include "worker/model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <numbers>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "worker/model/gguf.h"

namespace spear::model {
namespace {

using json = nlohmann::json;

absl::Status Invalid(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("model config: ", what));
}

// Optional integer field: absent or null leaves *out unchanged.
absl::Status GetInt(const json& j, const char* key, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (it->is_number_unsigned()) {
    if (it->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Invalid(absl::StrCat("\"", key, "\" is too large"));
    }
    *out = static_cast<int64_t>(it->get<uint64_t>());
    return absl::OkStatus();
  }
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }
  // Some exporters write integral values as floats (e.g. 8192.0).
  if (it->is_number_float()) {
    const double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e18) {
      *out = static_cast<int64_t>(d);
      return absl::OkStatus();
    }
  }
  return Invalid(absl::StrCat("\"", key, "\" must be an integer, got ", it->dump()));
}

absl::Status GetDouble(const json& j, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return Invalid(absl::StrCat("\"", key, "\" must be a number"));
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status GetBool(const json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return Invalid(absl::StrCat("\"", key, "\" must be a boolean"));
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::StatusOr<RopeScaling::Kind> RopeKindFromName(const std::string& name) {
  if (name == "default" || name == "none" || name.empty()) return RopeScaling::Kind::kNone;
  if (name == "linear") return RopeScaling::Kind::kLinear;
  if (name == "llama3") return RopeScaling::Kind::kLlama3;
  if (name == "dynamic") return RopeScaling::Kind::kDynamic;
  if (name == "yarn") return RopeScaling::Kind::kYarn;
  return Invalid(absl::StrCat("unsupported rope scaling type \"", name, "\""));
}

absl::Status ParseRopeScaling(const json& rs, int64_t max_position, RopeScaling* out) {
  if (rs.is_null()) return absl::OkStatus();
  if (!rs.is_object()) return Invalid("\"rope_scaling\" must be an object or null");
  auto type = rs.find("rope_type");
  if (type == rs.end()) type = rs.find("type");
  if (type == rs.end() || !type->is_string()) {
    return Invalid("\"rope_scaling\" needs a string \"rope_type\" (or \"type\")");
  }
  absl::StatusOr<RopeScaling::Kind> kind = RopeKindFromName(type->get<std::string>());
  if (!kind.ok()) return kind.status();
  out->kind = *kind;
  if (out->kind == RopeScaling::Kind::kYarn) out->original_max_position = max_position;
  absl::Status s = GetDouble(rs, "factor", &out->factor);
  if (s.ok()) s = GetDouble(rs, "low_freq_factor", &out->low_freq_factor);
  if (s.ok()) s = GetDouble(rs, "high_freq_factor", &out->high_freq_factor);
  if (s.ok()) s = GetInt(rs, "original_max_position_embeddings", &out->original_max_position);
  if (!s.ok()) return s;
  if (out->kind != RopeScaling::Kind::kNone && !rs.contains("factor")) {
    return Invalid(absl::StrCat("rope scaling \"", type->get<std::string>(), "\" needs a factor"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseHf(const json& j) {
  if (!j.is_object()) return Invalid("config.json is not a JSON object");
  ModelConfig c;
  std::string model_type;
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) {
    model_type = it->get<std::string>();
  } else if (auto a = j.find("architectures");
             a != j.end() && a->is_array() && !a->empty() && (*a)[0].is_string()) {
    const std::string arch = (*a)[0].get<std::string>();
    if (arch == "LlamaForCausalLM") model_type = "llama";
    if (arch == "MistralForCausalLM") model_type = "mistral";
    if (arch == "Qwen2ForCausalLM") model_type = "qwen2";
  }
  if (model_type != "llama" && model_type != "mistral" && model_type != "qwen2") {
    return Invalid(absl::StrCat("unsupported model_type \"", model_type,
                                "\" (supported: llama, mistral, qwen2)"));
  }
  c.architecture = model_type;
  c.attention_bias = (model_type == "qwen2");  // Qwen2 always has q/k/v biases
  c.num_kv_heads = -1;
  absl::Status s = GetInt(j, "vocab_size", &c.vocab_size);
  if (s.ok()) s = GetInt(j, "hidden_size", &c.hidden_size);
  if (s.ok()) s = GetInt(j, "intermediate_size", &c.intermediate_size);
  if (s.ok()) s = GetInt(j, "num_hidden_layers", &c.num_layers);
  if (s.ok()) s = GetInt(j, "num_attention_heads", &c.num_heads);
  if (s.ok()) s = GetInt(j, "num_key_value_heads", &c.num_kv_heads);
  if (s.ok()) s = GetInt(j, "head_dim", &c.head_dim);
  if (s.ok()) s = GetDouble(j, "rms_norm_eps", &c.rms_eps);
  if (s.ok()) s = GetDouble(j, "rope_theta", &c.rope_theta);
  if (s.ok()) s = GetInt(j, "max_position_embeddings", &c.max_position);
  if (s.ok()) s = GetBool(j, "tie_word_embeddings", &c.tie_word_embeddings);
  if (s.ok()) s = GetBool(j, "attention_bias", &c.attention_bias);
  if (s.ok()) s = GetInt(j, "bos_token_id", &c.bos_token_id);
  if (!s.ok()) return s;
  if (c.num_kv_heads < 0) c.num_kv_heads = c.num_heads;
  if (c.head_dim == 0 && c.num_heads > 0) c.head_dim = c.hidden_size / c.num_heads;
  if (auto it = j.find("rope_scaling"); it != j.end()) {
    s = ParseRopeScaling(*it, c.max_position, &c.rope_scaling);
    if (!s.ok()) return s;
  }
  // transformers >= 5 writes "rope_parameters" {rope_theta, rope_type,
  // factor, ...} in place of top-level rope_theta / rope_scaling.
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    s = GetDouble(*it, "rope_theta", &c.rope_theta);
    if (s.ok() && !j.contains("rope_scaling")) {
      s = ParseRopeScaling(*it, c.max_position, &c.rope_scaling);
    }
    if (!s.ok()) return s;
  }
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    const json list = it->is_array() ? *it : json::array({*it});
    for (const json& e : list) {
      if (!e.is_number_integer()) return Invalid("\"eos_token_id\" must be an int or int list");
      c.eos_token_ids.push_back(e.get<int64_t>());
    }
  }
  s = c.Validate();
  if (!s.ok()) return s;
  return c;
}

}  // namespace

absl::Status ModelConfig::Validate() const {
  auto positive = [](const char* name, int64_t v, int64_t max) -> absl::Status {
    if (v <= 0) return Invalid(absl::StrCat(name, " must be positive, got ", v));
    if (v > max) return Invalid(absl::StrCat(name, " = ", v, " is implausibly large"));
    return absl::OkStatus();
  };
  absl::Status s = positive("vocab_size", vocab_size, int64_t{1} << 24);
  if (s.ok()) s = positive("hidden_size", hidden_size, int64_t{1} << 17);
  if (s.ok()) s = positive("intermediate_size", intermediate_size, int64_t{1} << 20);
  if (s.ok()) s = positive("num_layers", num_layers, 1024);
  if (s.ok()) s = positive("num_heads", num_heads, 4096);
  if (s.ok()) s = positive("num_kv_heads", num_kv_heads, 4096);
  if (s.ok()) s = positive("head_dim", head_dim, 4096);
  if (s.ok()) s = positive("max_position", max_position, int64_t{1} << 30);
  if (!s.ok()) return s;
  if (num_heads % num_kv_heads != 0) {
    return Invalid(
        absl::StrCat("num_kv_heads (", num_kv_heads, ") must divide num_heads (", num_heads, ")"));
  }
  if (head_dim % 2 != 0) return Invalid(absl::StrCat("head_dim ", head_dim, " must be even"));
  if (!(rms_eps > 0) || !std::isfinite(rms_eps)) {
    return Invalid(absl::StrCat("rms_norm_eps must be positive, got ", rms_eps));
  }
  if (!(rope_theta > 1.0) || !std::isfinite(rope_theta)) {
    return Invalid(absl::StrCat("rope_theta must be > 1, got ", rope_theta));
  }
  if (rope_scaling.kind != RopeScaling::Kind::kNone) {
    if (!(rope_scaling.factor > 0) || !std::isfinite(rope_scaling.factor)) {
      return Invalid(
          absl::StrCat("rope scaling factor must be positive, got ", rope_scaling.factor));
    }
    if (rope_scaling.original_max_position <= 0) {
      return Invalid("rope scaling original_max_position_embeddings must be positive");
    }
  }
  if (rope_scaling.kind == RopeScaling::Kind::kLlama3 &&
      !(rope_scaling.low_freq_factor > 0 &&
        rope_scaling.high_freq_factor > rope_scaling.low_freq_factor)) {
    return Invalid("llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor");
  }
  if (bos_token_id >= vocab_size) {
    return Invalid(absl::StrCat("bos_token_id ", bos_token_id, " >= vocab_size ", vocab_size));
  }
  for (int64_t e : eos_token_ids) {
    if (e < 0 || e >= vocab_size) {
      return Invalid(absl::StrCat("eos_token_id ", e, " outside [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

std::vector<float> ModelConfig::RopeInvFreq() const {
  const int64_t half = head_dim / 2;
  const double dim = static_cast<double>(head_dim);
  std::vector<double> inv(static_cast<size_t>(std::max<int64_t>(half, 0)));
  // _compute_default_rope_parameters: 1 / base^(2j/dim).
  for (int64_t j = 0; j < half; ++j) inv[j] = 1.0 / std::pow(rope_theta, (2.0 * j) / dim);
  const RopeScaling& rs = rope_scaling;
  switch (rs.kind) {
    case RopeScaling::Kind::kNone:
    case RopeScaling::Kind::kDynamic:  // dynamic NTK only changes inv_freq past max_position
      break;
    case RopeScaling::Kind::kLinear:
      for (double& f : inv) f /= rs.factor;
      break;
    case RopeScaling::Kind::kLlama3: {
      const double old_ctx = static_cast<double>(rs.original_max_position);
      const double low_wavelen = old_ctx / rs.low_freq_factor;
      const double high_wavelen = old_ctx / rs.high_freq_factor;
      for (double& f : inv) {
        const double wavelen = 2.0 * std::numbers::pi / f;
        if (wavelen > low_wavelen) {
          f /= rs.factor;  // low frequency: fully interpolated
        } else if (wavelen >= high_wavelen) {
          const double smooth =
              (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
          f = (1 - smooth) * f / rs.factor + smooth * f;
        }  // high frequency: unchanged
      }
      break;
    }
    case RopeScaling::Kind::kYarn: {
      // _compute_yarn_parameters with beta_fast = 32, beta_slow = 1, truncate.
      auto correction_dim = [&](double rotations) {
        return dim *
               std::log(static_cast<double>(rs.original_max_position) /
                        (rotations * 2 * std::numbers::pi)) /
               (2 * std::log(rope_theta));
      };
      const double low = std::max(std::floor(correction_dim(32.0)), 0.0);
      double high = std::min(std::ceil(correction_dim(1.0)), dim - 1);
      if (low == high) high += 0.001;
      for (int64_t j = 0; j < half; ++j) {
        const double ramp = std::clamp((j - low) / (high - low), 0.0, 1.0);
        const double extrapolation = 1.0 - ramp;
        inv[j] = inv[j] / rs.factor * (1 - extrapolation) + inv[j] * extrapolation;
      }
      break;
    }
  }
  return std::vector<float>(inv.begin(), inv.end());
}

absl::StatusOr<ModelConfig> ConfigFromHfJson(const std::string& json_text) {
  try {
    const json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return Invalid("config.json is not valid JSON");
    return ParseHf(j);
  } catch (const std::exception& e) {
    return Invalid(absl::StrCat("config.json: ", e.what()));
  }
}

absl::StatusOr<ModelConfig> ConfigFromHfJsonFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<ModelConfig> c = ConfigFromHfJson(ss.str());
  if (!c.ok())
    return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  return c;
}

absl::StatusOr<ModelConfig> ConfigFromGguf(const GgufFile& gguf) {
  absl::StatusOr<std::string> arch = gguf.GetString("general.architecture");
  if (!arch.ok()) return Invalid(absl::StrCat("GGUF: ", arch.status().message()));
  if (*arch != "llama" && *arch != "mistral" && *arch != "qwen2") {
    return Invalid(
        absl::StrCat("GGUF architecture \"", *arch, "\" is not supported (llama, mistral, qwen2)"));
  }
  ModelConfig c;
  c.architecture = *arch;
  const std::string p = *arch + ".";
  // Required integer keys.
  struct Req {
    const char* key;
    int64_t* out;
  };
  for (const Req& r : {Req{"block_count", &c.num_layers}, Req{"embedding_length", &c.hidden_size},
                       Req{"feed_forward_length", &c.intermediate_size},
                       Req{"attention.head_count", &c.num_heads}}) {
    absl::StatusOr<int64_t> v = gguf.GetInt(p + r.key);
    if (!v.ok()) return Invalid(absl::StrCat("GGUF: ", v.status().message()));
    *r.out = *v;
  }
  // Optional keys: absent keeps the default; present with a wrong type is an error.
  auto opt_int = [&](const std::string& key, int64_t* out) -> absl::Status {
    if (gguf.Get(key) == nullptr) return absl::OkStatus();
    absl::StatusOr<int64_t> v = gguf.GetInt(key);
    if (!v.ok()) return Invalid(absl::StrCat("GGUF: ", v.status().message()));
    *out = *v;
    return absl::OkStatus();
  };
  auto opt_float = [&](const std::string& key, double* out) -> absl::Status {
    if (gguf.Get(key) == nullptr) return absl::OkStatus();
    absl::StatusOr<double> v = gguf.GetFloat(key);
    if (!v.ok()) return Invalid(absl::StrCat("GGUF: ", v.status().message()));
    *out = *v;
    return absl::OkStatus();
  };
  c.num_kv_heads = c.num_heads;
  c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  int64_t rope_dim = -1;
  absl::Status s = opt_int(p + "attention.head_count_kv", &c.num_kv_heads);
  if (s.ok()) s = opt_int(p + "attention.key_length", &c.head_dim);
  if (s.ok()) s = opt_int(p + "rope.dimension_count", &rope_dim);
  if (s.ok()) s = opt_float(p + "attention.layer_norm_rms_epsilon", &c.rms_eps);
  if (s.ok()) s = opt_float(p + "rope.freq_base", &c.rope_theta);
  if (s.ok()) s = opt_int(p + "context_length", &c.max_position);
  if (s.ok()) s = opt_int(p + "vocab_size", &c.vocab_size);
  if (s.ok()) s = opt_int("tokenizer.ggml.bos_token_id", &c.bos_token_id);
  if (!s.ok()) return s;
  if (rope_dim >= 0 && rope_dim != c.head_dim) {
    return Invalid(absl::StrCat("GGUF: rope.dimension_count ", rope_dim, " != head_dim ",
                                c.head_dim, " (partial rotary embeddings are not supported)"));
  }
  if (c.vocab_size == 0) {
    if (const GgufValue* tokens = gguf.Get("tokenizer.ggml.tokens")) {
      if (const GgufArray* a = std::get_if<GgufArray>(&tokens->v)) {
        c.vocab_size = static_cast<int64_t>(a->size());
      }
    }
  }
  // End-of-sequence: eos, plus end-of-turn when the chat template uses a different one.
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"}) {
    int64_t id = -1;
    s = opt_int(key, &id);
    if (!s.ok()) return s;
    if (id >= 0 &&
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) == c.eos_token_ids.end()) {
      c.eos_token_ids.push_back(id);
    }
  }
  if (gguf.Get(p + "rope.scaling.type") != nullptr) {
    absl::StatusOr<std::string> type = gguf.GetString(p + "rope.scaling.type");
    if (!type.ok()) return Invalid(absl::StrCat("GGUF: ", type.status().message()));
    absl::StatusOr<RopeScaling::Kind> kind = RopeKindFromName(*type);
    if (!kind.ok()) return kind.status();
    c.rope_scaling.kind = *kind;
  }
  s = opt_float(p + "rope.scaling.factor", &c.rope_scaling.factor);
  if (s.ok())
    s = opt_int(p + "rope.scaling.original_context_length", &c.rope_scaling.original_max_position);
  if (!s.ok()) return s;
  if (c.rope_scaling.kind == RopeScaling::Kind::kNone && c.rope_scaling.factor != 1.0 &&
      gguf.Get(p + "rope.scaling.factor") != nullptr) {
    c.rope_scaling.kind = RopeScaling::Kind::kLinear;  // older files carry only the factor
  }
  c.tie_word_embeddings = gguf.Find("output.weight") == nullptr;
  c.attention_bias = gguf.Find("blk.0.attn_q.bias") != nullptr;
  s = c.Validate();
  if (!s.ok()) return s;
  return c;
}

}  // namespace spear::model
