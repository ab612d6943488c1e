#include "worker/quantize/w4_quant.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <ostream>
#include <random>
#include <string>

#include "kernels/dtype.h"
#include "tests/quantize/test_helpers.h"

namespace spear::quantize {
namespace {

using testing::RandomNormal;

TEST(W4Pack, RoundTripCodesAndParams) {
  const W4Format fmt{5, 33, 33, false};  // odd k: the last byte holds one code
  std::mt19937 rng(7);
  std::vector<uint8_t> codes(static_cast<size_t>(fmt.n * fmt.k));
  for (auto& c : codes) c = static_cast<uint8_t>(rng() % 16);
  std::vector<GroupParams> params;
  for (int i = 0; i < fmt.n; ++i) params.push_back({0.125f * (i + 1), static_cast<uint8_t>(i + 3)});
  auto w = PackW4(fmt, codes, params);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->packed.size(), static_cast<size_t>(fmt.n * 17));
  EXPECT_EQ(UnpackCodes(*w), codes);
  std::vector<float> out(codes.size(), std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE(DequantizeW4(*w, out.data()).ok());
  for (int64_t i = 0; i < fmt.n; ++i) {
    for (int64_t j = 0; j < fmt.k; ++j) {
      const float expect = params[i].scale * (codes[i * fmt.k + j] - float(params[i].zero));
      EXPECT_EQ(out[i * fmt.k + j], expect);
      EXPECT_EQ(w->Dequant(i, j), expect);
    }
  }
}

struct FormatCase {
  int64_t k, group;
  bool symmetric;
};

// How gtest (and ctest's test names, gtest_discover_tests printing the
// value) show a case: without it, the struct's bytes, padding included.
void PrintTo(const FormatCase& c, std::ostream* os) {
  *os << "k=" << c.k << " group=" << c.group << (c.symmetric ? " symmetric" : " asymmetric");
}

class RtnBound : public ::testing::TestWithParam<FormatCase> {};

TEST_P(RtnBound, ErrorWithinHalfScale) {
  const FormatCase c = GetParam();
  const int64_t n = 9;
  Matrix w = RandomNormal(n, c.k, 100 + c.k + c.group, 0.05f);
  w.at(0, 1) = 0.7f;   // an outlier
  for (int64_t j = 0; j < c.k; ++j) w.at(1, j) = std::fabs(w.at(1, j)) + 0.01f;  // all positive
  for (int64_t j = 0; j < c.k; ++j) w.at(2, j) = -std::fabs(w.at(2, j)) - 0.01f;  // all negative
  for (int64_t j = 0; j < c.k; ++j) w.at(3, j) = 0.0f;                            // all zero
  const W4Format fmt{n, c.k, c.group, c.symmetric};
  auto q = QuantizeRtn(w.view(), fmt);
  ASSERT_TRUE(q.ok()) << q.status();
  std::vector<float> deq(static_cast<size_t>(n * c.k));
  ASSERT_TRUE(DequantizeW4(*q, deq.data()).ok());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < c.k; ++j) {
      const int64_t g = i * fmt.num_groups() + j / c.group;
      const float scale = kernels::HalfToFloat(q->scales[g]);
      if (c.symmetric) {
        EXPECT_EQ(q->zeros[g], 8);
      }
      EXPECT_LE(std::fabs(w.at(i, j) - deq[i * c.k + j]), 0.5f * scale * (1.0f + 1e-6f) + 1e-7f)
          << "i=" << i << " j=" << j;
    }
  }
  for (int64_t j = 0; j < c.k; ++j) EXPECT_EQ(deq[3 * c.k + j], 0.0f);
  if (!c.symmetric) {  // all-positive: zero point 0
    EXPECT_EQ(q->zeros[1 * fmt.num_groups()], 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Formats, RtnBound,
    ::testing::Values(FormatCase{384, 384, false}, FormatCase{384, 384, true},
                      FormatCase{384, 32, false}, FormatCase{384, 32, true},
                      FormatCase{384, 64, false}, FormatCase{384, 128, true},
                      FormatCase{384, 128, false}, FormatCase{33, 33, false},
                      FormatCase{33, 33, true}, FormatCase{160, 32, false},
                      FormatCase{96, 96, true}, FormatCase{2, 1, false},
                      // ragged last group: 576 = 4 x 128 + 64; 100 = 3 x 32 + 4; 77 = 3 x 20 + 17
                      FormatCase{576, 128, false}, FormatCase{576, 128, true},
                      FormatCase{100, 32, false}, FormatCase{77, 20, true}),
    // Named by the case's fields (gtest's default is the case's index).
    [](const ::testing::TestParamInfo<FormatCase>& info) {
      return "k" + std::to_string(info.param.k) + "_g" + std::to_string(info.param.group) +
             (info.param.symmetric ? "_sym" : "_asym");
    });

TEST(Rtn, ClipRatioShrinksRangeAndClamps) {
  const W4Format fmt{1, 16, 16, false};
  Matrix w(1, 16);
  for (int j = 0; j < 16; ++j) w.at(0, j) = -1.0f + 2.0f * j / 15.0f;
  auto full = QuantizeRtn(w.view(), fmt);
  auto half = QuantizeRtn(w.view(), fmt, {0.5f});
  ASSERT_TRUE(full.ok() && half.ok());
  EXPECT_NEAR(kernels::HalfToFloat(half->scales[0]), 0.5f * kernels::HalfToFloat(full->scales[0]), 1e-3);
  EXPECT_EQ(half->Code(0, 0), 0);  // clamped
  EXPECT_EQ(half->Code(0, 15), 15);
}

TEST(Rtn, ValidationErrors) {
  const Matrix w = RandomNormal(4, 64, 1);
  auto ragged = QuantizeRtn(w.view(), {4, 64, 48, false});  // groups of 48 and 16
  ASSERT_TRUE(ragged.ok()) << ragged.status();
  EXPECT_EQ(ragged->scales.size(), 4u * 2u);
  EXPECT_EQ(QuantizeRtn(w.view(), {4, 64, 0, false}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeRtn(w.view(), {4, 64, 128, false}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeRtn(w.view(), {5, 64, 64, false}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(QuantizeRtn(w.view(), {4, 64, 32, false}, {1.0f}).ok());
  Matrix bad = w;
  bad.at(1, 2) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(QuantizeRtn(bad.view(), {4, 64, 64, false}).ok());
  bad.at(1, 2) = 1e6f;  // scale 1e6 / 15 overflows fp16
  EXPECT_FALSE(QuantizeRtn(bad.view(), {4, 64, 64, false}).ok());
  EXPECT_FALSE(PackW4({4, 64, 64, false}, std::vector<uint8_t>(10), {}).ok());
  auto q = QuantizeRtn(w.view(), {4, 64, 64, false});
  ASSERT_TRUE(q.ok());
  W4Weight corrupt = *q;
  corrupt.scales.pop_back();
  std::vector<float> out(4 * 64);
  EXPECT_FALSE(DequantizeW4(corrupt, out.data()).ok());
  corrupt = *q;
  corrupt.act_scale.assign(3, 1.0f);
  EXPECT_FALSE(DequantizeW4(corrupt, out.data()).ok());
}

TEST(Rtn, ActScaleFoldedOnlyByEffective) {
  const Matrix w = RandomNormal(3, 8, 2);
  auto q = QuantizeRtn(w.view(), {3, 8, 8, true});
  ASSERT_TRUE(q.ok());
  q->act_scale = {1, 2, 4, 0.5f, 1, 1, 1, 8};
  std::vector<float> plain(24);
  ASSERT_TRUE(DequantizeW4(*q, plain.data()).ok());
  auto eff = DequantizeW4Effective(*q);
  ASSERT_TRUE(eff.ok());
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 8; ++j) EXPECT_FLOAT_EQ(eff->at(i, j), plain[i * 8 + j] / q->act_scale[j]);
  }
  auto e = QuantizationError(w.view(), *q);
  ASSERT_TRUE(e.ok());
  EXPECT_FLOAT_EQ(e->at(2, 3), w.at(2, 3) - eff->at(2, 3));
}

}  // namespace
}  // namespace spear::quantize
