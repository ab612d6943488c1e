// Weights of a LLaMA-family decoder (llama, mistral, qwen2: same forward)
// and the loader for Hugging Face checkpoints and GGUF files.
//
// Ownership: LlamaWeights owns everything its pointers refer to: the
// memory-mapped safetensors checkpoint (HF F32/F16/BF16 weights are used in
// place, not copied) and float32 buffers it created (norm weights, biases,
// dequantized GGUF tensors). Moving a LlamaWeights keeps the pointers valid.
// Thread-safety: immutable after loading; read concurrently freely.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "worker/model/config.h"
#include "worker/model/linear.h"
#include "worker/model/tokenizer.h"

namespace spear::model {

struct LayerWeights {
  const float* attn_norm = nullptr;  // [hidden] input_layernorm
  const float* ffn_norm = nullptr;   // [hidden] post_attention_layernorm
  std::unique_ptr<Linear> q_proj;    // [heads*head_dim, hidden]
  std::unique_ptr<Linear> k_proj;    // [kv_heads*head_dim, hidden]
  std::unique_ptr<Linear> v_proj;    // [kv_heads*head_dim, hidden]
  std::unique_ptr<Linear> o_proj;    // [hidden, heads*head_dim]
  std::unique_ptr<Linear> gate_proj; // [intermediate, hidden]
  std::unique_ptr<Linear> up_proj;   // [intermediate, hidden]
  std::unique_ptr<Linear> down_proj; // [hidden, intermediate]
};

struct LlamaWeights {
  // Token embedding [vocab, hidden] of embed_dtype (row-major).
  const void* embed = nullptr;
  kernels::DType embed_dtype = kernels::DType::kF32;
  std::vector<LayerWeights> layers;
  const float* final_norm = nullptr;  // [hidden]
  std::unique_ptr<Linear> lm_head;    // [vocab, hidden]; over `embed` when tied
  bool tied_embeddings = false;

  // Keeps mapped files and owned buffers alive (type-erased).
  std::vector<std::shared_ptr<const void>> storage;

  // Writes embedding row `token` (caller checked 0 <= token < vocab) as
  // float32 into out[0, hidden).
  void EmbedRow(int32_t token, int64_t hidden, float* out) const;

  // Visits every transformer linear layer with its HF-style name
  // ("model.layers.3.self_attn.q_proj"); the callback may replace the layer
  // (e.g. with a quantized one of the same shape). lm_head is not visited.
  void ForEachLinear(const std::function<void(const std::string&, std::unique_ptr<Linear>&)>& fn);
};

// The seven linears of a decoder layer, in ForEachLinear order.
enum class LayerLinear { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kLayerLinears = 7;
struct LinearName {
  int64_t layer = 0;
  LayerLinear which = LayerLinear::kQ;
};
// The inverse of ForEachLinear's names ("model.layers.3.self_attn.q_proj"
// -> {3, kQ}); nullopt for any other name.
std::optional<LinearName> ParseLinearName(std::string_view name);

struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<Tokenizer> tokenizer;  // nullptr if the source has none
  LlamaWeights weights;
  std::string source_path;
};

struct LoadOptions {
  // Load the tokenizer if the source has one (tokenizer.json in an HF
  // directory; tokenizer.ggml.* metadata in GGUF). A tokenizer that exists
  // but fails to load is an error.
  bool load_tokenizer = true;
};

// OK if `dir` has a config.json (a Hugging Face model directory); else
// NotFound naming what it holds instead (the .gguf files in it, with a hint
// to pass one of them or the cache name). LoadModel and `spear info` use it.
absl::Status CheckHfModelDir(const std::string& dir);

// `path` is (a) a .spear directory (spear.json present: a W4(+EC) model,
// validated strictly, see spear_checkpoint.h), (b) an HF directory:
// config.json + model.safetensors or model.safetensors.index.json (+
// optional tokenizer.json), or (c) a .gguf
// file (every tensor dequantized to float32; for llama/mistral the q/k row
// permutation of llama.cpp's converter is undone, so the same rotate_half
// RoPE serves both sources; qwen2 GGUFs are not permuted).
// Every tensor is checked against the config: NotFound for a missing
// tensor, InvalidArgument for a wrong shape or unsupported dtype.
absl::StatusOr<std::unique_ptr<LoadedModel>> LoadModel(const std::string& path,
                                                       const LoadOptions& options = {});

// llama.cpp's converter stores q/k rows of each head interleaved (for its
// GPT-J style RoPE): GGUF row h*hd + 2i + s holds HF row h*hd + s*hd/2 + i.
// Undoes that in place on a float32 [n_heads*head_dim, cols] matrix.
// InvalidArgument if rows != n_heads * head_dim or head_dim is odd.
absl::Status UnpermuteGgufQk(float* w, int64_t rows, int64_t cols, int64_t n_heads);

}  // namespace spear::model
