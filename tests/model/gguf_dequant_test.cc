// Dequantization of hand-made blocks against values computed by hand from
// the ggml block layouts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "worker/model/gguf.h"

namespace spear::model {
namespace {

TensorInfo Info(TensorType type, std::vector<int64_t> shape, const std::vector<uint8_t>& bytes) {
  TensorInfo t;
  t.name = "t";
  t.type = type;
  t.shape = std::move(shape);
  t.data = bytes.data();
  t.nbytes = bytes.size();
  return t;
}

void Put16(std::vector<uint8_t>* b, uint16_t v) {
  b->push_back(v & 0xFF);
  b->push_back(v >> 8);
}

TEST(DequantTest, Q4_0) {
  // d = 0.5 (fp16 0x3800); byte j holds element j (low nibble j) and
  // element j+16 (high nibble 15-j). x = d * (q - 8).
  std::vector<uint8_t> b;
  Put16(&b, 0x3800);
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  std::vector<float> out(32, -99.f);
  ASSERT_TRUE(Dequantize(Info(TensorType::kQ4_0, {32}, b), out.data()).ok());
  EXPECT_EQ(out[0], -4.0f);   // 0.5 * (0 - 8)
  EXPECT_EQ(out[8], 0.0f);    // 0.5 * (8 - 8)
  EXPECT_EQ(out[15], 3.5f);   // 0.5 * (15 - 8)
  EXPECT_EQ(out[16], 3.5f);   // high nibble 15
  EXPECT_EQ(out[31], -4.0f);  // high nibble 0
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.5f * (j - 8)) << j;
    EXPECT_EQ(out[j + 16], 0.5f * (7 - j)) << j;
  }
}

TEST(DequantTest, Q4_1) {
  // d = 0.25 (0x3400), m = -1 (0xBC00); x = d * q + m.
  std::vector<uint8_t> b;
  Put16(&b, 0x3400);
  Put16(&b, 0xBC00);
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  std::vector<float> out(32);
  ASSERT_TRUE(Dequantize(Info(TensorType::kQ4_1, {1, 32}, b), out.data()).ok());
  EXPECT_EQ(out[0], -1.0f);
  EXPECT_EQ(out[1], -0.75f);
  EXPECT_EQ(out[15], 2.75f);
  EXPECT_EQ(out[16], 2.75f);
  EXPECT_EQ(out[31], -1.0f);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.25f * j - 1.0f);
    EXPECT_EQ(out[j + 16], 0.25f * (15 - j) - 1.0f);
  }
}

TEST(DequantTest, Q8_0TwoBlocks) {
  std::vector<uint8_t> b;
  Put16(&b, 0x4000);  // d = 2
  for (int j = 0; j < 32; ++j) b.push_back(static_cast<uint8_t>(static_cast<int8_t>(j - 16)));
  Put16(&b, 0xB000);  // d = -0.125
  b.push_back(127);
  b.push_back(0x80);  // -128
  for (int j = 2; j < 32; ++j) b.push_back(0);
  std::vector<float> out(64);
  ASSERT_TRUE(Dequantize(Info(TensorType::kQ8_0, {2, 32}, b), out.data()).ok());
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 2.0f * (j - 16));
  EXPECT_EQ(out[32], -15.875f);
  EXPECT_EQ(out[33], 16.0f);
  EXPECT_EQ(out[34], 0.0f);  // -0.125 * 0 is -0.0, equal to 0
}

TEST(DequantTest, Q5_0AndQ5_1HighBits) {
  // Q5_0: d = 1, qh has bit 0 and bit 16 set: element 0 -> (0|16)-16 = 0,
  // element 16 -> (15|16)-16 = 15 (nibble 15 in the high half of byte 0).
  std::vector<uint8_t> b;
  Put16(&b, 0x3C00);
  const uint32_t qh = 1u | (1u << 16);
  for (int i = 0; i < 4; ++i) b.push_back((qh >> (8 * i)) & 0xFF);
  b.push_back(0xF0);
  for (int j = 1; j < 16; ++j) b.push_back(0x11);
  std::vector<float> out(32);
  ASSERT_TRUE(Dequantize(Info(TensorType::kQ5_0, {32}, b), out.data()).ok());
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[16], 15.0f);
  EXPECT_EQ(out[1], -15.0f);  // 1 - 16
  EXPECT_EQ(out[17], -15.0f);

  std::vector<uint8_t> c;
  Put16(&c, 0x3800);  // d = 0.5
  Put16(&c, 0x3C00);  // m = 1
  for (int i = 0; i < 4; ++i) c.push_back((qh >> (8 * i)) & 0xFF);
  c.insert(c.end(), b.begin() + 6, b.end());
  ASSERT_TRUE(Dequantize(Info(TensorType::kQ5_1, {32}, c), out.data()).ok());
  EXPECT_EQ(out[0], 0.5f * 16 + 1);
  EXPECT_EQ(out[16], 0.5f * 31 + 1);
  EXPECT_EQ(out[1], 0.5f * 1 + 1);
}

TEST(DequantTest, F16AndBF16) {
  std::vector<uint8_t> b;
  for (uint16_t h : {0x3C00, 0x0001, 0x7BFF, 0xFC00, 0x8000, 0x03FF, 0xC500}) Put16(&b, h);
  std::vector<float> out(7);
  ASSERT_TRUE(Dequantize(Info(TensorType::kF16, {7}, b), out.data()).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(out[4]) && out[4] == 0.0f);
  EXPECT_EQ(out[5], std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(out[6], -5.0f);

  std::vector<uint8_t> bf;
  Put16(&bf, 0x3F80);
  Put16(&bf, 0xC040);
  ASSERT_TRUE(Dequantize(Info(TensorType::kBF16, {2}, bf), out.data()).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -3.0f);
}

TEST(DequantTest, Q6_KAndQ4_KSmoke) {
  // Q6_K with d = 1, all scales 1, every 6-bit quant 32 -> all zeros; then
  // ql nibble 1 for element 0 -> 1 - 32 + 32 = 1.
  std::vector<uint8_t> q6(210, 0);
  for (int i = 0; i < 128; ++i) q6[i] = 0;
  for (int i = 0; i < 64; ++i) q6[128 + i] = 0xAA;  // high 2 bits = 2 -> +32
  for (int i = 0; i < 16; ++i) q6[192 + i] = 1;
  q6[208] = 0x00;
  q6[209] = 0x3C;  // d = 1
  q6[0] = 0x01;
  std::vector<float> out(256);
  ASSERT_TRUE(Dequantize(Info(TensorType::kQ6_K, {256}, q6), out.data()).ok());
  EXPECT_EQ(out[0], 1.0f);
  for (int i = 1; i < 256; ++i) EXPECT_EQ(out[i], 0.0f) << i;

  // Q4_K with d = 1, dmin = 1, sub-block 0 scale 2 min 1, quants 3 -> 2*3-1.
  std::vector<uint8_t> q4(144, 0);
  q4[1] = 0x3C;
  q4[3] = 0x3C;
  q4[4] = 2;      // scale of sub-block 0
  q4[4 + 4] = 1;  // min of sub-block 0
  for (int i = 0; i < 128; ++i) q4[16 + i] = 0x33;
  ASSERT_TRUE(Dequantize(Info(TensorType::kQ4_K, {256}, q4), out.data()).ok());
  EXPECT_EQ(out[0], 5.0f);
  EXPECT_EQ(out[31], 5.0f);
  EXPECT_EQ(out[32], 0.0f);  // sub-block 1: scale 0, min 0
}

TEST(DequantTest, RejectsInconsistentInfos) {
  std::vector<uint8_t> b(34, 0);
  std::vector<float> out(64);
  EXPECT_FALSE(Dequantize(Info(TensorType::kQ8_0, {64}, b), out.data()).ok());  // too few bytes
  EXPECT_FALSE(Dequantize(Info(TensorType::kQ8_0, {16}, b), out.data()).ok());  // partial block
  EXPECT_FALSE(Dequantize(Info(TensorType::kQ8_0, {-32}, b), out.data()).ok());
  EXPECT_FALSE(
      Dequantize(Info(TensorType::kQ8_0, {int64_t{1} << 40, int64_t{1} << 40}, b), out.data())
          .ok());
  EXPECT_FALSE(Dequantize(Info(TensorType::kI32, {8}, std::vector<uint8_t>(32)), out.data()).ok());
  EXPECT_FALSE(CanDequantize(TensorType::kQ3_K));
  for (TensorType t : {TensorType::kF32, TensorType::kF16, TensorType::kBF16, TensorType::kQ8_0,
                       TensorType::kQ4_0, TensorType::kQ4_1, TensorType::kQ5_0, TensorType::kQ5_1,
                       TensorType::kQ4_K, TensorType::kQ5_K, TensorType::kQ6_K}) {
    EXPECT_TRUE(CanDequantize(t)) << TensorTypeName(t);
  }
}

}  // namespace
}  // namespace spear::model
