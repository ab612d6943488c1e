// SmolLM2-135M tokenizer (from the GGUF, and optionally from the full
// tokenizer.json the golden script writes to /tmp) against HF `tokenizers`.
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <thread>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tests/tokenizer/tokenizer_test_util.h"
#include "worker/model/gguf.h"
#include "worker/model/tokenizer.h"

namespace spear::model {
namespace {

using spear::model::testing::Escaped;
using spear::model::testing::ReadFileOrDie;

struct Golden {
  std::vector<std::string> strings;
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::string> decoded;  // HF's decode of ids
};

Golden LoadGolden() {
  const auto j = nlohmann::json::parse(
      ReadFileOrDie(spear::testing::TestdataPath("tokenizer_golden.json")));
  return Golden{j["strings"].get<std::vector<std::string>>(),
                j["ids"].get<std::vector<std::vector<int32_t>>>(),
                j["decoded"].get<std::vector<std::string>>()};
}

std::unique_ptr<Tokenizer> LoadSmolLm2(const std::string& path) {
  auto gguf = GgufFile::Open(path);
  EXPECT_TRUE(gguf.ok()) << gguf.status();
  if (!gguf.ok()) return nullptr;
  auto tok = TokenizerFromGguf(**gguf);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

void ExpectGolden(const Tokenizer& tok, const Golden& g) {
  ASSERT_EQ(g.strings.size(), g.ids.size());
  ASSERT_EQ(g.strings.size(), g.decoded.size());
  ASSERT_GE(g.strings.size(), 50u);
  int matches = 0;
  int round_trips = 0;
  for (size_t i = 0; i < g.strings.size(); ++i) {
    const std::vector<int32_t> ids = tok.Encode(g.strings[i], /*add_bos=*/false);
    EXPECT_EQ(ids, g.ids[i]) << "string " << i << ": " << Escaped(g.strings[i]);
    matches += ids == g.ids[i];
    const std::string decoded = tok.Decode(ids);
    EXPECT_EQ(decoded, g.decoded[i]) << Escaped(g.strings[i]);
    // Exact round trip except where HF also drops bytes without a byte token.
    if (g.decoded[i] == g.strings[i]) {
      EXPECT_EQ(decoded, g.strings[i]);
    }
    round_trips += decoded == g.strings[i];
  }
  std::printf("golden: %d/%zu strings match HF tokenizers; %d round-trip exactly\n", matches,
              g.strings.size(), round_trips);
}

TEST(SmolLm2Tokenizer, GgufMatchesHfGolden) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  auto tok = LoadSmolLm2(path);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 49152);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  ExpectGolden(*tok, LoadGolden());
}

TEST(SmolLm2Tokenizer, FullTokenizerJsonMatchesHfGolden) {
  const char* env = std::getenv("SPEAR_TOKENIZER_JSON");
  const std::string path = env && *env ? env : "/tmp/smollm2_tokenizer.json";
  if (!std::filesystem::exists(path)) {
    GTEST_SKIP() << path << " absent; run tests/testdata/make_tokenizer_golden.py to create it";
  }
  auto tok = LoadHfTokenizer(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  ExpectGolden(**tok, LoadGolden());
}

TEST(SmolLm2Tokenizer, SpecialTokensAndBos) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  auto tok = LoadSmolLm2(path);
  ASSERT_NE(tok, nullptr);
  EXPECT_TRUE(tok->IsSpecial(0));
  EXPECT_TRUE(tok->IsSpecial(1));
  EXPECT_FALSE(tok->IsSpecial(19556));
  EXPECT_EQ(tok->TokenId("<|im_start|>"), 1);
  EXPECT_EQ(tok->TokenText(2), "<|im_end|>");
  EXPECT_EQ(tok->TokenId("no such token"), std::nullopt);
  // add_bos_token is false in SmolLM2's GGUF: add_bos changes nothing.
  EXPECT_EQ(tok->Encode("Hello", true), tok->Encode("Hello", false));
  const std::vector<int32_t> ids = tok->Encode("<|im_start|>user\nHi<|im_end|>");
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(tok->Decode(ids, /*skip_special=*/true), "user\nHi");
  // Out-of-range ids decode to nothing rather than crashing.
  const std::vector<int32_t> bad = {-5, 1 << 30};
  EXPECT_EQ(tok->Decode(bad), "");
}

TEST(SmolLm2Tokenizer, InvalidUtf8RoundTripsThroughByteTokens) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  auto tok = LoadSmolLm2(path);
  ASSERT_NE(tok, nullptr);
  for (const std::string& s : {std::string("ab\xc3"), std::string("\xe4\xb8 x \x80\x80 y"),
                               std::string("\0a\0", 3), std::string("\xed\xa0\x80")}) {
    const auto ids = tok->Encode(s);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tok->Decode(ids), s) << Escaped(s);
  }
  // SmolLM2's vocabulary has no byte token for 0xC0, 0xC1, 0xF5-0xFF (never
  // in valid UTF-8) and a few control bytes: like HF, those bytes are dropped.
  EXPECT_EQ(tok->Decode(tok->Encode("a\xff\xfe\x06" "b")), "ab");
}

TEST(SmolLm2Tokenizer, ConcurrentEncodeIsConsistent) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  auto tok = LoadSmolLm2(path);
  ASSERT_NE(tok, nullptr);
  const Golden g = LoadGolden();
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        for (size_t i = 0; i < g.strings.size(); ++i) {
          mismatches[t] += tok->Encode(g.strings[i], false) != g.ids[i];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int m : mismatches) EXPECT_EQ(m, 0);
}

TEST(SmolLm2Tokenizer, StreamingDecoderHoldsBackPartialUtf8) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  auto tok = LoadSmolLm2(path);
  ASSERT_NE(tok, nullptr);
  for (const std::string text :
       {"中文分词测试：你好，世界！", "family 👨‍👩‍👧‍👦 and 🇺🇸", "plain ascii text, nothing odd",
        "<|im_start|>assistant\nمرحبا 😀<|im_end|>"}) {
    StreamingDecoder dec(tok.get());
    std::string streamed;
    for (int32_t id : tok->Encode(text, false)) {
      const std::string piece = dec.Push(id);
      // Every chunk is complete UTF-8 on its own.
      EXPECT_TRUE(spear::model::testing::IsValidUtf8(piece)) << Escaped(text);
      streamed += piece;
    }
    streamed += dec.Flush();
    EXPECT_EQ(streamed, text);
  }
  // A truncated stream gives its partial bytes back on Flush.
  StreamingDecoder dec(tok.get());
  std::string out;
  const auto ids = tok->Encode("😀", false);
  ASSERT_GT(ids.size(), 1u);
  out += dec.Push(ids[0]);
  EXPECT_EQ(out, "");
  out += dec.Flush();
  EXPECT_FALSE(out.empty());
  // skip_special drops control tokens from the stream.
  StreamingDecoder quiet(tok.get(), /*skip_special=*/true);
  std::string q;
  for (int32_t id : tok->Encode("<|im_start|>hi<|im_end|>", false)) q += quiet.Push(id);
  q += quiet.Flush();
  EXPECT_EQ(q, "hi");
}

TEST(SmolLm2Tokenizer, ChatTemplateMatchesJinjaOutput) {
  SPEAR_SKIP_WITHOUT_SMOLLM2(path);
  auto tok = LoadSmolLm2(path);
  ASSERT_NE(tok, nullptr);
  ASSERT_NE(tok->chat_template().find("<|im_start|>"), std::string::npos);
  // Expected strings are what the GGUF's Jinja template renders.
  auto r = ApplyChatTemplate(*tok, {{"user", "What is 2+2?"}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n");
  r = ApplyChatTemplate(*tok, {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello!"}},
                        /*add_generation_prompt=*/false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n");
  EXPECT_EQ(ApplyChatTemplate(*tok, {{"tool", "x"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spear::model
