// Scalar half / bfloat16 conversions in kernels/dtype.h. _Float16 (GCC 12,
// x86-64) serves as an independent oracle for IEEE half.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"
#include "kernels/dtype.h"

namespace spear::kernels {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DTypeTest, NamesAndSizes) {
  EXPECT_EQ(DTypeName(DType::kF32), "f32");
  EXPECT_EQ(DTypeName(DType::kF16), "f16");
  EXPECT_EQ(DTypeName(DType::kBF16), "bf16");
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
}

TEST(HalfTest, AllValuesRoundTripAndMatchOracle) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f = HalfToFloat(bits);
    _Float16 oracle;
    std::memcpy(&oracle, &bits, 2);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(static_cast<float>(oracle))) << std::hex << h;
      const uint16_t back = FloatToHalf(f);
      ASSERT_EQ(back & 0x7c00u, 0x7c00u) << std::hex << h;
      ASSERT_NE(back & 0x3ffu, 0u) << "NaN became inf: " << std::hex << h;
      continue;
    }
    ASSERT_EQ(Bits(f), Bits(static_cast<float>(oracle))) << std::hex << h;
    ASSERT_EQ(FloatToHalf(f), bits) << std::hex << h;
  }
}

TEST(HalfTest, RoundingCases) {
  // Ties go to even; just above a tie rounds up.
  EXPECT_EQ(FloatToHalf(1.f + std::ldexp(1.f, -11)), 0x3c00);  // tie -> 1.0 (even)
  EXPECT_EQ(FloatToHalf(1.f + 3 * std::ldexp(1.f, -11)), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(FloatToHalf(std::nextafter(1.f + std::ldexp(1.f, -11), 2.f)), 0x3c01);
  EXPECT_EQ(FloatToHalf(65504.f), 0x7bff);  // max finite
  EXPECT_EQ(FloatToHalf(65519.f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.f), 0x7c00);  // tie above max rounds to inf
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToHalf(-0.f), 0x8000);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.f, -25)), 0x0000);  // tie -> 0 (even)
  EXPECT_EQ(FloatToHalf(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(FloatToHalf(std::ldexp(3.f, -25)), 0x0002);  // 1.5 ulp tie -> 2 (even)
  EXPECT_EQ(FloatToHalf(std::ldexp(1.f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(FloatToHalf(std::ldexp(1023.5f, -24)), 0x0400);  // subnormal rounds up to normal
  EXPECT_EQ(FloatToHalf(1e-30f), 0x0000);
}

TEST(HalfTest, RandomFloatsMatchOracle) {
  std::mt19937 rng(7);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t u = rng();
    const float f = FromBits(u);
    if (std::isnan(f)) continue;
    const _Float16 o = static_cast<_Float16>(f);
    uint16_t ob;
    std::memcpy(&ob, &o, 2);
    ASSERT_EQ(FloatToHalf(f), ob) << "float bits 0x" << std::hex << u;
  }
}

TEST(BF16Test, AllValuesRoundTrip) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = BF16ToFloat(static_cast<uint16_t>(b));
    ASSERT_EQ(Bits(f), b << 16);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(f)))) << std::hex << b;
    } else {
      ASSERT_EQ(FloatToBF16(f), b) << std::hex << b;
    }
  }
}

TEST(BF16Test, RoundingCases) {
  EXPECT_EQ(FloatToBF16(FromBits(0x3f808000u)), 0x3f80);  // tie -> even (down)
  EXPECT_EQ(FloatToBF16(FromBits(0x3f818000u)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(FloatToBF16(FromBits(0x3f808001u)), 0x3f81);  // above tie
  EXPECT_EQ(FloatToBF16(FromBits(0x3f807fffu)), 0x3f80);  // below tie
  EXPECT_EQ(FloatToBF16(FromBits(0x7f7fffffu)), 0x7f80);  // max float rounds to inf
  EXPECT_EQ(FloatToBF16(-0.f), 0x8000);
  // A NaN whose payload sits only in the low 16 bits must stay NaN.
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(FromBits(0x7f800001u)))));
}

}  // namespace
}  // namespace spear::kernels
