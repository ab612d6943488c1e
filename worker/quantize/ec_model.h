// The EC as a differentiable function, with a hand-written backward pass and
// Adam. Templated on the scalar so the tests check every gradient in float64
// against finite differences; training runs in float32.
//
// Forward over a batch X [m, k] (one token per row), target R [m, n]:
//   U  = X A^T                [m, r]
//   H1 = U W1^T + b1          [m, h]     P = silu(H1)
//   Z  = P W2^T + b2          [m, r]     T = tanh(Z),  G = 1 + T
//   V  = G ⊙ U                [m, r]     (V = U when the gate is absent)
//   Y  = V B^T                [m, n]     D = Y - R
//   loss = (1/m) sum_t sum_i w_i D_ti^2  (w_i = 1 without channel weights)
// Backward:
//   dY = (2/m) D diag(w);   dB = dY^T V;   dV = dY B
//   dG = dV ⊙ U;  dZ = dG ⊙ (1 - T^2);  dW2 = dZ^T P;  db2 = colsum dZ
//   dH1 = (dZ W2) ⊙ silu'(H1), silu'(x) = sig(x) (1 + x (1 - sig(x)))
//   dW1 = dH1^T U;  db1 = colsum dH1
//   dU = dV ⊙ G + dH1 W1;   dA = dU^T X
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <vector>

#include "kernels/ec_factors.h"
#include "kernels/w4_format.h"

namespace spear::quantize {

template <typename S>
using EMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename S>
using EVec = Eigen::Matrix<S, 1, Eigen::Dynamic>;

template <typename S>
struct EcParams {
  bool gated = false;
  EMat<S> a, b, w1, w2;  // [r,k] [n,r] [h,r] [r,h]
  EVec<S> b1, b2;        // [h] [r]

  void SetZeroLike(const EcParams& o) {
    gated = o.gated;
    a.setZero(o.a.rows(), o.a.cols());
    b.setZero(o.b.rows(), o.b.cols());
    w1.setZero(o.w1.rows(), o.w1.cols());
    w2.setZero(o.w2.rows(), o.w2.cols());
    b1.setZero(o.b1.size());
    b2.setZero(o.b2.size());
  }
};

template <typename S>
EcParams<S> ParamsFromEc(const kernels::EcWeights& ec_in) {
  // A compact int8 EC (a loaded .spear) is decoded first; a loaded
  // checkpoint's codes were validated, so decoding cannot fail here.
  std::optional<kernels::EcWeights> decoded;
  if (ec_in.compact_i8()) {
    auto d = kernels::WithFloatFactors(ec_in);
    if (!d.ok()) {
      std::fprintf(stderr, "ParamsFromEc: %s\n", d.status().ToString().c_str());  // an invariant
      std::abort();
    }
    decoded = std::move(*d);
  }
  const kernels::EcWeights& ec = decoded ? *decoded : ec_in;
  EcParams<S> p;
  p.gated = ec.gated;
  const int64_t r = ec.rank, h = ec.gated ? ec.gate_hidden : 0;
  p.a = Eigen::Map<const EMat<float>>(ec.a.data(), r, ec.k).template cast<S>();
  p.b = Eigen::Map<const EMat<float>>(ec.b.data(), ec.n, r).template cast<S>();
  p.w1 = Eigen::Map<const EMat<float>>(ec.w1.data(), h, r).template cast<S>();
  p.w2 = Eigen::Map<const EMat<float>>(ec.w2.data(), r, h).template cast<S>();
  p.b1 = Eigen::Map<const EVec<float>>(ec.b1.data(), h).template cast<S>();
  p.b2 = Eigen::Map<const EVec<float>>(ec.b2.data(), ec.gated ? r : 0).template cast<S>();
  return p;
}

template <typename S>
void ParamsToEc(const EcParams<S>& p, kernels::EcWeights* ec) {
  auto put = [](const auto& m, std::vector<float>* dst) {
    dst->resize(static_cast<size_t>(m.size()));
    for (int64_t i = 0; i < m.size(); ++i) (*dst)[static_cast<size_t>(i)] = static_cast<float>(m.data()[i]);
  };
  put(p.a, &ec->a);
  put(p.b, &ec->b);
  ec->i8 = kernels::EcI8Factors();  // the float form now
  ec->gate16 = kernels::EcWeights::Gate16();
  put(p.w1, &ec->w1);
  put(p.b1, &ec->b1);
  put(p.w2, &ec->w2);
  put(p.b2, &ec->b2);
}

template <typename S>
struct EcActivations {
  EMat<S> u, h1, p, t, v;
};

// u, the gate and v = g ⊙ u for every row of x (into acts).
template <typename S>
void EcLowRankForward(const EcParams<S>& prm, const Eigen::Ref<const EMat<S>>& x, EcActivations<S>* acts) {
  EcActivations<S>& c = *acts;
  c.u.noalias() = x * prm.a.transpose();
  if (prm.gated) {
    c.h1.noalias() = c.u * prm.w1.transpose();
    c.h1.rowwise() += prm.b1;
    c.p = c.h1.unaryExpr([](S z) { return z / (S(1) + std::exp(-z)); });
    EMat<S> z = c.p * prm.w2.transpose();
    z.rowwise() += prm.b2;
    c.t = z.array().tanh();
    c.v = (c.t.array() + S(1)).cwiseProduct(c.u.array());
  } else {
    c.v = c.u;
  }
}

// Y = B (g ⊙ u) for every row of x; fills acts (needed by the backward).
template <typename S>
EMat<S> EcForward(const EcParams<S>& prm, const Eigen::Ref<const EMat<S>>& x, EcActivations<S>* acts) {
  EcLowRankForward(prm, x, acts);
  return acts->v * prm.b.transpose();
}

// The backward from dV = dLoss/dV [m, r] (everything except dB, which the
// callers compute). Consumes dv. If du_out is set it receives dLoss/dU
// [m, r] (the input gradient of the EC is then dX = dU A).
template <typename S>
void EcBackwardFromDv(const EcParams<S>& prm, const Eigen::Ref<const EMat<S>>& x,
                      const EcActivations<S>& c, EMat<S>&& dv, EcParams<S>* grad,
                      EMat<S>* du_out = nullptr) {
  EMat<S> du;
  if (prm.gated) {
    EMat<S> dz = dv.cwiseProduct(c.u).cwiseProduct((S(1) - c.t.array().square()).matrix());
    grad->w2.noalias() = dz.transpose() * c.p;
    grad->b2 = dz.colwise().sum();
    EMat<S> dh1 = dz * prm.w2;
    dh1 = dh1.binaryExpr(c.h1, [](S g, S z) {
      const S sg = S(1) / (S(1) + std::exp(-z));
      return g * sg * (S(1) + z * (S(1) - sg));
    });
    grad->w1.noalias() = dh1.transpose() * c.u;
    grad->b1 = dh1.colwise().sum();
    du = dv.cwiseProduct((c.t.array() + S(1)).matrix());
    du.noalias() += dh1 * prm.w1;
  } else {
    du = std::move(dv);
  }
  grad->a.noalias() = du.transpose() * x;
  if (du_out != nullptr) *du_out = std::move(du);
}

// Loss (see the header comment) and, if grad != nullptr, its gradient, the
// direct way (forms Y and D = Y - R: 3 products of size m*n*r).
// channel_weights: empty or [n].
template <typename S>
S EcLossAndGrad(const EcParams<S>& prm, const Eigen::Ref<const EMat<S>>& x,
                const Eigen::Ref<const EMat<S>>& r, const EVec<S>& channel_weights,
                EcParams<S>* grad) {
  EcActivations<S> c;
  EMat<S> d = EcForward(prm, x, &c);
  d -= r;
  const S inv_m = S(1) / static_cast<S>(x.rows());
  const bool weighted = channel_weights.size() > 0;
  EMat<S> dw = weighted ? EMat<S>(d * channel_weights.asDiagonal()) : d;
  const S loss = inv_m * dw.cwiseProduct(d).sum();
  if (grad == nullptr) return loss;
  grad->SetZeroLike(prm);
  dw *= S(2) * inv_m;                        // dY
  grad->b.noalias() = dw.transpose() * c.v;  // dB
  EcBackwardFromDv(prm, x, c, EMat<S>(dw * prm.b), grad);
  return loss;
}

// The same loss and gradient without forming Y (2 products of size m*n*r
// instead of 3; the training step). With Rw = R diag(w), Gm = B^T diag(w) B:
//   loss = (1/m) [sum(V Gm ⊙ V) - 2 sum(V ⊙ Rw B) + sum(Rw ⊙ R)]
//   dV = (2/m) (V Gm - Rw B),  dB = (2/m) (diag(w) B V^T V - Rw^T V).
// The loss suffers cancellation when it is far below sum ||r||^2 (use the
// direct form to MEASURE losses); the gradient does not.
template <typename S>
S EcLossAndGradExpanded(const EcParams<S>& prm, const Eigen::Ref<const EMat<S>>& x,
                        const Eigen::Ref<const EMat<S>>& r, const EVec<S>& channel_weights,
                        EcParams<S>* grad) {
  EcActivations<S> c;
  EcLowRankForward(prm, x, &c);
  const S inv_m = S(1) / static_cast<S>(x.rows());
  const bool weighted = channel_weights.size() > 0;
  EMat<S> rw = weighted ? EMat<S>(r * channel_weights.asDiagonal()) : EMat<S>(r);
  const EMat<S> wb = weighted ? EMat<S>(channel_weights.transpose().asDiagonal() * prm.b) : prm.b;
  const EMat<S> gm = prm.b.transpose() * wb;  // [r, r]
  const EMat<S> rb = rw * prm.b;              // [m, r]
  EMat<S> vg = c.v * gm;
  const S loss = inv_m * (vg.cwiseProduct(c.v).sum() - S(2) * c.v.cwiseProduct(rb).sum() +
                          rw.cwiseProduct(r).sum());
  if (grad == nullptr) return loss;
  grad->SetZeroLike(prm);
  grad->b.noalias() = S(2) * inv_m * (wb * (c.v.transpose() * c.v) - rw.transpose() * c.v);
  vg -= rb;
  vg *= S(2) * inv_m;
  EcBackwardFromDv(prm, x, c, std::move(vg), grad);
  return loss;
}

// Adam (Kingma & Ba) with bias correction, on one tensor:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// `t` is the 1-based step count (shared by all tensors of one optimizer).
template <typename S>
struct AdamTensor {
  Eigen::Array<S, Eigen::Dynamic, 1> m, v;

  template <typename Derived, typename GDerived>
  void Step(Eigen::MatrixBase<Derived>& param, const Eigen::MatrixBase<GDerived>& grad, S lr,
            int64_t t, S beta1 = S(0.9), S beta2 = S(0.999), S eps = S(1e-8)) {
    const int64_t sz = param.size();
    if (m.size() != sz) {
      m.setZero(sz);
      v.setZero(sz);
    }
    const S c1 = S(1) - std::pow(beta1, static_cast<S>(t));
    const S c2 = S(1) - std::pow(beta2, static_cast<S>(t));
    S* pd = param.derived().data();
    const S* gd = grad.derived().data();
    for (int64_t i = 0; i < sz; ++i) {
      m(i) = beta1 * m(i) + (S(1) - beta1) * gd[i];
      v(i) = beta2 * v(i) + (S(1) - beta2) * gd[i] * gd[i];
      pd[i] -= lr * (m(i) / c1) / (std::sqrt(v(i) / c2) + eps);
    }
  }
};

}  // namespace spear::quantize
