#include "worker/model/weights.h"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "spdlog/spdlog.h"
#include "worker/model/gguf.h"
#include "worker/model/safetensors.h"
#include "worker/model/spear_checkpoint.h"

namespace spear::model {
namespace {

namespace fs = std::filesystem;

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// A weight matrix ready for a DenseLinear.
struct DenseRef {
  const void* data;
  kernels::DType dtype;
};

// Allocates a float32 buffer owned by `w`.
float* NewFloatBuffer(LlamaWeights* w, size_t n) {
  auto buf = std::make_shared<std::vector<float>>(n);
  float* p = buf->data();
  w->storage.push_back(std::move(buf));
  return p;
}

// Where tensors come from. Implementations copy/convert into buffers owned
// by `weights` when needed; returned pointers live as long as `weights`.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool Has(const std::string& name) const = 0;
  // [rows, cols]; unpermute_heads > 0 asks for llama.cpp's q/k permutation
  // to be undone (only meaningful for GGUF).
  virtual absl::StatusOr<DenseRef> Matrix(const std::string& name, int64_t rows, int64_t cols,
                                          int64_t unpermute_heads, LlamaWeights* weights) = 0;
  // [n] as float32.
  virtual absl::StatusOr<const float*> Vector(const std::string& name, int64_t n,
                                              LlamaWeights* weights) = 0;
};

absl::Status CheckShape(const TensorInfo& t, const std::vector<int64_t>& want) {
  if (t.shape != want) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, " has shape ",
                                                   ShapeStr(t.shape), ", expected ",
                                                   ShapeStr(want), " from the model config"));
  }
  return absl::OkStatus();
}

absl::StatusOr<kernels::DType> DenseDType(const TensorInfo& t) {
  switch (t.type) {
    case TensorType::kF32: return kernels::DType::kF32;
    case TensorType::kF16: return kernels::DType::kF16;
    case TensorType::kBF16: return kernels::DType::kBF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, " has unsupported dtype ",
                                                     std::string(TensorTypeName(t.type)),
                                                     " (expected F32, F16 or BF16)"));
  }
}

// Safetensors: dense tensors used in place from the mapping.
class HfSource final : public WeightSource {
 public:
  explicit HfSource(std::shared_ptr<SafetensorsCheckpoint> ckpt) : ckpt_(std::move(ckpt)) {}

  bool Has(const std::string& name) const override { return ckpt_->Find(name) != nullptr; }

  absl::StatusOr<DenseRef> Matrix(const std::string& name, int64_t rows, int64_t cols,
                                  int64_t /*unpermute_heads*/, LlamaWeights* weights) override {
    auto t = Get(name, {rows, cols});
    if (!t.ok()) return t.status();
    auto dt = DenseDType(**t);
    if (!dt.ok()) return dt.status();
    const size_t esize = kernels::DTypeSize(*dt);
    if (reinterpret_cast<uintptr_t>((*t)->data) % esize == 0) return DenseRef{(*t)->data, *dt};
    // Misaligned inside the file (legal in safetensors): copy once.
    auto buf = std::make_shared<std::vector<uint8_t>>((*t)->nbytes + 8);
    uint8_t* p = buf->data();
    p += (esize - reinterpret_cast<uintptr_t>(p) % esize) % esize;
    std::memcpy(p, (*t)->data, (*t)->nbytes);
    weights->storage.push_back(std::move(buf));
    return DenseRef{p, *dt};
  }

  absl::StatusOr<const float*> Vector(const std::string& name, int64_t n,
                                      LlamaWeights* weights) override {
    auto t = Get(name, {n});
    if (!t.ok()) return t.status();
    auto dt = DenseDType(**t);
    if (!dt.ok()) return dt.status();
    float* out = NewFloatBuffer(weights, n);
    for (int64_t i = 0; i < n; ++i) {
      // memcpy-based loads: the mapped data may be misaligned.
      if (*dt == kernels::DType::kF32) {
        std::memcpy(&out[i], (*t)->data + 4 * i, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, (*t)->data + 2 * i, 2);
        out[i] = *dt == kernels::DType::kF16 ? kernels::HalfToFloat(h) : kernels::BF16ToFloat(h);
      }
    }
    return out;
  }

 private:
  absl::StatusOr<const TensorInfo*> Get(const std::string& name, const std::vector<int64_t>& want) {
    const TensorInfo* t = ckpt_->Find(name);
    if (t == nullptr) return absl::NotFoundError(absl::StrCat("missing tensor ", name));
    if (auto s = CheckShape(*t, want); !s.ok()) return s;
    return t;
  }

  std::shared_ptr<SafetensorsCheckpoint> ckpt_;
};

// GGUF: every tensor dequantized to an owned float32 buffer.
class GgufSource final : public WeightSource {
 public:
  explicit GgufSource(const GgufFile* gguf) : gguf_(gguf) {}

  bool Has(const std::string& name) const override { return gguf_->Find(name) != nullptr; }

  absl::StatusOr<DenseRef> Matrix(const std::string& name, int64_t rows, int64_t cols,
                                  int64_t unpermute_heads, LlamaWeights* weights) override {
    auto p = Load(name, {rows, cols}, weights);
    if (!p.ok()) return p.status();
    if (unpermute_heads > 0) {
      if (auto s = UnpermuteGgufQk(*p, rows, cols, unpermute_heads); !s.ok()) return s;
    }
    return DenseRef{*p, kernels::DType::kF32};
  }

  absl::StatusOr<const float*> Vector(const std::string& name, int64_t n,
                                      LlamaWeights* weights) override {
    auto p = Load(name, {n}, weights);
    if (!p.ok()) return p.status();
    return *p;
  }

 private:
  absl::StatusOr<float*> Load(const std::string& name, const std::vector<int64_t>& want,
                              LlamaWeights* weights) {
    const TensorInfo* t = gguf_->Find(name);
    if (t == nullptr) return absl::NotFoundError(absl::StrCat("missing tensor ", name));
    if (auto s = CheckShape(*t, want); !s.ok()) return s;
    if (!CanDequantize(t->type)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has unsupported type ",
                                                     std::string(TensorTypeName(t->type))));
    }
    float* out = NewFloatBuffer(weights, static_cast<size_t>(t->numel()));
    if (auto s = Dequantize(*t, out); !s.ok()) return s;
    return out;
  }

  const GgufFile* gguf_;
};

// Tensor names of one source format.
struct Names {
  std::string embed, final_norm, lm_head;
  // Per-layer names: prefix + layer + suffix.
  std::string layer_prefix;
  std::string q, k, v, o, gate, up, down, attn_norm, ffn_norm;  // with ".weight"
  std::string q_bias, k_bias, v_bias, o_bias;
};

Names HfNames() {
  return Names{"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.",
               ".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
               ".self_attn.o_proj.weight", ".mlp.gate_proj.weight", ".mlp.up_proj.weight",
               ".mlp.down_proj.weight", ".input_layernorm.weight",
               ".post_attention_layernorm.weight", ".self_attn.q_proj.bias",
               ".self_attn.k_proj.bias", ".self_attn.v_proj.bias", ".self_attn.o_proj.bias"};
}

Names GgufNames() {
  return Names{"token_embd.weight", "output_norm.weight", "output.weight", "blk.",
               ".attn_q.weight", ".attn_k.weight", ".attn_v.weight", ".attn_output.weight",
               ".ffn_gate.weight", ".ffn_up.weight", ".ffn_down.weight", ".attn_norm.weight",
               ".ffn_norm.weight", ".attn_q.bias", ".attn_k.bias", ".attn_v.bias",
               ".attn_output.bias"};
}

absl::StatusOr<std::unique_ptr<Linear>> MakeLinear(WeightSource& src, LlamaWeights* w,
                                                   const std::string& name,
                                                   const std::string& bias_name, int64_t rows,
                                                   int64_t cols, bool require_bias,
                                                   int64_t unpermute_heads) {
  auto m = src.Matrix(name, rows, cols, unpermute_heads, w);
  if (!m.ok()) return m.status();
  const float* bias = nullptr;
  if (require_bias || src.Has(bias_name)) {
    auto b = src.Vector(bias_name, rows, w);
    if (!b.ok()) return b.status();
    if (unpermute_heads > 0) {
      // A bias is a [rows, 1] matrix under the same row permutation.
      float* bp = const_cast<float*>(*b);  // owned by w
      if (auto s = UnpermuteGgufQk(bp, rows, 1, unpermute_heads); !s.ok()) return s;
    }
    bias = *b;
  }
  auto lin = DenseLinear::Create(m->data, m->dtype, rows, cols, bias);
  if (!lin.ok()) return lin.status();
  return std::unique_ptr<Linear>(std::move(*lin));
}

absl::Status BuildWeights(const ModelConfig& c, WeightSource& src, const Names& n,
                          bool is_gguf, LlamaWeights* w) {
  const int64_t d = c.hidden_size, hd = c.head_dim, qd = c.num_heads * hd,
                kvd = c.num_kv_heads * hd, ff = c.intermediate_size;
  auto emb = src.Matrix(n.embed, c.vocab_size, d, 0, w);
  if (!emb.ok()) return emb.status();
  w->embed = emb->data;
  w->embed_dtype = emb->dtype;
  w->layers.clear();
  w->layers.resize(c.num_layers);
  const bool bias = c.attention_bias;
  // llama.cpp permutes q/k rows only for its LLaMA-family converter (llama,
  // mistral); qwen2 GGUFs keep HF order (NeoX RoPE in llama.cpp).
  const bool permuted = is_gguf && c.architecture != "qwen2";
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LayerWeights& L = w->layers[i];
    const std::string p = absl::StrCat(n.layer_prefix, i);
    auto an = src.Vector(p + n.attn_norm, d, w);
    if (!an.ok()) return an.status();
    L.attn_norm = *an;
    auto fn = src.Vector(p + n.ffn_norm, d, w);
    if (!fn.ok()) return fn.status();
    L.ffn_norm = *fn;
    struct Spec {
      std::unique_ptr<Linear>* dst;
      const std::string* name;
      const std::string* bias_name;
      int64_t rows, cols;
      bool require_bias;
      int64_t unpermute;
    };
    const Spec specs[] = {
        {&L.q_proj, &n.q, &n.q_bias, qd, d, bias, permuted ? c.num_heads : 0},
        {&L.k_proj, &n.k, &n.k_bias, kvd, d, bias, permuted ? c.num_kv_heads : 0},
        {&L.v_proj, &n.v, &n.v_bias, kvd, d, bias, 0},
        {&L.o_proj, &n.o, &n.o_bias, d, qd, false, 0},
        {&L.gate_proj, &n.gate, nullptr, ff, d, false, 0},
        {&L.up_proj, &n.up, nullptr, ff, d, false, 0},
        {&L.down_proj, &n.down, nullptr, d, ff, false, 0},
    };
    for (const Spec& s : specs) {
      const std::string bname = s.bias_name ? p + *s.bias_name : std::string("<no bias>");
      auto lin = MakeLinear(src, w, p + *s.name, bname, s.rows, s.cols, s.require_bias,
                            s.unpermute);
      if (!lin.ok()) return lin.status();
      *s.dst = std::move(*lin);
    }
  }
  auto fnorm = src.Vector(n.final_norm, d, w);
  if (!fnorm.ok()) return fnorm.status();
  w->final_norm = *fnorm;
  // Tied when the checkpoint has no separate output matrix (or the config
  // says so); an untied config with no lm_head is an error.
  w->tied_embeddings = c.tie_word_embeddings || (is_gguf && !src.Has(n.lm_head));
  if (w->tied_embeddings) {
    auto lin = DenseLinear::Create(w->embed, w->embed_dtype, c.vocab_size, d);
    if (!lin.ok()) return lin.status();
    w->lm_head = std::move(*lin);
  } else {
    auto lin = MakeLinear(src, w, n.lm_head, "", c.vocab_size, d, false, 0);
    if (!lin.ok()) return lin.status();
    w->lm_head = std::move(*lin);
  }
  return absl::OkStatus();
}

void FillSpecialIds(LoadedModel* m) {
  if (m->tokenizer == nullptr) return;
  if (m->config.eos_token_ids.empty() && m->tokenizer->eos_id() >= 0) {
    m->config.eos_token_ids.push_back(m->tokenizer->eos_id());
  }
  if (m->config.bos_token_id < 0) m->config.bos_token_id = m->tokenizer->bos_id();
}

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadHf(const std::string& dir,
                                                    const LoadOptions& opt) {
  auto m = std::make_unique<LoadedModel>();
  m->source_path = dir;
  auto cfg = ConfigFromHfJsonFile((fs::path(dir) / "config.json").string());
  if (!cfg.ok()) return cfg.status();
  m->config = *cfg;
  if (auto s = m->config.Validate(); !s.ok()) return s;
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  if (!ckpt.ok()) return ckpt.status();
  std::shared_ptr<SafetensorsCheckpoint> shared(std::move(*ckpt));
  m->weights.storage.push_back(shared);
  HfSource src(shared);
  if (auto s = BuildWeights(m->config, src, HfNames(), false, &m->weights); !s.ok()) return s;
  const fs::path tok = fs::path(dir) / "tokenizer.json";
  if (opt.load_tokenizer && fs::exists(tok)) {
    auto t = LoadHfTokenizer(tok.string());
    if (!t.ok()) {
      return absl::Status(t.status().code(), absl::StrCat("loading ", tok.string(), ": ",
                                                          t.status().message()));
    }
    m->tokenizer = std::move(*t);
  }
  FillSpecialIds(m.get());
  return m;
}

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadGguf(const std::string& path,
                                                      const LoadOptions& opt) {
  auto m = std::make_unique<LoadedModel>();
  m->source_path = path;
  auto gguf = GgufFile::Open(path);
  if (!gguf.ok()) return gguf.status();
  auto cfg = ConfigFromGguf(**gguf);
  if (!cfg.ok()) return cfg.status();
  m->config = *cfg;
  if (auto s = m->config.Validate(); !s.ok()) return s;
  GgufSource src(gguf->get());
  if (auto s = BuildWeights(m->config, src, GgufNames(), true, &m->weights); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  if (opt.load_tokenizer && (*gguf)->Get("tokenizer.ggml.model") != nullptr) {
    auto t = TokenizerFromGguf(**gguf);
    if (!t.ok()) return t.status();
    m->tokenizer = std::move(*t);
  }
  FillSpecialIds(m.get());
  // Every weight was dequantized into owned buffers: the file can go.
  return m;
}

}  // namespace

void LlamaWeights::EmbedRow(int32_t token, int64_t hidden, float* out) const {
  const int64_t base = static_cast<int64_t>(token) * hidden;
  if (embed_dtype == kernels::DType::kF32) {
    std::memcpy(out, static_cast<const float*>(embed) + base, hidden * sizeof(float));
    return;
  }
  for (int64_t j = 0; j < hidden; ++j) out[j] = kernels::LoadAsFloat(embed, embed_dtype, base + j);
}

namespace {
constexpr std::string_view kLayerPrefix = "model.layers.";
// Suffixes after "model.layers.<L>", in LayerLinear order.
constexpr std::string_view kLinearSuffix[kLayerLinears] = {
    ".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.o_proj",
    ".mlp.gate_proj",    ".mlp.up_proj",      ".mlp.down_proj"};
}  // namespace

void LlamaWeights::ForEachLinear(
    const std::function<void(const std::string&, std::unique_ptr<Linear>&)>& fn) {
  for (size_t i = 0; i < layers.size(); ++i) {
    LayerWeights& L = layers[i];
    std::unique_ptr<Linear>* slots[kLayerLinears] = {&L.q_proj,    &L.k_proj,  &L.v_proj,
                                                     &L.o_proj,    &L.gate_proj, &L.up_proj,
                                                     &L.down_proj};
    const std::string p = std::string(kLayerPrefix) + std::to_string(i);
    for (int j = 0; j < kLayerLinears; ++j) fn(p + std::string(kLinearSuffix[j]), *slots[j]);
  }
}

std::optional<LinearName> ParseLinearName(std::string_view name) {
  if (name.substr(0, kLayerPrefix.size()) != kLayerPrefix) return std::nullopt;
  name.remove_prefix(kLayerPrefix.size());
  LinearName out;
  const auto r = std::from_chars(name.data(), name.data() + name.size(), out.layer);
  if (r.ec != std::errc() || r.ptr == name.data() || out.layer < 0) return std::nullopt;
  name.remove_prefix(static_cast<size_t>(r.ptr - name.data()));
  for (int j = 0; j < kLayerLinears; ++j) {
    if (name == kLinearSuffix[j]) {
      out.which = static_cast<LayerLinear>(j);
      return out;
    }
  }
  return std::nullopt;
}

absl::Status UnpermuteGgufQk(float* w, int64_t rows, int64_t cols, int64_t n_heads) {
  if (w == nullptr || n_heads <= 0 || rows <= 0 || cols <= 0 || rows % n_heads != 0 ||
      (rows / n_heads) % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("UnpermuteGgufQk: cannot split ", rows,
                                                   " rows into ", n_heads,
                                                   " heads of even size"));
  }
  const int64_t hd = rows / n_heads, half = hd / 2;
  std::vector<float> head(static_cast<size_t>(hd * cols));
  for (int64_t h = 0; h < n_heads; ++h) {
    float* base = w + h * hd * cols;
    std::memcpy(head.data(), base, head.size() * sizeof(float));
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t s = 0; s < 2; ++s) {
        std::memcpy(base + (s * half + i) * cols, head.data() + (2 * i + s) * cols,
                    cols * sizeof(float));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckHfModelDir(const std::string& dir) {
  std::error_code ec;
  if (fs::exists(fs::path(dir) / "config.json", ec)) return absl::OkStatus();
  // Not a Hugging Face model: say what the directory holds instead of
  // failing on the missing file (the model cache keeps a pulled GGUF in
  // models/<name>/, whose cache name or file path loads).
  std::vector<std::string> ggufs;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".gguf") ggufs.push_back(e.path().filename().string());
  }
  std::sort(ggufs.begin(), ggufs.end());
  std::string msg = absl::StrCat("directory ", dir,
                                 " is neither a Hugging Face model directory (no config.json) "
                                 "nor a .spear checkpoint (no spear.json)");
  if (!ggufs.empty()) {
    absl::StrAppend(&msg, "; it holds ", absl::StrJoin(ggufs, ", "),
                    ": pass that file's path (or the model's cache name)");
  }
  return absl::NotFoundError(msg);
}

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadModel(const std::string& path,
                                                       const LoadOptions& options) {
  std::error_code ec;
  if (IsSpearDir(path)) {
    auto r = LoadSpearModel(path, options);
    if (!r.ok()) {
      return absl::Status(r.status().code(), absl::StrCat("loading .spear model from ", path,
                                                          ": ", r.status().message()));
    }
    spdlog::info("loaded .spear model {} ({} layers, hidden {}, vocab {})", path,
                 (*r)->config.num_layers, (*r)->config.hidden_size, (*r)->config.vocab_size);
    return r;
  }
  if (fs::is_directory(path, ec)) {
    if (absl::Status st = CheckHfModelDir(path); !st.ok()) return st;
    auto r = LoadHf(path, options);
    if (!r.ok()) {
      return absl::Status(r.status().code(), absl::StrCat("loading HF model from ", path, ": ",
                                                          r.status().message()));
    }
    spdlog::info("loaded HF model {} ({} layers, hidden {}, vocab {})", path,
                 (*r)->config.num_layers, (*r)->config.hidden_size, (*r)->config.vocab_size);
    return r;
  }
  if (!fs::exists(path, ec)) return absl::NotFoundError(absl::StrCat("model path not found: ", path));
  auto r = LoadGguf(path, options);
  if (r.ok()) {
    spdlog::info("loaded GGUF model {} ({} layers, hidden {}, vocab {})", path,
                 (*r)->config.num_layers, (*r)->config.hidden_size, (*r)->config.vocab_size);
  }
  return r;
}

}  // namespace spear::model
