// int8 EC factor storage (kernels/ec_factors.h): the per-group error bound,
// the grid reproducing itself, the byte count, and the errors.
#include "kernels/ec_factors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "kernels/dtype.h"

namespace spear::kernels {
namespace {

// A and B with a different magnitude per group (1e-4 .. 3), zero groups,
// and a ragged last group (n = 100, k = 70: groups of 64 and 36 / 6).
EcWeights RandomEc(std::mt19937* rng, int64_t n, int64_t k, int64_t r) {
  EcWeights e;
  e.n = n, e.k = k, e.rank = r, e.gated = false;
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> mag(-4.f, 0.5f);
  e.a.resize(static_cast<size_t>(r * k));
  e.b.resize(static_cast<size_t>(n * r));
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t g = 0; g < k; g += kEcI8Group) {
      const float s = (i + g / kEcI8Group) % 5 == 3 ? 0.f : std::pow(10.f, mag(*rng));
      for (int64_t j = g; j < std::min(k, g + kEcI8Group); ++j) e.a[i * k + j] = s * nd(*rng);
    }
    for (int64_t g = 0; g < n; g += kEcI8Group) {
      const float s = std::pow(10.f, mag(*rng));
      for (int64_t j = g; j < std::min(n, g + kEcI8Group); ++j) e.b[j * r + i] = s * nd(*rng);
    }
  }
  return e;
}

// Every element of a line within half its group's scale of the original;
// the scale no larger than the group's max / 127 rounded up to fp16 (or the
// 2^-14 floor); a group above the floor uses code 127 for its max.
void ExpectLineBound(const float* x, const float* q, int64_t len, int64_t stride,
                     const uint16_t* scales, int64_t sstride, const int8_t* codes) {
  for (int64_t g0 = 0, g = 0; g0 < len; g0 += kEcI8Group, ++g) {
    const float s = HalfToFloat(scales[g * sstride]);
    float m = 0;
    int cmax = 0;
    for (int64_t j = g0; j < std::min(len, g0 + kEcI8Group); ++j) {
      m = std::max(m, std::fabs(x[j * stride]));
      cmax = std::max(cmax, std::abs(int{codes[j * stride]}));
      ASSERT_LE(std::fabs(x[j * stride] - q[j * stride]), 0.5f * s * (1 + 1e-6f)) << j;
      ASSERT_EQ(q[j * stride], static_cast<float>(codes[j * stride]) * s);
    }
    const float floor = std::ldexp(1.f, -14);
    EXPECT_LE(s, std::max(m / 127.f * (1 + std::ldexp(1.f, -10)), floor)) << g;
    EXPECT_GE(s * 127.f, m) << g;
    if (s > floor) EXPECT_EQ(cmax, 127) << g;
  }
}

TEST(EcFactorsI8, RoundingBoundAndIdempotence) {
  std::mt19937 rng(std::random_device{}());
  for (auto [n, k, r] : {std::array<int64_t, 3>{100, 70, 3}, {64, 64, 1}, {576, 1536, 8}, {5, 3, 2}}) {
    const EcWeights e = RandomEc(&rng, n, k, r);
    EcI8Factors f;
    ASSERT_TRUE(EncodeEcFactorsI8(e, &f).ok());
    ASSERT_EQ(f.a_scales.size(), static_cast<size_t>(r * EcI8Groups(k)));
    ASSERT_EQ(f.b_scales.size(), static_cast<size_t>(EcI8Groups(n) * r));
    EcWeights d = e;
    ASSERT_TRUE(DecodeEcFactorsI8(f, &d).ok());
    EXPECT_EQ(d.factors, EcFactors::kI8);
    for (int64_t i = 0; i < r; ++i) {
      ExpectLineBound(e.a.data() + i * k, d.a.data() + i * k, k, 1,
                      f.a_scales.data() + i * EcI8Groups(k), 1, f.a.data() + i * k);
      ExpectLineBound(e.b.data() + i, d.b.data() + i, n, r, f.b_scales.data() + i, r,
                      f.b.data() + i);
    }
    // Round = encode + decode, and the grid reproduces itself bit for bit.
    EcWeights once = e;
    ASSERT_TRUE(RoundEcFactorsI8(&once).ok());
    EXPECT_EQ(once.a, d.a);
    EXPECT_EQ(once.b, d.b);
    EcWeights twice = once;
    ASSERT_TRUE(RoundEcFactorsI8(&twice).ok());
    EXPECT_EQ(std::memcmp(twice.a.data(), once.a.data(), once.a.size() * 4), 0);
    EXPECT_EQ(std::memcmp(twice.b.data(), once.b.data(), once.b.size() * 4), 0);
    EcI8Factors f2;
    ASSERT_TRUE(EncodeEcFactorsI8(once, &f2).ok());
    EXPECT_EQ(f2.a, f.a);
    EXPECT_EQ(f2.b_scales, f.b_scales);
  }
}

TEST(EcFactorsI8, BytesAsStored) {
  EcWeights e;
  e.n = 100, e.k = 70, e.rank = 3, e.gate_hidden = 8, e.gated = true;
  e.a.assign(3 * 70, 0.f);
  e.b.assign(100 * 3, 0.f);
  e.w1.assign(8 * 3, 0.f);
  e.b1.assign(8, 0.f);
  e.w2.assign(3 * 8, 0.f);
  e.b2.assign(3, 0.f);
  const size_t gate = 2 * (24 + 8 + 24 + 3);
  EXPECT_EQ(e.bytes(), 2 * (3 * 70 + 100 * 3) + gate);
  e.factors = EcFactors::kI8;
  // codes (1 byte) + fp16 scales: A 3 x 2 groups, B 2 groups x 3.
  EXPECT_EQ(e.bytes(), (3 * 70 + 100 * 3) + 2 * (3 * 2 + 2 * 3) + gate);
  EXPECT_EQ(EcFactorBytesPerRank(100, 70, EcFactors::kI8), 170 + 2 * 4);
  EXPECT_EQ(EcFactorBytesPerRank(100, 70, EcFactors::kF16), 340);
}

TEST(EcFactorsI8, BadValuesAndCodesAreErrors) {
  std::mt19937 rng(7);
  EcWeights e = RandomEc(&rng, 100, 70, 2);
  e.a[5] = std::numeric_limits<float>::quiet_NaN();
  EcI8Factors f;
  EXPECT_TRUE(absl::IsInvalidArgument(EncodeEcFactorsI8(e, &f)));
  EXPECT_TRUE(absl::IsInvalidArgument(RoundEcFactorsI8(&e)));
  e = RandomEc(&rng, 100, 70, 2);
  e.b[7] = 1e9f;  // its scale would overflow fp16
  EXPECT_TRUE(absl::IsInvalidArgument(EncodeEcFactorsI8(e, &f)));
  e = RandomEc(&rng, 100, 70, 2);
  e.b.pop_back();
  EXPECT_TRUE(absl::IsInvalidArgument(EncodeEcFactorsI8(e, &f)));

  e = RandomEc(&rng, 100, 70, 2);
  ASSERT_TRUE(EncodeEcFactorsI8(e, &f).ok());
  EcWeights d = e;
  EcI8Factors bad = f;
  bad.a[3] = -128;
  absl::Status s = DecodeEcFactorsI8(bad, &d);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(std::string(s.message()).find("code -128"), std::string::npos) << s;
  for (uint16_t h : {uint16_t{0x7e00}, uint16_t{0xbc00}, uint16_t{0x0001}, uint16_t{0}}) {
    bad = f;
    bad.b_scales[1] = h;  // NaN, -1, a subnormal, 0
    s = DecodeEcFactorsI8(bad, &d);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << h;
    EXPECT_NE(std::string(s.message()).find("positive normal fp16"), std::string::npos) << s;
  }
  bad = f;
  bad.a_scales.pop_back();
  EXPECT_TRUE(absl::IsInvalidArgument(DecodeEcFactorsI8(bad, &d)));
  d.rank = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(DecodeEcFactorsI8(f, &d)));
}

}  // namespace
}  // namespace spear::kernels
