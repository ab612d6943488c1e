// The EC's B as the CUDA decode kernels hold it (kernels/ec_tile_layout.h):
// every value read back through the documented record layout, the segments
// of a block-diagonal (merged) B, the int8 form's bytes, and the errors.
#include "kernels/ec_tile_layout.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/dtype.h"

namespace spear::kernels {
namespace {

std::vector<float> RandomB(std::mt19937* rng, int64_t n, int64_t r) {
  std::normal_distribution<float> nd(0.f, 0.05f);
  std::vector<float> b(static_cast<size_t>(n * r));
  for (float& v : b) v = nd(*rng);
  return b;
}

TEST(EcTileLayout, F16DenseReadsBackEveryValue) {
  std::mt19937 rng(std::random_device{}());
  for (auto [n, r] : {std::pair<int64_t, int64_t>{200, 5}, {64, 1}, {1000, 16}, {130, 24}}) {
    const std::vector<float> b = RandomB(&rng, n, r);
    auto l = BuildEcTileLayoutF16(b.data(), n, r);
    ASSERT_TRUE(l.ok()) << l.status();
    EXPECT_FALSE(l->i8);
    ASSERT_EQ(l->nseg, 1) << "n " << n << " r " << r;
    EXPECT_EQ(l->q0[0], 0);
    EXPECT_EQ(l->npairs[0], (r + 1) / 2);
    EXPECT_EQ(l->max_steps, ((r + 1) / 2 + 3) / 4);
    EXPECT_EQ(l->bytes(), static_cast<size_t>((n + 63) / 64 * ((r + 1) / 2) * 8 * 32));
    for (int64_t c = 0; c < n + 70; ++c) {
      for (int64_t q = 0; q < r + 2; ++q) {
        const float want = c < n && q < r ? HalfToFloat(FloatToHalf(b[c * r + q])) : 0.f;
        ASSERT_EQ(l->Value(c, q), want) << "n " << n << " r " << r << " col " << c << " q " << q;
      }
    }
  }
}

// A merged q/k/v-like B: three modules' columns, each using its own ranks
// (block-diagonal), a module without an EC, and a ragged last tile.
TEST(EcTileLayout, MergedEcStoresEachModulesRanksOnly) {
  std::mt19937 rng(std::random_device{}());
  const int64_t n = 64 * 3 + 64 * 2 + 64 + 40, r = 3 + 4 + 2;
  std::vector<float> b = RandomB(&rng, n, r);
  auto owner = [](int64_t c) { return c < 192 ? 0 : c < 320 ? 1 : c < 384 ? 2 : 3; };
  const int64_t rank0[4] = {0, 3, 7, 9}, rank1[4] = {3, 7, 9, 9};  // module 3: no EC
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t q = 0; q < r; ++q) {
      const int o = owner(c);
      if (q < rank0[o] || q >= rank1[o]) b[c * r + q] = 0.f;
    }
  }
  auto l = BuildEcTileLayoutF16(b.data(), n, r);
  ASSERT_TRUE(l.ok()) << l.status();
  ASSERT_EQ(l->nseg, 4);
  const int tile0[4] = {0, 3, 5, 6}, q0[4] = {0, 2, 6, 0}, npairs[4] = {2, 3, 2, 0};
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(l->tile0[s], tile0[s]) << s;
    EXPECT_EQ(l->q0[s], q0[s]) << s;  // even, at or below the module's first rank
    EXPECT_EQ(l->npairs[s], npairs[s]) << s;
  }
  EXPECT_EQ(l->max_steps, 1);
  EXPECT_EQ(l->nrec(), (3 * 2 + 2 * 3 + 1 * 2) * 8);
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t q = 0; q < r; ++q) {
      ASSERT_EQ(l->Value(c, q), HalfToFloat(FloatToHalf(b[c * r + q]))) << c << " " << q;
    }
  }
  // Five distinct ranges do not fit kEcMaxSegs: one segment of every rank.
  std::vector<float> b5 = RandomB(&rng, 64 * 5, 10);
  for (int64_t c = 0; c < 64 * 5; ++c) {
    for (int64_t q = 0; q < 10; ++q) {
      if (q / 2 != c / 64) b5[c * 10 + q] = 0.f;
    }
  }
  auto l5 = BuildEcTileLayoutF16(b5.data(), 64 * 5, 10);
  ASSERT_TRUE(l5.ok());
  ASSERT_EQ(l5->nseg, 1);
  EXPECT_EQ(l5->npairs[0], 5);
  EXPECT_EQ(l5->max_steps, 2);
  for (int64_t c = 0; c < 64 * 5; ++c) {
    for (int64_t q = 0; q < 10; ++q) ASSERT_EQ(l5->Value(c, q), HalfToFloat(FloatToHalf(b5[c * 10 + q])));
  }
}

TEST(EcTileLayout, Int8HoldsCodesAndTileScales) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> code(-127, 127);
  std::uniform_int_distribution<int> sbits(0x0400, 0x2c00);  // normal fp16 scales, 2^-14 .. 2^-4
  for (auto [n, r] : {std::pair<int64_t, int64_t>{300, 4}, {64, 7}, {4096, 8}}) {
    const int64_t g = (n + 63) / 64;
    std::vector<int8_t> codes(static_cast<size_t>(n * r));
    std::vector<uint16_t> scales(static_cast<size_t>(g * r));
    for (int8_t& c : codes) c = static_cast<int8_t>(code(rng));
    for (uint16_t& s : scales) s = static_cast<uint16_t>(sbits(rng));
    auto l = BuildEcTileLayoutI8(codes.data(), scales.data(), n, r);
    ASSERT_TRUE(l.ok()) << l.status();
    EXPECT_TRUE(l->i8);
    ASSERT_EQ(l->nseg, 1);
    // One byte per (column, rank) of the tiles, ranks rounded up to even,
    // + one fp16 scale per (tile, rank): about the bytes the checkpoint stores.
    EXPECT_EQ(l->bytes(), static_cast<size_t>(g * 64 * ((r + 1) & ~1) + g * ((r + 1) & ~1) * 2));
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t q = 0; q < r; ++q) {
        const float want = static_cast<float>(codes[c * r + q]) * HalfToFloat(scales[(c / 64) * r + q]);
        ASSERT_EQ(l->Value(c, q), want) << "n " << n << " col " << c << " q " << q;
      }
    }
    // The documented record of (tile 0, pair 0, gid 1), subtile p = 2:
    // codes of (33, 0), (33, 1), (41, 0), (41, 1).
    const uint32_t w = l->words[1 * 4 + 2];
    EXPECT_EQ(static_cast<int8_t>(w & 0xff), codes[33 * r + 0]);
    EXPECT_EQ(static_cast<int8_t>((w >> 8) & 0xff), codes[33 * r + 1]);
    EXPECT_EQ(static_cast<int8_t>((w >> 16) & 0xff), codes[41 * r + 0]);
    EXPECT_EQ(static_cast<int8_t>(w >> 24), codes[41 * r + 1]);
  }
}

TEST(EcTileLayout, RejectsBadInput) {
  std::vector<float> b(64 * 4, 0.5f);
  EXPECT_EQ(BuildEcTileLayoutF16(b.data(), 0, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BuildEcTileLayoutF16(b.data(), 64, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BuildEcTileLayoutF16(nullptr, 64, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int8_t> codes(64 * 4, 1);
  std::vector<uint16_t> scales(4, 0x3c00);
  codes[77] = -128;
  auto l = BuildEcTileLayoutI8(codes.data(), scales.data(), 64, 4);
  ASSERT_EQ(l.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(l.status().message().find("-128"), std::string::npos) << l.status();
  EXPECT_EQ(BuildEcTileLayoutI8(codes.data(), nullptr, 64, 4).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spear::kernels
