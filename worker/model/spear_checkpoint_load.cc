// Loading a .spear directory: manifest first (spear_manifest.cc), then every
// tensor checked against it before any layer is built.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"
#include "spdlog/spdlog.h"
#include "worker/model/safetensors.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/spear_checkpoint_internal.h"
#include "worker/model/w4_linear.h"

namespace spear::model {
namespace {

namespace fs = std::filesystem;

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// Tensor lookup that records which tensors were used (the rest are errors).
class Tensors {
 public:
  explicit Tensors(const SafetensorsCheckpoint& ckpt) : ckpt_(ckpt) {}

  // The tensor `name`, of one of `types` and shape `shape`.
  absl::StatusOr<const TensorInfo*> Get(const std::string& name,
                                        std::initializer_list<TensorType> types,
                                        const std::vector<int64_t>& shape) {
    const TensorInfo* t = ckpt_.Find(name);
    if (t == nullptr) return absl::NotFoundError(absl::StrCat("missing tensor ", name));
    used_.insert(name);
    bool type_ok = false;
    std::vector<std::string> names;
    for (TensorType ty : types) {
      type_ok |= t->type == ty;
      names.emplace_back(TensorTypeName(ty));
    }
    if (!type_ok) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has dtype ",
                                                     std::string(TensorTypeName(t->type)),
                                                     ", expected ", absl::StrJoin(names, " or ")));
    }
    if (t->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has shape ",
                                                     ShapeStr(t->shape), ", expected ",
                                                     ShapeStr(shape)));
    }
    return t;
  }
  bool Has(const std::string& name) const { return ckpt_.Find(name) != nullptr; }

  // InvalidArgument naming the first tensor nothing asked for.
  absl::Status CheckAllUsed() const {
    for (const TensorInfo* t : ckpt_.tensors()) {
      if (!used_.contains(t->name)) {
        return absl::InvalidArgumentError(
            absl::StrCat("unexpected tensor ", t->name, " (not described by spear.json)"));
      }
    }
    return absl::OkStatus();
  }

 private:
  const SafetensorsCheckpoint& ckpt_;
  std::set<std::string> used_;
};

// F16 / F32 tensor -> float32, rejecting non-finite values.
absl::StatusOr<std::vector<float>> ToFloats(const TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (t.type == TensorType::kF32) {
      std::memcpy(&out[i], t.data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      out[i] = t.type == TensorType::kBF16 ? kernels::BF16ToFloat(h) : kernels::HalfToFloat(h);
    }
    if (!std::isfinite(out[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", t.name, " has a non-finite value at element ", i));
    }
  }
  return out;
}

absl::StatusOr<std::vector<float>> Floats(Tensors& ts, const std::string& name,
                                          std::initializer_list<TensorType> types,
                                          const std::vector<int64_t>& shape) {
  auto t = ts.Get(name, types, shape);
  if (!t.ok()) return t.status();
  return ToFloats(**t);
}

// A float32 buffer owned by the weights.
const float* Own(LlamaWeights* w, std::vector<float> v) {
  auto buf = std::make_shared<std::vector<float>>(std::move(v));
  w->storage.push_back(buf);
  return buf->data();
}

// A dense [rows, cols] F16/BF16 matrix, in place if 2-byte aligned.
absl::StatusOr<const void*> DenseMatrix(Tensors& ts, LlamaWeights* w, const std::string& name,
                                        int64_t rows, int64_t cols, kernels::DType* dtype) {
  auto t = ts.Get(name, {TensorType::kF16, TensorType::kBF16}, {rows, cols});
  if (!t.ok()) return t.status();
  *dtype = (*t)->type == TensorType::kBF16 ? kernels::DType::kBF16 : kernels::DType::kF16;
  if (reinterpret_cast<uintptr_t>((*t)->data) % 2 == 0) return (*t)->data;
  auto buf = std::make_shared<std::vector<uint16_t>>((*t)->nbytes / 2);
  std::memcpy(buf->data(), (*t)->data, (*t)->nbytes);
  w->storage.push_back(buf);
  return buf->data();
}

// An EC's int8 A and B with their scales (FORMAT.md, "EC factor storage");
// e's shapes are set. Validated by decoding them; LoadModule then keeps the
// EC compact (kernels::CompactEcFactorsI8).
absl::Status LoadI8Factors(Tensors& ts, const std::string& p, kernels::EcWeights* e) {
  const int64_t r = e->rank, n = e->n, k = e->k;
  kernels::EcI8Factors f;
  auto a = ts.Get(p + ".ec.a", {TensorType::kI8}, {r, k});
  if (!a.ok()) return a.status();
  auto as = ts.Get(p + ".ec.a_scales", {TensorType::kF16}, {r, kernels::EcI8Groups(k)});
  if (!as.ok()) return as.status();
  auto b = ts.Get(p + ".ec.b", {TensorType::kI8}, {n, r});
  if (!b.ok()) return b.status();
  auto bs = ts.Get(p + ".ec.b_scales", {TensorType::kF16}, {kernels::EcI8Groups(n), r});
  if (!bs.ok()) return bs.status();
  f.a.resize((*a)->nbytes);
  std::memcpy(f.a.data(), (*a)->data, (*a)->nbytes);
  f.b.resize((*b)->nbytes);
  std::memcpy(f.b.data(), (*b)->data, (*b)->nbytes);
  f.a_scales.resize((*as)->nbytes / 2);
  std::memcpy(f.a_scales.data(), (*as)->data, (*as)->nbytes);
  f.b_scales.resize((*bs)->nbytes / 2);
  std::memcpy(f.b_scales.data(), (*bs)->data, (*bs)->nbytes);
  if (absl::Status s = kernels::DecodeEcFactorsI8(f, e); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tensors ", p, ".ec.*: ", s.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<W4Linear>> LoadModule(Tensors& ts, const SpearModuleInfo& m) {
  const std::string& p = m.name;
  kernels::W4Weight w;
  w.fmt = {m.n, m.k, m.group_size, m.symmetric};
  const int64_t g = w.fmt.num_groups();
  auto qw = ts.Get(p + ".qweight", {TensorType::kU8}, {m.n, w.fmt.packed_row_bytes()});
  if (!qw.ok()) return qw.status();
  w.packed.assign((*qw)->data, (*qw)->data + (*qw)->nbytes);
  auto sc = ts.Get(p + ".scales", {TensorType::kF16}, {m.n, g});
  if (!sc.ok()) return sc.status();
  w.scales.resize(static_cast<size_t>(m.n * g));
  std::memcpy(w.scales.data(), (*sc)->data, (*sc)->nbytes);
  for (size_t i = 0; i < w.scales.size(); ++i) {
    const float s = kernels::HalfToFloat(w.scales[i]);
    if (!std::isfinite(s)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", p, ".scales has a non-finite scale (",
                                                     s, ") at row ", i / g, ", group ", i % g));
    }
  }
  auto zp = ts.Get(p + ".zeros", {TensorType::kU8}, {m.n, g});
  if (!zp.ok()) return zp.status();
  w.zeros.assign((*zp)->data, (*zp)->data + (*zp)->nbytes);
  for (size_t i = 0; i < w.zeros.size(); ++i) {
    if (w.zeros[i] > 15 || (m.symmetric && w.zeros[i] != 8)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", p, ".zeros: zero point ",
                                                     int{w.zeros[i]}, " at ", i, " is not ",
                                                     m.symmetric ? "8 (symmetric)" : "in [0, 15]"));
    }
  }
  if (m.act_scale) {
    auto as = Floats(ts, p + ".act_scale", {TensorType::kF16}, {m.k});
    if (!as.ok()) return as.status();
    for (float s : *as) {
      if (!(s > 0)) return absl::InvalidArgumentError(absl::StrCat(p, ".act_scale has a value <= 0"));
    }
    w.act_scale = *std::move(as);
  } else if (ts.Has(p + ".act_scale")) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", p, ".act_scale present but spear.json says act_scale false"));
  }
  std::vector<float> bias;
  if (m.bias) {
    auto b = Floats(ts, p + ".bias", {TensorType::kF32}, {m.n});
    if (!b.ok()) return b.status();
    bias = *std::move(b);
  }
  std::optional<kernels::EcWeights> ec;
  if (m.ec_rank > 0) {
    kernels::EcWeights e;
    e.n = m.n, e.k = m.k, e.rank = m.ec_rank, e.gated = m.ec_gated;
    e.gate_hidden = m.ec_gated ? m.ec_gate_hidden : 0;
    const int64_t r = m.ec_rank, h = e.gate_hidden;
    struct Part {
      const char* suffix;
      std::vector<int64_t> shape;
      std::vector<float>* dst;
    };
    std::vector<Part> parts;
    if (m.ec_factors == kernels::EcFactors::kI8) {
      if (absl::Status s = LoadI8Factors(ts, p, &e); !s.ok()) return s;
    } else {
      parts = {{".ec.a", {r, m.k}, &e.a}, {".ec.b", {m.n, r}, &e.b}};
    }
    if (m.ec_gated) {
      parts.push_back({".ec.w1", {h, r}, &e.w1});
      parts.push_back({".ec.b1", {h}, &e.b1});
      parts.push_back({".ec.w2", {r, h}, &e.w2});
      parts.push_back({".ec.b2", {r}, &e.b2});
    }
    for (const Part& part : parts) {
      auto v = Floats(ts, p + part.suffix, {TensorType::kF16}, part.shape);
      if (!v.ok()) {
        return absl::Status(v.status().code(),
                            absl::StrCat(v.status().message(), " (spear.json: EC rank ", r,
                                         m.ec_gated ? absl::StrCat(", gate_hidden ", h) : "", ")"));
      }
      *part.dst = *std::move(v);
    }
    if (m.ec_factors == kernels::EcFactors::kI8) {
      // Held as stored (int8 A and B with their scales, the fp16 gate): the
      // bytes the EC budget counts are the bytes served (the kernels decode
      // per call). Exact: the values came from those very codes.
      if (absl::Status s = kernels::CompactEcFactorsI8(&e); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("tensors ", p, ".ec.*: ", s.message()));
      }
    }
    ec = std::move(e);
  } else if (ts.Has(p + ".ec.a")) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", p, ".ec.a present but spear.json lists no EC for ", p));
  }
  return W4Linear::Create(std::move(w), std::move(ec), std::move(bias));
}

absl::Status BuildModel(const SpearManifest& man, const SafetensorsCheckpoint& ckpt,
                        LoadedModel* m) {
  const ModelConfig& c = man.config;
  LlamaWeights& w = m->weights;
  Tensors ts(ckpt);
  kernels::DType embed_dtype;
  auto embed = DenseMatrix(ts, &w, "model.embed_tokens.weight", c.vocab_size, c.hidden_size,
                           &embed_dtype);
  if (!embed.ok()) return embed.status();
  w.embed = *embed;
  w.embed_dtype = embed_dtype;
  auto norm = Floats(ts, "model.norm.weight", {TensorType::kF16}, {c.hidden_size});
  if (!norm.ok()) return norm.status();
  w.final_norm = Own(&w, *std::move(norm));
  w.layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i);
    auto an = Floats(ts, p + ".input_layernorm.weight", {TensorType::kF16}, {c.hidden_size});
    if (!an.ok()) return an.status();
    w.layers[i].attn_norm = Own(&w, *std::move(an));
    auto fn = Floats(ts, p + ".post_attention_layernorm.weight", {TensorType::kF16}, {c.hidden_size});
    if (!fn.ok()) return fn.status();
    w.layers[i].ffn_norm = Own(&w, *std::move(fn));
  }
  std::map<std::string, const SpearModuleInfo*> modules;
  for (const SpearModuleInfo& mi : man.modules) modules[mi.name] = &mi;
  absl::Status status;
  w.ForEachLinear([&](const std::string& name, std::unique_ptr<Linear>& lin) {
    if (!status.ok()) return;
    auto it = modules.find(name);  // present: ReadSpearManifest checked the list
    if (it == modules.end()) {
      status = absl::InternalError(absl::StrCat("module ", name, " missing from the manifest"));
      return;
    }
    auto q = LoadModule(ts, *it->second);
    if (!q.ok()) {
      status = q.status();
      return;
    }
    lin = *std::move(q);
  });
  if (!status.ok()) return status;
  w.tied_embeddings = c.tie_word_embeddings;
  if (w.tied_embeddings) {
    if (ts.Has("lm_head.weight")) {
      return absl::InvalidArgumentError("tensor lm_head.weight present but the embeddings are tied");
    }
    auto lin = DenseLinear::Create(w.embed, w.embed_dtype, c.vocab_size, c.hidden_size);
    if (!lin.ok()) return lin.status();
    w.lm_head = *std::move(lin);
  } else {
    kernels::DType dt;
    auto head = DenseMatrix(ts, &w, "lm_head.weight", c.vocab_size, c.hidden_size, &dt);
    if (!head.ok()) return head.status();
    auto lin = DenseLinear::Create(*head, dt, c.vocab_size, c.hidden_size);
    if (!lin.ok()) return lin.status();
    w.lm_head = *std::move(lin);
  }
  return ts.CheckAllUsed();
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadSpearModel(const std::string& dir,
                                                            const LoadOptions& options) {
  auto man = ReadSpearManifest(dir);
  if (!man.ok()) return man.status();
  auto m = std::make_unique<LoadedModel>();
  m->source_path = dir;
  m->config = man->config;
  const std::string weights = (fs::path(dir) / kSpearWeightsFile).string();
  std::error_code ec;
  if (!fs::exists(weights, ec)) {
    return absl::NotFoundError(absl::StrCat("missing ", kSpearWeightsFile, " in ", dir));
  }
  auto ckpt = SafetensorsCheckpoint::Open(weights);
  if (!ckpt.ok()) return ckpt.status();
  std::shared_ptr<SafetensorsCheckpoint> shared(std::move(*ckpt));
  m->weights.storage.push_back(shared);
  if (auto s = BuildModel(*man, *shared, m.get()); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(weights, ": ", s.message()));
  }
  if (options.load_tokenizer && !man->tokenizer_file.empty()) {
    const std::string tok = (fs::path(dir) / man->tokenizer_file).string();
    auto t = LoadHfTokenizer(tok);
    if (!t.ok()) {
      return absl::Status(t.status().code(),
                          absl::StrCat("loading ", tok, ": ", t.status().message()));
    }
    m->tokenizer = *std::move(t);
  }
  return m;
}

}  // namespace spear::model
