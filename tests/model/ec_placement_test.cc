// spear_bench_decode_cuda's --ec-placement reader (kernels/bench/ec_placement.h)
// on a .spear written by SaveSpearModel: every EC's layer, module and rank,
// the EC %, and clear errors for a missing or broken checkpoint.
#include "ec_placement.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "kernels/ec_factors.h"
#include "tests/engine/tiny_w4_model.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/w4_linear.h"

namespace spear::kernels::bench {
namespace {

TEST(EcPlacement, ReadsEveryEcOfASavedCheckpoint) {
  // ECs gated / static / absent in turn, ranks 2..8 (tests/engine/tiny_w4_model.h).
  auto m = testing::TinyW4Model(/*grouped=*/true, /*tied=*/false);
  int expected[3][kNumMembers] = {};
  int count = 0, i = 0;
  m->weights.ForEachLinear([&](const std::string&, std::unique_ptr<model::Linear>& l) {
    const auto* w = dynamic_cast<const model::W4Linear*>(l.get());
    ASSERT_NE(w, nullptr);
    if (w->has_ec()) {
      expected[i / kNumMembers][i % kNumMembers] = static_cast<int>(w->ec()->rank);
      ++count;
    }
    ++i;
  });
  ASSERT_EQ(i, 3 * kNumMembers);  // ForEachLinear's order: layer by layer, q k v o gate up down
  ASSERT_GT(count, 0);
  const std::string dir = testing::MakeTempDir("ec_placement") + "/m.spear";
  ASSERT_TRUE(model::SaveSpearModel(*m, model::SpearProvenance{}, dir).ok());

  for (const std::string& path : {dir, dir + "/spear.json"}) {
    auto p = ReadEcPlacement(path);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->num_layers, 3);
    EXPECT_EQ(p->num_ecs, count);
    const model::ServedBytes sb = model::ComputeServedBytes(*m);
    EXPECT_NEAR(p->ec_pct, sb.ec_pct(), 1e-9);
    for (int l = 0; l < 3; ++l) {
      for (int j = 0; j < kNumMembers; ++j) EXPECT_EQ(p->ranks[l][j], expected[l][j]) << l << " " << j;
    }
    EXPECT_FALSE(p->int8_factors);  // fp16 factors
  }
  // The same ECs stored as int8 factors: the placement says so.
  m->weights.ForEachLinear([&](const std::string&, std::unique_ptr<model::Linear>& l) {
    auto* w = dynamic_cast<model::W4Linear*>(l.get());
    if (w == nullptr || !w->has_ec()) return;
    kernels::EcWeights e = *w->ec();
    ASSERT_TRUE(kernels::RoundEcFactorsI8(&e).ok());
    auto q = model::W4Linear::Create(w->weight(), std::move(e), w->bias());
    ASSERT_TRUE(q.ok()) << q.status();
    l = *std::move(q);
  });
  const std::string dir8 = testing::MakeTempDir("ec_placement_i8") + "/m.spear";
  ASSERT_TRUE(model::SaveSpearModel(*m, model::SpearProvenance{}, dir8).ok());
  auto p8 = ReadEcPlacement(dir8);
  ASSERT_TRUE(p8.ok()) << p8.status();
  EXPECT_TRUE(p8->int8_factors);
  EXPECT_EQ(p8->num_ecs, count);
}

TEST(EcPlacement, MissingOrBrokenCheckpointsAreClearErrors) {
  const std::string dir = testing::MakeTempDir("ec_placement_bad");
  auto missing = ReadEcPlacement(dir + "/none.spear");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(missing.status().message()).find("EC placement"), std::string::npos);
  std::filesystem::create_directories(dir + "/broken.spear");
  std::ofstream(dir + "/broken.spear/spear.json") << "{\"format\": \"spear\", \"format_version\":";
  EXPECT_EQ(ReadEcPlacement(dir + "/broken.spear").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spear::kernels::bench
