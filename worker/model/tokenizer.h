// Tokenizers: GPT-2-style byte-level BPE (from HF tokenizer.json or from
// GGUF tokenizer.ggml.* metadata; pre-tokenizer regexes through PCRE2 with
// Unicode classes) and SentencePiece models (through libsentencepiece).
// Special/added tokens are matched before pre-tokenization (leftmost, longest
// first). Thread-safety: a loaded Tokenizer is immutable; Encode/Decode may
// run concurrently (no shared caches).
//
// Supported sources (anything else is an error, never silently different):
//   tokenizer.json: model BPE; pre_tokenizer ByteLevel / Split / Digits /
//     Sequence; normalizer null or NFC (NFC is treated as identity: inputs are
//     assumed NFC already); post_processor TemplateProcessing / Bert /
//     Roberta / ByteLevel / Sequence; decoder ByteLevel / ByteFallback / Fuse.
//     See worker/model/tokenizer/hf_tokenizer_json.cc.
//   GGUF: tokenizer.ggml.model "gpt2" with tokenizer.ggml.pre gpt2, smollm
//     (and starcoder-family), llama-bpe (llama3), qwen2, dbrx, default; see
//     worker/model/tokenizer/gguf_tokenizer.cc. GGUF "llama" (SentencePiece
//     vocabularies) is Unimplemented.
//   SentencePiece .model files.
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
namespace tok {
struct BpeConfig;  // worker/model/tokenizer/bpe_tokenizer.h (private)
}  // namespace tok

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // add_bos: prepend BOS when the model's tokenizer is configured to (HF:
  // the post_processor template's tokens around the text; GGUF:
  // tokenizer.ggml.add_bos_token; SentencePiece: always, if it has a BOS).
  // Any byte string is accepted: for byte-level BPE an invalid UTF-8 byte
  // never matches a pre-tokenizer regex and is encoded through its byte
  // token; a byte with no byte token in the vocabulary (SmolLM2 lacks 0xC0,
  // 0xC1, 0xF5-0xFF and a few control bytes) is dropped, as HF does.
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_bos = true) const = 0;
  // Concatenated bytes of the tokens (byte-level decoding); special tokens
  // are included as their text unless skip_special. Ids out of range are
  // ignored. The result may be invalid UTF-8 (e.g. a partial character).
  virtual std::string Decode(std::span<const int32_t> ids, bool skip_special = false) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> TokenId(std::string_view token) const = 0;
  virtual std::string TokenText(int32_t id) const = 0;  // the vocabulary string
  virtual bool IsSpecial(int32_t id) const = 0;
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual int32_t eos_id() const = 0;  // -1 if none
  // The raw chat template string, if the source carried one.
  virtual const std::string& chat_template() const = 0;
  // The byte-level BPE configuration this tokenizer runs, or nullptr (e.g.
  // SentencePiece). For ExportHfTokenizer; the type is private to the
  // tokenizer library.
  virtual const tok::BpeConfig* bpe_config() const { return nullptr; }
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

// A byte-level BPE tokenizer (from tokenizer.json or GGUF) written out as HF
// files: tokenizer.json (model BPE with vocab and merges as pairs, added
// tokens, pre_tokenizer Sequence of Split/ByteLevel, TemplateProcessing for
// the ids Encode(add_bos=true) adds, decoder) and tokenizer_config.json
// (bos_token, eos_token, chat_template). Loading both back with
// LoadHfTokenizer gives the same ids, specials, bos/eos and template.
// Unimplemented for tokenizers without a BPE configuration (SentencePiece).
struct HfTokenizerFiles {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
};
absl::StatusOr<HfTokenizerFiles> ExportHfTokenizer(const Tokenizer& tok);
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
// string; a minimal renderer, not a Jinja engine (documented in docs/API.md;
// the exact rules are in worker/model/tokenizer/chat_template.cc). ChatML
// inserts a template's literal default system message (SmolLM2's "You are a
// helpful AI assistant named SmolLM...") when the first message is not a
// system message. InvalidArgument for an empty or unrecognised template or a
// role other than system/user/assistant.
struct ChatMessage {
  std::string role;  // system | user | assistant
  std::string content;
};
absl::StatusOr<std::string> ApplyChatTemplate(const Tokenizer& tok,
                                              const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt = true);

}  // namespace spear::model
