// EcControl on a tiny LLaMA whose linears are W4 with random gated ECs:
// the per-iteration mask really switches ECs (logits change, gate
// statistics only from enabled units), densities, shed order from the
// .spear manifest's diagnostic, and the engine loop's EC policies
// (NO_EC alone runs plain W4 == Engine::Generate with ECs off; FULL_EC
// reports density 1).
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/ec_control.h"
#include "worker/engine/engine_loop.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/w4_linear.h"

namespace spear::engine {
namespace {

constexpr int kRank = 4;

std::unique_ptr<model::W4Linear> RandomW4Ec(int64_t n, int64_t k, std::mt19937* rng) {
  std::uniform_int_distribution<int> code(0, 15);
  std::normal_distribution<float> nd(0.f, 1.f);
  kernels::W4Weight w;
  w.fmt.n = n;
  w.fmt.k = k;
  w.fmt.group_size = k;
  w.fmt.symmetric = true;
  w.packed.resize(n * w.fmt.packed_row_bytes());
  for (auto& b : w.packed) b = static_cast<uint8_t>(code(*rng) | (code(*rng) << 4));
  w.scales.assign(n, kernels::FloatToHalf(0.05f));
  w.zeros.assign(n, 8);
  kernels::EcWeights ec;
  ec.n = n;
  ec.k = k;
  ec.rank = kRank;
  ec.gated = true;
  ec.gate_hidden = 4;
  auto fill = [&](std::vector<float>* v, size_t size, float s) {
    v->resize(size);
    for (auto& x : *v) x = kernels::HalfToFloat(kernels::FloatToHalf(s * nd(*rng)));
  };
  fill(&ec.a, kRank * k, 0.2f);
  fill(&ec.b, n * kRank, 0.2f);
  fill(&ec.w1, 4 * kRank, 0.5f);
  fill(&ec.b1, 4, 0.1f);
  fill(&ec.w2, kRank * 4, 0.5f);
  fill(&ec.b2, kRank, 0.1f);
  return std::move(*model::W4Linear::Create(std::move(w), std::move(ec)));
}

std::unique_ptr<model::LoadedModel> EcModel() {
  const std::string dir = testing::MakeTempDir("ec_model");
  testing::TinyModelSpec spec;
  EXPECT_TRUE(testing::WriteTinyModel(dir, spec).ok());
  auto m = std::move(*model::LoadModel(dir));
  std::mt19937 rng(7);
  m->weights.ForEachLinear([&](const std::string&, std::unique_ptr<model::Linear>& l) {
    l = RandomW4Ec(l->out_features(), l->in_features(), &rng);
  });
  return m;
}

std::vector<float> Logits(Engine* e, const std::vector<int32_t>& prompt) {
  Sequence seq(1000, prompt, SamplingParams(), GenerateOptions());
  EXPECT_TRUE(e->backend().allocator().Allocate(e->backend().BlocksFor(prompt.size()),
                                                 &seq.block_table()).ok());
  SeqChunk ch;
  ch.tokens = seq.tokens();
  ch.block_table = seq.block_table();
  ch.logits = LogitsMode::kLast;
  ForwardOutput out;
  EXPECT_TRUE(e->backend().Forward({ch}, &out).ok());
  e->Release(&seq);
  return std::vector<float>(out.row(0), out.row(0) + out.vocab);
}

std::unique_ptr<Engine> MakeEngine(model::LoadedModel* m) {
  EngineOptions o;
  o.num_threads = 2;
  o.kv_cache.block_size = 8;
  o.kv_cache.num_blocks = 64;
  return std::move(*Engine::Create(m, o));
}

TEST(EcControlTest, MaskSwitchesEcsAndGateStats) {
  auto m = EcModel();
  auto ec = EcControl::Create(m.get());
  ASSERT_TRUE(ec.ok()) << ec.status();
  EcControl& c = **ec;
  ASSERT_EQ(c.num_units(), 14);  // 2 layers x 7 modules
  EXPECT_EQ(c.value_source(), "ec size");
  double total = 0;
  for (const EcUnit& u : c.units()) total += u.share;
  EXPECT_NEAR(total, 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(c.Density({}), 1.0);
  std::vector<bool> one(14, false);
  one[3] = true;
  EXPECT_DOUBLE_EQ(c.Density(one), c.units()[3].share);
  // Shed order: smallest EC first (k + n smallest: k/v projections).
  EXPECT_LE(c.units()[c.shed_order().front()].value, c.units()[c.shed_order().back()].value);

  auto e = MakeEngine(m.get());
  const std::vector<int32_t> prompt = {5, 9, 17, 33, 2};
  c.EnableAll();
  c.ResetGateStats();
  const auto full = Logits(e.get(), prompt);
  GateStats g = c.gate_stats();
  EXPECT_EQ(g.count, 5 * kRank * 14);
  EXPECT_GT(g.mean, 0);
  EXPECT_LT(g.mean, 2);
  EXPECT_GT(g.stddev, 0);

  c.DisableAll();
  c.ResetGateStats();
  const auto none = Logits(e.get(), prompt);
  EXPECT_EQ(c.gate_stats().count, 0);
  EXPECT_NE(full, none);

  c.Apply(one);
  c.ResetGateStats();
  const auto partial = Logits(e.get(), prompt);
  EXPECT_EQ(c.gate_stats().count, 5 * kRank);
  EXPECT_NE(partial, full);
  EXPECT_NE(partial, none);

  c.Apply(std::vector<bool>(14, true));
  EXPECT_EQ(Logits(e.get(), prompt), full);
}

TEST(EcControlTest, ShedOrderFromTheManifestDiagnostic) {
  auto m = EcModel();
  // Damage grows with the module index, except module 5 which is worth most.
  std::string mods;
  int i = 0;
  m->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<model::Linear>&) {
    const double damage = i == 5 ? 1.0 : 0.01 * (i + 1);
    absl::StrAppend(&mods, mods.empty() ? "" : ",", "{\"name\":\"", name, "\",\"damage\":", damage,
                    ",\"err_w4\":1.0,\"err_final\":0.5}");
    ++i;
  });
  model::SpearProvenance prov;
  prov.source_path = "";
  prov.diagnostic_json = absl::StrCat("{\"modules\":[", mods, "]}");
  const std::string dir = testing::MakeTempDir("ec_spear") + "/m.spear";
  ASSERT_TRUE(model::SaveSpearModel(*m, prov, dir).ok());
  auto loaded = model::LoadModel(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto ec = EcControl::Create(loaded->get());
  ASSERT_TRUE(ec.ok());
  EXPECT_EQ((*ec)->value_source(), "manifest diagnostic");
  const auto& order = (*ec)->shed_order();
  EXPECT_EQ(order.front(), 0);  // least damage: shed first
  EXPECT_EQ(order.back(), 5);   // most damage: kept longest
  EXPECT_NEAR((*ec)->units()[5].value, 0.5, 1e-12);  // damage x (1 - 0.5 / 1)
}

class Sink final : public RequestSink {
 public:
  void OnAccepted(double, int64_t) override {}
  void OnTokens(const std::vector<int32_t>& ids, double d) override {
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    density.push_back(d);
  }
  void OnFinished(const FinishInfo& f) override {
    info = f;
    done.Notify();
  }
  std::vector<int32_t> tokens;
  std::vector<double> density;
  FinishInfo info;
  absl::Notification done;
};

TEST(EcControlTest, LoopPoliciesNoEcAndFullEc) {
  auto m = EcModel();
  auto ec = std::move(*EcControl::Create(m.get()));
  const std::vector<int32_t> prompt = {4, 8, 15, 16, 23, 42};
  GenerateOptions go;
  go.max_new_tokens = 10;
  go.stop_on_eos = false;
  // References on a separate engine: ECs off, then on.
  auto ref = MakeEngine(m.get());
  ec->DisableAll();
  auto want_plain = ref->Generate(prompt, SamplingParams(), go);
  ec->EnableAll();
  auto want_full = ref->Generate(prompt, SamplingParams(), go);
  ASSERT_TRUE(want_plain.ok() && want_full.ok());

  auto e = MakeEngine(m.get());
  SteadyClock clock;
  EngineLoopOptions lo;
  lo.profile.max_tokens = 32;
  auto loop = std::move(*EngineLoop::Create(e.get(), ec.get(), lo, &clock, nullptr));
  const auto table = loop->latency_points();
  EXPECT_GE(table.seconds_full_ec.back(), table.seconds_no_ec.back());
  loop->Start();
  for (QualityPolicy q : {QualityPolicy::kNoEc, QualityPolicy::kFullEc}) {
    auto sink = std::make_shared<Sink>();
    ExecuteSpec s;
    s.prompt = prompt;
    s.options = go;
    s.spec.quality = q;
    ASSERT_TRUE(loop->Submit(s, sink).ok());
    ASSERT_TRUE(sink->done.WaitForNotificationWithTimeout(absl::Seconds(30)));
    ASSERT_TRUE(sink->info.status.ok());
    if (q == QualityPolicy::kNoEc) {
      EXPECT_EQ(sink->tokens, want_plain->tokens);
      EXPECT_DOUBLE_EQ(sink->info.ec_density, 0.0);
    } else {
      EXPECT_EQ(sink->tokens, want_full->tokens);
      EXPECT_DOUBLE_EQ(sink->info.ec_density, 1.0);
    }
  }
  loop->Stop();
}

}  // namespace
}  // namespace spear::engine
