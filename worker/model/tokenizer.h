// Tokenizers: GPT-2-style byte-level BPE (from HF tokenizer.json or from
// GGUF tokenizer.ggml.* metadata; pre-tokenizer regexes through PCRE2 with
// Unicode classes) and SentencePiece models (through libsentencepiece).
// Special/added tokens are matched before pre-tokenization. Thread-safety:
// a loaded Tokenizer is immutable; Encode/Decode may run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::model {

class GgufFile;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // add_bos: prepend BOS when the model's tokenizer is configured to.
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_bos = true) const = 0;
  // Concatenated bytes of the tokens (byte-level decoding); special tokens
  // are included as their text unless skip_special.
  virtual std::string Decode(std::span<const int32_t> ids, bool skip_special = false) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> TokenId(std::string_view token) const = 0;
  virtual std::string TokenText(int32_t id) const = 0;  // the vocabulary string
  virtual bool IsSpecial(int32_t id) const = 0;
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual int32_t eos_id() const = 0;  // -1 if none
  // The raw chat template string, if the source carried one.
  virtual const std::string& chat_template() const = 0;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& tokenizer_json_path);
absl::StatusOr<std::unique_ptr<Tokenizer>> HfTokenizerFromJson(std::string_view json_text);
// As above, plus the text of tokenizer_config.json (bos_token, eos_token,
// add_bos_token, chat_template); LoadHfTokenizer reads it from beside
// tokenizer.json when present. Without it, bos is the first token of the
// post-processor template and eos is -1.
absl::StatusOr<std::unique_ptr<Tokenizer>> HfTokenizerFromJson(std::string_view json_text,
                                                               std::string_view config_json);
absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromGguf(const GgufFile& gguf);
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& model_path);

// Incremental detokenizer for streaming: Push returns the newly completed
// UTF-8 text (holding back an incomplete multi-byte sequence); Flush returns
// whatever remains and resets the decoder. The concatenation of all outputs
// equals tok->Decode(all ids, skip_special). `tok` must outlive the decoder;
// one decoder per stream (not thread-safe itself).
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer* tok, bool skip_special = false)
      : tok_(tok), skip_special_(skip_special) {}
  std::string Push(int32_t id);
  std::string Flush();

 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::vector<int32_t> window_;  // last emitted token + the unread ones
  size_t emitted_ = 0;           // bytes of Decode(window_) already returned
};

// Chat formatting. Supports ChatML (<|im_start|>role\n...<|im_end|>, used by
// SmolLM2 and Qwen) and Llama-3 headers, chosen by inspecting the template
// string; a minimal renderer, not a Jinja engine (documented in docs/API.md).
struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
};
absl::StatusOr<std::string> ApplyChatTemplate(const Tokenizer& tok,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt = true);

}  // namespace spear::model
