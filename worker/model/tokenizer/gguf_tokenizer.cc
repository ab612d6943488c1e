// GGUF tokenizer.ggml.* metadata -> byte-level BPE (model "gpt2").
//
// tokenizer.ggml.pre selects the pre-tokenizer regex list the way llama.cpp
// does (each regex splits every current piece, matches and gaps both kept):
//   gpt2, mpt, olmo, jais                   : GPT-2 regex
//   smollm, starcoder, refact, command-r,
//   codeshell, exaone, minerva-7b           : \p{N} then the GPT-2 regex
//   llama-bpe, llama3, llama-v3, falcon3,
//   dbrx, smaug-bpe                         : Llama-3 regex (+ ignore_merges
//                                             for the llama3 family)
//   qwen2, stablelm2, deepseek-r1-qwen      : Qwen2 regex
//   default (or absent)                     : llama.cpp's default list
// Token types: 3 (control) are special tokens; 4 (user-defined) are matched
// as whole strings but decoded like text. Both are matched before
// pre-tokenization.
#include <set>

#include "absl/strings/str_cat.h"
#include "worker/model/gguf.h"
#include "worker/model/tokenizer.h"
#include "worker/model/tokenizer/bpe_tokenizer.h"

namespace spear::model {
namespace {

constexpr int64_t kTokenTypeControl = 3;
constexpr int64_t kTokenTypeUserDefined = 4;

struct PreSet {
  std::vector<std::string> patterns;
  bool ignore_merges = false;
};

absl::StatusOr<PreSet> PreSetFor(const std::string& pre) {
  static const std::set<std::string> kGpt2 = {"gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2"};
  static const std::set<std::string> kStarcoder = {"smollm", "starcoder", "refact", "command-r",
                                                   "codeshell", "exaone", "minerva-7b"};
  static const std::set<std::string> kLlama3 = {"llama-bpe", "llama3", "llama-v3", "falcon3"};
  static const std::set<std::string> kLlama3Like = {"dbrx", "smaug-bpe"};
  static const std::set<std::string> kQwen2 = {"qwen2", "stablelm2", "deepseek-r1-qwen"};
  if (kGpt2.contains(pre)) return PreSet{{tok::kGpt2Pattern}};
  if (kStarcoder.contains(pre)) return PreSet{{"\\p{N}", tok::kGpt2Pattern}};
  if (kLlama3.contains(pre)) return PreSet{{tok::kLlama3Pattern}, /*ignore_merges=*/true};
  if (kLlama3Like.contains(pre)) return PreSet{{tok::kLlama3Pattern}};
  if (kQwen2.contains(pre)) return PreSet{{tok::kQwen2Pattern}};
  if (pre.empty() || pre == "default") {
    return PreSet{{"[\\p{P}\\$\\+<=>\\^~\\|]+", tok::kGpt2Pattern, "\\p{N}+", "[0-9][0-9][0-9]"}};
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported tokenizer.ggml.pre '", pre, "' (see gguf_tokenizer.cc)"));
}

// Optional keys: NotFound means "use the default"; other errors propagate.
template <typename T>
absl::Status Optional(absl::StatusOr<T> v, T* out) {
  if (v.ok()) {
    *out = *std::move(v);
    return absl::OkStatus();
  }
  return absl::IsNotFound(v.status()) ? absl::OkStatus() : v.status();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromGguf(const GgufFile& gguf) {
  auto model = gguf.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  if (*model != "gpt2") {
    return absl::UnimplementedError(absl::StrCat(
        "GGUF tokenizer model '", *model, "' is not supported (only gpt2 byte-level BPE)"));
  }
  tok::BpeConfig c;
  auto tokens = gguf.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  if (tokens->empty() || static_cast<int64_t>(tokens->size()) >= tok::kMaxVocab) {
    return absl::InvalidArgumentError("tokenizer.ggml.tokens: bad size");
  }
  c.vocab = *std::move(tokens);
  std::vector<int64_t> types;
  if (auto s = Optional(gguf.GetIntArray("tokenizer.ggml.token_type"), &types); !s.ok()) return s;
  if (!types.empty() && types.size() != c.vocab.size()) {
    return absl::InvalidArgumentError("tokenizer.ggml.token_type size differs from tokens");
  }
  for (size_t i = 0; i < types.size(); ++i) {
    if (types[i] == kTokenTypeControl || types[i] == kTokenTypeUserDefined) {
      c.added_tokens.push_back(
          tok::AddedToken{static_cast<int32_t>(i), c.vocab[i], types[i] == kTokenTypeControl});
    }
  }
  auto merges = gguf.GetStringArray("tokenizer.ggml.merges");
  if (!merges.ok()) return merges.status();
  c.merges.reserve(merges->size());
  for (const std::string& m : *merges) {
    // Search from 1 so that a merge whose left token is " " still splits.
    const size_t sp = m.find(' ', 1);
    if (sp == std::string::npos) return absl::InvalidArgumentError("bad merge '" + m + "'");
    c.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
  }
  std::string pre;
  if (auto s = Optional(gguf.GetString("tokenizer.ggml.pre"), &pre); !s.ok()) return s;
  auto set = PreSetFor(pre);
  if (!set.ok()) return set.status();
  for (const std::string& p : set->patterns) {
    if (auto s = c.pre_tokenizer.AddSplit(p, false, tok::SplitBehavior::kIsolated); !s.ok()) return s;
  }
  if (auto s = c.pre_tokenizer.AddByteLevel(false, false); !s.ok()) return s;
  c.ignore_merges = set->ignore_merges;
  c.byte_level_decode = true;

  int64_t bos = -1, eos = -1;
  if (auto s = Optional(gguf.GetInt("tokenizer.ggml.bos_token_id"), &bos); !s.ok()) return s;
  if (auto s = Optional(gguf.GetInt("tokenizer.ggml.eos_token_id"), &eos); !s.ok()) return s;
  const auto n = static_cast<int64_t>(c.vocab.size());
  if (bos < -1 || bos >= n || eos < -1 || eos >= n) {
    return absl::InvalidArgumentError("bos/eos token id out of range");
  }
  c.bos_id = static_cast<int32_t>(bos);
  c.eos_id = static_cast<int32_t>(eos);
  // llama.cpp's default for BPE vocabularies: add BOS only for the llama3 family.
  bool add_bos = set->ignore_merges;
  if (auto s = Optional(gguf.GetBool("tokenizer.ggml.add_bos_token"), &add_bos); !s.ok()) return s;
  if (add_bos && c.bos_id >= 0) c.prefix_ids = {c.bos_id};
  if (auto s = Optional(gguf.GetString("tokenizer.chat_template"), &c.chat_template); !s.ok()) {
    return s;
  }
  return tok::BuildBpeTokenizer(std::move(c));
}

}  // namespace spear::model
