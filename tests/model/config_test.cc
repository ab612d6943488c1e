#include "worker/model/config.h"

#include <gtest/gtest.h>

#include <cmath>

#include "tests/model/gguf_builder.h"
#include "tests/test_util.h"
#include "worker/model/gguf.h"

namespace spear::model {
namespace {

namespace t = ::spear::testing;

constexpr char kSmolLm2Json[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1,
  "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
  "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
  "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
  "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "vocab_size": 49152})";

constexpr char kLlama31Json[] = R"({
  "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "hidden_size": 4096, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "vocab_size": 128256})";

void ExpectSmolLm2(const ModelConfig& c) {
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.num_layers, 30);
  EXPECT_EQ(c.hidden_size, 576);
  EXPECT_EQ(c.num_heads, 9);
  EXPECT_EQ(c.num_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate_size, 1536);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.rope_theta, 100000.0);
  EXPECT_NEAR(c.rms_eps, 1e-5, 1e-12);
  EXPECT_EQ(c.max_position, 8192);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2}));
  EXPECT_EQ(c.rope_scaling.kind, RopeScaling::Kind::kNone);
  const std::vector<float> inv = c.RopeInvFreq();
  ASSERT_EQ(inv.size(), 32u);
  // numpy float64: 1 / 100000 ** (arange(0, 64, 2) / 64)
  const double expect[][2] = {
      {0, 1.0}, {1, 6.978305849e-01}, {16, 3.162277660e-03}, {31, 1.433012570e-05}};
  for (const auto& [j, v] : expect) EXPECT_NEAR(inv[static_cast<int>(j)], v, v * 1e-6) << j;
}

TEST(ConfigTest, SmolLm2FromHfJson) {
  absl::StatusOr<ModelConfig> c = ConfigFromHfJson(kSmolLm2Json);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectSmolLm2(*c);
}

TEST(ConfigTest, SmolLm2FromGguf) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  absl::StatusOr<std::unique_ptr<GgufFile>> g = GgufFile::Open(path);
  ASSERT_TRUE(g.ok()) << g.status();
  absl::StatusOr<ModelConfig> c = ConfigFromGguf(**g);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectSmolLm2(*c);
}

TEST(ConfigTest, Llama3RopeScalingMatchesTransformers) {
  absl::StatusOr<ModelConfig> c = ConfigFromHfJson(kLlama31Json);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.kind, RopeScaling::Kind::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_EQ(c->rope_scaling.original_max_position, 8192);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_FALSE(c->tie_word_embeddings);
  const std::vector<float> inv = c->RopeInvFreq();
  ASSERT_EQ(inv.size(), 64u);
  // transformers' _compute_llama3_parameters, evaluated with numpy (float64):
  // high-frequency band unchanged, medium band smoothed, low band divided by 8.
  const double expect[][2] = {{0, 1.000000000e+00},  {1, 8.146172339e-01},  {10, 1.286873734e-01},
                              {20, 1.656044008e-02}, {30, 1.371893568e-03}, {35, 9.556212354e-05},
                              {40, 3.428102196e-05}, {45, 1.229763868e-05}, {50, 4.411534675e-06},
                              {63, 3.068925989e-07}};
  for (const auto& [j, v] : expect) EXPECT_NEAR(inv[static_cast<int>(j)], v, v * 1e-6) << j;
}

TEST(ConfigTest, LinearScalingDividesByFactor) {
  std::string j = kSmolLm2Json;
  j.replace(j.find("\"rope_scaling\": null"), 20,
            R"("rope_scaling": {"type": "linear", "factor": 4.0})");
  absl::StatusOr<ModelConfig> c = ConfigFromHfJson(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.kind, RopeScaling::Kind::kLinear);
  ModelConfig plain = *c;
  plain.rope_scaling = RopeScaling();
  const std::vector<float> a = c->RopeInvFreq(), b = plain.RopeInvFreq();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_FLOAT_EQ(a[i], b[i] / 4.0f);
}

TEST(ConfigTest, Qwen2DefaultsAndHeadDim) {
  absl::StatusOr<ModelConfig> c = ConfigFromHfJson(R"({
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
    "max_position_embeddings": 32768, "eos_token_id": 151645, "bos_token_id": null})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "qwen2");
  EXPECT_TRUE(c->attention_bias);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->bos_token_id, -1);

  absl::StatusOr<ModelConfig> m = ConfigFromHfJson(R"({
    "model_type": "mistral", "vocab_size": 32768, "hidden_size": 5120, "intermediate_size": 14336,
    "num_hidden_layers": 40, "num_attention_heads": 32, "head_dim": 128, "rope_theta": 1e6})");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->head_dim, 128);     // explicit, not 5120 / 32
  EXPECT_EQ(m->num_kv_heads, 32);  // defaults to num_heads
}

TEST(ConfigTest, InvalidConfigs) {
  auto with = [](const std::string& from, const std::string& to) {
    std::string j = kSmolLm2Json;
    const size_t at = j.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return j.replace(at, from.size(), to);
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{not json", "not valid JSON"},
      {"[1]", "not a JSON object"},
      {with("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4"), "must divide"},
      {with("\"hidden_size\": 576,", ""), "hidden_size must be positive"},
      {with("\"num_hidden_layers\": 30", "\"num_hidden_layers\": -1"), "num_layers"},
      {with("\"vocab_size\": 49152", "\"vocab_size\": \"big\""), "must be an integer"},
      {with("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\""), "unsupported model_type"},
      {with("\"rope_scaling\": null", R"("rope_scaling": {"rope_type": "longrope", "factor": 2})"),
       "unsupported rope scaling"},
      {with("\"rope_scaling\": null", R"("rope_scaling": {"rope_type": "linear"})"),
       "needs a factor"},
      {with("\"eos_token_id\": 2", "\"eos_token_id\": 50000"), "eos_token_id 50000"},
      {with("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 0"), "rms_norm_eps"},
      {with("\"num_attention_heads\": 9", "\"num_attention_heads\": 9, \"head_dim\": 63"), "even"},
      {with("\"rope_theta\": 100000", "\"rope_theta\": 1e400"), "not valid JSON"},
  };
  for (const auto& [json, msg] : cases) {
    absl::StatusOr<ModelConfig> c = ConfigFromHfJson(json);
    ASSERT_FALSE(c.ok()) << msg;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(c.status().message().find(msg), std::string::npos) << c.status();
  }
  EXPECT_EQ(ConfigFromHfJsonFile("/nonexistent/config.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ConfigTest, GgufErrors) {
  t::GgufBuilder b;
  b.AddString("general.architecture", "gpt2");
  std::vector<uint8_t> bytes = b.Build();
  auto g = GgufFile::FromBuffer(bytes.data(), bytes.size(), "x.gguf");
  ASSERT_TRUE(g.ok());
  EXPECT_FALSE(ConfigFromGguf(**g).ok());

  t::GgufBuilder l;
  l.AddString("general.architecture", "llama");
  l.AddU32("llama.block_count", 2);
  l.AddU32("llama.embedding_length", 64);
  l.AddU32("llama.feed_forward_length", 128);
  l.AddU32("llama.attention.head_count", 4);
  l.AddStringArray("tokenizer.ggml.tokens", {"a", "b", "c"});
  l.AddString("llama.rope.scaling.type", "linear");
  l.AddF32("llama.rope.scaling.factor", 2.0f);
  l.AddTensor("output.weight", t::kGgmlF32, {64, 3}, std::vector<uint8_t>(64 * 3 * 4));
  bytes = l.Build();
  g = GgufFile::FromBuffer(bytes.data(), bytes.size(), "y.gguf");
  ASSERT_TRUE(g.ok()) << g.status();
  absl::StatusOr<ModelConfig> c = ConfigFromGguf(**g);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 3);  // from the token list
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->rope_scaling.kind, RopeScaling::Kind::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 2.0);

  t::GgufBuilder n;  // missing a required key
  n.AddString("general.architecture", "llama");
  n.AddU32("llama.block_count", 2);
  bytes = n.Build();
  g = GgufFile::FromBuffer(bytes.data(), bytes.size(), "z.gguf");
  ASSERT_TRUE(g.ok());
  c = ConfigFromGguf(**g);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("llama.embedding_length"), std::string::npos) << c.status();
}

}  // namespace
}  // namespace spear::model
