// ExportHfTokenizer: the exported tokenizer.json + tokenizer_config.json,
// loaded back with LoadHfTokenizer, behave exactly like the original
// (ids with and without BOS, decoding, specials, bos/eos, chat template);
// on SmolLM2 (when present) they also reproduce HF's golden ids.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/engine/tiny_model.h"
#include "tests/test_util.h"
#include "worker/model/gguf.h"
#include "worker/model/tokenizer.h"

namespace spear::model {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> GoldenStrings() {
  std::vector<std::string> out;
  for (const char* f : {"tokenizer_golden.json", "tokenizer_tiny_golden.json"}) {
    const auto j = nlohmann::json::parse(ReadAll(spear::testing::TestdataPath(f)));
    for (const auto& s : j["strings"]) out.push_back(s.get<std::string>());
  }
  out.push_back("<|im_start|>user\nhi<|im_end|>\n<|endoftext|> tail");
  return out;
}

std::unique_ptr<Tokenizer> ExportAndReload(const Tokenizer& tok) {
  auto files = ExportHfTokenizer(tok);
  EXPECT_TRUE(files.ok()) << files.status();
  if (!files.ok()) return nullptr;
  const std::string dir = spear::testing::MakeTempDir("tok_export");
  std::ofstream(dir + "/tokenizer.json") << files->tokenizer_json;
  std::ofstream(dir + "/tokenizer_config.json") << files->tokenizer_config_json;
  auto back = LoadHfTokenizer(dir + "/tokenizer.json");
  EXPECT_TRUE(back.ok()) << back.status();
  return back.ok() ? *std::move(back) : nullptr;
}

void ExpectSameTokenizer(const Tokenizer& a, const Tokenizer& b) {
  EXPECT_EQ(a.vocab_size(), b.vocab_size());
  EXPECT_EQ(a.bos_id(), b.bos_id());
  EXPECT_EQ(a.eos_id(), b.eos_id());
  EXPECT_EQ(a.chat_template(), b.chat_template());
  for (int32_t id = 0; id < a.vocab_size(); ++id) {
    ASSERT_EQ(a.TokenText(id), b.TokenText(id)) << id;
    ASSERT_EQ(a.IsSpecial(id), b.IsSpecial(id)) << id;
  }
  int n = 0;
  for (const std::string& s : GoldenStrings()) {
    for (bool bos : {false, true}) {
      const auto ids = a.Encode(s, bos);
      ASSERT_EQ(ids, b.Encode(s, bos)) << s;
      EXPECT_EQ(a.Decode(ids), b.Decode(ids));
      ++n;
    }
  }
  EXPECT_GT(n, 100);
}

TEST(TokenizerExport, TinyHfJsonFixtures) {
  for (const char* f : {"tiny_bpe_gpt2.json", "tiny_bpe_llama3.json"}) {
    SCOPED_TRACE(f);
    auto tok = LoadHfTokenizer(spear::testing::TestdataPath(f));
    ASSERT_TRUE(tok.ok()) << tok.status();
    auto back = ExportAndReload(**tok);
    ASSERT_NE(back, nullptr);
    ExpectSameTokenizer(**tok, *back);
  }
}

TEST(TokenizerExport, TinyGgufFixtures) {
  for (const char* f : {"tiny_gpt2.gguf", "tiny_llama-bpe.gguf", "tiny_qwen2.gguf", "tiny_smollm.gguf"}) {
    SCOPED_TRACE(f);
    auto gguf = GgufFile::Open(spear::testing::TestdataPath(f));
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    auto tok = TokenizerFromGguf(**gguf);
    ASSERT_TRUE(tok.ok()) << tok.status();
    auto back = ExportAndReload(**tok);
    ASSERT_NE(back, nullptr);
    ExpectSameTokenizer(**tok, *back);
  }
}

TEST(TokenizerExport, SmolLm2MatchesHfGolden) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  auto gguf = GgufFile::Open(path);
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  auto tok = TokenizerFromGguf(**gguf);
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto back = ExportAndReload(**tok);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(back->bos_id(), 1);
  EXPECT_EQ(back->eos_id(), 2);
  EXPECT_FALSE(back->chat_template().empty());
  const auto g = nlohmann::json::parse(ReadAll(spear::testing::TestdataPath("tokenizer_golden.json")));
  const auto strings = g["strings"].get<std::vector<std::string>>();
  const auto ids = g["ids"].get<std::vector<std::vector<int32_t>>>();
  ASSERT_EQ(strings.size(), ids.size());
  for (size_t i = 0; i < strings.size(); ++i) {
    EXPECT_EQ(back->Encode(strings[i], /*add_bos=*/false), ids[i]) << strings[i];
  }
  ExpectSameTokenizer(**tok, *back);
}

}  // namespace
}  // namespace spear::model
