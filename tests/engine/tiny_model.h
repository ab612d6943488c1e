// Test helper: writes a randomly initialised tiny LLaMA-family checkpoint
// (config.json + model.safetensors) into a fresh temporary directory.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "worker/model/safetensors.h"

namespace spear::testing {

struct TinyModelSpec {
  int64_t vocab = 128, hidden = 64, heads = 4, kv_heads = 2, head_dim = 16;
  int64_t intermediate = 96, layers = 2, max_position = 1024;
  bool tied = false;
  bool qwen2 = false;  // q/k/v biases
  model::TensorType dtype = model::TensorType::kF32;  // kF32, kF16 or kBF16
  // Round weights to bf16 values before storing (so F32 and BF16 files of
  // the same seed hold identical numbers).
  bool bf16_values = false;
  uint32_t seed = 1;
  // Tensors to leave out / reshape, to exercise loader errors.
  std::string drop_tensor;
  std::string reshape_tensor;
};

// Removes the directories MakeTempDir created when the process exits.
struct TempDirCleaner {
  std::vector<std::string> dirs;
  ~TempDirCleaner() {
    std::error_code ec;
    for (const auto& d : dirs) std::filesystem::remove_all(d, ec);
  }
};

inline std::string MakeTempDir(const std::string& tag) {
  static TempDirCleaner cleaner;
  static int counter = 0;
  auto dir = std::filesystem::temp_directory_path() /
             absl::StrCat("spear_engine_test_", tag, "_", ::getpid(), "_", counter++);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  cleaner.dirs.push_back(dir.string());
  return dir.string();
}

// Returns the directory; gtest ASSERTs belong to the caller (status only).
inline absl::Status WriteTinyModel(const std::string& dir, const TinyModelSpec& s) {
  const int64_t d = s.hidden, qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim,
                ff = s.intermediate;
  std::mt19937 rng(s.seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::map<std::string, std::vector<int64_t>> shapes;
  shapes["model.embed_tokens.weight"] = {s.vocab, d};
  shapes["model.norm.weight"] = {d};
  if (!s.tied) shapes["lm_head.weight"] = {s.vocab, d};
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    shapes[p + "self_attn.q_proj.weight"] = {qd, d};
    shapes[p + "self_attn.k_proj.weight"] = {kvd, d};
    shapes[p + "self_attn.v_proj.weight"] = {kvd, d};
    shapes[p + "self_attn.o_proj.weight"] = {d, qd};
    shapes[p + "mlp.gate_proj.weight"] = {ff, d};
    shapes[p + "mlp.up_proj.weight"] = {ff, d};
    shapes[p + "mlp.down_proj.weight"] = {d, ff};
    shapes[p + "input_layernorm.weight"] = {d};
    shapes[p + "post_attention_layernorm.weight"] = {d};
    if (s.qwen2) {
      shapes[p + "self_attn.q_proj.bias"] = {qd};
      shapes[p + "self_attn.k_proj.bias"] = {kvd};
      shapes[p + "self_attn.v_proj.bias"] = {kvd};
    }
  }
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<model::TensorToWrite> tw;
  for (auto& [name, shape0] : shapes) {
    if (name == s.drop_tensor) continue;
    std::vector<int64_t> shape = shape0;
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    const bool is_norm = shape.size() == 1 && name.find("bias") == std::string::npos;
    const float scale = is_norm ? 0.1f : (name.find("embed") != std::string::npos ? 1.f : 0.15f);
    std::vector<float> v(n);
    for (auto& x : v) {
      x = (is_norm ? 1.f : 0.f) + scale * nd(rng);
      if (s.bf16_values) x = kernels::BF16ToFloat(kernels::FloatToBF16(x));
    }
    if (name == s.reshape_tensor) shape[0] += 1, v.resize(v.size() / shape0[0] * shape[0]);
    std::vector<uint8_t> raw;
    if (s.dtype == model::TensorType::kF32) {
      raw.resize(v.size() * 4);
      std::memcpy(raw.data(), v.data(), raw.size());
    } else {
      raw.resize(v.size() * 2);
      for (size_t i = 0; i < v.size(); ++i) {
        const uint16_t h = s.dtype == model::TensorType::kF16 ? kernels::FloatToHalf(v[i])
                                                              : kernels::FloatToBF16(v[i]);
        std::memcpy(raw.data() + 2 * i, &h, 2);
      }
    }
    bufs.push_back(std::move(raw));
    tw.push_back({name, s.dtype, shape, bufs.back().data(), bufs.back().size()});
  }
  if (auto st = model::WriteSafetensors(dir + "/model.safetensors", tw, {}); !st.ok()) return st;
  std::ofstream cfg(dir + "/config.json");
  cfg << "{\n"
      << "  \"architectures\": [\"" << (s.qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM")
      << "\"],\n"
      << "  \"model_type\": \"" << (s.qwen2 ? "qwen2" : "llama") << "\",\n"
      << "  \"vocab_size\": " << s.vocab << ",\n"
      << "  \"hidden_size\": " << d << ",\n"
      << "  \"intermediate_size\": " << ff << ",\n"
      << "  \"num_hidden_layers\": " << s.layers << ",\n"
      << "  \"num_attention_heads\": " << s.heads << ",\n"
      << "  \"num_key_value_heads\": " << s.kv_heads << ",\n"
      << "  \"head_dim\": " << s.head_dim << ",\n"
      << "  \"rms_norm_eps\": 1e-05,\n"
      << "  \"rope_theta\": 10000.0,\n"
      << "  \"max_position_embeddings\": " << s.max_position << ",\n"
      << "  \"tie_word_embeddings\": " << (s.tied ? "true" : "false") << ",\n"
      << "  \"bos_token_id\": 1,\n"
      << "  \"eos_token_id\": 2\n"
      << "}\n";
  return cfg.good() ? absl::OkStatus() : absl::InternalError("cannot write config.json");
}

}  // namespace spear::testing
