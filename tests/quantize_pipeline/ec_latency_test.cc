// The measured EC latency table (worker/quantize/pipeline/ec_latency.h):
// parsing, lookups, and every malformed-input error naming file and line.
#include "worker/quantize/pipeline/ec_latency.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace spear::quantize {
namespace {

constexpr char kGood[] =
    "# spear EC latency table v1: NVIDIA H200, 132 SMs\r\n"
    "n,k,m,rank,w4_us,ec_us\r\n"
    "576,576,1,4,2.979,7.815\n"
    "\n"
    "576,1536,1,4, 4.011 ,7.798\n"
    "192,576,1,4,3.0,2.5\n"
    "576,576,8,4,3.248,8.233\n";

TEST(EcLatencyTable, ParsesRowsCommentsAndCrlf) {
  auto t = ParseEcLatencyTable(kGood, "t.csv");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->rows.size(), 4u);
  ASSERT_EQ(t->comments.size(), 1u);
  EXPECT_EQ(t->comments[0], "spear EC latency table v1: NVIDIA H200, 132 SMs");
  EXPECT_EQ(t->group, 0);  // no comment names a group
  EXPECT_EQ(t->rows[1].k, 1536);
  EXPECT_DOUBLE_EQ(t->rows[1].w4_us, 4.011);
  // (7.815 - 2.979) / 2.979, by hand: 1.62336...
  auto r = t->Relative(576, 576, 1, 4);
  ASSERT_TRUE(r.ok());
  EXPECT_NEAR(*r, 4.836 / 2.979, 1e-12);
  // m selects the row.
  EXPECT_NEAR(*t->Relative(576, 576, 8, 4), (8.233 - 3.248) / 3.248, 1e-12);
  // A faster EC is noise: clamped at 0.
  EXPECT_EQ(*t->Relative(192, 576, 1, 4), 0.0);
}

TEST(EcLatencyTable, ReadsTheGroupFromTheBenchComment) {
  const std::string h = "n,k,m,rank,w4_us,ec_us\n1,2,3,4,5,6\n";
  auto pc = ParseEcLatencyTable("# spear EC latency table v1: X; W4 group -1 asymmetric\n" + h, "t");
  ASSERT_TRUE(pc.ok()) << pc.status();
  EXPECT_EQ(pc->group, -1);
  auto g128 = ParseEcLatencyTable("# W4 group 128, gated\n" + h, "t");
  ASSERT_TRUE(g128.ok());
  EXPECT_EQ(g128->group, 128);
  auto bad = ParseEcLatencyTable("# W4 group x\n" + h, "t.csv");
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status()));
  EXPECT_NE(bad.status().message().find("t.csv:1: unreadable W4 group"), std::string::npos);
}

TEST(EcLatencyTable, MissingRowIsNotFoundWithTheCommandToMeasureIt) {
  auto t = ParseEcLatencyTable(kGood, "t.csv");
  ASSERT_TRUE(t.ok());
  auto r = t->Relative(576, 576, 1, 8);
  ASSERT_TRUE(absl::IsNotFound(r.status()));
  EXPECT_NE(r.status().message().find("no row for n=576 k=576 m=1 rank=8"), std::string::npos);
  EXPECT_NE(r.status().message().find("--ec-latency=576x576 --ec-ranks=8"), std::string::npos);
}

TEST(EcLatencyTable, MalformedInputNamesFileAndLine) {
  const std::string h = "n,k,m,rank,w4_us,ec_us\n";
  struct Bad {
    std::string text, want;
  };
  const Bad bad[] = {
      {"", "no header line"},
      {"# only a comment\n", "no header line"},
      {"n,k,m,rank\n1,2,3,4\n", "t.csv:1: expected the header"},
      {h, "no rows"},
      {h + "1,2,3,4,5\n", "t.csv:2: expected 6 fields, got 5"},
      {h + "1,2,3,4,5,6,7\n", "expected 6 fields, got 7"},
      {h + "1,2,x,4,5,6\n", "t.csv:2: n, k, m and rank must be positive integers"},
      {h + "1,2,3,0,5,6\n", "positive integers"},
      {h + "1.5,2,3,4,5,6\n", "positive integers"},
      {h + "1,2,3,4,-5,6\n", "w4_us and ec_us must be positive finite"},
      {h + "1,2,3,4,5,nan\n", "positive finite"},
      {h + "1,2,3,4,5,inf\n", "positive finite"},
      {h + "1,2,3,4,5,\n", "positive finite"},
      {h + "1,2,3,4,5,6\n# c\n1,2,3,4,7,8\n", "t.csv:4: repeated row n=1 k=2 m=3 rank=4"},
  };
  for (const Bad& b : bad) {
    auto t = ParseEcLatencyTable(b.text, "t.csv");
    ASSERT_FALSE(t.ok()) << b.text;
    EXPECT_TRUE(absl::IsInvalidArgument(t.status())) << t.status();
    EXPECT_NE(t.status().message().find(b.want), std::string::npos)
        << "got: " << t.status().message() << "\nwant: " << b.want;
  }
}

TEST(EcLatencyTable, ReadsAFileAndRefusesAMissingOne) {
  const std::string path =
      (std::filesystem::temp_directory_path() / "spear_ec_latency_test.csv").string();
  {
    std::ofstream out(path, std::ios::binary);
    out << kGood;
  }
  auto t = ReadEcLatencyTable(path);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->rows.size(), 4u);
  EXPECT_EQ(t->source, path);
  std::remove(path.c_str());
  auto missing = ReadEcLatencyTable(path);
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
  EXPECT_NE(missing.status().message().find("cannot read EC latency table"), std::string::npos);
}

}  // namespace
}  // namespace spear::quantize
