// SentencePiece through libsentencepiece, on a tiny model trained here.
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "tests/tokenizer/sp_train_helper.h"
#include "worker/model/tokenizer.h"

namespace spear::model {
namespace {

class SentencePieceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::filesystem::path(std::filesystem::temp_directory_path() /
                                     ("spear_sp_test_" + std::to_string(::getpid())));
    std::filesystem::create_directories(*dir_);
    std::ofstream corpus(*dir_ / "corpus.txt");
    for (int i = 0; i < 50; ++i) {
      corpus << "the quick brown fox jumps over the lazy dog " << i << "\n"
             << "hello world, tokenizers turn text into numbers and back again\n"
             << "sentence piece models work on raw unicode text like café and naïve\n";
    }
    corpus.close();
    const std::string err = testing::TrainSentencePiece(
        "--input=" + (*dir_ / "corpus.txt").string() + " --model_prefix=" +
        (*dir_ / "tiny").string() +
        " --vocab_size=100 --model_type=bpe --character_coverage=1.0"
        " --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1 --minloglevel=2");
    ASSERT_EQ(err, "");
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
  }
  static std::string ModelPath() { return (*dir_ / "tiny.model").string(); }
  static std::filesystem::path* dir_;
};
std::filesystem::path* SentencePieceTest::dir_ = nullptr;

TEST_F(SentencePieceTest, RoundTripAndSpecialIds) {
  auto tok = LoadSentencePiece(ModelPath());
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Tokenizer& t = **tok;
  EXPECT_EQ(t.vocab_size(), 100);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_TRUE(t.IsSpecial(1));
  EXPECT_TRUE(t.IsSpecial(2));
  EXPECT_FALSE(t.IsSpecial(50));
  EXPECT_EQ(t.TokenText(1), "<s>");
  EXPECT_EQ(t.TokenId("</s>"), 2);
  EXPECT_EQ(t.TokenId("definitely not a piece"), std::nullopt);
  EXPECT_TRUE(t.chat_template().empty());

  for (const std::string text : {"hello world", "the lazy dog jumps", "café 42"}) {
    const auto ids = t.Encode(text, /*add_bos=*/true);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.front(), 1);
    EXPECT_EQ(t.Decode(ids, /*skip_special=*/true), text);
    EXPECT_EQ(t.Decode(ids), "<s>" + text);
    EXPECT_EQ(t.Encode(text, false), std::vector<int32_t>(ids.begin() + 1, ids.end()));
  }
  // Control tokens written in the text are matched as whole tokens.
  const auto ids = t.Encode("hello</s>", false);
  EXPECT_EQ(ids.back(), 2);
  // Streaming keeps SentencePiece's word-boundary spaces.
  StreamingDecoder dec(&t);
  std::string streamed;
  for (int32_t id : t.Encode("the quick brown fox", false)) streamed += dec.Push(id);
  streamed += dec.Flush();
  EXPECT_EQ(streamed, "the quick brown fox");
}

TEST_F(SentencePieceTest, MissingModelIsAnError) {
  EXPECT_FALSE(LoadSentencePiece((*dir_ / "missing.model").string()).ok());
}

}  // namespace
}  // namespace spear::model
