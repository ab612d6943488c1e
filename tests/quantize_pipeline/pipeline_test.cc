// QuantizeModel end to end on a tiny random LLaMA (hidden 64, 2 layers):
// RTN replaces every linear; SPEAR beats W4 and static on held-out final
// hidden states; the diagnostic ranks an injected bad module first; the EC
// budget holds; the sequential target is W x_fp - Q x_q.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/ec_factors.h"
#include "tests/engine/tiny_model.h"
#include "worker/model/linear.h"
#include "worker/model/w4_linear.h"
#include "worker/model/weights.h"
#include "worker/quantize/cka.h"
#include "worker/quantize/pipeline/calibration.h"
#include "worker/quantize/pipeline/diagnostic.h"
#include "worker/quantize/pipeline/distill.h"
#include "worker/quantize/pipeline/layerwise.h"
#include "worker/quantize/pipeline/module_quant.h"
#include "worker/quantize/pipeline/quantize_model.h"
#include "worker/quantize/w4_quant.h"

namespace spear::quantize {
namespace {

class PipelineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(spear::testing::MakeTempDir("pipeline"));
    spear::testing::TinyModelSpec spec;  // hidden 64, 2 layers, vocab 128
    spec.seed = 3;
    ASSERT_TRUE(spear::testing::WriteTinyModel(*dir_, spec).ok());
  }
  std::unique_ptr<model::LoadedModel> Load() {
    auto m = model::LoadModel(*dir_);
    EXPECT_TRUE(m.ok()) << m.status();
    return std::move(*m);
  }
  static QuantizeOptions Opts() {
    QuantizeOptions o;
    o.group_size = -1;  // per-channel: a real gap on this model
    o.calib.num_sequences = 20;
    o.calib.seq_len = 64;
    o.calib.seed = 11;
    o.diagnostic_tokens = 512;
    o.train_steps = 300;
    return o;
  }
  // Final-normed hidden states of held-out self-generated sequences.
  std::vector<float> Hidden(model::LoadedModel* m) {
    CalibrationOptions c;
    c.num_sequences = 6;
    c.seq_len = 64;
    c.seed = 999;  // not the calibration seed
    auto seqs = MakeCalibrationSequences(*fp_, c, 2);
    EXPECT_TRUE(seqs.ok());
    auto run = LayerwiseRunner::Create(m, &pool_, *seqs);
    EXPECT_TRUE(run.ok());
    std::vector<float> h((*run)->num_tokens() * 64);
    EXPECT_TRUE((*run)->Embed(h.data()).ok());
    EXPECT_TRUE((*run)->RunLayers(0, m->config.num_layers, h.data()).ok());
    EXPECT_TRUE((*run)->FinalNorm(h.data(), h.data()).ok());
    return h;
  }
  static double Mse(const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    return s / static_cast<double>(a.size());
  }
  void SetUp() override { fp_ = Load(); }

  static std::string* dir_;
  kernels::ThreadPool pool_{2};
  std::unique_ptr<model::LoadedModel> fp_;
};
std::string* PipelineTest::dir_ = nullptr;

TEST_F(PipelineTest, RtnReplacesEveryLinearAndRuns) {
  auto m = Load();
  QuantizeOptions o = Opts();
  o.ec = EcMode::kNone;
  auto rep = QuantizeModel(m.get(), o, &pool_);
  ASSERT_TRUE(rep.ok()) << rep.status();
  int n = 0;
  m->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<model::Linear>& l) {
    const auto* w4 = dynamic_cast<const model::W4Linear*>(l.get());
    ASSERT_NE(w4, nullptr) << name;
    EXPECT_FALSE(w4->has_ec());
    EXPECT_EQ(w4->weight().fmt.group_size, w4->weight().fmt.k);
    ++n;
  });
  EXPECT_EQ(n, 14);
  EXPECT_EQ(rep->modules.size(), 14u);
  EXPECT_EQ(rep->ec_bytes, 0);
  EXPECT_EQ(rep->w4_model_bytes, ServedModelBytes(*m));
  const auto h_fp = Hidden(fp_.get()), h_q = Hidden(m.get());
  for (float v : h_q) ASSERT_TRUE(std::isfinite(v));
  const double err = Mse(h_fp, h_q);
  EXPECT_GT(err, 1e-6);  // W4 changes something
  EXPECT_LT(err, 0.5);   // but it is still the same model (hidden states are O(1))
  // A second quantization of a quantized model is refused.
  EXPECT_FALSE(QuantizeModel(m.get(), o, &pool_).ok());
}

// The sequential pass scores modules on a prefix of the held-out sequences
// (sequential_holdout_max_tokens): the fits (W4 codes, EC factors) come
// from the fit tokens alone and do not change; the scores do.
TEST_F(PipelineTest, SequentialHoldoutCapScoresOnAPrefixOnly) {
  auto run = [&](int64_t cap, std::vector<float>* factors) {
    auto m = Load();
    QuantizeOptions o = Opts();  // 20 sequences of 64: 2 held out
    o.ec = EcMode::kStatic;
    o.ec_budget_pct = 25;
    o.sequential_holdout_max_tokens = cap;
    auto rep = QuantizeModel(m.get(), o, &pool_);
    EXPECT_TRUE(rep.ok()) << rep.status();
    m->weights.ForEachLinear([&](const std::string&, std::unique_ptr<model::Linear>& l) {
      const auto* w4 = dynamic_cast<const model::W4Linear*>(l.get());
      ASSERT_NE(w4, nullptr);
      for (uint8_t c : w4->weight().packed) factors->push_back(c);
      if (w4->has_ec()) {
        const auto& ec = *w4->ec();
        factors->insert(factors->end(), ec.a.begin(), ec.a.end());
        factors->insert(factors->end(), ec.b.begin(), ec.b.end());
      }
    });
    std::vector<double> errs;
    for (const auto& mr : rep->modules) errs.push_back(mr.err_w4);
    return errs;
  };
  std::vector<float> f_all, f_one;
  const auto e_all = run(0, &f_all), e_one = run(64, &f_one);  // all held out / one sequence
  ASSERT_FALSE(f_all.empty());
  EXPECT_EQ(f_all, f_one);
  ASSERT_EQ(e_all.size(), e_one.size());
  int differ = 0;
  for (size_t i = 0; i < e_all.size(); ++i) {
    EXPECT_GT(e_one[i], 0.0);
    differ += std::fabs(e_all[i] - e_one[i]) > 1e-6 * e_all[i];
  }
  EXPECT_GT(differ, 0);  // scored on fewer tokens
}

TEST_F(PipelineTest, SpearBeatsW4AndStatic) {
  const auto h_fp = Hidden(fp_.get());
  auto run = [&](EcMode ec, bool gptq) {
    auto m = Load();
    QuantizeOptions o = Opts();
    o.ec = ec;
    o.ec_budget_pct = 25;
    if (gptq) o.backbone = Backbone::kGptq;
    auto rep = QuantizeModel(m.get(), o, &pool_);
    EXPECT_TRUE(rep.ok()) << rep.status();
    // The budget holds (it is taken from the W4 model without act scales).
    EXPECT_LE(rep->ec_bytes, 0.25 * rep->w4_model_bytes) << static_cast<int>(ec);
    if (ec != EcMode::kNone) {
      EXPECT_GT(rep->ec_bytes, 0.1 * rep->w4_model_bytes);
    }
    int64_t sum = 0;
    for (const auto& mr : rep->modules) {
      sum += mr.ec_bytes;
      if (mr.ec_rank > 0) {
        EXPECT_LE(mr.err_static, mr.err_w4 * 1.0001) << mr.name;
      }
      if (ec == EcMode::kSpear && mr.ec_rank > 0) {
        EXPECT_LE(mr.err_final, mr.err_static * 1.0001);
      }
    }
    // SPEAR's teacher came from the sampling pass, for every sequence.
    EXPECT_EQ(rep->teacher_captured_sequences, ec == EcMode::kSpear ? 20 : 0);
    EXPECT_EQ(sum, rep->ec_bytes);
    return Mse(h_fp, Hidden(m.get()));
  };
  const double w4 = run(EcMode::kNone, false);
  const double st = run(EcMode::kStatic, false);
  const double sp = run(EcMode::kSpear, false);
  std::printf("final hidden MSE vs FP16: W4 %.5g  static %.5g  spear %.5g\n", w4, st, sp);
  EXPECT_LT(sp, 0.8 * w4);
  EXPECT_LE(sp, st * 1.02);
  // GPTQ backbone + SPEAR also runs and improves on plain RTN W4.
  EXPECT_LT(run(EcMode::kSpear, true), w4);
}

// --ec-factors i8: the budget is charged at the int8 size (about twice the
// ranks), every EC ends on the int8 grid, the report counts what is stored,
// and the trainer scores its rounded parameters.
TEST_F(PipelineTest, Int8FactorsBuyRankAndEndOnTheGrid) {
  ASSERT_EQ(EcBytes(64, 64, 4, true, 16, kernels::EcFactors::kI8),
            4 * (128 + 2 * 2) + 2 * (2 * 16 * 4 + 16 + 4));
  auto run = [&](kernels::EcFactors f, std::unique_ptr<model::LoadedModel>* out) {
    auto m = Load();
    QuantizeOptions o = Opts();
    o.ec_budget_pct = 10;
    o.min_ec_rank = 2;
    o.distill.steps = 40;
    o.ec_factors = f;
    auto rep = QuantizeModel(m.get(), o, &pool_);
    EXPECT_TRUE(rep.ok()) << rep.status();
    *out = std::move(m);
    return *rep;
  };
  std::unique_ptr<model::LoadedModel> m16, m8;
  const QuantizeReport r16 = run(kernels::EcFactors::kF16, &m16);
  const QuantizeReport r8 = run(kernels::EcFactors::kI8, &m8);
  int64_t rank16 = 0, rank8 = 0;
  for (const auto& mr : r16.modules) rank16 += mr.ec_rank;
  for (const auto& mr : r8.modules) rank8 += mr.ec_rank;
  EXPECT_GE(rank8, rank16 * 3 / 2) << "int8 factors should buy about twice the rank";
  EXPECT_LE(r8.ec_bytes, 0.10 * r8.w4_model_bytes);
  int64_t ec = 0;
  EXPECT_EQ(r8.w4_model_bytes + r8.ec_bytes, ServedModelBytes(*m8, &ec));
  EXPECT_EQ(ec, r8.ec_bytes);
  int64_t sum = 0, ecs = 0;
  for (const auto& mr : r8.modules) sum += mr.ec_bytes;
  EXPECT_EQ(sum, r8.ec_bytes);
  m8->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<model::Linear>& l) {
    const auto* w4 = dynamic_cast<const model::W4Linear*>(l.get());
    ASSERT_NE(w4, nullptr);
    if (!w4->has_ec()) return;
    ++ecs;
    EXPECT_EQ(w4->ec()->factors, kernels::EcFactors::kI8) << name;
    kernels::EcWeights again = *w4->ec();
    ASSERT_TRUE(kernels::RoundEcFactorsI8(&again).ok());
    EXPECT_EQ(again.a, w4->ec()->a) << name << ": A is not on the int8 grid";
    EXPECT_EQ(again.b, w4->ec()->b) << name << ": B is not on the int8 grid";
  });
  EXPECT_GT(ecs, 0);
  EXPECT_LT(r16.distill.rounded_val_kl, 0);  // not rounded
  ASSERT_GE(r8.distill.rounded_val_kl, 0);
  EXPECT_NEAR(r8.distill.rounded_val_kl, r8.distill.final_val_kl,
              0.05 * r8.distill.final_val_kl + 1e-4);
}

TEST(PlacementRankOptionsTest, MinRankThenPowersOfTwo) {
  EXPECT_EQ(PlacementRankOptions(), (std::vector<int64_t>{4, 8, 16, 32, 64, 128, 256}));
  EXPECT_EQ(PlacementRankOptions(1), (std::vector<int64_t>{1, 2, 4, 8, 16, 32, 64, 128, 256}));
  EXPECT_EQ(PlacementRankOptions(3), (std::vector<int64_t>{3, 4, 8, 16, 32, 64, 128, 256}));
  EXPECT_EQ(PlacementRankOptions(256), (std::vector<int64_t>{256}));
  // --ec-max-rank caps the powers of two (a cap below the minimum is the minimum).
  EXPECT_EQ(PlacementRankOptions(2, 4), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(PlacementRankOptions(3, 20), (std::vector<int64_t>{3, 4, 8, 16}));
  EXPECT_EQ(PlacementRankOptions(4, 1), (std::vector<int64_t>{4}));
  // The placement never exceeds the cap, however large the budget.
  const std::vector<double> damages = {0.6, 0.3, 0.1};
  const std::vector<ModuleShape> shapes = {{64, 64, 2048}, {64, 64, 2048}, {64, 64, 2048}};
  auto capped = PlanDiagnosticPlacement(damages, shapes, 1e6, true, 16, 1.0, 2, nullptr, nullptr,
                                        nullptr, kernels::EcFactors::kF16, 4);
  ASSERT_TRUE(capped.ok()) << capped.status();
  for (int64_t r : *capped) EXPECT_LE(r, 4);
  auto free = PlanDiagnosticPlacement(damages, shapes, 1e6, true, 16, 1.0, 2);
  ASSERT_TRUE(free.ok()) << free.status();
  EXPECT_GT(*std::max_element(free->begin(), free->end()), 4);
}

TEST_F(PipelineTest, CalibrationWindowsCutLongerSamples) {
  CalibrationOptions one;
  one.num_sequences = 3;
  one.seq_len = 40;
  auto a = MakeCalibrationSequences(*fp_, one, 2);
  ASSERT_TRUE(a.ok()) << a.status();
  CalibrationOptions two = one;
  two.seq_len = 20;
  two.windows_per_sequence = 2;
  auto b = MakeCalibrationSequences(*fp_, two, 2);
  ASSERT_TRUE(b.ok()) << b.status();
  // Same seeds, same sampler: sample i of 40 tokens = windows 2i and 2i + 1.
  ASSERT_EQ(b->size(), 6u);
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_EQ((*b)[2 * i].size(), 20u);
    EXPECT_EQ(std::vector<int32_t>((*a)[i].begin(), (*a)[i].begin() + 20), (*b)[2 * i]);
    EXPECT_EQ(std::vector<int32_t>((*a)[i].begin() + 20, (*a)[i].end()), (*b)[2 * i + 1]);
  }
  // A narrower nucleus changes the samples; bad values are rejected.
  CalibrationOptions narrow = one;
  narrow.top_p = 0.05;
  auto c = MakeCalibrationSequences(*fp_, narrow, 2);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NE(*c, *a);
  narrow.top_p = 0;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, narrow, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  two.windows_per_sequence = 0;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, two, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PipelineTest, CalibrationRandomStartsContinueFromARandomWord) {
  CalibrationOptions base;
  base.num_sequences = 8;
  base.seq_len = 24;
  auto a = MakeCalibrationSequences(*fp_, base, 2);
  ASSERT_TRUE(a.ok()) << a.status();
  CalibrationOptions half = base;
  half.random_start_fraction = 0.5;
  auto b = MakeCalibrationSequences(*fp_, half, 2);
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->size(), 8u);
  // floor((i + 1) / 2) > floor(i / 2) for odd i: samples 1, 3, 5, 7 start
  // randomly, the others are exactly the BOS-started samples.
  const int32_t first = (*a)[0][0];
  int differing_starts = 0;
  for (size_t i = 0; i < 8; ++i) {
    ASSERT_EQ((*b)[i].size(), 24u);
    EXPECT_EQ((*b)[i][0], first) << i;  // every sample still starts like a served prompt
    if (i % 2 == 0) {
      EXPECT_EQ((*b)[i], (*a)[i]) << i;
    } else {
      differing_starts += (*b)[i][1] != (*a)[i][1];
    }
  }
  // Four uniform draws from the vocabulary all equal to what the model
  // sampled after BOS would be a (1/V)^4 coincidence.
  EXPECT_GE(differing_starts, 3);
  half.random_start_fraction = 1.5;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, half, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PipelineTest, CalibrationPromptsStartTheirSamples) {
  CalibrationOptions base;
  base.num_sequences = 6;
  base.seq_len = 24;
  auto a = MakeCalibrationSequences(*fp_, base, 2);
  ASSERT_TRUE(a.ok()) << a.status();
  CalibrationOptions p = base;
  p.prompt_ids = {{5, 6, 7}, {9}};
  p.prompt_fraction = 0.5;
  auto b = MakeCalibrationSequences(*fp_, p, 2);
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->size(), 6u);
  // Samples 1, 3, 5 are prompted with prompts 0, 1, 0 (in order, cycled);
  // 0, 2, 4 are exactly the BOS-started samples.
  const int32_t first = (*a)[0][0];
  const std::vector<std::vector<int32_t>> want = {{5, 6, 7}, {9}, {5, 6, 7}};
  for (size_t i = 0; i < 6; ++i) {
    ASSERT_EQ((*b)[i].size(), 24u) << i;
    EXPECT_EQ((*b)[i][0], first) << i;
    if (i % 2 == 0) {
      EXPECT_EQ((*b)[i], (*a)[i]) << i;
    } else {
      const auto& w = want[i / 2];
      EXPECT_TRUE(std::equal(w.begin(), w.end(), (*b)[i].begin() + 1)) << i;
    }
  }
  // Every sample prompted: prompt 0, 1, 0, 1, ...
  p.prompt_fraction = 1.0;
  auto c = MakeCalibrationSequences(*fp_, p, 2);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)[2][1], 5);
  EXPECT_EQ((*c)[3][1], 9);
  // Errors: a prompt of half a sample or more, an empty prompt, an id
  // outside the vocabulary, a bad fraction, random starts beside prompts,
  // a prompt file without a tokenizer.
  CalibrationOptions bad = p;
  bad.prompt_ids = {std::vector<int32_t>(11, 5)};  // + BOS = 12 = half of 24
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad.prompt_ids = {std::vector<int32_t>(10, 5)};
  EXPECT_TRUE(MakeCalibrationSequences(*fp_, bad, 2).ok());
  bad.prompt_ids = {{}};
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad.prompt_ids = {{static_cast<int32_t>(fp_->config.vocab_size)}};
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = p;
  bad.prompt_fraction = 0.0;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = p;
  bad.random_start_fraction = 0.5;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = base;
  bad.prompt_file = "/no/such/prompts.txt";
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  bad = p;  // prompts beside a text file: refused, not silently dropped
  bad.text_file = "/no/such/text.txt";
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The sampler's temperature: another temperature, other samples from the
// same seeds (BOS kept); out of range is refused.
TEST_F(PipelineTest, CalibrationTemperature) {
  CalibrationOptions c;
  c.num_sequences = 4;
  c.seq_len = 32;
  auto a = MakeCalibrationSequences(*fp_, c, 2);
  c.temperature = 3.0;
  auto b = MakeCalibrationSequences(*fp_, c, 2);
  ASSERT_TRUE(a.ok() && b.ok());
  int differ = 0;
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ((*a)[i][0], (*b)[i][0]);
    differ += (*a)[i] != (*b)[i];
  }
  EXPECT_GE(differ, 3);
  c.temperature = 0.0;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, c, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

constexpr char kChatMl[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\\n' }}{% endif %}";

// A unit-test tokenizer: one id per byte (1 + byte % 100), a chat template
// (ChatML unless given; "" = none), BOS = `bos`; Encode marks
// "<|im_start|>" as id 120 (so a rendering can start with the BOS id when
// bos = 120).
class ByteChatTokenizer final : public model::Tokenizer {
 public:
  explicit ByteChatTokenizer(int32_t bos, std::string tmpl = kChatMl)
      : bos_(bos), tmpl_(std::move(tmpl)) {}
  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> out;
    if (add_bos) out.push_back(bos_);
    for (size_t i = 0; i < text.size();) {
      if (text.substr(i, 12) == "<|im_start|>") {
        out.push_back(120);
        i += 12;
      } else {
        out.push_back(1 + static_cast<unsigned char>(text[i++]) % 100);
      }
    }
    return out;
  }
  std::string Decode(std::span<const int32_t>, bool) const override { return ""; }
  int64_t vocab_size() const override { return 128; }
  std::optional<int32_t> TokenId(std::string_view) const override { return std::nullopt; }
  std::string TokenText(int32_t) const override { return ""; }
  bool IsSpecial(int32_t id) const override { return id >= 120; }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return -1; }
  const std::string& chat_template() const override { return tmpl_; }

 private:
  int32_t bos_;
  std::string tmpl_;
};

// --calib-chat: each prompt line becomes a user message in the chat
// template; the sample is BOS + the rendering + the model's answer, and a
// rendering that starts with the BOS id gets no second BOS.
TEST_F(PipelineTest, CalibrationChatPromptsUseTheTemplate) {
  const std::string file = ::testing::TempDir() + "/chat_prompts.txt";
  {
    std::ofstream f(file);
    f << "Tell me about owls.\n\nDescribe rivers.\n";
  }
  CalibrationOptions c;
  c.num_sequences = 4;
  c.seq_len = 160;
  c.prompt_file = file;
  c.prompt_fraction = 1.0;
  c.prompt_chat = true;
  for (const int32_t bos : {7, 120}) {
    fp_->tokenizer = std::make_unique<ByteChatTokenizer>(bos);
    fp_->config.bos_token_id = bos;
    auto seqs = MakeCalibrationSequences(*fp_, c, 2);
    ASSERT_TRUE(seqs.ok()) << seqs.status();
    ASSERT_EQ(seqs->size(), 4u);
    for (int i = 0; i < 4; ++i) {
      const std::string line = i % 2 == 0 ? "Tell me about owls." : "Describe rivers.";
      auto text = model::ApplyChatTemplate(*fp_->tokenizer, {{"user", line}}, true);
      ASSERT_TRUE(text.ok());
      std::vector<int32_t> want = fp_->tokenizer->Encode(*text, false);
      if (want.front() != bos) want.insert(want.begin(), bos);
      ASSERT_EQ((*seqs)[i].size(), 160u);
      EXPECT_TRUE(std::equal(want.begin(), want.end(), (*seqs)[i].begin()))
          << "bos " << bos << " sample " << i;
      EXPECT_EQ((*seqs)[i][0], bos);
      if (bos == 120) {  // no doubled BOS
        EXPECT_NE((*seqs)[i][1], 120);
      }
    }
  }
  // Without the chat flag the same file gives the raw lines.
  c.prompt_chat = false;
  auto raw = MakeCalibrationSequences(*fp_, c, 2);
  ASSERT_TRUE(raw.ok());
  const auto owls = fp_->tokenizer->Encode("Tell me about owls.", false);
  EXPECT_TRUE(std::equal(owls.begin(), owls.end(), (*raw)[0].begin() + 1));
  // Errors: chat without a prompt file; chat beside a text file; a model
  // without a chat template.
  CalibrationOptions bad;
  bad.num_sequences = 2;
  bad.seq_len = 96;
  bad.prompt_chat = true;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad.text_file = file;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  fp_->tokenizer = std::make_unique<ByteChatTokenizer>(7, "");
  c.prompt_chat = true;
  EXPECT_EQ(MakeCalibrationSequences(*fp_, c, 2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  std::remove(file.c_str());
}

// The teacher captured while sampling (MakeCalibrationSet with
// capture_hidden): the same sequences as without, and the final-normed
// states the teacher pass computes over them; ComputeDistillTeacher runs
// only the sequences whose states are not known and checks their sizes.
TEST_F(PipelineTest, CalibrationCapturesTheTeacherWhileSampling) {
  CalibrationOptions c;
  c.num_sequences = 5;
  c.seq_len = 48;
  c.seed = 5;
  c.prompt_ids = {{9, 10, 11, 12, 13, 14, 15}, {40, 41}};  // prompt prefills of 8 and 3
  c.prompt_fraction = 0.6;
  const int64_t d = fp_->config.hidden_size;
  auto plain = MakeCalibrationSequences(*fp_, c, 2);
  ASSERT_TRUE(plain.ok()) << plain.status();
  auto set = MakeCalibrationSet(*fp_, c, 2, /*capture_hidden=*/true);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->sequences, *plain);  // the extra sampled token is dropped
  ASSERT_EQ(set->final_hidden.size(), 5u);
  std::vector<float> captured;
  for (const auto& h : set->final_hidden) {
    ASSERT_EQ(h.size(), static_cast<size_t>(48 * d));
    captured.insert(captured.end(), h.begin(), h.end());
  }
  auto full = ComputeDistillTeacher(fp_.get(), &pool_, set->sequences, false);
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_EQ(full->final_hidden.size(), captured.size());
  double err = 0, scale = 0;
  for (size_t j = 0; j < captured.size(); ++j) {
    err = std::max(err, static_cast<double>(std::fabs(captured[j] - full->final_hidden[j])));
    scale = std::max(scale, static_cast<double>(std::fabs(full->final_hidden[j])));
  }
  EXPECT_GT(scale, 0.1);
  EXPECT_LE(err, 1e-4 * std::max(1.0, scale));  // other batching: summation order only

  // Two of five known: those rows are copied, the rest computed.
  std::vector<std::vector<float>> known(5);
  known[1] = set->final_hidden[1];
  known[3] = set->final_hidden[3];
  known[3][7] = 1234.5f;  // a marker: proves the known rows are taken, not recomputed
  auto mixed = ComputeDistillTeacher(fp_.get(), &pool_, set->sequences, false, &known);
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  ASSERT_EQ(mixed->final_hidden.size(), captured.size());
  EXPECT_EQ(mixed->final_hidden[3 * 48 * d + 7], 1234.5f);
  for (int s : {0, 2, 4}) {
    for (int64_t j = 0; j < 48 * d; ++j) {
      const size_t at = static_cast<size_t>(s * 48 * d + j);
      ASSERT_NEAR(mixed->final_hidden[at], full->final_hidden[at], 1e-4 * std::max(1.0, scale))
          << "sequence " << s;
    }
  }
  // Bad known states: another count of entries, an entry of another size.
  std::vector<std::vector<float>> four(4);
  EXPECT_EQ(ComputeDistillTeacher(fp_.get(), &pool_, set->sequences, false, &four).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<std::vector<float>> none;
  EXPECT_EQ(ComputeDistillTeacher(fp_.get(), &pool_, {}, false, &none).status().code(),
            absl::StatusCode::kInvalidArgument);
  known[2].assign(5, 0.f);
  EXPECT_EQ(ComputeDistillTeacher(fp_.get(), &pool_, set->sequences, false, &known).status().code(),
            absl::StatusCode::kInvalidArgument);

  // Nothing is captured for later windows of a sample, or without capture.
  c.windows_per_sequence = 2;
  auto windows = MakeCalibrationSet(*fp_, c, 2, true);
  ASSERT_TRUE(windows.ok()) << windows.status();
  ASSERT_EQ(windows->final_hidden.size(), 10u);
  for (const auto& h : windows->final_hidden) EXPECT_TRUE(h.empty());
  c.windows_per_sequence = 1;
  auto off = MakeCalibrationSet(*fp_, c, 2, false);
  ASSERT_TRUE(off.ok());
  for (const auto& h : off->final_hidden) EXPECT_TRUE(h.empty());
  // A sample as long as the context: no room for the extra token, so no
  // capture (and no error).
  CalibrationOptions whole;
  whole.num_sequences = 1;
  whole.seq_len = fp_->config.max_position;
  auto at_limit = MakeCalibrationSet(*fp_, whole, 2, true);
  ASSERT_TRUE(at_limit.ok()) << at_limit.status();
  ASSERT_EQ(at_limit->sequences[0].size(), static_cast<size_t>(whole.seq_len));
  EXPECT_TRUE(at_limit->final_hidden[0].empty());
}

// The calibration text mix: text windows spread evenly among the
// self-generated sequences, the last one at the end (the held-out tenth).
TEST(CalibrationMixTest, SpreadAmongInterleavesEvenly) {
  auto seqs = [](int n, int32_t tag) {
    std::vector<std::vector<int32_t>> v;
    for (int i = 0; i < n; ++i) v.push_back({tag, i});
    return v;
  };
  auto order = [](const std::vector<std::vector<int32_t>>& v) {
    std::string s;
    for (const auto& x : v) s += (x[0] == 0 ? "s" : "t") + std::to_string(x[1]) + " ";
    return s;
  };
  EXPECT_EQ(order(SpreadAmong(seqs(8, 0), seqs(2, 1))), "s0 s1 s2 s3 t0 s4 s5 s6 s7 t1 ");
  EXPECT_EQ(order(SpreadAmong(seqs(3, 0), seqs(3, 1))), "s0 t0 s1 t1 s2 t2 ");
  // floor((j + 1) 2 / 5) - 1 = -1, -1, 0, 0, 1: four after s0 (none before it)
  EXPECT_EQ(order(SpreadAmong(seqs(2, 0), seqs(5, 1))), "s0 t0 t1 t2 t3 s1 t4 ");
  EXPECT_EQ(order(SpreadAmong(seqs(4, 0), {})), "s0 s1 s2 s3 ");
  EXPECT_EQ(order(SpreadAmong({}, seqs(2, 1))), "t0 t1 ");
  // 128 self + 32 text: t[j] follows s[4 j + 3], so every block of 5 ends
  // with a text window; 4 of the last 16 (the held-out tenth) are text.
  const auto big = SpreadAmong(seqs(128, 0), seqs(32, 1));
  ASSERT_EQ(big.size(), 160u);
  int text_tail = 0;
  for (size_t i = 144; i < 160; ++i) text_tail += big[i][0] == 1;
  EXPECT_EQ(text_tail, 4);
  EXPECT_EQ(big.back()[0], 1);
}

TEST_F(PipelineTest, CalibrationMixNeedsSelfDataAndATokenizer) {
  CalibrationOptions c;
  c.num_sequences = 2;
  c.seq_len = 16;
  c.mix_texts = {{"/no/such/file.txt", 0}};
  EXPECT_EQ(MakeCalibrationSequences(*fp_, c, 2).status().code(),
            absl::StatusCode::kInvalidArgument);  // 0 windows
  c.mix_texts = {{"/no/such/file.txt", 2}, {"/no/such/other.txt", 0}};
  EXPECT_EQ(MakeCalibrationSequences(*fp_, c, 2).status().code(),
            absl::StatusCode::kInvalidArgument);  // 0 windows in the second
  c.mix_texts = {{"/no/such/file.txt", 2}};
  c.text_file = "/no/such/file.txt";
  EXPECT_EQ(MakeCalibrationSequences(*fp_, c, 2).status().code(),
            absl::StatusCode::kInvalidArgument);  // text + mix
  c.text_file.clear();
  // the tiny model has no tokenizer: the self part runs, the text part cannot
  EXPECT_EQ(MakeCalibrationSequences(*fp_, c, 2).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// The diagnostic's tokens spread over several calibration sequences
// (diagnostic_sequences): other tokens, so other damages; a count above the
// fit sequences is clamped, not an error.
TEST_F(PipelineTest, DiagnosticSpreadOverSequences) {
  auto damages = [&](int64_t k) {
    auto m = Load();
    QuantizeOptions o = Opts();
    o.ec = EcMode::kStatic;
    o.place_static_like_spear = true;
    o.ec_budget_pct = 10;
    o.diagnostic_tokens = 128;
    o.diagnostic_sequences = k;
    auto rep = QuantizeModel(m.get(), o, &pool_);
    EXPECT_TRUE(rep.ok()) << rep.status();
    std::vector<double> d;
    if (!rep.ok()) return d;
    for (const auto& mr : rep->modules) {
      EXPECT_TRUE(std::isfinite(mr.damage) && mr.damage >= 0 && mr.damage <= 1) << mr.name;
      d.push_back(mr.damage);
    }
    return d;
  };
  const auto one = damages(1), four = damages(4), many = damages(1000);
  ASSERT_EQ(one.size(), 14u);
  ASSERT_EQ(four.size(), 14u);
  ASSERT_EQ(many.size(), 14u);
  double diff = 0;
  for (size_t i = 0; i < one.size(); ++i) diff += std::fabs(one[i] - four[i]);
  EXPECT_GT(diff, 1e-6) << "4 sequences' tokens gave the first sequence's damages";
}

TEST_F(PipelineTest, GivenPlacementReplacesTheDiagnostic) {
  QuantizeOptions o = Opts();
  o.ec = EcMode::kStatic;
  o.place_static_like_spear = true;
  o.ec_budget_pct = 10;
  auto m1 = Load();
  auto first = QuantizeModel(m1.get(), o, &pool_);
  ASSERT_TRUE(first.ok()) << first.status();
  // The diagnostic's placement handed to a second run (as --ec-placement
  // does from a checkpoint), reversed in order: the same modules and ranks.
  std::vector<QuantizeOptions::GivenEc> given;
  for (const auto& mr : first->modules) {
    if (mr.ec_rank == 0) continue;
    int64_t n = 0, k = 0;
    m1->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<model::Linear>& l) {
      if (name == mr.name) n = l->out_features(), k = l->in_features();
    });
    given.insert(given.begin(), {mr.name, n, k, mr.ec_rank});
  }
  ASSERT_GE(given.size(), 2u);
  QuantizeOptions g = o;
  g.given_placement = given;
  g.given_placement_source = "first";
  g.calib.seed = 12;  // other calibration data: the placement must not follow it
  auto m2 = Load();
  auto second = QuantizeModel(m2.get(), g, &pool_);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->placement_source, "first");
  ASSERT_EQ(second->modules.size(), first->modules.size());
  for (size_t i = 0; i < first->modules.size(); ++i) {
    EXPECT_EQ(second->modules[i].ec_rank, first->modules[i].ec_rank) << first->modules[i].name;
    EXPECT_EQ(second->modules[i].damage, 0.0);  // no diagnostic ran
  }
  EXPECT_EQ(second->ec_bytes, first->ec_bytes);

  // Bad placements are refused before the calibration runs.
  auto refused = [&](QuantizeOptions bad, const std::string& what) {
    bool calibrated = false;
    auto m = Load();
    auto r = QuantizeModel(m.get(), bad, &pool_, [&](const std::string& stage, int64_t, int64_t) {
      calibrated = calibrated || stage == "calibration";
    });
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_FALSE(calibrated) << what;
    std::printf("%s: %s\n", what.c_str(), std::string(r.status().message()).c_str());
  };
  QuantizeOptions bad = g;
  bad.given_placement[0].module = "model.layers.7.mlp.up_proj";
  refused(bad, "unknown module");
  bad = g;
  bad.given_placement[0].k += 1;
  refused(bad, "shape");
  bad = g;
  bad.given_placement[1] = bad.given_placement[0];
  refused(bad, "twice");
  bad = g;
  bad.given_placement[0].rank = 0;
  refused(bad, "rank 0");
  bad = g;
  bad.given_placement[0].rank = 10000;
  refused(bad, "rank over min(n, k)");
  bad = g;
  bad.ec_budget_pct = 0.1;
  refused(bad, "over the budget");
  bad = g;
  bad.place_static_like_spear = false;
  refused(bad, "static-all");
  bad = g;
  bad.ec = EcMode::kNone;
  refused(bad, "no ECs");
}

TEST_F(PipelineTest, DiagnosticRanksInjectedModuleFirst) {
  CalibrationOptions c;
  c.num_sequences = 8;
  c.seq_len = 64;
  auto seqs = MakeCalibrationSequences(*fp_, c, 2);
  ASSERT_TRUE(seqs.ok());
  const QuantizeOptions o = Opts();
  const auto rtn = RtnDiagnosticQuantizer(o);
  const int64_t bad = 9;  // layer 1 v_proj
  DiagnosticQuantizer q = [&](int64_t i, const std::string& name,
                              MatrixView w) -> absl::StatusOr<Matrix> {
    if (i != bad) return rtn(i, name, w);
    // 1-bit sign quantization: a deliberately coarse format.
    Matrix m(w.rows, w.cols);
    double mean_abs = 0;
    for (int64_t j = 0; j < w.size(); ++j) mean_abs += std::fabs(w.data[j]);
    mean_abs /= static_cast<double>(w.size());
    for (int64_t j = 0; j < w.size(); ++j) m.data[j] = w.data[j] >= 0 ? mean_abs : -mean_abs;
    return m;
  };
  auto res = RunCkaDiagnostic(fp_.get(), &pool_, *seqs, q);
  ASSERT_TRUE(res.ok()) << res.status();
  ASSERT_EQ(res->damages.size(), 14u);
  for (double d : res->damages) {
    EXPECT_GE(d, 0.0);
    EXPECT_LE(d, 1.0);
  }
  const auto top = std::max_element(res->damages.begin(), res->damages.end()) - res->damages.begin();
  EXPECT_EQ(top, bad) << res->names[top];
  EXPECT_EQ(res->names[bad], "model.layers.1.self_attn.v_proj");
  EXPECT_GT(*std::min_element(res->damages.begin(), res->damages.end()), 0.0);
  // The model is restored: running the plain diagnostic again gives RTN damages
  // below the injected one.
  auto again = RunCkaDiagnostic(fp_.get(), &pool_, *seqs, rtn);
  ASSERT_TRUE(again.ok());
  EXPECT_LT(again->damages[bad], res->damages[bad]);
  // Placement within a budget.
  std::vector<ModuleShape> shapes;
  for (const auto& name : res->names) {
    const bool down = name.find("down") != std::string::npos;
    const bool kv = name.find("k_proj") != std::string::npos || name.find("v_proj") != std::string::npos;
    const bool gu = name.find("gate") != std::string::npos || name.find("up_proj") != std::string::npos;
    shapes.push_back({kv ? 32 : (gu ? 96 : 64), down ? 96 : 64, 2000});
  }
  auto ranks = PlanDiagnosticPlacement(res->damages, shapes, 4000, true, 16);
  ASSERT_TRUE(ranks.ok());
  int64_t bytes = 0;
  for (size_t i = 0; i < shapes.size(); ++i) bytes += EcBytes(shapes[i].n, shapes[i].k, (*ranks)[i], true, 16);
  EXPECT_LE(bytes, 4000);
  EXPECT_GT((*ranks)[bad], 0);
}

// The diagnostic runs the layers above a module's layer for its 7 modules'
// streams stacked in one runner: each damage must be the one a run with only
// that module swapped gives on its own (the per-module loop, written here
// as the reference), on sequences of unequal lengths.
TEST_F(PipelineTest, DiagnosticStackedStreamsMatchPerModuleRuns) {
  CalibrationOptions c;
  c.num_sequences = 3;
  c.seq_len = 40;
  c.seed = 5;
  auto seqs = MakeCalibrationSequences(*fp_, c, 2);
  ASSERT_TRUE(seqs.ok());
  (*seqs)[1].resize(23);  // unequal lengths: the stacked runner's micro-batches and KV slots
  const auto rtn = RtnDiagnosticQuantizer(Opts());
  auto res = RunCkaDiagnostic(fp_.get(), &pool_, *seqs, rtn);
  ASSERT_TRUE(res.ok()) << res.status();
  const int64_t L = fp_->config.num_layers, d = fp_->config.hidden_size;
  ASSERT_EQ(res->damages.size(), static_cast<size_t>(7 * L));

  auto run = LayerwiseRunner::Create(fp_.get(), &pool_, *seqs);
  ASSERT_TRUE(run.ok());
  const int64_t T = (*run)->num_tokens();
  std::vector<float> h0(T * d), y(T * d);
  ASSERT_TRUE((*run)->Embed(h0.data()).ok());
  std::vector<float> fp = h0;
  ASSERT_TRUE((*run)->RunLayers(0, L, fp.data()).ok());
  ASSERT_TRUE((*run)->FinalNorm(fp.data(), fp.data()).ok());
  auto ref = CkaReference::Create(MatrixView{fp.data(), T, d});
  ASSERT_TRUE(ref.ok());
  int64_t idx = 0;
  double max_damage = 0;
  for (int64_t l = 0; l < L; ++l) {
    model::LayerWeights& lw = fp_->weights.layers[l];
    std::unique_ptr<model::Linear>* slots[7] = {&lw.q_proj, &lw.k_proj, &lw.v_proj, &lw.o_proj,
                                                &lw.gate_proj, &lw.up_proj, &lw.down_proj};
    for (int j = 0; j < 7; ++j, ++idx) {
      auto w = DenseWeightMatrix(**slots[j]);
      ASSERT_TRUE(w.ok());
      auto q = rtn(idx, res->names[idx], w->view());
      ASSERT_TRUE(q.ok());
      const auto* dense = dynamic_cast<const model::DenseLinear*>(slots[j]->get());
      ASSERT_NE(dense, nullptr);
      auto repl = model::DenseLinear::Create(q->data.data(), kernels::DType::kF32, w->rows,
                                             w->cols, dense->bias());
      ASSERT_TRUE(repl.ok());
      std::unique_ptr<model::Linear> orig = std::move(*slots[j]);
      *slots[j] = std::move(*repl);
      std::vector<float> h = h0;
      ASSERT_TRUE((*run)->RunLayers(0, L, h.data()).ok());
      ASSERT_TRUE((*run)->FinalNorm(h.data(), y.data()).ok());
      *slots[j] = std::move(orig);
      auto cka = ref->Cka(MatrixView{y.data(), T, d});
      ASSERT_TRUE(cka.ok());
      const double want = std::clamp(1.0 - *cka, 0.0, 1.0);
      max_damage = std::max(max_damage, want);
      // Float rounding of GEMMs over other row counts only: 1e-6 of a
      // damage on the order of 1e-3..1e-1.
      EXPECT_NEAR(res->damages[idx], want, 1e-6 + 1e-4 * want) << res->names[idx];
    }
  }
  EXPECT_GT(max_damage, 1e-4);  // the comparison is not between zeros
}

TEST(SequentialTargetTest, UsesFp16StreamForWAndCurrentStreamForQ) {
  const int64_t n = 6, k = 8, T = 5;
  Matrix w(n, k), xfp(T, k), xq(T, k);
  for (int64_t i = 0; i < w.rows * w.cols; ++i) w.data[i] = std::sin(0.7 * i);
  for (int64_t i = 0; i < xfp.rows * xfp.cols; ++i) {
    xfp.data[i] = std::cos(0.3 * i);
    xq.data[i] = xfp.data[i] + 0.1f * std::sin(1.3 * i);  // upstream drift
  }
  kernels::W4Format f{n, k, k, false};
  auto q = QuantizeRtn(w.view(), f);
  ASSERT_TRUE(q.ok());
  auto qe = DequantizeW4Effective(*q);
  ASSERT_TRUE(qe.ok());
  auto r = SequentialTarget(w.view(), *q, xfp.view(), xq.view());
  ASSERT_TRUE(r.ok());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      double want = 0;
      for (int64_t j = 0; j < k; ++j) want += w.at(i, j) * xfp.at(t, j) - qe->at(i, j) * xq.at(t, j);
      EXPECT_NEAR(r->at(t, i), want, 1e-5);
    }
  }
  // With no drift it is exactly the weight error applied to x.
  auto r0 = SequentialTarget(w.view(), *q, xfp.view(), xfp.view());
  ASSERT_TRUE(r0.ok());
  auto e = QuantizationError(w.view(), *q);
  ASSERT_TRUE(e.ok());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      double want = 0;
      for (int64_t j = 0; j < k; ++j) want += e->at(i, j) * xfp.at(t, j);
      EXPECT_NEAR(r0->at(t, i), want, 1e-5);
    }
  }
  EXPECT_FALSE(SequentialTarget(w.view(), *q, xfp.view(), MatrixView{xq.data.data(), T - 1, k}).ok());
}

}  // namespace
}  // namespace spear::quantize

namespace spear::quantize {
namespace {

// --ec-latency-table: the placement ranks by damage per byte penalised by
// the measured relative latency instead of the bytes proxy. Two modules of
// equal damage and shape, a budget for one rank-4 EC (1,320 bytes: 2 (64 +
// 64 + 2 x 16 + 1) x 4 + 2 x 16): the proxy ties them (lower index wins);
// the measured latencies (2.0, 0.1) pick module 1.
TEST(PlacementLatency, MeasuredLatencyDecidesBetweenEqualModules) {
  const std::vector<double> damages = {0.5, 0.5};
  const std::vector<ModuleShape> shapes = {{64, 64, 2048}, {64, 64, 2048}};
  ASSERT_EQ(EcBytes(64, 64, 4, true, 16), 1320);
  std::vector<double> used;
  auto proxy = PlanDiagnosticPlacement(damages, shapes, 1500, true, 16, 1.0, 4, nullptr, &used);
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  EXPECT_EQ(*proxy, (std::vector<int64_t>{4, 0}));
  ASSERT_EQ(used.size(), 2u);
  EXPECT_DOUBLE_EQ(used[0], 1320.0 / 2048.0);
  const std::vector<double> measured = {2.0, 0.1};
  auto m = PlanDiagnosticPlacement(damages, shapes, 1500, true, 16, 1.0, 4, &measured, &used);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(*m, (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(used, measured);
  for (const std::vector<double>& bad :
       {std::vector<double>{1.0}, std::vector<double>{-0.1, 1.0},
        std::vector<double>{std::nan(""), 1.0}}) {
    auto r = PlanDiagnosticPlacement(damages, shapes, 1500, true, 16, 1.0, 4, &bad);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
  }
}

// The runner's fused GEMMs as launch groups: q/k/v of layer L -> 2 L,
// gate/up -> 2 L + 1, o / down / others -> -1.
TEST(PlacementLatency, FusedLaunchGroupsFollowTheRunnersMerging) {
  const std::vector<std::string> names = {
      "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
      "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
      "model.layers.0.mlp.gate_proj",    "model.layers.0.mlp.up_proj",
      "model.layers.0.mlp.down_proj",    "model.layers.12.self_attn.k_proj",
      "model.layers.12.mlp.up_proj",     "lm_head",
      "model.layers.x.self_attn.q_proj"};
  EXPECT_EQ(FusedLaunchGroups(names),
            (std::vector<int64_t>{0, 0, 0, -1, 1, 1, -1, 24, 25, -1, -1}));
  // Through PlanDiagnosticPlacement: two q/k modules of one layer beat an
  // o_proj of higher damage per byte once the first of them is taken.
  const std::vector<double> damages = {0.6, 0.5, 0.55};
  const std::vector<ModuleShape> shapes = {{64, 64, 2048}, {64, 64, 2048}, {64, 64, 2048}};
  const std::vector<double> lat = {1.0, 1.0, 1.0};
  const std::vector<int64_t> groups =
      FusedLaunchGroups({"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.o_proj"});
  auto plain = PlanDiagnosticPlacement(damages, shapes, 2700, true, 16, 1.0, 4, &lat);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(*plain, (std::vector<int64_t>{4, 0, 4}));
  auto fused = PlanDiagnosticPlacement(damages, shapes, 2700, true, 16, 1.0, 4, &lat, nullptr,
                                       &groups);
  ASSERT_TRUE(fused.ok());
  EXPECT_EQ(*fused, (std::vector<int64_t>{4, 4, 0}));
  const std::vector<int64_t> short_groups = {0};
  EXPECT_TRUE(absl::IsInvalidArgument(
      PlanDiagnosticPlacement(damages, shapes, 2700, true, 16, 1.0, 4, &lat, nullptr,
                              &short_groups)
          .status()));
}

// --ec-launch-budget: CountLaunches counts a group once and every module of
// group -1 alone; LaunchCap rounds F L half up, at least 1, none at F = 1.
// Through PlanDiagnosticPlacement a budget of 1/3 over the three launches
// of {q, k (one group), o, down} keeps to the q/k launch, where the plain
// plan takes all four modules.
TEST(PlacementLatency, LaunchBudgetCapsTheEcCarryingGemms) {
  EXPECT_EQ(CountLaunches({0, 0, 0, -1, 1, 1, -1}), 4);
  EXPECT_EQ(CountLaunches({}), 0);
  EXPECT_EQ(LaunchCap(1.0, 120), -1);
  EXPECT_EQ(LaunchCap(0.5, 120), 60);
  EXPECT_EQ(LaunchCap(0.5, 5), 3);
  EXPECT_EQ(LaunchCap(0.01, 5), 1);
  const std::vector<double> damages = {0.6, 0.5, 0.55, 0.1};
  const std::vector<ModuleShape> shapes(4, ModuleShape{64, 64, 2048});
  const std::vector<int64_t> groups =
      FusedLaunchGroups({"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"});
  ASSERT_EQ(CountLaunches(groups), 3);
  auto plain = PlanDiagnosticPlacement(damages, shapes, 1e6, true, 16, 10.0, 4, nullptr,
                                       nullptr, &groups);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(std::count_if(plain->begin(), plain->end(), [](int64_t r) { return r > 0; }), 4);
  auto capped = PlanDiagnosticPlacement(damages, shapes, 1e6, true, 16, 10.0, 4, nullptr,
                                        nullptr, &groups, kernels::EcFactors::kF16, 4, 1.0 / 3);
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_GT((*capped)[0], 0);
  EXPECT_GT((*capped)[1], 0);
  EXPECT_EQ((*capped)[2], 0);
  EXPECT_EQ((*capped)[3], 0);
  for (double bad : {0.0, -0.5, 1.5, std::nan("")}) {
    EXPECT_TRUE(absl::IsInvalidArgument(
        PlanDiagnosticPlacement(damages, shapes, 1e6, true, 16, 10.0, 4, nullptr, nullptr,
                                &groups, kernels::EcFactors::kF16, 4, bad)
            .status()))
        << bad;
  }
  EXPECT_TRUE(absl::IsInvalidArgument(
      PlanDiagnosticPlacement(damages, shapes, 1e6, true, 16, 10.0, 4, nullptr, nullptr, nullptr,
                              kernels::EcFactors::kF16, 4, 0.5)
          .status()));
}

}  // namespace
}  // namespace spear::quantize
