// TokenizerFromGguf: every supported tokenizer.ggml.pre preset on a tiny
// vocabulary, against HF `tokenizers` with the equivalent pre-tokenizer.
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tests/tokenizer/tokenizer_test_util.h"
#include "worker/model/gguf.h"
#include "worker/model/tokenizer.h"

namespace spear::model {
namespace {

using spear::model::testing::Escaped;
using spear::model::testing::ReadFileOrDie;
using spear::testing::TestdataPath;

TEST(GgufTokenizer, PresetsMatchHfGolden) {
  const auto g = nlohmann::json::parse(ReadFileOrDie(TestdataPath("tokenizer_tiny_golden.json")));
  const auto strings = g["gguf_strings"].get<std::vector<std::string>>();
  ASSERT_EQ(g["gguf_cases"].size(), 4u);
  for (const auto& c : g["gguf_cases"]) {
    const std::string name = c["gguf"].get<std::string>();
    auto gguf = GgufFile::Open(TestdataPath(name));
    ASSERT_TRUE(gguf.ok()) << name << ": " << gguf.status();
    auto tok = TokenizerFromGguf(**gguf);
    ASSERT_TRUE(tok.ok()) << name << ": " << tok.status();
    const auto ids = c["ids"].get<std::vector<std::vector<int32_t>>>();
    int matches = 0;
    for (size_t i = 0; i < strings.size(); ++i) {
      const auto got = (*tok)->Encode(strings[i], /*add_bos=*/true);
      EXPECT_EQ(got, ids[i]) << name << " string " << i << ": " << Escaped(strings[i]);
      matches += got == ids[i];
      EXPECT_EQ((*tok)->Decode((*tok)->Encode(strings[i], false)), strings[i]) << name;
    }
    std::printf("%s: %d/%zu match HF\n", name.c_str(), matches, strings.size());
  }
}

TEST(GgufTokenizer, BosFollowsAddBosToken) {
  for (const char* name : {"tiny_gpt2.gguf", "tiny_llama-bpe.gguf"}) {
    auto gguf = GgufFile::Open(TestdataPath(name));
    ASSERT_TRUE(gguf.ok());
    auto tok = TokenizerFromGguf(**gguf);
    ASSERT_TRUE(tok.ok());
    const int32_t bos = (*tok)->bos_id();
    EXPECT_EQ((*tok)->TokenText(bos), "<|begin_of_text|>");
    EXPECT_EQ((*tok)->TokenText((*tok)->eos_id()), "<|end_of_text|>");
    const bool adds = (*tok)->Encode("hi", true).front() == bos;
    EXPECT_EQ(adds, std::string(name) == "tiny_llama-bpe.gguf") << name;
  }
}

}  // namespace
}  // namespace spear::model
