// Forward and hand-written backward of the LLaMA decoder's non-linear ops,
// for end-to-end distillation of the ECs (pipeline/distill.h). Templated on
// the scalar so the tests check every backward in float64 against finite
// differences; training runs them in float32. Row-major buffers with an
// explicit row stride; one token per row. No allocation-free promises: the
// callers are offline training loops.
//
// RMSNorm:  y = x r w,  r = (mean_j x_j^2 + eps)^-1/2
//           g = dy ⊙ w;  dx = r g - x r^3 (g · x) / d
// RoPE (HF "rotate_half", the engine's convention, kernels/op_params.h):
//           a' = a c - b s,  b' = b c + a s  (a = x[j], b = x[j + hd/2],
//           t = pos * inv_freq[j] in float32 as the engine forms it);
//           the backward is the transpose: the same with s -> -s.
// Causal attention of ONE sequence from position 0, GQA (head h reads kv
// head h / (H / KH)):  S = scale q_h k^T (j <= i),  P = softmax(S),  o = P v
//           dP = do v^T;  dS = P ⊙ (dP - rowsum(dP ⊙ P));
//           dq = scale dS k;  dk += scale dS^T q;  dv += P^T do
// SiLU-mul: m = silu(g) ⊙ u;  dg = dm ⊙ u ⊙ silu'(g),  du = dm ⊙ silu(g)
// KL on logits, per row: KL(p_t || p_s) = sum_v p_t (log p_t - log p_s);
//           d/dz_s = p_s - p_t.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Dense>

namespace spear::quantize::distill {

template <typename S>
using RowMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename S>
using StridedMap = Eigen::Map<RowMat<S>, 0, Eigen::OuterStride<>>;
template <typename S>
using ConstStridedMap = Eigen::Map<const RowMat<S>, 0, Eigen::OuterStride<>>;

// y [m, d] = RmsNorm(x) w; rstd [m] = r per row. y may alias x.
template <typename S>
void RmsNormForward(const S* x, int64_t m, int64_t d, const float* w, double eps, S* y, S* rstd) {
  for (int64_t i = 0; i < m; ++i) {
    const S* xr = x + i * d;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const S r = static_cast<S>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    rstd[i] = r;
    S* yr = y + i * d;
    for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * r * static_cast<S>(w[j]);
  }
}

// dx [m, d] (+)= backward of RmsNorm given dy, x and rstd.
template <typename S>
void RmsNormBackward(const S* x, const S* rstd, const float* w, const S* dy, int64_t m, int64_t d,
                     S* dx, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    const S* xr = x + i * d;
    const S* dyr = dy + i * d;
    S* dxr = dx + i * d;
    const S r = rstd[i];
    double gx = 0;
    for (int64_t j = 0; j < d; ++j) gx += static_cast<double>(dyr[j]) * w[j] * xr[j];
    const S c = static_cast<S>(gx) * r * r * r / static_cast<S>(d);
    for (int64_t j = 0; j < d; ++j) {
      const S v = r * dyr[j] * static_cast<S>(w[j]) - xr[j] * c;
      dxr[j] = accumulate ? dxr[j] + v : v;
    }
  }
}

// In place on x [m, ld] (n_heads heads of head_dim at the row start);
// inverse = true applies the transpose (backward).
template <typename S>
void RopeInPlace(S* x, int64_t m, int64_t ld, int64_t n_heads, int64_t head_dim,
                 const int32_t* positions, const float* inv_freq, bool inverse) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < m; ++i) {
    const float pos = static_cast<float>(positions[i]);
    for (int64_t j = 0; j < half; ++j) {
      const float t = pos * inv_freq[j];
      const S c = static_cast<S>(std::cos(t));
      const S s = inverse ? -static_cast<S>(std::sin(t)) : static_cast<S>(std::sin(t));
      for (int64_t h = 0; h < n_heads; ++h) {
        S* xh = x + i * ld + h * head_dim;
        const S a = xh[j], b = xh[j + half];
        xh[j] = a * c - b * s;
        xh[j + half] = b * c + a * s;
      }
    }
  }
}

struct AttentionShape {
  int64_t len = 0;  // tokens of the sequence (positions 0 .. len-1)
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t ldq = 0, ldkv = 0, ldo = 0;  // row strides
  double scale = 1.0;
};

// y [m, n] (+)= x [m, k] w^T (x row stride ldx; w [n, k] contiguous; y
// row stride ldy). float: kernels::cpu::Linear on one thread (the packed
// GEMM with run-time ISA dispatch; callers run one per task; distill_ops.cc;
// also the sequential stage's products, pipeline/module_quant.cc).
// double (the tests' finite differences): Eigen.
void MatMulNT(const float* x, int64_t m, int64_t k, int64_t ldx, const float* w, int64_t n,
              float* y, int64_t ldy, bool accumulate);
inline void MatMulNT(const double* x, int64_t m, int64_t k, int64_t ldx, const double* w, int64_t n,
                     double* y, int64_t ldy, bool accumulate) {
  ConstStridedMap<double> X(x, m, k, Eigen::OuterStride<>(ldx));
  Eigen::Map<const RowMat<double>> W(w, n, k);
  StridedMap<double> Y(y, m, n, Eigen::OuterStride<>(ldy));
  if (accumulate) {
    Y.noalias() += X * W.transpose();
  } else {
    Y.noalias() = X * W.transpose();
  }
}

// dst [cols, rows] = src [rows, cols]^T (src row stride lds), in tiles of
// 32 x 32 so that both sides stay in L1 (the attention backward transposes
// its L x L probabilities: row by row, every write of a 256-row matrix
// landed in another cache line).
template <typename S>
void Transpose(const S* src, int64_t rows, int64_t cols, int64_t lds, S* dst) {
  constexpr int64_t kTile = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) dst[j * rows + i] = src[i * lds + j];
      }
    }
  }
}

// Heads [kv_head * group, (kv_head + 1) * group) of one sequence: out and
// probs (group blocks of len x len, row-major; entries j > i are 0).
template <typename S>
void AttentionForwardKvHead(const AttentionShape& a, int64_t kvh, const S* q, const S* k,
                            const S* v, S* out, S* probs) {
  const int64_t L = a.len, hd = a.head_dim, group = a.n_heads / a.n_kv_heads;
  // Per-thread scratch, every element written before it is read: fresh
  // vectors per call cost page faults and zeroing (~1 MB a call in training).
  thread_local std::vector<S> kc, vt;
  kc.resize(static_cast<size_t>(L * hd));
  vt.resize(static_cast<size_t>(hd * L));
  for (int64_t t = 0; t < L; ++t) {
    std::copy(k + t * a.ldkv + kvh * hd, k + t * a.ldkv + (kvh + 1) * hd, kc.begin() + t * hd);
  }
  Transpose(v + kvh * hd, L, hd, a.ldkv, vt.data());
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = kvh * group + g;
    S* P = probs + g * L * L;
    MatMulNT(q + h * hd, L, hd, a.ldq, kc.data(), L, P, L, false);  // q k^T
    for (int64_t i = 0; i < L; ++i) {
      S* row = P + i * L;
      S mx = -std::numeric_limits<S>::infinity();
      for (int64_t j = 0; j <= i; ++j) {
        row[j] *= static_cast<S>(a.scale);
        mx = std::max(mx, row[j]);
      }
      S sum = 0;
      for (int64_t j = 0; j <= i; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      const S inv = S(1) / sum;
      for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
      for (int64_t j = i + 1; j < L; ++j) row[j] = 0;
    }
    MatMulNT(P, L, L, L, vt.data(), hd, out + h * hd, a.ldo, false);  // P v
  }
}

// Backward of AttentionForwardKvHead: dq (written, for this kv head's query
// heads), dk and dv (written for this kv head: the group's sum).
template <typename S>
void AttentionBackwardKvHead(const AttentionShape& a, int64_t kvh, const S* q, const S* k,
                             const S* v, const S* probs, const S* dout, S* dq, S* dk, S* dv) {
  const int64_t L = a.len, hd = a.head_dim, group = a.n_heads / a.n_kv_heads;
  const size_t lh = static_cast<size_t>(L * hd), ll = static_cast<size_t>(L * L);
  // Per-thread scratch, every element written before it is read (as in
  // the forward).
  thread_local std::vector<S> vc, kt, dot, qt, pt, dP, dpt;
  for (auto* b : {&vc, &kt, &dot, &qt}) b->resize(lh);
  for (auto* b : {&pt, &dP, &dpt}) b->resize(ll);
  for (int64_t t = 0; t < L; ++t) {
    std::copy(v + t * a.ldkv + kvh * hd, v + t * a.ldkv + (kvh + 1) * hd, vc.begin() + t * hd);
    std::fill(dk + t * a.ldkv + kvh * hd, dk + t * a.ldkv + (kvh + 1) * hd, S(0));
    std::fill(dv + t * a.ldkv + kvh * hd, dv + t * a.ldkv + (kvh + 1) * hd, S(0));
  }
  Transpose(k + kvh * hd, L, hd, a.ldkv, kt.data());
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = kvh * group + g;
    const S* P = probs + g * L * L;
    Transpose(P, L, L, L, pt.data());
    Transpose(dout + h * hd, L, hd, a.ldo, dot.data());
    MatMulNT(pt.data(), L, L, L, dot.data(), hd, dv + kvh * hd, a.ldkv, true);  // dv += P^T do
    MatMulNT(dout + h * hd, L, hd, a.ldo, vc.data(), L, dP.data(), L, false);  // dP = do v^T
    for (int64_t i = 0; i < L; ++i) {
      S* d = dP.data() + i * L;
      const S* p = P + i * L;
      // dotp = sum_j<=i d[j] p[j] in 8 partial sums (so the loop vectorizes).
      S part[8] = {};
      int64_t j8 = 0;
      for (; j8 + 8 <= i + 1; j8 += 8) {
        for (int u = 0; u < 8; ++u) part[u] += d[j8 + u] * p[j8 + u];
      }
      S dotp = 0;
      for (int64_t j = j8; j <= i; ++j) dotp += d[j] * p[j];
      for (int u = 0; u < 8; ++u) dotp += part[u];
      for (int64_t j = 0; j <= i; ++j) d[j] = p[j] * (d[j] - dotp) * static_cast<S>(a.scale);
      for (int64_t j = i + 1; j < L; ++j) d[j] = 0;
    }
    MatMulNT(dP.data(), L, L, L, kt.data(), hd, dq + h * hd, a.ldq, false);  // dq = dS k
    Transpose(dP.data(), L, L, L, dpt.data());
    Transpose(q + h * hd, L, hd, a.ldq, qt.data());
    MatMulNT(dpt.data(), L, L, L, qt.data(), hd, dk + kvh * hd, a.ldkv, true);  // dk += dS^T q
  }
}

template <typename S>
inline S Sigmoid(S z) {
  return S(1) / (S(1) + std::exp(-z));
}

// m [n] = silu(g) ⊙ u.
template <typename S>
void SiluMulForward(const S* g, const S* u, int64_t n, S* m) {
  for (int64_t i = 0; i < n; ++i) m[i] = g[i] * Sigmoid(g[i]) * u[i];
}

// dg, du [n] from dm [n].
template <typename S>
void SiluMulBackward(const S* g, const S* u, const S* dm, int64_t n, S* dg, S* du) {
  for (int64_t i = 0; i < n; ++i) {
    const S sg = Sigmoid(g[i]);
    du[i] = dm[i] * g[i] * sg;
    dg[i] = dm[i] * u[i] * sg * (S(1) + g[i] * (S(1) - sg));
  }
}

}  // namespace spear::quantize::distill
