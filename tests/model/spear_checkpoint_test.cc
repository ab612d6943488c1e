// .spear checkpoint: SHA-256 vectors, save/load round trip on a random tiny
// W4(+EC) model (logits identical), and corrupted checkpoints, each a clear
// error.
#include "worker/model/spear_checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "kernels/ec_factors.h"
#include "tests/engine/tiny_model.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/model/safetensors.h"
#include "worker/model/sha256.h"
#include "worker/model/w4_linear.h"
#include "worker/quantize/w4_quant.h"

namespace spear::model {
namespace {

namespace fs = std::filesystem;

TEST(Sha256, KnownVectors) {
  // FIPS 180-4 / NIST CAVP examples.
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha256Hex("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmno"
                      "pqklmnopqrlmnopqrsmnopqrstnopqrstu"),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, IncrementalAndFileMatchOneShot) {
  std::string data(100003, '\0');
  std::mt19937 rng(7);
  for (char& c : data) c = static_cast<char>(rng());
  const std::string want = Sha256Hex(data);
  for (size_t chunk : {1u, 55u, 56u, 63u, 64u, 65u, 4096u}) {
    Sha256 h;
    for (size_t i = 0; i < data.size(); i += chunk) h.Update(data.substr(i, chunk));
    EXPECT_EQ(h.FinishHex(), want) << "chunk " << chunk;
  }
  const std::string path = testing::MakeTempDir("sha") + "/blob";
  std::ofstream(path, std::ios::binary) << data;
  auto got = Sha256File(path);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, want);
  EXPECT_EQ(Sha256File("/no/such/file").status().code(), absl::StatusCode::kNotFound);
}

float RoundF16(float x) { return kernels::HalfToFloat(kernels::FloatToHalf(x)); }

std::vector<float> RandomF16(size_t n, float scale, std::mt19937* rng) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = RoundF16(nd(*rng));
  return v;
}

// Replaces every linear of `m` by an RTN W4Linear; modules get varied
// formats, and every third one an EC (gated, except every ninth: static).
absl::Status QuantizeInPlace(LoadedModel* m) {
  std::mt19937 rng(3);
  int index = 0;
  absl::Status status;
  m->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<Linear>& lin) {
    if (!status.ok()) return;
    const auto* dense = dynamic_cast<const DenseLinear*>(lin.get());
    const int64_t n = lin->out_features(), k = lin->in_features();
    quantize::Matrix w(n, k);
    for (int64_t i = 0; i < n * k; ++i) w.data[i] = kernels::LoadAsFloat(dense->weight(), dense->dtype(), i);
    const int i = index++;
    kernels::W4Format fmt{n, k, i % 2 ? k : 32, i % 3 == 1};
    auto q = quantize::QuantizeRtn(w.view(), fmt);
    if (!q.ok()) {
      status = q.status();
      return;
    }
    if (i % 4 == 2) {  // AWQ-style act scale (fp16 values)
      q->act_scale.resize(k);
      for (auto& s : q->act_scale) s = RoundF16(0.5f + std::uniform_real_distribution<float>(0, 1)(rng));
    }
    std::optional<kernels::EcWeights> ec;
    if (i % 3 == 0) {
      kernels::EcWeights e;
      e.n = n, e.k = k, e.rank = 4 + i % 5, e.gated = i % 9 != 0;
      e.gate_hidden = e.gated ? 8 : 0;
      e.a = RandomF16(e.rank * k, 0.1f, &rng);
      e.b = RandomF16(n * e.rank, 0.1f, &rng);
      if (e.gated) {
        e.w1 = RandomF16(e.gate_hidden * e.rank, 0.3f, &rng);
        e.b1 = RandomF16(e.gate_hidden, 0.1f, &rng);
        e.w2 = RandomF16(e.rank * e.gate_hidden, 0.3f, &rng);
        e.b2 = RandomF16(e.rank, 0.1f, &rng);
      }
      ec = std::move(e);
    }
    std::vector<float> bias;
    if (dense->bias() != nullptr) bias.assign(dense->bias(), dense->bias() + n);
    auto wl = W4Linear::Create(*std::move(q), std::move(ec), std::move(bias));
    if (!wl.ok()) {
      status = wl.status();
      return;
    }
    lin = *std::move(wl);
  });
  return status;
}

// All-token logits of one sequence.
std::vector<float> Logits(LoadedModel* m, const std::vector<int32_t>& toks) {
  engine::KvCacheOptions ko;
  ko.block_size = 16;
  ko.num_blocks = 16;
  auto cache = engine::KvCache::Create(m->config, ko);
  EXPECT_TRUE(cache.ok()) << cache.status();
  kernels::ThreadPool pool(2);
  engine::ModelRunner runner(m, cache->get(), &pool);
  std::vector<int32_t> table;
  for (int64_t i = 0; i < (*cache)->BlocksFor(toks.size()); ++i) table.push_back(static_cast<int32_t>(i));
  engine::ForwardOutput out;
  auto s = runner.Forward({engine::SeqChunk{toks, 0, table, engine::LogitsMode::kAll}}, &out);
  EXPECT_TRUE(s.ok()) << s;
  return std::vector<float>(out.logits.begin(), out.logits.begin() + toks.size() * m->config.vocab_size);
}

// Every linear of `m` as a W4Linear (null where it is not one), in
// ForEachLinear order.
std::vector<const W4Linear*> W4Linears(LoadedModel* m) {
  std::vector<const W4Linear*> out;
  m->weights.ForEachLinear([&](const std::string&, std::unique_ptr<Linear>& l) {
    out.push_back(dynamic_cast<const W4Linear*>(l.get()));
  });
  return out;
}

class SpearCheckpointTest : public ::testing::TestWithParam<bool> {
 protected:
  // A quantized tiny model (qwen2-style biases when the parameter is true)
  // saved to dir_.
  void SetUp() override {
    spec_.dtype = TensorType::kF16;
    spec_.qwen2 = GetParam();
    spec_.tied = GetParam();
    const std::string src = testing::MakeTempDir("spear_src");
    ASSERT_TRUE(testing::WriteTinyModel(src, spec_).ok());
    auto m = LoadModel(src);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    ASSERT_TRUE(QuantizeInPlace(model_.get()).ok());
    dir_ = testing::MakeTempDir("spear_out") + "/model.spear";
    SpearProvenance prov;
    prov.source_path = src;
    prov.command = "test";
    prov.calibration_json = R"({"kind": "self", "sequences": 2})";
    ASSERT_TRUE(SaveSpearModel(*model_, prov, dir_).ok());
  }

  // A copy of the checkpoint to corrupt.
  std::string Copy() {
    const std::string d = testing::MakeTempDir("spear_bad") + "/m.spear";
    fs::copy(dir_, d, fs::copy_options::recursive);
    return d;
  }
  static void EditManifest(const std::string& d, const std::function<void(nlohmann::json&)>& fn) {
    std::ifstream in(d + "/spear.json");
    nlohmann::json j = nlohmann::json::parse(in);
    fn(j);
    std::ofstream(d + "/spear.json", std::ios::trunc) << j.dump(1);
  }
  // Rewrites model.safetensors through fn (which may edit the list, the
  // buffers it points to being copies).
  static void EditTensors(const std::string& d, const std::function<void(std::vector<TensorToWrite>&,
                                                                           std::vector<std::vector<uint8_t>>&)>& fn) {
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<TensorToWrite> tw;
    {
      auto f = SafetensorsFile::Open(d + "/model.safetensors");
      ASSERT_TRUE(f.ok()) << f.status();
      bufs.reserve((*f)->tensors().size() + 1);
      for (const TensorInfo& t : (*f)->tensors()) {
        bufs.emplace_back(t.data, t.data + t.nbytes);
        tw.push_back({t.name, t.type, t.shape, bufs.back().data(), t.nbytes});
      }
      fn(tw, bufs);
    }
    ASSERT_TRUE(WriteSafetensors(d + "/model.safetensors", tw, {}).ok());
  }
  static void ExpectError(const std::string& d, absl::StatusCode code, const std::string& needle) {
    auto m = LoadModel(d);
    ASSERT_FALSE(m.ok()) << "loaded a corrupt checkpoint (wanted: " << needle << ")";
    EXPECT_EQ(m.status().code(), code) << m.status();
    EXPECT_NE(std::string(m.status().message()).find(needle), std::string::npos) << m.status();
  }

  testing::TinyModelSpec spec_;
  std::unique_ptr<LoadedModel> model_;
  std::string dir_;
};

TEST_P(SpearCheckpointTest, RoundTripLogitsIdentical) {
  EXPECT_TRUE(IsSpearDir(dir_));
  EXPECT_FALSE(fs::exists(dir_ + ".tmp"));
  auto loaded = LoadModel(dir_);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::vector<int32_t> toks;
  for (int i = 0; i < 21; ++i) toks.push_back((i * 37 + 5) % spec_.vocab);
  const std::vector<float> want = Logits(model_.get(), toks);
  const std::vector<float> got = Logits(loaded->get(), toks);
  ASSERT_EQ(want.size(), got.size());
  float md = 0;
  for (size_t i = 0; i < want.size(); ++i) md = std::max(md, std::abs(want[i] - got[i]));
  EXPECT_LE(md, 1e-6f);
  // Same modules, formats and ECs; sizes agree with the manifest.
  int ecs = 0;
  const std::vector<const W4Linear*> a = W4Linears(model_.get()), b = W4Linears(loaded->get());
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_NE(b[i], nullptr);
    EXPECT_EQ(a[i]->weight().packed, b[i]->weight().packed);
    EXPECT_EQ(a[i]->weight().act_scale, b[i]->weight().act_scale);
    EXPECT_EQ(a[i]->bias(), b[i]->bias());
    ASSERT_EQ(a[i]->has_ec(), b[i]->has_ec());
    if (a[i]->has_ec()) {
      ++ecs;
      EXPECT_EQ(a[i]->ec()->gated, b[i]->ec()->gated);
      EXPECT_EQ(a[i]->ec()->a, b[i]->ec()->a);
      EXPECT_EQ(a[i]->ec()->w2, b[i]->ec()->w2);
    }
  }
  EXPECT_GT(ecs, 2);
  auto man = ReadSpearManifest(dir_);
  ASSERT_TRUE(man.ok()) << man.status();
  const ServedBytes sb = ComputeServedBytes(**loaded);
  EXPECT_EQ(man->w4_model_bytes, sb.w4_model_bytes);
  EXPECT_EQ(man->ec_bytes, sb.ec_bytes);
  EXPECT_GT(sb.ec_bytes, 0);
  const auto prov = nlohmann::json::parse(man->provenance_json);
  EXPECT_EQ(prov["calibration"]["sequences"], 2);
  ASSERT_GE(prov["source_files"].size(), 2u);  // config.json, model.safetensors
  EXPECT_EQ(prov["source_files"][0]["sha256"].get<std::string>().size(), 64u);
}

TEST_P(SpearCheckpointTest, RefusesNonEmptyDirUnlessOverwrite) {
  SpearProvenance prov;
  EXPECT_EQ(SaveSpearModel(*model_, prov, dir_).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(SaveSpearModel(*model_, prov, dir_, /*overwrite=*/true).ok());
  EXPECT_TRUE(LoadModel(dir_).ok());
  prov.calibration_json = "[1, 2]";
  EXPECT_EQ(SaveSpearModel(*model_, prov, dir_, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(LoadModel(dir_).ok()) << "a failed save must leave the old checkpoint intact";
}

TEST_P(SpearCheckpointTest, RecordMeasurementKeepsTheCheckpointValid) {
  ASSERT_TRUE(RecordSpearMeasurement(dir_, "wiki.test.raw@ctx512", R"({"ppl": 12.5})").ok());
  ASSERT_TRUE(RecordSpearMeasurement(dir_, "other", "3").ok());
  auto man = ReadSpearManifest(dir_);
  ASSERT_TRUE(man.ok()) << man.status();
  const auto measured = nlohmann::json::parse(man->measured_json);
  EXPECT_EQ(measured["wiki.test.raw@ctx512"]["ppl"], 12.5);
  EXPECT_EQ(measured["other"], 3);
  EXPECT_TRUE(LoadModel(dir_).ok());
  EXPECT_EQ(RecordSpearMeasurement(dir_, "k", "{oops").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RecordSpearMeasurement("/no/such", "k", "1").code(), absl::StatusCode::kNotFound);
}

TEST_P(SpearCheckpointTest, DenseModelIsNotSaved) {
  auto dense = LoadModel(nlohmann::json::parse(ReadSpearManifest(dir_)->provenance_json)["source"]);
  ASSERT_TRUE(dense.ok());
  const std::string d = testing::MakeTempDir("spear_dense") + "/x";
  const absl::Status s = SaveSpearModel(**dense, {}, d);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_FALSE(fs::exists(d));
  EXPECT_FALSE(fs::exists(d + ".tmp"));
}

TEST_P(SpearCheckpointTest, CorruptionsAreClearErrors) {
  {  // No manifest: LoadSpearModel says so (LoadModel then treats it as HF).
    const std::string d = Copy();
    fs::remove(d + "/spear.json");
    auto m = LoadSpearModel(d);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
    EXPECT_NE(std::string(m.status().message()).find("spear.json"), std::string::npos);
    ExpectError(d, absl::StatusCode::kNotFound, "config.json");
    // A GGUF file in it (the model cache's layout): the error names it.
    std::ofstream(d + "/model.gguf") << "x";
    ExpectError(d, absl::StatusCode::kNotFound, "holds model.gguf: pass that file");
    const absl::Status st = CheckHfModelDir(d);  // what `spear info` reports
    EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
    EXPECT_NE(std::string(st.message()).find("model.gguf"), std::string::npos) << st;
  }
  {
    const std::string d = Copy();
    EditManifest(d, [](nlohmann::json& j) { j["format_version"] = 2; });
    ExpectError(d, absl::StatusCode::kUnimplemented, "format_version 2");
  }
  {
    const std::string d = Copy();
    std::ofstream(d + "/spear.json", std::ios::trunc) << "{\"format\": ";
    ExpectError(d, absl::StatusCode::kInvalidArgument, "not a JSON object");
  }
  {
    const std::string d = Copy();
    EditTensors(d, [](auto& tw, auto&) { std::erase_if(tw, [](const TensorToWrite& t) { return t.name == "model.layers.1.mlp.up_proj.scales"; }); });
    ExpectError(d, absl::StatusCode::kNotFound, "missing tensor model.layers.1.mlp.up_proj.scales");
  }
  {
    const std::string d = Copy();
    EditTensors(d, [](auto& tw, auto&) {
      for (auto& t : tw) {
        if (t.name == "model.layers.0.self_attn.q_proj.scales") t.type = TensorType::kBF16;
      }
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "q_proj.scales has dtype BF16, expected F16");
  }
  {
    const std::string d = Copy();
    EditTensors(d, [](auto& tw, auto&) {
      for (auto& t : tw) {
        if (t.name == "model.layers.1.self_attn.o_proj.qweight") t.shape = {t.shape[1], t.shape[0]};
      }
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "o_proj.qweight has shape");
  }
  {  // Manifest rank differs from the tensors.
    const std::string d = Copy();
    EditManifest(d, [](nlohmann::json& j) {
      for (auto& m : j["modules"]) {
        if (!m["ec"].is_null()) {
          m["ec"]["rank"] = m["ec"]["rank"].get<int>() - 1;
          break;
        }
      }
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "EC rank");
  }
  {
    const std::string d = Copy();
    const auto size = fs::file_size(d + "/model.safetensors");
    fs::resize_file(d + "/model.safetensors", size - 100);
    ExpectError(d, absl::StatusCode::kInvalidArgument, "model.safetensors");
  }
  {
    const std::string d = Copy();
    EditTensors(d, [](auto& tw, auto& bufs) {
      for (size_t i = 0; i < tw.size(); ++i) {
        if (tw[i].name == "model.layers.0.mlp.down_proj.scales") {
          const uint16_t nan = 0x7e00;
          std::memcpy(bufs[i].data() + 6, &nan, 2);
        }
      }
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "non-finite scale");
  }
  {
    const std::string d = Copy();
    EditManifest(d, [](nlohmann::json& j) { j["modules"].erase(j["modules"].begin() + 3); });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "model.layers.0.self_attn.o_proj missing");
  }
  {
    const std::string d = Copy();
    EditManifest(d, [](nlohmann::json& j) { j["architecture"]["num_layers"] = 3; });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "module model.layers.2.self_attn.q_proj missing");
  }
  {
    const std::string d = Copy();
    EditTensors(d, [](auto& tw, auto& bufs) {
      bufs.emplace_back(8, 0);
      tw.push_back({"stray.tensor", TensorType::kU8, {8}, bufs.back().data(), 8});
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "unexpected tensor stray.tensor");
  }
  {
    const std::string d = Copy();
    EditTensors(d, [](auto& tw, auto& bufs) {
      for (size_t i = 0; i < tw.size(); ++i) {
        if (tw[i].name == "model.layers.0.self_attn.k_proj.zeros") bufs[i][0] = 16;
      }
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "zero point 16");
  }
}

// ECs with int8 factors (EcFactors::kI8): saved as I8 codes + F16 scales,
// reloaded bit for bit, counted at their stored size; their corruptions are
// clear errors.
TEST_P(SpearCheckpointTest, I8FactorsRoundTripAndCorruptions) {
  const int64_t f16_bytes = ComputeServedBytes(*model_).ec_bytes;
  int64_t want = 0;
  model_->weights.ForEachLinear([&](const std::string&, std::unique_ptr<Linear>& l) {
    const auto* w4 = dynamic_cast<const W4Linear*>(l.get());
    if (w4 == nullptr || !w4->has_ec()) return;
    kernels::EcWeights e = *w4->ec();
    ASSERT_TRUE(kernels::RoundEcFactorsI8(&e).ok());
    want += static_cast<int64_t>(e.bytes());
    auto q = W4Linear::Create(w4->weight(), std::move(e), w4->bias());
    ASSERT_TRUE(q.ok()) << q.status();
    l = *std::move(q);
  });
  const std::string dir = testing::MakeTempDir("spear_i8") + "/m.spear";
  ASSERT_TRUE(SaveSpearModel(*model_, {}, dir).ok());
  auto man = ReadSpearManifest(dir);
  ASSERT_TRUE(man.ok()) << man.status();
  std::string ec_module;
  for (const SpearModuleInfo& mi : man->modules) {
    if (mi.ec_rank > 0) {
      EXPECT_EQ(mi.ec_factors, kernels::EcFactors::kI8) << mi.name;
      if (ec_module.empty()) ec_module = mi.name;
    }
  }
  ASSERT_FALSE(ec_module.empty());
  EXPECT_EQ(man->ec_bytes, want);
  EXPECT_LT(man->ec_bytes, f16_bytes * 3 / 5);  // about half the fp16 factors
  auto loaded = LoadModel(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(ComputeServedBytes(**loaded).ec_bytes, want);
  int64_t held = 0;  // the loaded ECs' bytes in memory
  const std::vector<const W4Linear*> a = W4Linears(model_.get()), b = W4Linears(loaded->get());
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_NE(b[i], nullptr);
    ASSERT_EQ(a[i]->has_ec(), b[i]->has_ec());
    if (!a[i]->has_ec()) continue;
    EXPECT_EQ(b[i]->ec()->factors, kernels::EcFactors::kI8);
    // Loaded compact: the codes and scales as stored, no float copy, so the
    // bytes held are the bytes counted (the fp16 gate apart, held as floats).
    const kernels::EcWeights& le = *b[i]->ec();
    ASSERT_TRUE(le.compact_i8());
    EXPECT_TRUE(le.a.empty() && le.b.empty() && le.w1.empty());
    EXPECT_EQ(le.resident_bytes(), le.bytes());
    held += static_cast<int64_t>(le.resident_bytes());
    auto decoded = kernels::WithFloatFactors(le);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(a[i]->ec()->a, decoded->a);
    EXPECT_EQ(a[i]->ec()->b, decoded->b);
    EXPECT_EQ(a[i]->ec()->b1, decoded->b1);  // the tiny model's gate is fp16-exact
    EXPECT_EQ(a[i]->ec()->w2, decoded->w2);
  }
  EXPECT_EQ(held, want);
  // Saved again from the compact form: the same tensors, byte for byte.
  const std::string dir2 = testing::MakeTempDir("spear_i8_again") + "/m.spear";
  ASSERT_TRUE(SaveSpearModel(**loaded, {}, dir2).ok());
  {
    std::ifstream f1(dir + "/model.safetensors", std::ios::binary),
        f2(dir2 + "/model.safetensors", std::ios::binary);
    const std::string s1((std::istreambuf_iterator<char>(f1)), std::istreambuf_iterator<char>()),
        s2((std::istreambuf_iterator<char>(f2)), std::istreambuf_iterator<char>());
    EXPECT_FALSE(s1.empty());
    EXPECT_TRUE(s1 == s2) << "re-saved safetensors differ";
  }
  std::vector<int32_t> toks;
  for (int i = 0; i < 17; ++i) toks.push_back((i * 29 + 3) % spec_.vocab);
  EXPECT_EQ(Logits(model_.get(), toks), Logits(loaded->get(), toks));

  auto copy = [&]() {
    const std::string d = testing::MakeTempDir("spear_i8_bad") + "/m.spear";
    fs::copy(dir, d, fs::copy_options::recursive);
    return d;
  };
  auto edit_tensor = [&](const std::string& d, const std::string& name,
                         const std::function<void(std::vector<uint8_t>&)>& fn) {
    EditTensors(d, [&](auto& tw, auto& bufs) {
      for (size_t i = 0; i < tw.size(); ++i) {
        if (tw[i].name == name) fn(bufs[i]);
      }
    });
  };
  {
    const std::string d = copy();
    edit_tensor(d, ec_module + ".ec.a", [](std::vector<uint8_t>& v) { v[2] = 0x80; });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "code -128");
  }
  {
    const std::string d = copy();
    edit_tensor(d, ec_module + ".ec.b_scales", [](std::vector<uint8_t>& v) {
      const uint16_t nan = 0x7e00;
      std::memcpy(v.data(), &nan, 2);
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "not a positive normal fp16");
  }
  {
    const std::string d = copy();
    EditTensors(d, [&](auto& tw, auto&) {
      std::erase_if(tw, [&](const TensorToWrite& t) { return t.name == ec_module + ".ec.a_scales"; });
    });
    ExpectError(d, absl::StatusCode::kNotFound, "missing tensor " + ec_module + ".ec.a_scales");
  }
  {  // The manifest says fp16 factors: the I8 tensors are refused.
    const std::string d = copy();
    EditManifest(d, [](nlohmann::json& j) {
      for (auto& m : j["modules"]) {
        if (!m["ec"].is_null()) m["ec"]["factors"] = "f16";
      }
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "ec.a has dtype I8, expected F16");
  }
  {
    const std::string d = copy();
    EditManifest(d, [](nlohmann::json& j) {
      for (auto& m : j["modules"]) {
        if (!m["ec"].is_null()) m["ec"]["factors"] = "i4";
      }
    });
    ExpectError(d, absl::StatusCode::kInvalidArgument, "ec.factors is 'i4', not f16 or i8");
  }
}

INSTANTIATE_TEST_SUITE_P(UntiedAndQwen2Tied, SpearCheckpointTest, ::testing::Bool());

}  // namespace
}  // namespace spear::model
