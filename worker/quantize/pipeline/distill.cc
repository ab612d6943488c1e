// EcDistiller: see distill.h for the objective, the math and the procedure.
//
// Layout of one decoder layer's forward, as stored for the backward
// (T = tokens of the minibatch, all sequences from position 0):
//   xn1 = RmsNorm(h_in) ;  q, k, v = Lin(xn1) ; RoPE(q, k) ; ao = Attn(q, k, v)
//   h_mid = h_in + Lin_o(ao) ;  xn2 = RmsNorm(h_mid)
//   g, u = Lin(xn2) ;  m = silu(g) ⊙ u ;  h_out = h_mid + Lin_down(m)
// with Lin(x) = x Qeff^T + bias + B (gate ⊙ A x) when the module has an EC.
#include "worker/quantize/pipeline/distill.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"
#include "kernels/ops.h"
#include "worker/engine/model_runner.h"
#include "worker/model/w4_linear.h"
#include "worker/quantize/distill_ops.h"
#include "worker/quantize/ec_model.h"
#include "worker/quantize/pipeline/layerwise.h"
#include "worker/quantize/pipeline/module_quant.h"
#include "worker/quantize/w4_quant.h"

namespace spear::quantize {
namespace {

using Mat = EMat<float>;
using MapC = Eigen::Map<const Mat>;
using MapM = Eigen::Map<Mat>;
constexpr int kMods = engine::kModulesPerLayer;

// A frozen weight matrix [rows, cols] as the training's GEMMs read it:
// fp32, or bf16 bits (DistillGemm).
struct FrozenW {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  const void* data() const {
    return bf16.empty() ? static_cast<const void*>(f32.data()) : bf16.data();
  }
  // The weight fields of a Linear call: bf16 weights come with 16-bit
  // products (DistillGemm::kBf16 is both: fp16 products where the CPU has
  // AVX512-FP16, else bf16 products), fp32 weights with fp32 products.
  void Into(kernels::LinearParams* p) const {
    p->w = data();
    p->w_dtype = bf16.empty() ? kernels::DType::kF32 : kernels::DType::kBF16;
    p->bf16_products = !bf16.empty();
    p->f16_products = !bf16.empty();
  }
  // Stores m [rows, cols] (row-major) and, if transposed, as [cols, rows].
  void Set(const std::vector<float>& m, int64_t rows, int64_t cols, bool transposed,
           DistillGemm gemm) {
    f32.clear();
    bf16.clear();
    if (gemm == DistillGemm::kBf16) {
      Fill(m, rows, cols, transposed, &bf16, [](float v) { return kernels::FloatToBF16(v); });
    } else {
      Fill(m, rows, cols, transposed, &f32, [](float v) { return v; });
    }
  }
  template <class T, class Conv>
  static void Fill(const std::vector<float>& m, int64_t rows, int64_t cols, bool transposed,
                   std::vector<T>* out, Conv conv) {
    out->resize(static_cast<size_t>(rows * cols));
    T* o = out->data();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        o[transposed ? c * rows + r : r * cols + c] = conv(m[r * cols + c]);
      }
    }
  }
};

struct LinOp {
  int64_t n = 0, k = 0;
  FrozenW w, wt;  // Qeff [n, k] and its transpose [k, n]
  std::vector<float> bias;
  int ec = -1;  // index into Impl::ecs
};

struct LayerActs {
  std::vector<float> h_in, rstd1, xn1, q, k, v, probs, ao, h_mid, rstd2, xn2, g, u, m;
  std::array<EcActivations<float>, kMods> ec;
};

std::array<const model::Linear*, kMods> LayerLinears(const model::LayerWeights& L) {
  return {L.q_proj.get(),    L.k_proj.get(),  L.v_proj.get(),   L.o_proj.get(),
          L.gate_proj.get(), L.up_proj.get(), L.down_proj.get()};
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

struct EcDistiller::Impl {
  const model::LoadedModel* model = nullptr;
  kernels::ThreadPool* pool = nullptr;
  int64_t d = 0, nh = 0, nkv = 0, hd = 0, qd = 0, kvd = 0, ff = 0, vocab = 0, nl = 0;
  double eps = 1e-5;
  std::vector<float> inv_freq;
  std::vector<std::array<LinOp, kMods>> lin;
  // lm_head [V, d], and its transpose in vocabulary slices of head_slice
  // columns: et[i] = E[i * head_slice : ..., :]^T [d, slice] (see HeadLoss).
  FrozenW e;
  std::vector<FrozenW> et;
  int64_t head_slice = EcDistiller::kDefaultHeadSlice;
  // HeadLoss's student and teacher logits of one chunk, kept across calls:
  // 2 x 50 MB for SmolLM2, which a fresh allocation per step page-faults
  // and zeroes again (page clearing and faults were ~3-4 % of a training
  // step in the profile, docs/results/quality.md).
  std::vector<float> head_zs, head_zt;
  std::vector<EcParams<float>> ecs, grads;
  std::vector<std::pair<int64_t, int>> ec_loc;  // (layer, module)
  std::vector<std::array<AdamTensor<float>, 6>> adam;
  int64_t first_ec_layer = 0;

  // Minibatch state.
  int64_t T = 0;
  std::vector<int64_t> offs, prob_offs;
  std::vector<int32_t> positions;
  std::vector<LayerActs> acts;
  std::vector<float> h_final, rstd_f, y;
  // Layer targets of the current LossAndGrad call: [T, nl, d] fp16 (null:
  // none), their weight, and the term's value summed by Backward.
  const uint16_t* tl = nullptr;
  double layer_w = 0, layer_loss = 0;

  // The residual stream after decoder layer l (of the stored forward).
  const float* LayerOut(int64_t l) const {
    return l == nl - 1 ? h_final.data() : acts[l + 1].h_in.data();
  }

  // Layer l's share of the layer-target term (distill.h):
  // layer_w / (T * layers used) * sum_t ||h_q - h_fp||^2 / ||h_fp||^2; if
  // dh != nullptr, dh [T, d] += its gradient w.r.t. layer l's output.
  double LayerTerm(int64_t l, float* dh) {
    const int64_t used = nl - first_ec_layer;
    const double scale = layer_w / (static_cast<double>(T) * static_cast<double>(used));
    const float* hq = LayerOut(l);
    std::vector<double> per(T);
    pool->ParallelFor(T, 8, [&](int64_t b, int64_t e2) {
      std::vector<float> ht(d);
      for (int64_t t = b; t < e2; ++t) {
        const uint16_t* src = tl + (t * nl + l) * d;
        const float* q = hq + t * d;
        double nt = 0, se = 0;
        for (int64_t j = 0; j < d; ++j) {
          ht[j] = kernels::HalfToFloat(src[j]);
          nt += static_cast<double>(ht[j]) * ht[j];
          const double diff = static_cast<double>(q[j]) - ht[j];
          se += diff * diff;
        }
        const double inv = 1.0 / std::max(nt, 1e-12);
        per[t] = se * inv;
        if (dh != nullptr) {
          const float g = static_cast<float>(2.0 * scale * inv);
          float* out = dh + t * d;
          for (int64_t j = 0; j < d; ++j) out[j] += g * (q[j] - ht[j]);
        }
      }
    });
    double sum = 0;
    for (double v : per) sum += v;
    return scale * sum;
  }

  absl::Status LinFwd(const LinOp& op, const float* x, float* out, EcActivations<float>* ea) {
    kernels::LinearParams p;
    p.x = x;
    p.m = T;
    p.k = op.k;
    p.ldx = op.k;
    op.w.Into(&p);
    p.n = op.n;
    p.bias = op.bias.empty() ? nullptr : op.bias.data();
    p.y = out;
    p.ldy = op.n;
    if (auto s = kernels::cpu::Linear(p, pool); !s.ok()) return s;
    if (op.ec >= 0) {
      EcFwd(ecs[op.ec], x, op.k, out, op.n, ea);
    }
    return absl::OkStatus();
  }

  // Row chunks of the minibatch for the EC's small products (rank <= a few
  // dozen: Eigen, one thread each): as many as the pool has threads.
  int64_t EcChunks() const { return std::max<int64_t>(1, std::min<int64_t>(pool->size(), T)); }
  int64_t ChunkRow(int64_t c) const { return T * c / EcChunks(); }

  // fn(a's matrix, b's matrix) for each activation matrix the EC's backward
  // reads (u, v; h1, p, t when gated): a chunk's rows in or out of the
  // minibatch's.
  template <typename Fn>
  static void ActRows(const EcActivations<float>& a, bool gated, Fn fn, EcActivations<float>& b) {
    fn(a.u, b.u);
    fn(a.v, b.v);
    if (gated) {
      fn(a.h1, b.h1);
      fn(a.p, b.p);
      fn(a.t, b.t);
    }
  }

  // The EC's forward: ea (every row) and out [T, n] += V B^T, over the pool.
  void EcFwd(const EcParams<float>& prm, const float* x, int64_t k, float* out, int64_t n,
             EcActivations<float>* ea) {
    const int64_t r = prm.a.rows(), hw = prm.gated ? prm.w1.rows() : 0;
    ea->u.resize(T, r);
    ea->v.resize(T, r);
    if (prm.gated) {
      ea->h1.resize(T, hw);
      ea->p.resize(T, hw);
      ea->t.resize(T, r);
    }
    pool->ParallelFor(EcChunks(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = ChunkRow(c), m = ChunkRow(c + 1) - r0;
        EcActivations<float> sub;
        EcLowRankForward<float>(prm, MapC(x + r0 * k, m, k), &sub);
        MapM(out + r0 * n, m, n).noalias() += sub.v * prm.b.transpose();
        ActRows(sub, prm.gated, [&](const Mat& src, Mat& all) { all.middleRows(r0, m) = src; }, *ea);
      }
    });
  }

  // The EC's backward from dY [T, n]: grads g (+)= its parameter gradients,
  // dx [T, k] += dU A, over the pool (per-chunk gradients, summed after).
  void EcBwd(const EcParams<float>& prm, const float* x, int64_t k, const float* dy, int64_t n,
             const EcActivations<float>& ea, EcParams<float>* g, float* dx) {
    std::vector<EcParams<float>> part(static_cast<size_t>(EcChunks()));
    pool->ParallelFor(EcChunks(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = ChunkRow(c), m = ChunkRow(c + 1) - r0;
        MapC dY(dy + r0 * n, m, n), X(x + r0 * k, m, k);
        EcActivations<float> sub;
        ActRows(ea, prm.gated, [&](const Mat& all, Mat& dst) { dst = all.middleRows(r0, m); }, sub);
        EcParams<float>& pc = part[static_cast<size_t>(c)];
        pc.b.noalias() = dY.transpose() * sub.v;
        Mat du;
        EcBackwardFromDv<float>(prm, X, sub, Mat(dY * prm.b), &pc, &du);
        MapM(dx + r0 * k, m, k).noalias() += du * prm.a;
      }
    });
    for (const EcParams<float>& pc : part) {
      g->b += pc.b;
      g->a += pc.a;
      if (prm.gated) {
        g->w1 += pc.w1;
        g->b1 += pc.b1;
        g->w2 += pc.w2;
        g->b2 += pc.b2;
      }
    }
  }

  // dx (+)= dy Qeff (+ dU A); EC grads accumulate into grads[op.ec].
  absl::Status LinBwd(const LinOp& op, const float* x, const float* dy, float* dx, bool accumulate,
                      const EcActivations<float>& ea) {
    kernels::LinearParams p;
    p.x = dy;
    p.m = T;
    p.k = op.n;
    p.ldx = op.n;
    op.wt.Into(&p);
    p.n = op.k;
    p.y = dx;
    p.ldy = op.k;
    p.accumulate = accumulate;
    if (auto s = kernels::cpu::Linear(p, pool); !s.ok()) return s;
    if (op.ec >= 0) {
      EcBwd(ecs[op.ec], x, op.k, dy, op.n, ea, &grads[op.ec], dx);
    }
    return absl::OkStatus();
  }

  distill::AttentionShape Shape(int64_t s) const {
    distill::AttentionShape a;
    a.len = offs[s + 1] - offs[s];
    a.n_heads = nh;
    a.n_kv_heads = nkv;
    a.head_dim = hd;
    a.ldq = a.ldo = qd;
    a.ldkv = kvd;
    a.scale = 1.0 / std::sqrt(static_cast<double>(hd));
    return a;
  }

  void SetBatch(const std::vector<std::span<const int32_t>>& seqs) {
    const int64_t ns = static_cast<int64_t>(seqs.size());
    offs.assign(ns + 1, 0);
    prob_offs.assign(ns + 1, 0);
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t n = static_cast<int64_t>(seqs[s].size());
      offs[s + 1] = offs[s] + n;
      prob_offs[s + 1] = prob_offs[s] + nh * n * n;
    }
    T = offs[ns];
    positions.resize(T);
    for (int64_t s = 0; s < ns; ++s) {
      for (int64_t i = offs[s]; i < offs[s + 1]; ++i) positions[i] = static_cast<int32_t>(i - offs[s]);
    }
    acts.resize(nl);
  }

  absl::Status Forward(const std::vector<std::span<const int32_t>>& seqs) {
    SetBatch(seqs);
    const int64_t ns = static_cast<int64_t>(seqs.size());
    std::vector<float> h(T * d), tmp(T * d);
    for (int64_t s = 0, t = 0; s < ns; ++s) {
      for (int32_t tok : seqs[s]) {
        if (tok < 0 || tok >= vocab) return absl::InvalidArgumentError("token outside the vocabulary");
        model->weights.EmbedRow(tok, d, h.data() + (t++) * d);
      }
    }
    for (int64_t l = 0; l < nl; ++l) {
      LayerActs& a = acts[l];
      const model::LayerWeights& W = model->weights.layers[l];
      const auto& ops = lin[l];
      a.h_in = h;
      a.rstd1.resize(T);
      a.xn1.resize(T * d);
      distill::RmsNormForward<float>(h.data(), T, d, W.attn_norm, eps, a.xn1.data(), a.rstd1.data());
      a.q.resize(T * qd);
      a.k.resize(T * kvd);
      a.v.resize(T * kvd);
      if (auto s = LinFwd(ops[0], a.xn1.data(), a.q.data(), &a.ec[0]); !s.ok()) return s;
      if (auto s = LinFwd(ops[1], a.xn1.data(), a.k.data(), &a.ec[1]); !s.ok()) return s;
      if (auto s = LinFwd(ops[2], a.xn1.data(), a.v.data(), &a.ec[2]); !s.ok()) return s;
      distill::RopeInPlace<float>(a.q.data(), T, qd, nh, hd, positions.data(), inv_freq.data(), false);
      distill::RopeInPlace<float>(a.k.data(), T, kvd, nkv, hd, positions.data(), inv_freq.data(), false);
      a.probs.resize(prob_offs[ns]);
      a.ao.resize(T * qd);
      const int64_t group = nh / nkv;
      pool->ParallelFor(ns * nkv, 1, [&](int64_t b, int64_t e) {
        for (int64_t task = b; task < e; ++task) {
          const int64_t s = task / nkv, kvh = task % nkv;
          const distill::AttentionShape sh = Shape(s);
          distill::AttentionForwardKvHead<float>(
              sh, kvh, a.q.data() + offs[s] * qd, a.k.data() + offs[s] * kvd,
              a.v.data() + offs[s] * kvd, a.ao.data() + offs[s] * qd,
              a.probs.data() + prob_offs[s] + kvh * group * sh.len * sh.len);
        }
      });
      if (auto s = LinFwd(ops[3], a.ao.data(), tmp.data(), &a.ec[3]); !s.ok()) return s;
      for (int64_t i = 0; i < T * d; ++i) h[i] += tmp[i];
      a.h_mid = h;
      a.rstd2.resize(T);
      a.xn2.resize(T * d);
      distill::RmsNormForward<float>(h.data(), T, d, W.ffn_norm, eps, a.xn2.data(), a.rstd2.data());
      a.g.resize(T * ff);
      a.u.resize(T * ff);
      a.m.resize(T * ff);
      if (auto s = LinFwd(ops[4], a.xn2.data(), a.g.data(), &a.ec[4]); !s.ok()) return s;
      if (auto s = LinFwd(ops[5], a.xn2.data(), a.u.data(), &a.ec[5]); !s.ok()) return s;
      // m = silu(g) * u on the kernels' SIMD op, over the pool.
      kernels::SiluMulParams sp;
      sp.gate = a.g.data();
      sp.up = a.u.data();
      sp.y = a.m.data();
      sp.m = T;
      sp.n = ff;
      sp.ld_gate = sp.ld_up = sp.ldy = ff;
      if (auto s = kernels::cpu::SiluMul(sp, pool); !s.ok()) return s;
      if (auto s = LinFwd(ops[6], a.m.data(), tmp.data(), &a.ec[6]); !s.ok()) return s;
      for (int64_t i = 0; i < T * d; ++i) h[i] += tmp[i];
    }
    h_final = std::move(h);
    rstd_f.resize(T);
    y.resize(T * d);
    distill::RmsNormForward<float>(h_final.data(), T, d, model->weights.final_norm, eps, y.data(),
                                   rstd_f.data());
    return absl::OkStatus();
  }

  // logits [rows, V] = y_rows E^T.
  absl::Status Head(const float* yr, int64_t rows, float* out) {
    kernels::LinearParams p;
    p.x = yr;
    p.m = rows;
    p.k = d;
    p.ldx = d;
    e.Into(&p);
    p.n = vocab;
    p.y = out;
    p.ldy = vocab;
    return kernels::cpu::Linear(p, pool);
  }

  // Loss of the stored forward; dy [T, d] = d loss / d y if dy != nullptr.
  absl::StatusOr<double> HeadLoss(const float* teacher, double mse_w, float* dy,
                                  std::vector<double>* per_row = nullptr, double tau = 1.0) {
    // Rows per lm_head call: each call re-packs the whole [V, d] head in
    // the GEMM, so few large chunks (2 x 256 x V floats of logits = 100 MB).
    constexpr int64_t kChunk = 256;
    if (head_zs.size() < static_cast<size_t>(kChunk * vocab)) {
      head_zs.resize(static_cast<size_t>(kChunk * vocab));
      head_zt.resize(static_cast<size_t>(kChunk * vocab));
    }
    std::vector<float>& zs = head_zs;
    std::vector<float>& zt = head_zt;
    std::vector<double> row_kl(kChunk);
    double kl = 0;
    const float inv_t = 1.0f / static_cast<float>(T);
    for (int64_t r0 = 0; r0 < T; r0 += kChunk) {
      const int64_t c = std::min(kChunk, T - r0);
      if (auto s = Head(y.data() + r0 * d, c, zs.data()); !s.ok()) return s;
      if (auto s = Head(teacher + r0 * d, c, zt.data()); !s.ok()) return s;
      // Per row tau^2 KL(teacher || student); with dy, its gradient
      // inv_t * tau * (p_s - p_t) over the student's logits.
      kernels::KlDivergenceParams kp;
      kp.zs = zs.data();
      kp.zt = zt.data();
      kp.kl = row_kl.data();
      kp.dzs = dy != nullptr ? zs.data() : nullptr;
      kp.m = c;
      kp.n = vocab;
      kp.ldz = vocab;
      kp.tau = static_cast<float>(tau);
      kp.weight = inv_t;
      if (auto s = kernels::cpu::KlDivergence(kp, pool); !s.ok()) return s;
      for (int64_t i = 0; i < c; ++i) kl += row_kl[i];
      if (per_row != nullptr) per_row->insert(per_row->end(), row_kl.begin(), row_kl.begin() + c);
      if (dy != nullptr) {
        // dy = dZ E, one vocabulary slice at a time (accumulated): a single
        // product with k = V would stream all of dZ (c x V floats, 50 MB)
        // from memory once per packed panel of d's columns; a slice's dZ
        // block (c x head_slice) stays in cache across the panels.
        for (size_t i = 0; i < et.size(); ++i) {
          const int64_t v0 = static_cast<int64_t>(i) * head_slice;
          kernels::LinearParams p;
          p.x = zs.data() + v0;
          p.m = c;
          p.k = std::min(head_slice, vocab - v0);
          p.ldx = vocab;
          et[i].Into(&p);
          p.n = d;
          p.y = dy + r0 * d;
          p.ldy = d;
          p.accumulate = i > 0;
          if (auto s = kernels::cpu::Linear(p, pool); !s.ok()) return s;
        }
      }
    }
    double loss = kl / static_cast<double>(T);
    if (mse_w > 0) {
      double se = 0;
      const float gscale = static_cast<float>(2.0 * mse_w / (static_cast<double>(T) * d));
      for (int64_t i = 0; i < T * d; ++i) {
        const float diff = y[i] - teacher[i];
        se += static_cast<double>(diff) * diff;
        if (dy != nullptr) dy[i] += gscale * diff;
      }
      loss += mse_w * se / (static_cast<double>(T) * d);
    }
    return loss;
  }

  absl::Status Backward(const std::vector<float>& dy_final) {
    const int64_t ns = static_cast<int64_t>(offs.size()) - 1;
    std::vector<float> dh(T * d), dxn(T * d), dm(T * ff), dg(T * ff), du(T * ff), dao(T * qd),
        dq(T * qd), dk(T * kvd), dv(T * kvd);
    distill::RmsNormBackward<float>(h_final.data(), rstd_f.data(), model->weights.final_norm,
                                    dy_final.data(), T, d, dh.data(), false);
    const int64_t group = nh / nkv;
    for (int64_t l = nl - 1; l >= first_ec_layer; --l) {
      LayerActs& a = acts[l];
      const model::LayerWeights& W = model->weights.layers[l];
      const auto& ops = lin[l];
      // dh = d loss / d (layer l's output) here: add the layer target's.
      if (tl != nullptr) layer_loss += LayerTerm(l, dh.data());
      // MLP block: h_out = h_mid + down(m).
      if (auto s = LinBwd(ops[6], a.m.data(), dh.data(), dm.data(), false, a.ec[6]); !s.ok()) return s;
      // SiLU-mul's backward (scalar exp) over the pool, in row chunks.
      pool->ParallelFor(T, 16, [&](int64_t r0, int64_t r1) {
        distill::SiluMulBackward<float>(a.g.data() + r0 * ff, a.u.data() + r0 * ff,
                                        dm.data() + r0 * ff, (r1 - r0) * ff, dg.data() + r0 * ff,
                                        du.data() + r0 * ff);
      });
      if (auto s = LinBwd(ops[4], a.xn2.data(), dg.data(), dxn.data(), false, a.ec[4]); !s.ok()) return s;
      if (auto s = LinBwd(ops[5], a.xn2.data(), du.data(), dxn.data(), true, a.ec[5]); !s.ok()) return s;
      distill::RmsNormBackward<float>(a.h_mid.data(), a.rstd2.data(), W.ffn_norm, dxn.data(), T, d,
                                      dh.data(), true);
      // Attention block: h_mid = h_in + o(attn(q, k, v)).
      if (auto s = LinBwd(ops[3], a.ao.data(), dh.data(), dao.data(), false, a.ec[3]); !s.ok()) return s;
      pool->ParallelFor(ns * nkv, 1, [&](int64_t b, int64_t e2) {
        for (int64_t task = b; task < e2; ++task) {
          const int64_t s = task / nkv, kvh = task % nkv;
          const distill::AttentionShape sh = Shape(s);
          distill::AttentionBackwardKvHead<float>(
              sh, kvh, a.q.data() + offs[s] * qd, a.k.data() + offs[s] * kvd,
              a.v.data() + offs[s] * kvd, a.probs.data() + prob_offs[s] + kvh * group * sh.len * sh.len,
              dao.data() + offs[s] * qd, dq.data() + offs[s] * qd, dk.data() + offs[s] * kvd,
              dv.data() + offs[s] * kvd);
        }
      });
      distill::RopeInPlace<float>(dq.data(), T, qd, nh, hd, positions.data(), inv_freq.data(), true);
      distill::RopeInPlace<float>(dk.data(), T, kvd, nkv, hd, positions.data(), inv_freq.data(), true);
      if (auto s = LinBwd(ops[0], a.xn1.data(), dq.data(), dxn.data(), false, a.ec[0]); !s.ok()) return s;
      if (auto s = LinBwd(ops[1], a.xn1.data(), dk.data(), dxn.data(), true, a.ec[1]); !s.ok()) return s;
      if (auto s = LinBwd(ops[2], a.xn1.data(), dv.data(), dxn.data(), true, a.ec[2]); !s.ok()) return s;
      distill::RmsNormBackward<float>(a.h_in.data(), a.rstd1.data(), W.attn_norm, dxn.data(), T, d,
                                      dh.data(), true);
    }
    return absl::OkStatus();
  }

  void ZeroGrads() {
    grads.resize(ecs.size());
    for (size_t i = 0; i < ecs.size(); ++i) grads[i].SetZeroLike(ecs[i]);
  }

  // Makes W1 u unit-RMS for gated ECs whose gate is still exactly 1 (uses
  // the acts of the last forward).
  void ScaleGateInit() {
    for (size_t i = 0; i < ecs.size(); ++i) {
      EcParams<float>& p = ecs[i];
      if (!p.gated || p.w2.cwiseAbs().maxCoeff() != 0 || p.b2.cwiseAbs().maxCoeff() != 0) continue;
      const auto [l, j] = ec_loc[i];
      const Mat& u = acts[l].ec[j].u;
      if (u.rows() == 0) continue;
      const Mat h1 = u * p.w1.transpose();
      const double rms = std::sqrt(h1.squaredNorm() / std::max<double>(1.0, h1.size()));
      if (rms > 0 && std::isfinite(rms)) p.w1 /= static_cast<float>(rms);
    }
  }
};

EcDistiller::EcDistiller(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EcDistiller::~EcDistiller() = default;

std::string_view DistillGemmName(DistillGemm g) { return g == DistillGemm::kBf16 ? "bf16" : "f32"; }

absl::StatusOr<DistillGemm> ParseDistillGemm(std::string_view s) {
  for (DistillGemm g : {DistillGemm::kF32, DistillGemm::kBf16}) {
    if (s == DistillGemmName(g)) return g;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("EC training GEMM must be f32 or bf16, got \"", std::string(s), "\""));
}

absl::StatusOr<std::unique_ptr<EcDistiller>> EcDistiller::Create(const model::LoadedModel* model,
                                                                 kernels::ThreadPool* pool,
                                                                 DistillGemm gemm,
                                                                 int64_t head_slice) {
  if (model == nullptr || pool == nullptr) return absl::InvalidArgumentError("null model or pool");
  if (head_slice < 1) return absl::InvalidArgumentError("head_slice must be >= 1");
  auto im = std::make_unique<Impl>();
  const model::ModelConfig& c = model->config;
  im->model = model;
  im->pool = pool;
  im->d = c.hidden_size;
  im->nh = c.num_heads;
  im->nkv = c.num_kv_heads;
  im->hd = c.head_dim;
  im->qd = c.num_heads * c.head_dim;
  im->kvd = c.num_kv_heads * c.head_dim;
  im->ff = c.intermediate_size;
  im->vocab = c.vocab_size;
  im->nl = c.num_layers;
  im->eps = c.rms_eps;
  im->inv_freq = c.RopeInvFreq();
  if (im->nkv <= 0 || im->nh % im->nkv != 0) return absl::InvalidArgumentError("bad head counts");
  im->lin.resize(im->nl);
  im->first_ec_layer = im->nl;
  for (int64_t l = 0; l < im->nl; ++l) {
    const auto mods = LayerLinears(model->weights.layers[l]);
    for (int j = 0; j < kMods; ++j) {
      const auto* w4 = dynamic_cast<const model::W4Linear*>(mods[j]);
      if (w4 == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", l, " module ", j,
                                                       " is not a W4Linear: ",
                                                       mods[j] ? mods[j]->DebugString() : "null"));
      }
      LinOp& op = im->lin[l][j];
      auto q = DequantizeW4Effective(w4->weight());
      if (!q.ok()) return q.status();
      op.n = q->rows;
      op.k = q->cols;
      op.w.Set(q->data, op.n, op.k, false, gemm);
      op.wt.Set(q->data, op.n, op.k, true, gemm);
      op.bias = w4->bias();
      if (w4->has_ec()) {
        op.ec = static_cast<int>(im->ecs.size());
        im->ecs.push_back(ParamsFromEc<float>(*w4->ec()));
        im->ec_loc.emplace_back(l, j);
        im->first_ec_layer = std::min(im->first_ec_layer, l);
      }
    }
  }
  if (model->weights.lm_head == nullptr) return absl::InvalidArgumentError("no lm_head");
  auto e = DenseWeightMatrix(*model->weights.lm_head);
  if (!e.ok()) return e.status();
  if (e->rows != im->vocab || e->cols != im->d) return absl::InvalidArgumentError("lm_head shape");
  im->e.Set(e->data, im->vocab, im->d, false, gemm);
  im->head_slice = head_slice;
  for (int64_t v0 = 0; v0 < im->vocab; v0 += head_slice) {
    const int64_t rows = std::min(head_slice, im->vocab - v0);
    const std::vector<float> slice(e->data.begin() + v0 * im->d,
                                   e->data.begin() + (v0 + rows) * im->d);
    im->et.emplace_back().Set(slice, rows, im->d, true, gemm);
  }
  im->adam.resize(im->ecs.size());
  im->ZeroGrads();
  return std::unique_ptr<EcDistiller>(new EcDistiller(std::move(im)));
}

int64_t EcDistiller::num_ecs() const { return static_cast<int64_t>(impl_->ecs.size()); }

namespace {
template <typename Fn>
void ForEachTensor(EcParams<float>& p, Fn fn) {
  fn(p.a.data(), p.a.size(), false);
  fn(p.b.data(), p.b.size(), false);
  if (p.gated) {
    fn(p.w1.data(), p.w1.size(), true);
    fn(p.b1.data(), p.b1.size(), true);
    fn(p.w2.data(), p.w2.size(), true);
    fn(p.b2.data(), p.b2.size(), true);
  }
}
}  // namespace

int64_t EcDistiller::num_params() const {
  int64_t n = 0;
  for (auto& p : impl_->ecs) ForEachTensor(p, [&](float*, int64_t sz, bool) { n += sz; });
  return n;
}

std::vector<float> EcDistiller::GetParams() const {
  std::vector<float> out;
  for (auto& p : impl_->ecs) {
    ForEachTensor(p, [&](float* d, int64_t sz, bool) { out.insert(out.end(), d, d + sz); });
  }
  return out;
}

void EcDistiller::SetParams(const std::vector<float>& in) {
  size_t o = 0;
  for (auto& p : impl_->ecs) {
    ForEachTensor(p, [&](float* d, int64_t sz, bool) {
      std::copy(in.begin() + o, in.begin() + o + sz, d);
      o += sz;
    });
  }
}

absl::StatusOr<double> EcDistiller::LossAndGrad(const std::vector<std::span<const int32_t>>& seqs,
                                                const float* teacher, double mse_w,
                                                std::vector<float>* grad, double kl_temperature,
                                                const uint16_t* teacher_layers,
                                                double layer_mse_weight) {
  if (!(kl_temperature > 0)) return absl::InvalidArgumentError("KL temperature must be > 0");
  if (seqs.empty()) return absl::InvalidArgumentError("no sequences");
  if (!(layer_mse_weight >= 0)) return absl::InvalidArgumentError("layer MSE weight must be >= 0");
  if (layer_mse_weight > 0 && teacher_layers == nullptr) {
    return absl::InvalidArgumentError("a layer MSE weight needs the teacher's layer states");
  }
  Impl& im = *impl_;
  if (auto s = im.Forward(seqs); !s.ok()) return s;
  const bool layers = layer_mse_weight > 0 && im.first_ec_layer < im.nl;
  im.tl = layers ? teacher_layers : nullptr;
  im.layer_w = layer_mse_weight;
  im.layer_loss = 0;
  std::vector<float> dy;
  if (grad != nullptr) dy.assign(im.T * im.d, 0.f);
  auto loss = im.HeadLoss(teacher, mse_w, grad ? dy.data() : nullptr, nullptr, kl_temperature);
  if (!loss.ok() || grad == nullptr) {
    if (loss.ok() && layers) {
      for (int64_t l = im.first_ec_layer; l < im.nl; ++l) *loss += im.LayerTerm(l, nullptr);
    }
    im.tl = nullptr;
    return loss;
  }
  im.ZeroGrads();
  const absl::Status bs = im.Backward(dy);
  im.tl = nullptr;
  if (!bs.ok()) return bs;
  *loss += im.layer_loss;
  grad->clear();
  for (auto& g : im.grads) {
    ForEachTensor(g, [&](float* d, int64_t sz, bool) { grad->insert(grad->end(), d, d + sz); });
  }
  return loss;
}

absl::StatusOr<std::vector<float>> EcDistiller::Logits(
    const std::vector<std::span<const int32_t>>& seqs) {
  Impl& im = *impl_;
  if (auto s = im.Forward(seqs); !s.ok()) return s;
  std::vector<float> out(im.T * im.vocab);
  if (auto s = im.Head(im.y.data(), im.T, out.data()); !s.ok()) return s;
  return out;
}

absl::StatusOr<EcTokenDiagnostics> EcDistiller::TokenDiagnostics(
    const std::vector<std::span<const int32_t>>& seqs, const float* teacher) {
  static constexpr const char* kNames[kMods] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"};
  Impl& im = *impl_;
  EcTokenDiagnostics out;
  for (const auto& [l, j] : im.ec_loc) out.ec_names.push_back(absl::StrCat("layers.", l, ".", kNames[j]));
  const int64_t ne = num_ecs();
  // Without ECs: B = 0 (restored below).
  std::vector<Mat> saved_b(ne);
  for (int64_t i = 0; i < ne; ++i) {
    saved_b[i] = im.ecs[i].b;
    im.ecs[i].b.setZero();
  }
  std::vector<double> without, with;
  absl::Status st = im.Forward(seqs);
  if (st.ok()) st = im.HeadLoss(teacher, 0.0, nullptr, &without).status();
  for (int64_t i = 0; i < ne; ++i) im.ecs[i].b = saved_b[i];
  if (!st.ok()) return st;
  if (auto s = im.Forward(seqs); !s.ok()) return s;
  if (auto s = im.HeadLoss(teacher, 0.0, nullptr, &with); !s.ok()) return s.status();
  const int64_t T = im.T;
  out.kl_with.assign(with.begin(), with.end());
  out.kl_without.assign(without.begin(), without.end());
  out.ec_gate.assign(T * ne, 1.f);
  out.mean_gate.assign(T, 1.f);
  for (int64_t i = 0; i < ne; ++i) {
    const auto [l, j] = im.ec_loc[i];
    const EcActivations<float>& a = im.acts[l].ec[j];
    if (!im.ecs[i].gated || a.t.rows() != T) continue;
    for (int64_t t = 0; t < T; ++t) out.ec_gate[t * ne + i] = 1.f + a.t.row(t).mean();
  }
  for (int64_t t = 0; t < T && ne > 0; ++t) {
    double s = 0;
    for (int64_t i = 0; i < ne; ++i) s += out.ec_gate[t * ne + i];
    out.mean_gate[t] = static_cast<float>(s / ne);
  }
  return out;
}

absl::StatusOr<DistillReport> EcDistiller::Train(const std::vector<std::vector<int32_t>>& seqs,
                                                 int64_t num_fit, const float* teacher,
                                                 const DistillOptions& o,
                                                 const DistillProgress& progress,
                                                 const uint16_t* teacher_layers) {
  const auto t0 = std::chrono::steady_clock::now();
  Impl& im = *impl_;
  const int64_t n = static_cast<int64_t>(seqs.size());
  if (num_fit < 1 || num_fit >= n) {
    return absl::InvalidArgumentError("Train needs >= 1 fit and >= 1 held-out sequence");
  }
  if (o.batch_sequences < 1 || o.steps < 0 || o.lr <= 0 || !(o.layer_mse_weight >= 0) ||
      o.eval_every < 1 || o.eval_every_early < 0) {
    return absl::InvalidArgumentError("bad distillation options");
  }
  if (o.layer_mse_weight > 0 && teacher_layers == nullptr) {
    return absl::InvalidArgumentError("a layer MSE weight needs the teacher's layer states");
  }
  DistillReport rep;
  rep.num_ecs = num_ecs();
  rep.num_params = num_params();
  std::vector<int64_t> row0(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) row0[i + 1] = row0[i] + static_cast<int64_t>(seqs[i].size());
  rep.fit_tokens = row0[num_fit];
  rep.val_tokens = row0[n] - row0[num_fit];
  if (rep.num_ecs == 0) return rep;

  std::vector<float> tbuf;
  std::vector<uint16_t> tlbuf;  // the minibatch's layer targets
  const bool layers = o.layer_mse_weight > 0;
  const int64_t lrow = im.nl * im.d;
  auto gather = [&](const std::vector<int64_t>& idx, std::vector<std::span<const int32_t>>* sp) {
    sp->clear();
    tbuf.clear();
    tlbuf.clear();
    for (int64_t i : idx) {
      sp->emplace_back(seqs[i]);
      tbuf.insert(tbuf.end(), teacher + row0[i] * im.d, teacher + row0[i + 1] * im.d);
      if (layers) {
        tlbuf.insert(tlbuf.end(), teacher_layers + row0[i] * lrow, teacher_layers + row0[i + 1] * lrow);
      }
    }
  };
  std::vector<std::span<const int32_t>> sp;
  auto val_kl = [&]() -> absl::StatusOr<double> {
    double sum = 0;
    for (int64_t b = num_fit; b < n; b += o.batch_sequences) {
      std::vector<int64_t> idx;
      for (int64_t i = b; i < std::min(n, b + o.batch_sequences); ++i) idx.push_back(i);
      gather(idx, &sp);
      auto l = LossAndGrad(sp, tbuf.data(), 0.0, nullptr);
      if (!l.ok()) return l.status();
      sum += *l * static_cast<double>(im.T);
    }
    return sum / static_cast<double>(rep.val_tokens);
  };

  std::mt19937_64 rng(o.seed);
  std::vector<int64_t> order(num_fit);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  int64_t cursor = 0;
  auto next_batch = [&]() {
    std::vector<int64_t> idx;
    for (int64_t i = 0; i < std::min(o.batch_sequences, num_fit); ++i) {
      if (cursor == num_fit) {
        std::shuffle(order.begin(), order.end(), rng);
        cursor = 0;
      }
      idx.push_back(order[cursor++]);
    }
    return idx;
  };

  // Gate init from the first minibatch, then the held-out baseline.
  gather(next_batch(), &sp);
  cursor = 0;
  auto l0 = LossAndGrad(sp, tbuf.data(), o.hidden_mse_weight, nullptr, o.kl_temperature,
                        layers ? tlbuf.data() : nullptr, o.layer_mse_weight);
  if (!l0.ok()) return l0.status();
  rep.init_train_kl = *l0;
  im.ScaleGateInit();
  const auto v0_start = std::chrono::steady_clock::now();
  auto v0 = val_kl();
  if (!v0.ok()) return v0.status();
  const double score_seconds = Seconds(v0_start);
  rep.init_val_kl = rep.final_val_kl = *v0;
  rep.val_history.emplace_back(0, *v0);
  if (progress) progress(0, o.steps, *v0);
  std::vector<float> best = GetParams();
  int64_t bad = 0;
  std::vector<float> grad;
  // ema_decay > 0: the parameters' moving average (started at the end of
  // the warm-up).
  const bool use_ema = o.ema_decay > 0;
  std::vector<float> ema, raw;
  // What follows the last step inside a time budget, each about as long as
  // the baseline's scoring: the last step's held-out scoring, the
  // average's, and the rounded factors' (round_factors_i8).
  const double tail_seconds =
      score_seconds * (1 + (use_ema ? 1 : 0) + (o.round_factors_i8 ? 1 : 0));
  const auto train_start = std::chrono::steady_clock::now();
  // The time budget's share spent once `step` steps are done: measured from
  // the start of Train (including the held-out baseline), with the time of
  // one more step and of the run's tail (above) projected, so that the
  // last step and the scorings after it fit. 0 without a budget.
  auto TimeFraction = [&](int64_t step) {
    if (o.max_seconds <= 0) return 0.0;
    const double spent = Seconds(t0);
    const double per_step = step > 1 ? Seconds(train_start) / static_cast<double>(step - 1) : 0;
    return (spent + per_step + tail_seconds) / o.max_seconds;
  };
  // Progress in [0, 1] after `step` steps (see the lr schedule below): the
  // larger of the step and the time fractions.
  auto RunFraction = [&](int64_t step) {
    const double f = static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, o.steps));
    return std::max(f, TimeFraction(step));
  };
  // Held-out evaluations every eval_every steps from patience_from of the
  // schedule on, every eval_every_early steps before (they only guard the
  // kept parameters there: the cosine schedule's best is late).
  const int64_t early_every = o.eval_every_early > 0 ? o.eval_every_early : o.eval_every;
  for (int64_t step = 1; step <= o.steps; ++step) {
    gather(next_batch(), &sp);
    auto l = LossAndGrad(sp, tbuf.data(), o.hidden_mse_weight, &grad, o.kl_temperature,
                         layers ? tlbuf.data() : nullptr, o.layer_mse_weight);
    if (!l.ok()) return l.status();
    rep.last_train_kl = *l;
    // lr: warm-up then cosine over the run's progress: the larger of the
    // step fraction and (with a time budget) the time fraction, so a time
    // cap still ends the schedule at lr * lr_min_ratio.
    const double frac = RunFraction(step);
    double lr = o.lr;
    if (step <= o.warmup_steps) {
      lr = o.lr * static_cast<double>(step) / static_cast<double>(o.warmup_steps + 1);
    } else {
      const double p = std::min(1.0, frac);
      lr = o.lr * (o.lr_min_ratio + (1 - o.lr_min_ratio) * 0.5 * (1 + std::cos(M_PI * p)));
    }
    for (size_t i = 0; i < im.ecs.size(); ++i) {
      EcParams<float>& p = im.ecs[i];
      EcParams<float>& g = im.grads[i];
      auto& ad = im.adam[i];
      ad[0].Step(p.a, g.a, static_cast<float>(lr), step);
      ad[1].Step(p.b, g.b, static_cast<float>(lr), step);
      if (p.gated && o.train_gate) {
        const float glr = static_cast<float>(lr * o.gate_lr_scale);
        ad[2].Step(p.w1, g.w1, glr, step);
        ad[3].Step(p.b1, g.b1, glr, step);
        ad[4].Step(p.w2, g.w2, glr, step);
        ad[5].Step(p.b2, g.b2, glr, step);
      }
    }
    rep.steps_run = step;
    if (use_ema && step >= o.warmup_steps) {
      raw = GetParams();
      if (ema.empty()) {
        ema = raw;
      } else {
        const float d = static_cast<float>(o.ema_decay);
        for (size_t i = 0; i < ema.size(); ++i) ema[i] = d * ema[i] + (1.f - d) * raw[i];
      }
    }
    // Only the time ends the run here: the step ceiling ends the loop.
    const bool time_up = TimeFraction(step + 1) >= 1.0;
    const bool late = frac >= o.patience_from;  // the step's place in the lr schedule
    if (step % (late ? o.eval_every : early_every) == 0 || step == o.steps || time_up) {
      auto v = val_kl();
      if (!v.ok()) return v.status();
      rep.val_history.emplace_back(step, *v);
      bool improved = false;
      if (*v < rep.final_val_kl) {
        rep.final_val_kl = *v;
        rep.best_step = step;
        rep.best_is_ema = false;
        best = GetParams();
        improved = true;
      }
      // The average, from half of the run on (before, it still carries the
      // early steps): swapped in, scored, swapped back (`raw` holds this
      // step's parameters: copied for the average's update above).
      if (use_ema && !ema.empty() && RunFraction(step) >= 0.5) {
        SetParams(ema);
        auto ve = val_kl();
        SetParams(raw);
        if (!ve.ok()) return ve.status();
        rep.ema_val_history.emplace_back(step, *ve);
        if (*ve < rep.final_val_kl) {
          rep.final_val_kl = *ve;
          rep.best_step = step;
          rep.best_is_ema = true;
          best = ema;
          improved = true;
        }
      }
      if (improved) {
        bad = 0;
      } else if (late) {
        ++bad;
      }
      if (progress) progress(step, o.steps, *v);
      if (o.patience > 0 && bad >= o.patience) {
        rep.stopped_early = true;
        break;
      }
    } else if (progress) {
      progress(step, o.steps, -1);
    }
    if (time_up) {
      rep.time_capped = true;
      break;
    }
  }
  SetParams(best);
  if (o.round_factors_i8) {
    // The factors as they will be stored (EcFactors::kI8), scored again.
    for (EcParams<float>& p : im.ecs) {
      absl::Status s = kernels::RoundEcFactorsI8(p.b.rows(), p.a.cols(), p.a.rows(), p.a.data(),
                                                 p.b.data());
      if (!s.ok()) return s;
    }
    auto v = val_kl();
    if (!v.ok()) return v.status();
    rep.rounded_val_kl = *v;
  }
  rep.seconds = Seconds(t0);
  if (rep.steps_run > 0) rep.seconds_per_step = Seconds(train_start) / static_cast<double>(rep.steps_run);
  return rep;
}

absl::StatusOr<DistillTeacher> ComputeDistillTeacher(
    const model::LoadedModel* fp_model, kernels::ThreadPool* pool,
    const std::vector<std::vector<int32_t>>& seqs, bool with_layers,
    const std::vector<std::vector<float>>* known_final) {
  if (fp_model == nullptr || pool == nullptr) return absl::InvalidArgumentError("null model or pool");
  if (known_final != nullptr && !with_layers) {
    if (seqs.empty()) return absl::InvalidArgumentError("teacher: no sequences");
    const int64_t d = fp_model->config.hidden_size;
    if (known_final->size() != seqs.size()) {
      return absl::InvalidArgumentError(absl::StrCat("teacher: ", known_final->size(),
                                                     " known states for ", seqs.size(),
                                                     " sequences"));
    }
    std::vector<std::vector<int32_t>> missing;
    int64_t rows = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const size_t want = seqs[i].size() * static_cast<size_t>(d);
      const size_t have = (*known_final)[i].size();
      if (have != 0 && have != want) {
        return absl::InvalidArgumentError(absl::StrCat("teacher: sequence ", i, " has ", have,
                                                       " known floats, expected ", want));
      }
      if (have == 0) missing.push_back(seqs[i]);
      rows += static_cast<int64_t>(seqs[i].size());
    }
    DistillTeacher t;
    if (!missing.empty()) {
      auto part = ComputeDistillTeacher(fp_model, pool, missing, false);
      if (!part.ok()) return part.status();
      t = std::move(*part);
    }
    if (missing.size() == seqs.size()) return t;
    std::vector<float> computed = std::move(t.final_hidden);
    t.hidden = d;
    t.num_layers = fp_model->config.num_layers;
    t.final_hidden.assign(static_cast<size_t>(rows * d), 0.f);
    size_t at = 0, from = 0;  // floats written / taken from `computed`
    for (size_t i = 0; i < seqs.size(); ++i) {
      const size_t n = seqs[i].size() * static_cast<size_t>(d);
      const float* src = (*known_final)[i].data();
      if ((*known_final)[i].empty()) {
        src = computed.data() + from;
        from += n;
      }
      std::copy(src, src + n, t.final_hidden.begin() + static_cast<std::ptrdiff_t>(at));
      at += n;
    }
    return t;
  }
  auto runner = LayerwiseRunner::Create(fp_model, pool, seqs);
  if (!runner.ok()) return runner.status();
  DistillTeacher t;
  t.hidden = fp_model->config.hidden_size;
  t.num_layers = fp_model->config.num_layers;
  const int64_t rows = (*runner)->num_tokens(), d = t.hidden, nl = t.num_layers;
  t.final_hidden.assign(static_cast<size_t>(rows * d), 0.f);
  float* h = t.final_hidden.data();
  if (auto s = (*runner)->Embed(h); !s.ok()) return s;
  if (!with_layers) {
    if (auto s = (*runner)->RunLayers(0, nl, h); !s.ok()) return s;
  } else {
    t.layers.resize(static_cast<size_t>(rows * nl * d));
    for (int64_t l = 0; l < nl; ++l) {
      if (auto s = (*runner)->RunLayers(l, l + 1, h); !s.ok()) return s;
      std::atomic<bool> out_of_range{false};
      pool->ParallelFor(rows, 64, [&](int64_t b, int64_t e) {
        bool bad = false;
        for (int64_t r = b; r < e; ++r) {
          uint16_t* dst = t.layers.data() + (r * nl + l) * d;
          for (int64_t j = 0; j < d; ++j) {
            const float v = h[r * d + j];
            bad |= !(std::fabs(v) <= 65504.f);  // fp16's largest finite value (NaN too)
            dst[j] = kernels::FloatToHalf(v);
          }
        }
        if (bad) out_of_range = true;
      });
      if (out_of_range) {
        return absl::OutOfRangeError(absl::StrCat(
            "layer targets: the FP16 model's residual stream after layer ", l,
            " leaves the fp16 range the targets are stored in; train without layer targets"));
      }
    }
  }
  if (auto s = (*runner)->FinalNorm(h, h); !s.ok()) return s;
  return t;
}

absl::Status EcDistiller::WriteBack(model::LoadedModel* model) const {
  const Impl& im = *impl_;
  if (model == nullptr || model->config.num_layers != im.nl) {
    return absl::InvalidArgumentError("WriteBack: model does not match");
  }
  for (size_t i = 0; i < im.ecs.size(); ++i) {
    const auto [l, j] = im.ec_loc[i];
    model::LayerWeights& L = model->weights.layers[l];
    std::array<std::unique_ptr<model::Linear>*, kMods> slots = {
        &L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, &L.gate_proj, &L.up_proj, &L.down_proj};
    const auto* w4 = dynamic_cast<const model::W4Linear*>(slots[j]->get());
    if (w4 == nullptr || !w4->has_ec()) {
      return absl::InvalidArgumentError("WriteBack: module has no EC");
    }
    kernels::EcWeights ec = *w4->ec();
    ParamsToEc(im.ecs[i], &ec);
    auto lin = model::W4Linear::Create(w4->weight(), std::move(ec), w4->bias());
    if (!lin.ok()) return lin.status();
    *slots[j] = std::move(*lin);
  }
  return absl::OkStatus();
}

std::string DistillReport::UnderTrainedWarning() const {
  if (!time_capped || steps_run >= kUnderTrainedSteps) return "";
  char per_step[32];
  std::snprintf(per_step, sizeof per_step, "%.2f", seconds_per_step);
  return absl::StrCat("the time budget allowed only ", steps_run, " EC training steps (", per_step,
                      " s per step on this machine; the documented results trained 180-250): "
                      "the ECs are under-trained. Raise --time-budget, or pin --train-steps "
                      "with a budget that allows them.");
}

}  // namespace spear::quantize
