// Minimal chat-template renderer (not a Jinja engine).
//
// Supported formats, chosen by inspecting Tokenizer::chat_template():
//
// 1. ChatML — the template contains "<|im_start|>" (SmolLM2, Qwen2/2.5):
//      <|im_start|>{role}\n{content}<|im_end|>\n      for every message
//      <|im_start|>assistant\n                        if add_generation_prompt
//    If the template carries a literal default system block
//    ('<|im_start|>system\n{text}<|im_end|>\n' with no expressions inside,
//    e.g. SmolLM2's "You are a helpful AI assistant named SmolLM, trained by
//    Hugging Face"), that block is emitted first whenever the first message
//    is not a system message (and there is at least one message).
//
// 2. Llama-3 — the template contains "<|start_header_id|>":
//      {bos_token}                                    if the template uses bos_token
//      <|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>
//      <|start_header_id|>assistant<|end_header_id|>\n\n   if add_generation_prompt
//    Llama-3.1-style templates (containing "Cutting Knowledge Date") always
//    start with a system block "Cutting Knowledge Date: December 2023\n
//    Today Date: 26 Jul 2024\n\n{system content|trim}"; tools are not
//    supported. The rendered text already contains the BOS token's text, so
//    encode it with Encode(text, /*add_bos=*/false).
//
// Roles must be system, user or assistant. Anything else, an empty template
// or an unrecognised template is InvalidArgument. Message content is inserted
// verbatim: special-token text inside content is not escaped.
#include <string_view>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "worker/model/tokenizer.h"

namespace spear::model {
namespace {

// The literal text of a default system block in a ChatML template, if any.
std::optional<std::string> DefaultSystemText(std::string_view tmpl) {
  for (std::string_view opener : {"<|im_start|>system\n", "<|im_start|>system\\n"}) {
    for (size_t pos = tmpl.find(opener); pos != std::string_view::npos;
         pos = tmpl.find(opener, pos + 1)) {
      const size_t begin = pos + opener.size();
      const size_t end = tmpl.find("<|im_end|>", begin);
      if (end == std::string_view::npos) continue;
      std::string_view text = tmpl.substr(begin, end - begin);
      // An expression ('...' + messages[0]['content'] + ...) is not a literal.
      if (text.find_first_of("'\"{}+") != std::string_view::npos) continue;
      std::string out;
      for (size_t i = 0; i < text.size(); ++i) {  // Jinja "\n" escapes
        if (text[i] == '\\' && i + 1 < text.size() && text[i + 1] == 'n') {
          out += '\n';
          ++i;
        } else {
          out += text[i];
        }
      }
      return out;
    }
  }
  return std::nullopt;
}

std::string RenderChatMl(std::string_view tmpl, const std::vector<ChatMessage>& messages,
                         bool add_generation_prompt) {
  std::string out;
  if (!messages.empty() && messages[0].role != "system") {
    if (auto sys = DefaultSystemText(tmpl)) {
      absl::StrAppend(&out, "<|im_start|>system\n", *sys, "<|im_end|>\n");
    }
  }
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

std::string RenderLlama3(const Tokenizer& tok, std::string_view tmpl,
                         const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  auto header = [](const std::string& role) {
    return absl::StrCat("<|start_header_id|>", role, "<|end_header_id|>\n\n");
  };
  std::string out;
  if (tmpl.find("bos_token") != std::string_view::npos && tok.bos_id() >= 0) {
    out += tok.TokenText(tok.bos_id());
  }
  size_t first = 0;
  if (tmpl.find("Cutting Knowledge Date") != std::string_view::npos) {
    absl::string_view system;
    if (!messages.empty() && messages[0].role == "system") {
      system = absl::StripAsciiWhitespace(messages[0].content);
      first = 1;
    }
    absl::StrAppend(&out, header("system"), "Cutting Knowledge Date: December 2023\n",
                    "Today Date: 26 Jul 2024\n\n", system, "<|eot_id|>");
  }
  for (size_t i = first; i < messages.size(); ++i) {
    absl::StrAppend(&out, header(messages[i].role),
                    absl::StripAsciiWhitespace(messages[i].content), "<|eot_id|>");
  }
  if (add_generation_prompt) out += header("assistant");
  return out;
}

}  // namespace

absl::StatusOr<std::string> ApplyChatTemplate(const Tokenizer& tok,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt) {
  for (const ChatMessage& m : messages) {
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("unsupported chat role '", m.role, "'"));
    }
  }
  const std::string& tmpl = tok.chat_template();
  if (tmpl.empty()) return absl::InvalidArgumentError("the model has no chat template");
  if (tmpl.find("<|im_start|>") != std::string::npos) {
    return RenderChatMl(tmpl, messages, add_generation_prompt);
  }
  if (tmpl.find("<|start_header_id|>") != std::string::npos) {
    return RenderLlama3(tok, tmpl, messages, add_generation_prompt);
  }
  return absl::InvalidArgumentError(
      "unsupported chat template (only ChatML and Llama-3 formats are rendered)");
}

}  // namespace spear::model
