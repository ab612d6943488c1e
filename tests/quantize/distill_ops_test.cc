// Finite-difference checks (float64) of every backward in distill_ops.h:
// RMSNorm, RoPE (its inverse is its transpose), causal GQA attention,
// SiLU-mul and the KL on logits; and the EC's input gradient (dU A).
#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "worker/quantize/distill_ops.h"
#include "worker/quantize/ec_model.h"

namespace spear::quantize::distill {
namespace {

std::vector<double> Rand(int64_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = nd(g);
  return v;
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Checks grad (analytic dL/dx) against central differences of f at x for
// a few coordinates and for one random direction.
void CheckGrad(const std::function<double(const std::vector<double>&)>& f,
               std::vector<double> x, const std::vector<double>& grad, double tol = 1e-6) {
  const double h = 1e-6;
  for (size_t i = 0; i < x.size(); i += std::max<size_t>(1, x.size() / 17)) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    const double fd = (fp - fm) / (2 * h);
    EXPECT_NEAR(grad[i], fd, tol * (1 + std::fabs(fd))) << "coordinate " << i;
  }
  const std::vector<double> dir = Rand(x.size(), 77);
  std::vector<double> xp = x, xm = x;
  for (size_t i = 0; i < x.size(); ++i) {
    xp[i] += h * dir[i];
    xm[i] -= h * dir[i];
  }
  const double fd = (f(xp) - f(xm)) / (2 * h);
  EXPECT_NEAR(Dot(grad, dir), fd, tol * (1 + std::fabs(fd)));
}

TEST(DistillOps, RmsNormBackward) {
  const int64_t m = 3, d = 7;
  std::vector<float> w(d);
  for (int64_t j = 0; j < d; ++j) w[j] = 0.5f + 0.1f * j;
  const std::vector<double> x = Rand(m * d, 1), c = Rand(m * d, 2);
  auto f = [&](const std::vector<double>& xx) {
    std::vector<double> y(m * d), r(m);
    RmsNormForward<double>(xx.data(), m, d, w.data(), 1e-5, y.data(), r.data());
    return Dot(y, c);
  };
  std::vector<double> y(m * d), r(m), dx(m * d, 1.0);
  RmsNormForward<double>(x.data(), m, d, w.data(), 1e-5, y.data(), r.data());
  std::vector<double> base = dx;
  RmsNormBackward<double>(x.data(), r.data(), w.data(), c.data(), m, d, dx.data(), true);
  for (int64_t i = 0; i < m * d; ++i) dx[i] -= base[i];  // accumulate mode adds
  CheckGrad(f, x, dx);
}

TEST(DistillOps, RopeInverseIsTransposeAndInverse) {
  const int64_t m = 5, heads = 3, hd = 8, ld = heads * hd + 2;
  std::vector<int32_t> pos = {0, 1, 7, 100, 3};
  std::vector<float> inv(hd / 2);
  for (int64_t j = 0; j < hd / 2; ++j) inv[j] = std::pow(10000.f, -2.f * j / hd);
  std::vector<double> x = Rand(m * ld, 3), y = Rand(m * ld, 4);
  std::vector<double> rx = x, rty = y;
  RopeInPlace<double>(rx.data(), m, ld, heads, hd, pos.data(), inv.data(), false);
  RopeInPlace<double>(rty.data(), m, ld, heads, hd, pos.data(), inv.data(), true);
  EXPECT_NEAR(Dot(rx, y), Dot(x, rty), 1e-9);  // <R x, y> = <x, R^T y>
  // cos and sin are float32 (as the engine forms them): R^T R = I to ~1e-7.
  RopeInPlace<double>(rx.data(), m, ld, heads, hd, pos.data(), inv.data(), true);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(rx[i], x[i], 1e-6);
}

// The tiled transpose against the definition, on sizes off the 32 x 32 tile
// (one tile, partial tiles on both sides, more rows than columns and the
// reverse) with a row stride above the width; the stride's padding is
// never read into dst.
TEST(DistillOps, TransposeMatchesDefinition) {
  for (const auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {32, 32}, {33, 7}, {5, 70}, {256, 64}, {97, 130}}) {
    const int64_t lds = cols + 3;
    std::vector<double> src = Rand(rows * lds, 21);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = cols; j < lds; ++j) src[i * lds + j] = std::nan("");
    }
    std::vector<double> dst(rows * cols, -1.0);
    Transpose<double>(src.data(), rows, cols, lds, dst.data());
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        ASSERT_EQ(dst[j * rows + i], src[i * lds + j]) << rows << "x" << cols << " " << i << "," << j;
      }
    }
  }
}

TEST(DistillOps, AttentionBackward) {
  AttentionShape a;
  a.len = 6;
  a.n_heads = 4;
  a.n_kv_heads = 2;
  a.head_dim = 3;
  a.ldq = a.ldo = 12;
  a.ldkv = 6;
  a.scale = 0.7;
  const int64_t L = a.len, group = 2;
  const std::vector<double> q0 = Rand(L * 12, 5), k0 = Rand(L * 6, 6), v0 = Rand(L * 6, 7),
                            c = Rand(L * 12, 8);
  auto run = [&](const std::vector<double>& q, const std::vector<double>& k,
                 const std::vector<double>& v, std::vector<double>* probs) {
    std::vector<double> out(L * 12);
    probs->assign(2 * group * L * L, 0);
    for (int64_t kvh = 0; kvh < 2; ++kvh) {
      AttentionForwardKvHead<double>(a, kvh, q.data(), k.data(), v.data(), out.data(),
                                     probs->data() + kvh * group * L * L);
    }
    return Dot(out, c);
  };
  std::vector<double> probs;
  run(q0, k0, v0, &probs);
  std::vector<double> dq(L * 12), dk(L * 6), dv(L * 6);
  for (int64_t kvh = 0; kvh < 2; ++kvh) {
    AttentionBackwardKvHead<double>(a, kvh, q0.data(), k0.data(), v0.data(),
                                    probs.data() + kvh * group * L * L, c.data(), dq.data(),
                                    dk.data(), dv.data());
  }
  std::vector<double> p;
  CheckGrad([&](const std::vector<double>& q) { return run(q, k0, v0, &p); }, q0, dq);
  CheckGrad([&](const std::vector<double>& k) { return run(q0, k, v0, &p); }, k0, dk);
  CheckGrad([&](const std::vector<double>& v) { return run(q0, k0, v, &p); }, v0, dv);
  // Causality: the first token's output ignores later keys.
  EXPECT_EQ(probs[1], 0.0);
}

// The float path (products on kernels::cpu::Linear) against the float64
// one (Eigen, checked by finite differences above) on a training-sized
// head: 40 tokens (past the GEMM path's 16-row threshold and off its
// tiles), GQA group 3, head_dim 20, strided rows. Fresh random inputs.
TEST(DistillOps, AttentionFloatMatchesDouble) {
  AttentionShape a;
  a.len = 40;
  a.n_heads = 6;
  a.n_kv_heads = 2;
  a.head_dim = 20;
  a.ldq = a.ldo = 6 * 20 + 3;  // strides wider than the heads
  a.ldkv = 2 * 20 + 5;
  a.scale = 1.0 / std::sqrt(20.0);
  const int64_t L = a.len, group = 3;
  std::random_device rd;
  const uint32_t seed = rd();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  const std::vector<double> q = Rand(L * a.ldq, seed, 2.0), k = Rand(L * a.ldkv, seed + 1, 2.0),
                            v = Rand(L * a.ldkv, seed + 2), dout = Rand(L * a.ldo, seed + 3);
  auto to_f = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  const std::vector<float> qf = to_f(q), kf = to_f(k), vf = to_f(v), doutf = to_f(dout);
  std::vector<double> out(L * a.ldo, 0), probs(2 * group * L * L), dq(L * a.ldq, 0),
      dk(L * a.ldkv, 0), dv(L * a.ldkv, 0);
  std::vector<float> outf(L * a.ldo, 0), probsf(2 * group * L * L), dqf(L * a.ldq, 0),
      dkf(L * a.ldkv, 0), dvf(L * a.ldkv, 0);
  for (int64_t kvh = 0; kvh < 2; ++kvh) {
    const int64_t po = kvh * group * L * L;
    AttentionForwardKvHead<double>(a, kvh, q.data(), k.data(), v.data(), out.data(),
                                   probs.data() + po);
    AttentionForwardKvHead<float>(a, kvh, qf.data(), kf.data(), vf.data(), outf.data(),
                                  probsf.data() + po);
    AttentionBackwardKvHead<double>(a, kvh, q.data(), k.data(), v.data(), probs.data() + po,
                                    dout.data(), dq.data(), dk.data(), dv.data());
    AttentionBackwardKvHead<float>(a, kvh, qf.data(), kf.data(), vf.data(), probsf.data() + po,
                                   doutf.data(), dqf.data(), dkf.data(), dvf.data());
  }
  // Relative to each output's largest entry: float32 rounding over sums of
  // <= 40 terms (~1e-6); a wrong product or transpose is O(1).
  auto check = [](const std::vector<double>& want, const std::vector<float>& got, const char* what) {
    double scale = 0, err = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      scale = std::max(scale, std::fabs(want[i]));
      err = std::max(err, std::fabs(want[i] - got[i]));
    }
    EXPECT_GT(scale, 0.01) << what;
    EXPECT_LE(err, 1e-4 * scale) << what;
  };
  check(out, outf, "out");
  check(probs, probsf, "probs");
  check(dq, dqf, "dq");
  check(dk, dkf, "dk");
  check(dv, dvf, "dv");
  // Columns outside the heads (the stride padding) are left untouched.
  EXPECT_EQ(dqf[6 * 20], 0.f);
  EXPECT_EQ(dkf[2 * 20 + 4], 0.f);
}

TEST(DistillOps, SiluMulBackward) {
  const int64_t n = 11;
  const std::vector<double> g0 = Rand(n, 9, 2.0), u0 = Rand(n, 10), c = Rand(n, 11);
  std::vector<double> dg(n), du(n);
  SiluMulBackward<double>(g0.data(), u0.data(), c.data(), n, dg.data(), du.data());
  auto f = [&](const std::vector<double>& g, const std::vector<double>& u) {
    std::vector<double> m(n);
    SiluMulForward<double>(g.data(), u.data(), n, m.data());
    return Dot(m, c);
  };
  CheckGrad([&](const std::vector<double>& g) { return f(g, u0); }, g0, dg);
  CheckGrad([&](const std::vector<double>& u) { return f(g0, u); }, u0, du);
}

// The EC's input gradient dX = dU A (used by the end-to-end backward).
TEST(DistillOps, EcInputGradient) {
  const int64_t m = 4, k = 6, n = 5, r = 2, h = 3;
  EcParams<double> p;
  p.gated = true;
  auto fill = [](EMat<double>& e, int64_t rows, int64_t cols, uint64_t seed) {
    const auto v = Rand(rows * cols, seed, 0.7);
    e = Eigen::Map<const EMat<double>>(v.data(), rows, cols);
  };
  fill(p.a, r, k, 20);
  fill(p.b, n, r, 21);
  fill(p.w1, h, r, 22);
  fill(p.w2, r, h, 23);
  p.b1 = EVec<double>::Constant(h, 0.1);
  p.b2 = EVec<double>::Constant(r, -0.2);
  const std::vector<double> x0 = Rand(m * k, 24), c = Rand(m * n, 25);
  auto f = [&](const std::vector<double>& x) {
    EcActivations<double> acts;
    EMat<double> y = EcForward<double>(p, Eigen::Map<const EMat<double>>(x.data(), m, k), &acts);
    return (Eigen::Map<const EMat<double>>(c.data(), m, n).cwiseProduct(y)).sum();
  };
  EcActivations<double> acts;
  Eigen::Map<const EMat<double>> X(x0.data(), m, k), C(c.data(), m, n);
  EcForward<double>(p, X, &acts);
  EcParams<double> g;
  EMat<double> du;
  EcBackwardFromDv<double>(p, X, acts, EMat<double>(C * p.b), &g, &du);
  EMat<double> dx = du * p.a;
  std::vector<double> dxv(dx.data(), dx.data() + dx.size());
  CheckGrad(f, x0, dxv);
}

}  // namespace
}  // namespace spear::quantize::distill
