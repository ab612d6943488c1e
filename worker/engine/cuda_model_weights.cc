#include "worker/engine/cuda_model_weights.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"

namespace spear::engine {
namespace {

template <typename T>
absl::StatusOr<T*> Upload(const T* host, size_t n, std::vector<void*>* owned, size_t* bytes) {
  void* d = nullptr;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&d, n * sizeof(T)));
  owned->push_back(d);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpy(d, host, n * sizeof(T), cudaMemcpyHostToDevice));
  *bytes += n * sizeof(T);
  return static_cast<T*>(d);
}

// A [rows, cols] table of `dtype` as fp16 (round to nearest even).
std::vector<uint16_t> ToHalf(const void* src, kernels::DType dtype, size_t n) {
  std::vector<uint16_t> out(n);
  if (dtype == kernels::DType::kF16) {
    std::memcpy(out.data(), src, n * 2);
  } else if (dtype == kernels::DType::kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) out[i] = kernels::FloatToHalf(kernels::BF16ToFloat(s[i]));
  } else {
    const float* s = static_cast<const float*>(src);
    for (size_t i = 0; i < n; ++i) out[i] = kernels::FloatToHalf(s[i]);
  }
  return out;
}

bool SameBackbone(const model::W4Linear& a, const model::W4Linear& b) {
  const kernels::W4Format &fa = a.weight().fmt, &fb = b.weight().fmt;
  return fa.k == fb.k && fa.group_size == fb.group_size && fa.symmetric == fb.symmetric &&
         a.weight().act_scale == b.weight().act_scale;
}

kernels::W4Weight ConcatBackbones(const std::vector<const model::W4Linear*>& parts) {
  kernels::W4Weight w;
  w.fmt = parts[0]->weight().fmt;
  w.fmt.n = 0;
  for (const model::W4Linear* p : parts) {
    const kernels::W4Weight& s = p->weight();
    w.fmt.n += s.fmt.n;
    w.packed.insert(w.packed.end(), s.packed.begin(), s.packed.end());
    w.scales.insert(w.scales.end(), s.scales.begin(), s.scales.end());
    w.zeros.insert(w.zeros.end(), s.zeros.begin(), s.zeros.end());
  }
  w.act_scale = parts[0]->weight().act_scale;
  return w;
}

// Uploads `modules` (same in_features; outputs concatenated in order) as
// as few device weights as their formats allow.
absl::StatusOr<DeviceLinear> UploadLinear(const std::vector<const model::Linear*>& modules,
                                          const std::string& what, std::vector<void*>* owned,
                                          size_t* bytes) {
  DeviceLinear out;
  out.k = modules[0]->in_features();
  std::vector<const model::W4Linear*> w4;
  for (const model::Linear* m : modules) {
    const auto* p = dynamic_cast<const model::W4Linear*>(m);
    if (p == nullptr) {
      return absl::UnimplementedError(absl::StrCat("CUDA runner: ", what, " is ", m->DebugString(),
                                                   "; only W4 decoder linears run on CUDA"));
    }
    if (p->in_features() != out.k) {
      return absl::InvalidArgumentError(absl::StrCat("CUDA runner: ", what, ": in_features differ"));
    }
    w4.push_back(p);
  }
  // Greedy runs of consecutive compatible modules.
  size_t i = 0;
  while (i < w4.size()) {
    size_t j = i + 1;
    while (j < w4.size() && SameBackbone(*w4[i], *w4[j])) ++j;
    std::vector<const model::W4Linear*> run(w4.begin() + i, w4.begin() + j);
    DeviceLinear::Piece piece;
    piece.col0 = out.n;
    piece.modules = run;
    const kernels::W4Weight backbone = run.size() == 1 ? run[0]->weight() : ConcatBackbones(run);
    auto ec = MergeEcs(run);
    if (!ec.ok()) {
      return absl::Status(ec.status().code(),
                          absl::StrCat("CUDA runner: ", what, ": ", ec.status().message()));
    }
    auto dw = kernels::cuda::W4DeviceWeight::Create(backbone, *ec ? &**ec : nullptr);
    if (!dw.ok()) {
      return absl::Status(dw.status().code(),
                          absl::StrCat("CUDA runner: ", what, ": ", dw.status().message()));
    }
    piece.w = std::move(*dw);
    *bytes += piece.w->device_bytes();
    bool any_bias = false;
    for (const model::W4Linear* p : run) any_bias |= !p->bias().empty();
    if (any_bias) {
      std::vector<float> bias;
      for (const model::W4Linear* p : run) {
        if (p->bias().empty()) {
          bias.insert(bias.end(), p->out_features(), 0.f);
        } else {
          bias.insert(bias.end(), p->bias().begin(), p->bias().end());
        }
      }
      auto b = Upload(bias.data(), bias.size(), owned, bytes);
      if (!b.ok()) return b.status();
      piece.bias = *b;
    }
    out.n += backbone.fmt.n;
    out.pieces.push_back(std::move(piece));
    i = j;
  }
  return out;
}

}  // namespace

absl::StatusOr<std::optional<kernels::EcWeights>> MergeEcs(
    const std::vector<const model::W4Linear*>& parts) {
  int64_t n = 0, r = 0, h = 0;
  bool any = false, gated = false;
  for (const model::W4Linear* p : parts) {
    n += p->out_features();
    if (!p->has_ec()) continue;
    any = true;
    r += p->ec()->rank;
    if (p->ec()->gated) {
      gated = true;
      h += p->ec()->gate_hidden;
    }
  }
  if (!any) return std::optional<kernels::EcWeights>();
  if (parts.size() == 1) return parts[0]->ec();  // W4DeviceWeight::Create decodes a compact one
  kernels::EcWeights e;
  e.n = n;
  e.k = parts[0]->in_features();
  e.rank = r;
  e.gated = gated;
  e.gate_hidden = gated ? h : 0;
  e.a.reserve(static_cast<size_t>(r * e.k));
  e.b.assign(static_cast<size_t>(n * r), 0.f);
  if (gated) {
    e.w1.assign(static_cast<size_t>(h * r), 0.f);
    e.b1.assign(static_cast<size_t>(h), 0.f);
    e.w2.assign(static_cast<size_t>(r * h), 0.f);
    e.b2.assign(static_cast<size_t>(r), 0.f);
  }
  int64_t n0 = 0, r0 = 0, h0 = 0;
  // int8 when every part's EC is: the device copy then keeps B's codes where
  // they reproduce the merged B (W4DeviceWeight::Create).
  bool all_i8 = true;
  for (const model::W4Linear* p : parts) {
    if (p->has_ec()) all_i8 &= p->ec()->factors == kernels::EcFactors::kI8;
  }
  e.factors = all_i8 ? kernels::EcFactors::kI8 : kernels::EcFactors::kF16;
  for (const model::W4Linear* p : parts) {
    const int64_t np = p->out_features();
    if (p->has_ec()) {
      auto decoded = kernels::WithFloatFactors(*p->ec());  // a copy of A and B as floats
      if (!decoded.ok()) return decoded.status();
      const kernels::EcWeights& s = *decoded;
      const int64_t rp = s.rank;
      e.a.insert(e.a.end(), s.a.begin(), s.a.end());
      for (int64_t i = 0; i < np; ++i) {
        for (int64_t j = 0; j < rp; ++j) e.b[(n0 + i) * r + r0 + j] = s.b[i * rp + j];
      }
      if (s.gated) {
        const int64_t hp = s.gate_hidden;
        for (int64_t i = 0; i < hp; ++i) {
          for (int64_t j = 0; j < rp; ++j) e.w1[(h0 + i) * r + r0 + j] = s.w1[i * rp + j];
          e.b1[h0 + i] = s.b1[i];
        }
        for (int64_t j = 0; j < rp; ++j) {
          for (int64_t i = 0; i < hp; ++i) e.w2[(r0 + j) * h + h0 + i] = s.w2[j * hp + i];
          e.b2[r0 + j] = s.b2[j];
        }
        h0 += hp;
      }
      r0 += rp;
    }
    n0 += np;
  }
  return std::optional<kernels::EcWeights>(std::move(e));
}

size_t DeviceModelWeights::ec_bytes() const {
  size_t b = 0;
  auto add = [&](const DeviceLinear& l) {
    for (const DeviceLinear::Piece& p : l.pieces) b += p.w->ec_bytes();
  };
  for (const DeviceLayer& L : layers_) {
    for (const DeviceLinear* l : {&L.qkv, &L.o, &L.gate_up, &L.down}) add(*l);
  }
  if (lm_head_w4_) add(*lm_head_w4_);
  return b;
}

absl::StatusOr<std::unique_ptr<DeviceModelWeights>> DeviceModelWeights::Create(
    const model::LoadedModel& m) {
  const model::ModelConfig& c = m.config;
  const model::LlamaWeights& W = m.weights;
  auto dm = std::unique_ptr<DeviceModelWeights>(new DeviceModelWeights());
  std::vector<void*>* owned = &dm->owned_;
  size_t* bytes = &dm->bytes_;
  const int64_t d = c.hidden_size;
  dm->layers_.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const model::LayerWeights& L = W.layers[l];
    DeviceLayer& D = dm->layers_[l];
    const std::string p = absl::StrCat("layer ", l, " ");
    auto qkv = UploadLinear({L.q_proj.get(), L.k_proj.get(), L.v_proj.get()}, p + "qkv", owned,
                            bytes);
    if (!qkv.ok()) return qkv.status();
    D.qkv = std::move(*qkv);
    auto o = UploadLinear({L.o_proj.get()}, p + "o_proj", owned, bytes);
    if (!o.ok()) return o.status();
    D.o = std::move(*o);
    auto gu = UploadLinear({L.gate_proj.get(), L.up_proj.get()}, p + "gate_up", owned, bytes);
    if (!gu.ok()) return gu.status();
    D.gate_up = std::move(*gu);
    auto down = UploadLinear({L.down_proj.get()}, p + "down_proj", owned, bytes);
    if (!down.ok()) return down.status();
    D.down = std::move(*down);
    auto n1 = Upload(L.attn_norm, d, owned, bytes);
    if (!n1.ok()) return n1.status();
    D.attn_norm = *n1;
    auto n2 = Upload(L.ffn_norm, d, owned, bytes);
    if (!n2.ok()) return n2.status();
    D.ffn_norm = *n2;
  }
  auto fn = Upload(W.final_norm, d, owned, bytes);
  if (!fn.ok()) return fn.status();
  dm->final_norm_ = *fn;
  const size_t table = static_cast<size_t>(c.vocab_size * d);
  {
    const std::vector<uint16_t> e16 = ToHalf(W.embed, W.embed_dtype, table);
    auto e = Upload(e16.data(), table, owned, bytes);
    if (!e.ok()) return e.status();
    dm->embed_ = *e;
  }
  if (W.tied_embeddings) {
    dm->lm_head_f16_ = dm->embed_;
  } else if (const auto* dl = dynamic_cast<const model::DenseLinear*>(W.lm_head.get())) {
    if (dl->bias() != nullptr) {
      return absl::UnimplementedError("CUDA runner: lm_head bias is not supported");
    }
    const std::vector<uint16_t> h16 = ToHalf(dl->weight(), dl->dtype(), table);
    auto h = Upload(h16.data(), table, owned, bytes);
    if (!h.ok()) return h.status();
    dm->lm_head_f16_ = *h;
  } else {
    auto lw = UploadLinear({W.lm_head.get()}, "lm_head", owned, bytes);
    if (!lw.ok()) return lw.status();
    dm->lm_head_w4_ = std::make_unique<DeviceLinear>(std::move(*lw));
  }
  for (DeviceLayer& L : dm->layers_) {
    for (DeviceLinear* lin : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
      for (DeviceLinear::Piece& piece : lin->pieces) {
        if (!piece.w->has_ec()) continue;
        piece.gate_col = dm->gate_cols_;
        dm->gate_cols_ += piece.w->rank();
      }
    }
  }
  return dm;
}

DeviceModelWeights::~DeviceModelWeights() {
  for (void* p : owned_) cudaFree(p);
}

int64_t DeviceModelWeights::num_pieces() const {
  int64_t n = 0;
  for (const DeviceLayer& L : layers_) {
    n += static_cast<int64_t>(L.qkv.pieces.size() + L.o.pieces.size() + L.gate_up.pieces.size() +
                              L.down.pieces.size());
  }
  return n;
}

std::vector<std::vector<kernels::cuda::W4DeviceWeight*>> DeviceModelWeights::ShapeGroups() {
  std::vector<std::vector<kernels::cuda::W4DeviceWeight*>> groups;
  auto add = [&](DeviceLinear& lin) {
    for (DeviceLinear::Piece& p : lin.pieces) {
      auto g = std::find_if(groups.begin(), groups.end(),
                            [&](const auto& grp) { return grp[0]->fmt() == p.w->fmt(); });
      if (g == groups.end()) {
        groups.push_back({p.w.get()});
      } else {
        g->push_back(p.w.get());
      }
    }
  };
  for (DeviceLayer& L : layers_) {
    for (DeviceLinear* lin : {&L.qkv, &L.o, &L.gate_up, &L.down}) add(*lin);
  }
  if (lm_head_w4_ != nullptr) add(*lm_head_w4_);
  return groups;
}

absl::StatusOr<int> DeviceModelWeights::TuneDecode(kernels::cuda::W4Workspace* ws,
                                                   cudaStream_t stream) {
  const auto groups = ShapeGroups();
  for (const auto& g : groups) {
    if (absl::Status s = kernels::cuda::TuneDecode(g, kernels::cuda::W4DeviceWeight::kMaxTunedM, ws,
                                                   stream);
        !s.ok()) {
      return s;
    }
  }
  return static_cast<int>(groups.size());
}

absl::StatusOr<int> DeviceModelWeights::TunePrefill(kernels::cuda::W4Workspace* ws,
                                                    int64_t max_m, cudaStream_t stream) {
  const auto groups = ShapeGroups();
  for (const auto& g : groups) {
    if (absl::Status s = kernels::cuda::TunePrefill(g, max_m, ws, stream); !s.ok()) return s;
  }
  return static_cast<int>(groups.size());
}

}  // namespace spear::engine
