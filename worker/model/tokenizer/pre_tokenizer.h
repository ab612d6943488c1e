// Pre-tokenization for byte-level BPE: a pipeline of regex splits (PCRE2,
// UTF + UCP so \p{L} \p{N} \s are Unicode-aware) and an optional byte-level
// mapping step, mirroring HF tokenizers' Split / Digits / ByteLevel /
// Sequence pre-tokenizers. Private to spear_tokenizer.
//
// Thread-safety: a built PreTokenizer is immutable; Run() allocates its own
// PCRE2 match data, so concurrent calls are safe.
//
// Invalid UTF-8: patterns are compiled with PCRE2_MATCH_INVALID_UTF, so an
// invalid byte never matches any pattern item; it ends up in a gap piece and
// (after the ByteLevel step) is encoded through its byte token.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::model::tok {

// A compiled PCRE2 pattern.
class Regex {
 public:
  // literal: match `pattern` as a plain string (HF Split {"String": ...}).
  static absl::StatusOr<std::shared_ptr<const Regex>> Compile(std::string_view pattern,
                                                               bool literal = false);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Non-overlapping, non-empty matches of the pattern in s, left to right, as
  // [begin, end) byte offsets.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view s) const;

 private:
  explicit Regex(void* code) : code_(code) {}
  void* code_;  // pcre2_code_8*
};

// HF SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Regex presets (HF ByteLevel and llama.cpp's tokenizer.ggml.pre sets).
inline constexpr char kGpt2Pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
inline constexpr char kLlama3Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
inline constexpr char kQwen2Pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

class PreTokenizer {
 public:
  // Split each current piece on `pattern` (invert: the pattern describes the
  // pieces to keep rather than the delimiters).
  absl::Status AddSplit(std::string_view pattern, bool literal, SplitBehavior behavior,
                        bool invert = false);
  // HF Digits: \p{N} isolated one by one, or runs kept together.
  absl::Status AddDigits(bool individual_digits);
  // HF ByteLevel: optional prefix space, optional GPT-2 regex split, then
  // every byte is mapped through bytes_to_unicode.
  absl::Status AddByteLevel(bool add_prefix_space, bool use_regex);

  bool empty() const { return steps_.empty(); }
  bool has_byte_level() const { return has_byte_level_; }

  // Splits `text` into the pieces BPE runs on (never empty strings).
  std::vector<std::string> Run(std::string_view text) const;

  // One step of the pipeline; `pattern` / `literal` keep the source text of
  // `regex` so the pipeline can be written back out (tokenizer export).
  struct Step {
    std::shared_ptr<const Regex> regex;  // null for a pure byte-level step
    std::string pattern;                 // source of `regex` ("" when null)
    bool literal = false;
    SplitBehavior behavior = SplitBehavior::kIsolated;
    bool invert = false;
    bool byte_level = false;  // a ByteLevel step (regex = GPT-2 split or null)
    bool add_prefix_space = false;
  };
  const std::vector<Step>& steps() const { return steps_; }

 private:
  std::vector<Step> steps_;
  bool has_byte_level_ = false;
};

}  // namespace spear::model::tok
