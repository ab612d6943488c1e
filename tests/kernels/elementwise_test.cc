// cpu::RmsNorm, cpu::Rope and cpu::SiluMul vs ref:: for every ISA variant.
#include <cmath>

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

INSTANTIATE_TEST_SUITE_P(Variants, ElementwiseTest, ::testing::ValuesIn(AllVariants()),
                         VariantName);

}  // namespace
}  // namespace spear::kernels::testing
