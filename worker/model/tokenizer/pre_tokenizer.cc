#include "worker/model/tokenizer/pre_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "worker/model/tokenizer/unicode.h"

namespace spear::model::tok {

absl::StatusOr<std::shared_ptr<const Regex>> Regex::Compile(std::string_view pattern,
                                                            bool literal) {
  // MATCH_INVALID_UTF: the subject may hold arbitrary bytes (see header).
  uint32_t options = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF;
  options |= literal ? PCRE2_LITERAL : PCRE2_UCP;
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                    &error, &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(error, msg, sizeof(msg));
    return absl::InvalidArgumentError(absl::StrCat("bad pre-tokenizer regex at offset ",
                                                   error_offset, ": ",
                                                   reinterpret_cast<const char*>(msg)));
  }
  // JIT is an optimisation only; if it is unavailable pcre2_match interprets.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return std::shared_ptr<const Regex>(new Regex(code));
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

std::vector<std::pair<size_t, size_t>> Regex::FindAll(std::string_view s) const {
  std::vector<std::pair<size_t, size_t>> out;
  auto* code = static_cast<pcre2_code*>(code_);
  // Match data per call keeps concurrent callers independent.
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
  if (md == nullptr) return out;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t offset = 0;
  uint32_t match_options = 0;
  while (offset <= s.size()) {
    int rc = pcre2_match(code, subject, s.size(), offset, match_options, md, nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && match_options == 0) {
      // Very long runs can exhaust the default JIT stack; the interpreter
      // uses the heap instead.
      match_options = PCRE2_NO_JIT;
      continue;
    }
    if (rc < 0) break;  // no match (or a resource limit): the rest is one gap
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t begin = ov[0];
    const size_t end = ov[1];
    if (end > begin) {
      out.emplace_back(begin, end);
      offset = end;
    } else {
      // Empty match: step over one character and keep searching.
      if (begin >= s.size()) break;
      offset = begin + Utf8CharLen(s, begin);
    }
  }
  pcre2_match_data_free(md);
  return out;
}

absl::Status PreTokenizer::AddSplit(std::string_view pattern, bool literal,
                                    SplitBehavior behavior, bool invert) {
  auto re = Regex::Compile(pattern, literal);
  if (!re.ok()) return re.status();
  Step step;
  step.regex = *std::move(re);
  step.pattern = std::string(pattern);
  step.literal = literal;
  step.behavior = behavior;
  step.invert = invert;
  steps_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status PreTokenizer::AddDigits(bool individual_digits) {
  return AddSplit("\\p{N}", false,
                  individual_digits ? SplitBehavior::kIsolated : SplitBehavior::kContiguous);
}

absl::Status PreTokenizer::AddByteLevel(bool add_prefix_space, bool use_regex) {
  Step step;
  step.byte_level = true;
  step.add_prefix_space = add_prefix_space;
  if (use_regex) {
    auto re = Regex::Compile(kGpt2Pattern);
    if (!re.ok()) return re.status();
    step.regex = *std::move(re);
    step.pattern = kGpt2Pattern;
  }
  steps_.push_back(std::move(step));
  has_byte_level_ = true;
  return absl::OkStatus();
}

namespace {

struct Segment {
  size_t begin, end;
  bool is_match;
};

// HF NormalizedString::split: cover `s` with match / gap segments, then
// combine them according to `behavior`. Returns kept [begin, end) ranges.
std::vector<std::pair<size_t, size_t>> SplitRanges(std::string_view s, const Regex& re,
                                                   SplitBehavior behavior, bool invert) {
  std::vector<Segment> segs;
  size_t prev = 0;
  for (const auto& [b, e] : re.FindAll(s)) {
    if (b > prev) segs.push_back({prev, b, invert});
    segs.push_back({b, e, !invert});
    prev = e;
  }
  if (prev < s.size()) segs.push_back({prev, s.size(), invert});

  std::vector<std::pair<size_t, size_t>> out;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Segment& g : segs) out.emplace_back(g.begin, g.end);
      break;
    case SplitBehavior::kRemoved:
      for (const Segment& g : segs) {
        if (!g.is_match) out.emplace_back(g.begin, g.end);
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Segment& g : segs) {
        if (g.is_match && !previous_match && !out.empty()) {
          out.back().second = g.end;
        } else {
          out.emplace_back(g.begin, g.end);
        }
        previous_match = g.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->is_match && !previous_match && !out.empty()) {
          out.back().first = it->begin;
        } else {
          out.emplace_back(it->begin, it->end);
        }
        previous_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    case SplitBehavior::kContiguous:
      for (size_t i = 0; i < segs.size(); ++i) {
        if (i > 0 && segs[i].is_match == previous_match) {
          out.back().second = segs[i].end;
        } else {
          out.emplace_back(segs[i].begin, segs[i].end);
        }
        previous_match = segs[i].is_match;
      }
      break;
  }
  return out;
}

}  // namespace

std::vector<std::string> PreTokenizer::Run(std::string_view text) const {
  std::vector<std::string> pieces;
  if (text.empty()) return pieces;
  pieces.emplace_back(text);
  std::vector<std::string> next;
  for (const Step& step : steps_) {
    next.clear();
    for (std::string& piece : pieces) {
      if (step.add_prefix_space && piece.front() != ' ') piece.insert(piece.begin(), ' ');
      if (step.regex == nullptr) {
        next.push_back(std::move(piece));
        continue;
      }
      for (const auto& [b, e] : SplitRanges(piece, *step.regex, step.behavior, step.invert)) {
        if (e > b) next.emplace_back(piece.substr(b, e - b));
      }
    }
    if (step.byte_level) {
      for (std::string& p : next) p = ByteLevelEncode(p);
    }
    pieces.swap(next);
  }
  return pieces;
}

}  // namespace spear::model::tok
