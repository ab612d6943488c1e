// cpu::RmsNorm, cpu::Rope and cpu::SiluMul vs ref:: for every ISA variant.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ops_harness.h"

namespace spear::kernels::testing {
namespace {

// RmsNorm: float vs double sum of squares over d <= 577 terms, then a
// few roundings per element.
constexpr double kRmsTol = 1e-5, kRmsNmse = 1e-10;
// Rope: both sides use the same float angle and libm cos/sin; only the
// rotation's rounding (maybe fused) differs.
constexpr double kRopeTol = 1e-6, kRopeNmse = 1e-12;
// SiluMul: the SIMD exp is a polynomial with < 2e-7 relative error.
constexpr double kSiluTol = 1e-5, kSiluNmse = 1e-11;

using ElementwiseTest = OpsTest;

TEST_P(ElementwiseTest, RmsNorm) {
  for (int64_t m : {1, 2, 5, 17}) {
    for (int64_t d : {1, 7, 33, 576, 577}) {
      for (int mode = 0; mode < 4; ++mode) {
        const bool residual = mode & 1, alias = mode & 2;
        SCOPED_TRACE(::testing::Message() << "m=" << m << " d=" << d << " residual=" << residual
                                          << " y_aliases_x=" << alias << " seed=" << seed_);
        const int64_t ld = d + 5;
        std::vector<float> x = RandomRows(m, d, ld, -3.f, 3.f);
        std::vector<float> r = RandomRows(m, d, ld + 1, -3.f, 3.f);
        std::vector<float> w = Random(d, 0.5f, 1.5f);
        std::vector<float> x_ref = x, x_cpu = x, r_ref = r, r_cpu = r;
        std::vector<float> y_ref(m * ld, kPoison), y_cpu(m * ld, kPoison);
        RmsNormParams p;
        p.m = m;
        p.d = d;
        p.ldx = ld;
        p.ldy = ld;
        p.ldr = ld + 1;
        p.weight = w.data();
        p.eps = 1e-6f;
        p.x = x_ref.data();
        p.y = alias ? x_ref.data() : y_ref.data();
        p.residual = residual ? r_ref.data() : nullptr;
        ASSERT_TRUE(ref::RmsNorm(p).ok());
        p.x = x_cpu.data();
        p.y = alias ? x_cpu.data() : y_cpu.data();
        p.residual = residual ? r_cpu.data() : nullptr;
        ASSERT_TRUE(cpu::RmsNorm(p, pool()).ok());
        if (alias) {
          EXPECT_TRUE(Close(x_cpu, x_ref, m, d, ld, kRmsTol, kRmsNmse));
        } else {
          EXPECT_TRUE(Close(y_cpu, y_ref, m, d, ld, kRmsTol, kRmsNmse));
        }
        if (residual) {
          EXPECT_TRUE(Close(r_cpu, r_ref, m, d, ld + 1, kRmsTol, kRmsNmse));
        }
      }
    }
  }
}

TEST_P(ElementwiseTest, Rope) {
  std::uniform_int_distribution<int32_t> pos_dist(0, 5000);
  for (int64_t m : {1, 3, 17}) {
    for (int n_heads : {1, 3}) {
      for (int head_dim : {2, 8, 30, 64, 128}) {
        for (float scaling : {1.f, 1.3f}) {
          SCOPED_TRACE(::testing::Message() << "m=" << m << " n_heads=" << n_heads
                                            << " head_dim=" << head_dim << " scaling=" << scaling
                                            << " seed=" << seed_);
          const int64_t width = int64_t{n_heads} * head_dim, ld = width + 3;
          std::vector<float> x = RandomRows(m, width, ld);
          std::vector<int32_t> pos(m);
          for (int32_t& v : pos) v = pos_dist(rng_);
          std::vector<float> inv_freq(head_dim / 2);
          for (int j = 0; j < head_dim / 2; ++j) {
            inv_freq[j] = 1.f / std::pow(10000.f, 2.f * j / head_dim);
          }
          std::vector<float> x_ref = x, x_cpu = x;
          RopeParams p;
          p.m = m;
          p.ldx = ld;
          p.n_heads = n_heads;
          p.head_dim = head_dim;
          p.positions = pos.data();
          p.inv_freq = inv_freq.data();
          p.attention_scaling = scaling;
          p.x = x_ref.data();
          ASSERT_TRUE(ref::Rope(p).ok());
          p.x = x_cpu.data();
          ASSERT_TRUE(cpu::Rope(p, pool()).ok());
          EXPECT_TRUE(Close(x_cpu, x_ref, m, width, ld, kRopeTol, kRopeNmse));
        }
      }
    }
  }
}

TEST_P(ElementwiseTest, SiluMul) {
  for (int64_t m : {1, 3}) {
    for (int64_t n : {1, 7, 33, 1536, 9000}) {
      for (bool alias : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "m=" << m << " n=" << n << " y_aliases_gate=" << alias << " seed=" << seed_);
        const int64_t ld = n + 1;
        std::vector<float> g = RandomRows(m, n, ld, -12.f, 12.f);
        if (n > 4) {  // saturated tails of silu
          g[0] = -100.f;
          g[1] = 100.f;
          g[2] = -88.5f;
          g[3] = 0.f;
        }
        std::vector<float> u = RandomRows(m, n, ld + 2, -2.f, 2.f);
        std::vector<float> g_ref = g, g_cpu = g;
        std::vector<float> y_ref(m * ld, kPoison), y_cpu(m * ld, kPoison);
        SiluMulParams p;
        p.m = m;
        p.n = n;
        p.ld_gate = ld;
        p.ld_up = ld + 2;
        p.ldy = ld;
        p.up = u.data();
        p.gate = g_ref.data();
        p.y = alias ? g_ref.data() : y_ref.data();
        ASSERT_TRUE(ref::SiluMul(p).ok());
        p.gate = g_cpu.data();
        p.y = alias ? g_cpu.data() : y_cpu.data();
        ASSERT_TRUE(cpu::SiluMul(p, pool()).ok());
        EXPECT_TRUE(Close(alias ? g_cpu : y_cpu, alias ? g_ref : y_ref, m, n, ld, kSiluTol,
                          kSiluNmse));
      }
    }
  }
}

// LogSumExp: ref takes exp in double, cpu in float (< 2e-7 relative a
// term) summed in double: |got - ref| <= 1e-6 absolute (a float exp's
// error carried into the log); also a row with one dominant entry, a row
// whose entries lie 80 below its max (the terms near float's underflow),
// n = 1 (y = x) and SmolLM2's vocabulary width.
TEST_P(ElementwiseTest, LogSumExp) {
  for (int64_t m : {1, 3, 17}) {
    for (int64_t n : {1, 7, 16, 33, 64, 577, 49152 + 3}) {
      SCOPED_TRACE(::testing::Message() << "m=" << m << " n=" << n << " seed=" << seed_);
      const int64_t ld = n + 3;
      std::vector<float> x = RandomRows(m, n, ld, -20.f, 20.f);
      if (m > 1) x[ld + n / 2] = 60.f;  // row 1: one dominant entry
      if (m > 2) {                      // row 2: all but one 80 below the max
        for (int64_t j = 0; j < n; ++j) x[2 * ld + j] = -90.f + 0.001f * static_cast<float>(j % 7);
        x[2 * ld] = -10.f;
      }
      std::vector<double> y_ref(m, 0.0), y_cpu(m, std::nan(""));
      LogSumExpParams p;
      p.x = x.data();
      p.m = m;
      p.n = n;
      p.ldx = ld;
      p.y = y_ref.data();
      ASSERT_TRUE(ref::LogSumExp(p).ok());
      p.y = y_cpu.data();
      ASSERT_TRUE(cpu::LogSumExp(p, pool()).ok());
      for (int64_t i = 0; i < m; ++i) {
        ASSERT_NEAR(y_cpu[i], y_ref[i], 1e-6) << "row " << i;
        if (n == 1) {
          EXPECT_EQ(y_cpu[i], static_cast<double>(x[i * ld])) << "row " << i;
        }
      }
    }
  }
  LogSumExpParams bad;
  double y = 0;
  bad.x = nullptr;
  bad.y = &y;
  bad.m = 1;
  bad.n = 4;
  bad.ldx = 4;
  EXPECT_EQ(cpu::LogSumExp(bad, pool()).code(), absl::StatusCode::kInvalidArgument);
  float x[4] = {0, 0, 0, 0};
  bad.x = x;
  bad.n = 0;
  EXPECT_EQ(cpu::LogSumExp(bad, pool()).code(), absl::StatusCode::kInvalidArgument);
  bad.n = 4;
  bad.ldx = 3;
  EXPECT_EQ(ref::LogSumExp(bad).code(), absl::StatusCode::kInvalidArgument);
}

// KlDivergence: ref works in double, cpu takes exp in float and sums in
// float over <= 16 vectors: kl within 2e-6 (1 + kl) of ref's, the gradient
// within 1e-6 * weight * tau absolute (each p to ~3e-7 relative); rows with a
// dominant entry, entries 80 below the max, n = 1 (kl = 0, gradient 0),
// SmolLM2's vocabulary width, tau != 1, and the gradient written over zs.
TEST_P(ElementwiseTest, KlDivergence) {
  for (int64_t m : {1, 3, 17}) {
    for (int64_t n : {1, 7, 16, 33, 577, 49152 + 3}) {
      for (float tau : {1.f, 2.f}) {
        SCOPED_TRACE(::testing::Message() << "m=" << m << " n=" << n << " tau=" << tau
                                          << " seed=" << seed_);
        const int64_t ld = n + 3;
        std::vector<float> zs = RandomRows(m, n, ld, -10.f, 10.f);
        std::vector<float> zt = RandomRows(m, n, ld, -10.f, 10.f);
        if (m > 1) {  // row 1: one dominant entry in both rows, at different places
          zs[ld + n / 2] = 40.f;
          zt[ld + n / 3] = 45.f;
        }
        if (m > 2) {  // row 2: all but one entry 80 below the max
          for (int64_t j = 0; j < n; ++j) {
            zs[2 * ld + j] = -90.f + 0.01f * static_cast<float>(j % 5);
            zt[2 * ld + j] = -90.f + 0.01f * static_cast<float>(j % 3);
          }
          zs[2 * ld] = -10.f;
          zt[2 * ld + n - 1] = -10.f;
        }
        std::vector<double> kl_ref(m, 0.0), kl_cpu(m, std::nan(""));
        std::vector<float> dz_ref(m * ld, 0.f), dz_cpu(m * ld, std::nanf(""));
        KlDivergenceParams p;
        p.zs = zs.data();
        p.zt = zt.data();
        p.m = m;
        p.n = n;
        p.ldz = ld;
        p.tau = tau;
        p.weight = 0.25f;
        p.kl = kl_ref.data();
        p.dzs = dz_ref.data();
        ASSERT_TRUE(ref::KlDivergence(p).ok());
        p.kl = kl_cpu.data();
        p.dzs = dz_cpu.data();
        ASSERT_TRUE(cpu::KlDivergence(p, pool()).ok());
        const double gtol = 1e-6 * p.weight * tau;
        for (int64_t i = 0; i < m; ++i) {
          ASSERT_NEAR(kl_cpu[i], kl_ref[i], 2e-6 * (1 + kl_ref[i])) << "row " << i;
          ASSERT_GE(kl_ref[i], -1e-12) << "row " << i;
          if (n == 1) {
            EXPECT_EQ(kl_ref[i], 0.0);
            EXPECT_NEAR(kl_cpu[i], 0.0, 1e-7);
          }
          for (int64_t j = 0; j < n; ++j) {
            ASSERT_NEAR(dz_cpu[i * ld + j], dz_ref[i * ld + j], gtol) << "row " << i << " j " << j;
          }
        }
        // The gradient written over zs (the trainer's form): the same values.
        std::vector<float> zs2 = zs;
        std::vector<double> kl2(m, std::nan(""));
        p.zs = zs2.data();
        p.dzs = zs2.data();
        p.kl = kl2.data();
        ASSERT_TRUE(cpu::KlDivergence(p, pool()).ok());
        for (int64_t i = 0; i < m; ++i) {
          ASSERT_EQ(kl2[i], kl_cpu[i]) << "row " << i;
          for (int64_t j = 0; j < n; ++j) ASSERT_EQ(zs2[i * ld + j], dz_cpu[i * ld + j]);
        }
        // No gradient asked: the same kl, zs untouched.
        const std::vector<float> zs_before = zs;
        p.zs = zs.data();
        p.dzs = nullptr;
        ASSERT_TRUE(cpu::KlDivergence(p, pool()).ok());
        for (int64_t i = 0; i < m; ++i) ASSERT_EQ(kl2[i], kl_cpu[i]) << "row " << i;
        // (bitwise: the row padding holds NaNs)
        ASSERT_EQ(std::memcmp(zs.data(), zs_before.data(), zs.size() * sizeof(float)), 0);
      }
    }
  }
  KlDivergenceParams bad;
  float z[4] = {0, 1, 2, 3};
  double kl = 0;
  bad.zs = z;
  bad.zt = z;
  bad.kl = &kl;
  bad.m = 1;
  bad.n = 4;
  bad.ldz = 4;
  ASSERT_TRUE(cpu::KlDivergence(bad, pool()).ok());
  EXPECT_EQ(kl, 0.0);
  bad.tau = 0.f;
  EXPECT_EQ(cpu::KlDivergence(bad, pool()).code(), absl::StatusCode::kInvalidArgument);
  bad.tau = 1.f;
  bad.weight = std::nanf("");
  EXPECT_EQ(ref::KlDivergence(bad).code(), absl::StatusCode::kInvalidArgument);
  bad.weight = 1.f;
  bad.ldz = 3;
  EXPECT_EQ(cpu::KlDivergence(bad, pool()).code(), absl::StatusCode::kInvalidArgument);
  bad.ldz = 4;
  bad.zt = nullptr;
  EXPECT_EQ(ref::KlDivergence(bad).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Variants, ElementwiseTest, ::testing::ValuesIn(AllVariants()),
                         VariantName);

// ref::KlDivergence against the definition: tau^2 KL of the softened
// distributions computed by hand, and its gradient (weight 1) against
// central differences of the value (steps of the float logits taken as
// stored: within 1e-5 (1 + |fd|), the step's O(h^2) truncation).
TEST(KlDivergenceRef, ValueAndGradient) {
  const int64_t v = 9;
  std::mt19937 rng(12);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  std::vector<float> zs(v), zt(v);
  for (auto& x : zs) x = u(rng);
  for (auto& x : zt) x = u(rng);
  for (const float tau : {0.5f, 1.f, 2.f, 4.f}) {
    SCOPED_TRACE(::testing::Message() << "tau=" << tau);
    KlDivergenceParams p;
    p.zs = zs.data();
    p.zt = zt.data();
    p.m = 1;
    p.n = v;
    p.ldz = v;
    p.tau = tau;
    double kl = 0;
    std::vector<float> dz(v);
    p.kl = &kl;
    p.dzs = dz.data();
    ASSERT_TRUE(ref::KlDivergence(p).ok());
    double ss = 0, st = 0;
    for (int64_t i = 0; i < v; ++i) {
      ss += std::exp(static_cast<double>(zs[i]) / tau);
      st += std::exp(static_cast<double>(zt[i]) / tau);
    }
    double hand = 0;
    for (int64_t i = 0; i < v; ++i) {
      const double pt = std::exp(zt[i] / static_cast<double>(tau)) / st;
      const double ps = std::exp(zs[i] / static_cast<double>(tau)) / ss;
      hand += pt * std::log(pt / ps);
    }
    EXPECT_GT(kl, 0);
    EXPECT_NEAR(kl, static_cast<double>(tau) * tau * hand, 1e-12 * (1 + kl));
    p.dzs = nullptr;
    auto value = [&](const std::vector<float>& z) {
      KlDivergenceParams q = p;
      q.zs = z.data();
      double out = 0;
      q.kl = &out;
      EXPECT_TRUE(ref::KlDivergence(q).ok());
      return out;
    };
    for (int64_t i = 0; i < v; ++i) {
      std::vector<float> zp = zs, zm = zs;
      zp[i] += 1e-2f;
      zm[i] -= 1e-2f;
      const double fd = (value(zp) - value(zm)) / (static_cast<double>(zp[i]) - zm[i]);
      EXPECT_NEAR(dz[i], fd, 1e-5 * (1 + std::fabs(fd))) << "coordinate " << i;
    }
    // The same logits as teacher and student: zero.
    p.zs = zt.data();
    ASSERT_TRUE(ref::KlDivergence(p).ok());
    EXPECT_NEAR(kl, 0.0, 1e-14);
  }
}

}  // namespace
}  // namespace spear::kernels::testing
