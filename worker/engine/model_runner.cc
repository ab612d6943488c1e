#include "worker/engine/model_runner.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/ops.h"

namespace spear::engine {
namespace {

template <typename T>
void Grow(std::vector<T>* v, int64_t n) {
  if (static_cast<int64_t>(v->size()) < n) v->resize(n);
}

}  // namespace

ModelRunner::ModelRunner(const model::LoadedModel* model, KvCache* cache,
                         kernels::ThreadPool* pool)
    : model_(model), cache_(cache), pool_(pool) {
  inv_freq_ = model_->config.RopeInvFreq();
  attn_scale_ = 1.f / std::sqrt(static_cast<float>(model_->config.head_dim));
}

absl::Status ValidateBatch(const std::vector<SeqChunk>& batch, int64_t vocab, int64_t max_end,
                           int64_t block_size, int64_t num_blocks, int64_t* total_tokens) {
  if (batch.empty()) return absl::InvalidArgumentError("Forward: empty batch");
  int64_t T = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SeqChunk& ch = batch[s];
    if (ch.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("Forward: sequence ", s, " has no tokens"));
    }
    if (ch.start_pos < 0) {
      return absl::InvalidArgumentError(absl::StrCat("Forward: sequence ", s,
                                                     " has negative start position"));
    }
    for (int32_t t : ch.tokens) {
      if (t < 0 || t >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("Forward: token id ", t,
                                                       " outside the vocabulary [0, ", vocab, ")"));
      }
    }
    const int64_t end = ch.start_pos + static_cast<int64_t>(ch.tokens.size());
    if (end > max_end) {
      return absl::InvalidArgumentError(
          absl::StrCat("Forward: position ", end, " beyond the runner's limit ", max_end));
    }
    const int64_t need = (end + block_size - 1) / block_size;
    if (static_cast<int64_t>(ch.block_table.size()) < need) {
      return absl::InvalidArgumentError(absl::StrCat("Forward: sequence ", s, " needs ", need,
                                                     " KV blocks for ", end, " positions, has ",
                                                     ch.block_table.size()));
    }
    for (int32_t b : ch.block_table) {
      if (b < 0 || b >= num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("Forward: block id ", b,
                                                       " outside the cache (", num_blocks,
                                                       " blocks)"));
      }
    }
    T += static_cast<int64_t>(ch.tokens.size());
  }
  *total_tokens = T;
  return absl::OkStatus();
}

absl::Status ModelRunner::Validate(const std::vector<SeqChunk>& batch,
                                   int64_t* total_tokens) const {
  const model::ModelConfig& c = model_->config;
  if (cache_->num_layers() != c.num_layers || cache_->kv_dim() != c.num_kv_heads * c.head_dim) {
    return absl::InvalidArgumentError("Forward: KV cache shape does not match the model");
  }
  return ValidateBatch(batch, c.vocab_size, std::numeric_limits<int32_t>::max(),
                       cache_->block_size(), cache_->num_blocks(), total_tokens);
}

void ModelRunner::EnsureScratch(int64_t T) {
  if (T <= capacity_tokens_) return;
  const model::ModelConfig& c = model_->config;
  const int64_t d = c.hidden_size, qd = c.num_heads * c.head_dim,
                kvd = c.num_kv_heads * c.head_dim, ff = c.intermediate_size;
  Grow(&h_, T * d);
  Grow(&x_, T * d);
  Grow(&delta_, T * d);
  Grow(&q_, T * qd);
  Grow(&k_, T * kvd);
  Grow(&v_, T * kvd);
  Grow(&attn_, T * qd);
  Grow(&gate_, T * ff);
  Grow(&up_, T * ff);
  Grow(&positions_, T);
  capacity_tokens_ = T;
}

absl::Status ModelRunner::RunLayer(int64_t l, const std::vector<SeqChunk>& batch, int64_t T,
                                   const LinearObserver* observer, bool* stopped) {
  const model::ModelConfig& c = model_->config;
  // Observer hook: false = stop here (RunLayers leaves the caller's h alone).
  auto observe = [&](LayerModule m, const float* x, int64_t ldx) {
    if (observer == nullptr || !*observer || (*observer)(l, m, x, T, ldx)) return false;
    *stopped = true;
    return true;
  };
  const model::LayerWeights& L = model_->weights.layers[l];
  const int64_t d = c.hidden_size, hd = c.head_dim, qd = c.num_heads * hd,
                kvd = c.num_kv_heads * hd, ff = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_eps);

  // Attention block: x_ holds RmsNorm(h) on entry.
  if (observe(LayerModule::kQ, x_.data(), d)) return absl::OkStatus();
  if (auto s = L.q_proj->Forward(x_.data(), T, d, q_.data(), qd, false, pool_); !s.ok()) return s;
  if (observe(LayerModule::kK, x_.data(), d)) return absl::OkStatus();
  if (auto s = L.k_proj->Forward(x_.data(), T, d, k_.data(), kvd, false, pool_); !s.ok()) return s;
  if (observe(LayerModule::kV, x_.data(), d)) return absl::OkStatus();
  if (auto s = L.v_proj->Forward(x_.data(), T, d, v_.data(), kvd, false, pool_); !s.ok()) return s;
  kernels::RopeParams rp;
  rp.m = T;
  rp.head_dim = static_cast<int>(hd);
  rp.positions = positions_.data();
  rp.inv_freq = inv_freq_.data();
  rp.x = q_.data();
  rp.ldx = qd;
  rp.n_heads = static_cast<int>(c.num_heads);
  if (auto s = kernels::cpu::Rope(rp, pool_); !s.ok()) return s;
  rp.x = k_.data();
  rp.ldx = kvd;
  rp.n_heads = static_cast<int>(c.num_kv_heads);
  if (auto s = kernels::cpu::Rope(rp, pool_); !s.ok()) return s;

  // Write the new K/V into their cache slots.
  float* kc = cache_->k(l);
  float* vc = cache_->v(l);
  const int bs = cache_->block_size();
  int64_t t = 0;
  for (const SeqChunk& ch : batch) {
    for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
      const int64_t pos = ch.start_pos + static_cast<int64_t>(i);
      const int64_t slot = static_cast<int64_t>(ch.block_table[pos / bs]) * bs + pos % bs;
      std::memcpy(kc + slot * kvd, k_.data() + t * kvd, kvd * sizeof(float));
      std::memcpy(vc + slot * kvd, v_.data() + t * kvd, kvd * sizeof(float));
    }
  }

  // Attention per sequence. With many sequences (decode batches) the pool
  // splits over sequences; otherwise each call splits internally.
  const int64_t nseq = static_cast<int64_t>(batch.size());
  std::vector<int64_t>& offs = seq_offsets_;
  offs.resize(nseq + 1);
  offs[0] = 0;
  for (int64_t s = 0; s < nseq; ++s) offs[s + 1] = offs[s] + batch[s].tokens.size();
  auto attend = [&](int64_t s, kernels::ThreadPool* pool) {
    const SeqChunk& ch = batch[s];
    kernels::AttentionParams ap;
    ap.q = q_.data() + offs[s] * qd;
    ap.m = static_cast<int64_t>(ch.tokens.size());
    ap.ldq = qd;
    ap.n_heads = static_cast<int>(c.num_heads);
    ap.n_kv_heads = static_cast<int>(c.num_kv_heads);
    ap.head_dim = static_cast<int>(hd);
    ap.k_cache = kc;
    ap.v_cache = vc;
    ap.block_size = bs;
    ap.block_table = ch.block_table.data();
    ap.num_blocks_in_table = static_cast<int64_t>(ch.block_table.size());
    ap.num_cache_blocks = cache_->num_blocks();
    ap.q_start = ch.start_pos;
    ap.scale = attn_scale_;
    ap.out = attn_.data() + offs[s] * qd;
    ap.ldo = qd;
    return kernels::cpu::Attention(ap, pool);
  };
  const bool outer = pool_ != nullptr && nseq >= pool_->size() && nseq > 1;
  if (outer) {
    seq_status_.assign(nseq, absl::OkStatus());
    pool_->ParallelFor(nseq, 1, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) seq_status_[s] = attend(s, nullptr);
    });
    for (const absl::Status& s : seq_status_) {
      if (!s.ok()) return s;
    }
  } else {
    for (int64_t s = 0; s < nseq; ++s) {
      if (auto st = attend(s, pool_); !st.ok()) return st;
    }
  }
  if (observe(LayerModule::kO, attn_.data(), qd)) return absl::OkStatus();
  if (auto s = L.o_proj->Forward(attn_.data(), T, qd, delta_.data(), d, false, pool_); !s.ok()) {
    return s;
  }

  // h += attn_out; x = RmsNorm(h) with the MLP's norm.
  kernels::RmsNormParams np;
  np.x = delta_.data();
  np.residual = h_.data();
  np.y = x_.data();
  np.m = T;
  np.d = d;
  np.ldx = np.ldr = np.ldy = d;
  np.eps = eps;
  np.weight = L.ffn_norm;
  if (auto s = kernels::cpu::RmsNorm(np, pool_); !s.ok()) return s;

  // MLP: down(silu(gate(x)) * up(x)).
  if (observe(LayerModule::kGate, x_.data(), d)) return absl::OkStatus();
  if (auto s = L.gate_proj->Forward(x_.data(), T, d, gate_.data(), ff, false, pool_); !s.ok()) {
    return s;
  }
  if (observe(LayerModule::kUp, x_.data(), d)) return absl::OkStatus();
  if (auto s = L.up_proj->Forward(x_.data(), T, d, up_.data(), ff, false, pool_); !s.ok()) {
    return s;
  }
  kernels::SiluMulParams sp;
  sp.gate = gate_.data();
  sp.up = up_.data();
  sp.y = gate_.data();
  sp.m = T;
  sp.n = ff;
  sp.ld_gate = sp.ld_up = sp.ldy = ff;
  if (auto s = kernels::cpu::SiluMul(sp, pool_); !s.ok()) return s;
  if (observe(LayerModule::kDown, gate_.data(), ff)) return absl::OkStatus();
  if (auto s = L.down_proj->Forward(gate_.data(), T, ff, delta_.data(), d, false, pool_);
      !s.ok()) {
    return s;
  }

  // h += mlp_out; x = RmsNorm(h) with the next layer's (or the final) norm.
  np.weight = l + 1 < c.num_layers ? model_->weights.layers[l + 1].attn_norm
                                   : model_->weights.final_norm;
  return kernels::cpu::RmsNorm(np, pool_);
}

void ModelRunner::SetPositions(const std::vector<SeqChunk>& batch) {
  int64_t t = 0;
  for (const SeqChunk& ch : batch) {
    for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
      positions_[t] = static_cast<int32_t>(ch.start_pos + static_cast<int64_t>(i));
    }
  }
}

absl::Status ModelRunner::Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out) {
  int64_t T = 0;
  if (auto s = Validate(batch, &T); !s.ok()) return s;
  EnsureScratch(T);
  const model::ModelConfig& c = model_->config;
  const int64_t d = c.hidden_size;

  SetPositions(batch);
  int64_t t = 0;
  for (const SeqChunk& ch : batch) {
    for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
      model_->weights.EmbedRow(ch.tokens[i], d, h_.data() + t * d);
    }
  }
  kernels::RmsNormParams np;
  np.x = h_.data();
  np.y = x_.data();
  np.weight = model_->weights.layers[0].attn_norm;
  np.m = T;
  np.d = d;
  np.ldx = np.ldy = d;
  np.eps = static_cast<float>(c.rms_eps);
  if (auto s = kernels::cpu::RmsNorm(np, pool_); !s.ok()) return s;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (auto s = RunLayer(l, batch, T); !s.ok()) return s;
  }

  // x_ now holds the final-normed hidden states: copy those asked for, then
  // gather the rows that need logits and run lm_head over them in one GEMM.
  out->hidden_dim = d;
  out->first_hidden_row.assign(batch.size(), -1);
  int64_t hidden_rows = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    if (!batch[s].hidden) continue;
    out->first_hidden_row[s] = hidden_rows;
    hidden_rows += static_cast<int64_t>(batch[s].tokens.size());
  }
  out->num_hidden_rows = hidden_rows;
  if (hidden_rows > 0) {
    Grow(&out->hidden, hidden_rows * d);
    t = 0;
    for (size_t s = 0; s < batch.size(); ++s) {
      const int64_t n = static_cast<int64_t>(batch[s].tokens.size());
      if (batch[s].hidden) {
        std::memcpy(out->hidden.data() + out->first_hidden_row[s] * d, x_.data() + t * d,
                    n * d * sizeof(float));
      }
      t += n;
    }
  }
  out->vocab = c.vocab_size;
  out->first_row.assign(batch.size(), -1);
  int64_t rows = 0;
  for (size_t s = 0; s < batch.size(); ++s) {
    if (batch[s].logits == LogitsMode::kNone) continue;
    out->first_row[s] = rows;
    rows += batch[s].logits == LogitsMode::kAll ? batch[s].tokens.size() : 1;
  }
  out->num_rows = rows;
  if (rows == 0) return absl::OkStatus();
  Grow(&sel_, rows * d);
  t = 0;
  int64_t r = 0;
  for (const SeqChunk& ch : batch) {
    const int64_t n = static_cast<int64_t>(ch.tokens.size());
    if (ch.logits == LogitsMode::kAll) {
      std::memcpy(sel_.data() + r * d, x_.data() + t * d, n * d * sizeof(float));
      r += n;
    } else if (ch.logits == LogitsMode::kLast) {
      std::memcpy(sel_.data() + r * d, x_.data() + (t + n - 1) * d, d * sizeof(float));
      r += 1;
    }
    t += n;
  }
  Grow(&out->logits, rows * c.vocab_size);
  return model_->weights.lm_head->Forward(sel_.data(), rows, d, out->logits.data(),
                                           c.vocab_size, false, pool_);
}

// --- layer-wise execution ---------------------------------------------------
// These reuse RunLayer on the runner's own scratch: h is copied into h_ on
// entry and back on exit (O(T d), negligible next to the layers), so Forward
// and the layer-wise path share one implementation of a decoder layer.

absl::Status ModelRunner::Embed(const std::vector<SeqChunk>& batch, float* h) {
  int64_t T = 0;
  if (auto s = Validate(batch, &T); !s.ok()) return s;
  const int64_t d = model_->config.hidden_size;
  int64_t t = 0;
  for (const SeqChunk& ch : batch) {
    for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
      model_->weights.EmbedRow(ch.tokens[i], d, h + t * d);
    }
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::RunLayers(const std::vector<SeqChunk>& batch, int64_t first,
                                    int64_t last, float* h, const LinearObserver& observer,
                                    bool* stopped) {
  const model::ModelConfig& c = model_->config;
  if (first < 0 || first > last || last > c.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("RunLayers: bad layer range [", first, ", ",
                                                   last, ") of ", c.num_layers));
  }
  if (h == nullptr) return absl::InvalidArgumentError("RunLayers: null hidden states");
  int64_t T = 0;
  if (auto s = Validate(batch, &T); !s.ok()) return s;
  bool stop = false;
  if (stopped != nullptr) *stopped = false;
  if (first == last) return absl::OkStatus();
  EnsureScratch(T);
  SetPositions(batch);
  const int64_t d = c.hidden_size;
  std::memcpy(h_.data(), h, T * d * sizeof(float));
  kernels::RmsNormParams np;
  np.x = h_.data();
  np.y = x_.data();
  np.weight = model_->weights.layers[first].attn_norm;
  np.m = T;
  np.d = d;
  np.ldx = np.ldy = d;
  np.eps = static_cast<float>(c.rms_eps);
  if (auto s = kernels::cpu::RmsNorm(np, pool_); !s.ok()) return s;
  for (int64_t l = first; l < last; ++l) {
    if (auto s = RunLayer(l, batch, T, &observer, &stop); !s.ok()) return s;
    if (stop) {
      if (stopped != nullptr) *stopped = true;
      return absl::OkStatus();
    }
  }
  std::memcpy(h, h_.data(), T * d * sizeof(float));
  return absl::OkStatus();
}

absl::Status ModelRunner::FinalNorm(const float* h, int64_t T, float* y) {
  if (T <= 0 || h == nullptr || y == nullptr) {
    return absl::InvalidArgumentError("FinalNorm: empty input");
  }
  const model::ModelConfig& c = model_->config;
  kernels::RmsNormParams np;
  np.x = h;
  np.y = y;
  np.weight = model_->weights.final_norm;
  np.m = T;
  np.d = c.hidden_size;
  np.ldx = np.ldy = c.hidden_size;
  np.eps = static_cast<float>(c.rms_eps);
  return kernels::cpu::RmsNorm(np, pool_);
}

absl::Status ModelRunner::LmHead(const float* y, int64_t T, float* logits) {
  if (T <= 0 || y == nullptr || logits == nullptr) {
    return absl::InvalidArgumentError("LmHead: empty input");
  }
  const model::ModelConfig& c = model_->config;
  return model_->weights.lm_head->Forward(y, T, c.hidden_size, logits, c.vocab_size, false, pool_);
}

}  // namespace spear::engine
