// Byte-level BPE tokenizer shared by the HF tokenizer.json and GGUF loaders.
// Private to spear_tokenizer; the public interface is worker/model/tokenizer.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/tokenizer.h"
#include "worker/model/tokenizer/pre_tokenizer.h"

namespace spear::model::tok {

// Upper bound on token ids accepted from files (real vocabularies are
// < 300k); keeps corrupt inputs from allocating gigabytes.
inline constexpr int64_t kMaxVocab = int64_t{1} << 22;

// A token matched as a whole string before pre-tokenization (HF added_tokens;
// GGUF token_type control (special) or user-defined (not special)).
struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;
  bool lstrip = false;  // the match also swallows whitespace on its left
  bool rstrip = false;  // ... and on its right
};

struct BpeConfig {
  std::vector<std::string> vocab;  // id -> token string ("" for holes)
  // Merges in rank order (rank = index), each as its two token strings.
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<AddedToken> added_tokens;
  PreTokenizer pre_tokenizer;
  bool byte_level_decode = true;  // map decoded chars back through GPT-2 bytes
  bool ignore_merges = false;     // emit a whole piece found in the vocab as is
  bool byte_fallback = false;     // unknown chars -> <0xXX> tokens
  bool fuse_unk = false;
  int32_t unk_id = -1;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  // Post-processing applied when Encode(add_bos=true): ids placed around the
  // encoded text (HF TemplateProcessing "single"; GGUF add_bos_token).
  std::vector<int32_t> prefix_ids;
  std::vector<int32_t> suffix_ids;
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  std::string chat_template;
};

// Validates the configuration (merge pieces and results must be in the
// vocabulary, ids in range) and builds the tokenizer.
absl::StatusOr<std::unique_ptr<Tokenizer>> BuildBpeTokenizer(BpeConfig config);

}  // namespace spear::model::tok
