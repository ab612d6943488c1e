// ApplyChatTemplate on synthetic templates (the SmolLM2 template is checked
// in bpe_golden_test.cc against the GGUF's own string).
#include "gtest/gtest.h"
#include "worker/model/tokenizer.h"

namespace spear::model {
namespace {

// Just enough of a Tokenizer to carry a template and a BOS token.
class TemplateOnly final : public Tokenizer {
 public:
  explicit TemplateOnly(std::string tmpl) : tmpl_(std::move(tmpl)) {}
  std::vector<int32_t> Encode(std::string_view, bool) const override { return {}; }
  std::string Decode(std::span<const int32_t>, bool) const override { return ""; }
  int64_t vocab_size() const override { return 1; }
  std::optional<int32_t> TokenId(std::string_view) const override { return std::nullopt; }
  std::string TokenText(int32_t id) const override { return id == 0 ? "<|begin_of_text|>" : ""; }
  bool IsSpecial(int32_t) const override { return true; }
  int32_t bos_id() const override { return 0; }
  int32_t eos_id() const override { return -1; }
  const std::string& chat_template() const override { return tmpl_; }

 private:
  std::string tmpl_;
};

constexpr char kLlama3[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

TEST(ChatTemplate, Llama3) {
  TemplateOnly tok(kLlama3);
  auto r = ApplyChatTemplate(tok, {{"system", "Be nice. "}, {"user", "  Hi\n"}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatTemplate, Llama31DefaultSystemHeader) {
  TemplateOnly tok(std::string(kLlama3) + "{{- \"Cutting Knowledge Date: December 2023\\n\" }}");
  auto r = ApplyChatTemplate(tok, {{"user", "Hi"}}, /*add_generation_prompt=*/false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
            "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
}

TEST(ChatTemplate, ChatMlWithoutDefaultSystem) {
  TemplateOnly tok(
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
      "'<|im_start|>assistant\\n' }}{% endif %}");
  auto r = ApplyChatTemplate(tok, {{"user", "Hi"}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  r = ApplyChatTemplate(tok, {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "<|im_start|>assistant\n");
}

TEST(ChatTemplate, ChatMlEscapedDefaultSystem) {
  // Templates in JSON often spell the newline as a Jinja escape.
  TemplateOnly tok(
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>"
      "\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] }}");
  auto r = ApplyChatTemplate(tok, {{"user", "Hi"}}, false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

TEST(ChatTemplate, Errors) {
  TemplateOnly none("");
  EXPECT_EQ(ApplyChatTemplate(none, {{"user", "x"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  TemplateOnly alpaca("### Instruction:\n{{ messages[0]['content'] }}");
  EXPECT_EQ(ApplyChatTemplate(alpaca, {{"user", "x"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  TemplateOnly llama(kLlama3);
  EXPECT_EQ(ApplyChatTemplate(llama, {{"user", "x"}, {"narrator", "y"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spear::model
