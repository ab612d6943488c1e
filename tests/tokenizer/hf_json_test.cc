// tokenizer.json loader: small committed fixtures against HF golden ids, the
// pre-tokenizer split behaviors, and malformed inputs.
#include <memory>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tests/tokenizer/tokenizer_test_util.h"
#include "worker/model/tokenizer.h"

namespace spear::model {
namespace {

using spear::model::testing::Escaped;
using spear::model::testing::ReadFileOrDie;
using spear::testing::TestdataPath;

TEST(HfTokenizerJson, TinyFixturesMatchHfGolden) {
  const auto g = nlohmann::json::parse(ReadFileOrDie(TestdataPath("tokenizer_tiny_golden.json")));
  const auto strings = g["strings"].get<std::vector<std::string>>();
  int checked = 0;
  for (const auto& c : g["cases"]) {
    const std::string name = c["tokenizer"].get<std::string>();
    auto tok = LoadHfTokenizer(TestdataPath(name));
    ASSERT_TRUE(tok.ok()) << name << ": " << tok.status();
    const bool add_special = c["add_special"].get<bool>();
    const auto ids = c["ids"].get<std::vector<std::vector<int32_t>>>();
    ASSERT_EQ(ids.size(), strings.size());
    for (size_t i = 0; i < strings.size(); ++i) {
      const auto got = (*tok)->Encode(strings[i], add_special);
      EXPECT_EQ(got, ids[i]) << name << " add_special=" << add_special << " string " << i << ": "
                             << Escaped(strings[i]);
      ++checked;
      if (!add_special && name != "tiny_bpe_gpt2.json") {
        // The gpt2 fixture adds a prefix space and strips around <mask>.
        EXPECT_EQ((*tok)->Decode(got), strings[i]) << name << ": " << Escaped(strings[i]);
      }
    }
  }
  EXPECT_GE(checked, 200);
}

TEST(HfTokenizerJson, TemplateProcessingGivesBos) {
  auto tok = LoadHfTokenizer(TestdataPath("tiny_bpe_llama3.json"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto bos = (*tok)->TokenId("<|begin_of_text|>");
  ASSERT_TRUE(bos.has_value());
  EXPECT_EQ((*tok)->bos_id(), *bos);
  EXPECT_EQ((*tok)->Encode("hi", true).front(), *bos);
  EXPECT_TRUE((*tok)->IsSpecial(*bos));
  EXPECT_EQ((*tok)->eos_id(), -1);  // no tokenizer_config.json given
}

TEST(HfTokenizerJson, TokenizerConfigSuppliesEosAndTemplate) {
  const std::string json = ReadFileOrDie(TestdataPath("tiny_bpe_llama3.json"));
  const std::string config = R"({"bos_token": "<|begin_of_text|>",
      "eos_token": {"content": "<|end_of_text|>"},
      "chat_template": "{{ '<|im_start|>' + message['role'] }}"})";
  auto tok = HfTokenizerFromJson(json, config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->eos_id(), *(*tok)->TokenId("<|end_of_text|>"));
  EXPECT_EQ((*tok)->chat_template(), "{{ '<|im_start|>' + message['role'] }}");
  EXPECT_FALSE(HfTokenizerFromJson(json, "{not json").ok());
}

// A hand-written byte-level tokenizer whose vocabulary holds the 256 byte
// characters plus a few merges; `pre` is spliced in as the pre_tokenizer.
std::string MiniJson(const std::string& pre) {
  nlohmann::json vocab = nlohmann::json::object();
  // Bytes through the GPT-2 mapping: printable ASCII maps to itself.
  for (int c = '!'; c <= '~'; ++c) vocab[std::string(1, static_cast<char>(c))] = c;
  vocab["\xc4\xa0"] = 32;  // "Ġ" = space
  vocab["ab"] = 200;
  vocab["\xc4\xa0" "ab"] = 201;
  return R"({"model": {"type": "BPE", "vocab": )" + vocab.dump() +
         R"(, "merges": ["a b", "Ġ ab"]}, "pre_tokenizer": )" + pre +
         R"(, "decoder": {"type": "ByteLevel"}})";
}

std::vector<std::string> Pieces(const Tokenizer& tok, const std::string& text) {
  std::vector<std::string> out;
  for (int32_t id : tok.Encode(text, false)) out.push_back(tok.TokenText(id));
  return out;
}

TEST(HfTokenizerJson, SplitBehaviors) {
  using V = std::vector<std::string>;
  auto make = [](const std::string& behavior, bool invert = false) {
    return HfTokenizerFromJson(MiniJson(
        R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"String": "-"},
            "behavior": ")" + behavior + R"(", "invert": )" + (invert ? "true" : "false") +
        R"(}, {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})"));
  };
  // "ab" merges only when a piece holds both letters.
  auto iso = make("Isolated");
  ASSERT_TRUE(iso.ok()) << iso.status();
  EXPECT_EQ(Pieces(**iso, "ab-ab--a"), (V{"ab", "-", "ab", "-", "-", "a"}));
  auto removed = make("Removed");
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(Pieces(**removed, "ab-ab--a"), (V{"ab", "ab", "a"}));
  auto contiguous = make("Contiguous");
  ASSERT_TRUE(contiguous.ok());
  EXPECT_EQ(Pieces(**contiguous, "a-b--b"), (V{"a", "-", "b", "-", "-", "b"}));
  auto prev = make("MergedWithPrevious");
  ASSERT_TRUE(prev.ok());
  EXPECT_EQ(Pieces(**prev, "ab-b"), (V{"ab", "-", "b"}));
  auto next = make("MergedWithNext");
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(Pieces(**next, "a-ab"), (V{"a", "-", "ab"}));
}

TEST(HfTokenizerJson, ByteLevelPrefixSpaceAndDigits) {
  auto tok = HfTokenizerFromJson(MiniJson(
      R"({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true},
          {"type": "ByteLevel", "add_prefix_space": true}]})"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  using V = std::vector<std::string>;
  EXPECT_EQ(Pieces(**tok, "ab"), (V{"Ġab"}));
  // Each digit is its own piece and gets its own prefix space.
  EXPECT_EQ(Pieces(**tok, "12"), (V{"Ġ", "1", "Ġ", "2"}));
}

TEST(HfTokenizerJson, RejectsMalformedInput) {
  const std::vector<std::string> bad = {
      "",
      "{",
      "[]",
      R"({"model": {"type": "Unigram", "vocab": []}})",
      R"({"model": {"type": "BPE", "vocab": {"a": -1}, "merges": []}})",
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})",
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [3]}})",
      R"({"model": {"type": "BPE", "vocab": {}, "merges": []}})",
      R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Metaspace"}})",
      R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer":
          {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated"}})",
      R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": {"type": "NFKC"}})",
      R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{"id": 99999999}]})",
      R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "post_processor":
          {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}]}})",
  };
  for (const std::string& j : bad) {
    auto tok = HfTokenizerFromJson(j);
    EXPECT_FALSE(tok.ok()) << j;
    if (!tok.ok()) {
      EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << j;
    }
  }
  EXPECT_EQ(LoadHfTokenizer("/nonexistent/tokenizer.json").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace spear::model
