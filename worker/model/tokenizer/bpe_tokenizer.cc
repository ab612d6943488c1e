#include "worker/model/tokenizer/bpe_tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <queue>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "worker/model/tokenizer/unicode.h"

namespace spear::model::tok {
namespace {

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

bool IsSpaceByte(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

class BpeTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create(BpeConfig config);

  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override;
  std::string Decode(std::span<const int32_t> ids, bool skip_special) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(cfg_.vocab.size()); }
  std::optional<int32_t> TokenId(std::string_view token) const override {
    auto it = token_to_id_.find(absl::string_view(token.data(), token.size()));
    if (it == token_to_id_.end()) return std::nullopt;
    return it->second;
  }
  std::string TokenText(int32_t id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    return cfg_.vocab[id];
  }
  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < vocab_size() && kind_[id] == kSpecial;
  }
  int32_t bos_id() const override { return cfg_.bos_id; }
  int32_t eos_id() const override { return cfg_.eos_id; }
  const std::string& chat_template() const override { return cfg_.chat_template; }
  const BpeConfig* bpe_config() const override { return &cfg_; }

 private:
  enum Kind : uint8_t { kNormal, kAdded, kSpecial };
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    uint32_t len;  // bytes of the piece covered; 0 once merged away
  };

  explicit BpeTokenizer(BpeConfig config) : cfg_(std::move(config)) {}

  // Longest added token starting at text[pos], or null.
  const AddedToken* MatchAddedAt(std::string_view text, size_t pos) const;
  void EncodeSegment(std::string_view segment, std::vector<int32_t>* out) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;
  std::optional<int32_t> Lookup(std::string_view s) const { return TokenId(s); }

  BpeConfig cfg_;
  std::vector<Kind> kind_;  // per id
  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  // Added tokens bucketed by first byte, longest first (leftmost-longest
  // matching as HF's aho-corasick does).
  std::vector<std::vector<const AddedToken*>> added_by_byte_;
  std::vector<int32_t> byte_fallback_ids_;  // <0xXX> ids, -1 if absent
};

absl::StatusOr<std::unique_ptr<Tokenizer>> BpeTokenizer::Create(BpeConfig config) {
  // Added tokens may carry ids past the base vocabulary.
  for (const AddedToken& t : config.added_tokens) {
    if (t.id < 0 || t.id >= kMaxVocab) {
      return absl::InvalidArgumentError(absl::StrCat("added token id out of range: ", t.id));
    }
    if (static_cast<size_t>(t.id) >= config.vocab.size()) config.vocab.resize(t.id + 1);
    // As in HF, the added content is the token's text (decoded verbatim).
    config.vocab[t.id] = t.content;
  }
  if (config.vocab.empty()) return absl::InvalidArgumentError("tokenizer has an empty vocabulary");
  const auto n = static_cast<int32_t>(config.vocab.size());
  auto check_id = [n](int32_t id, const char* what) -> absl::Status {
    if (id < -1 || id >= n) {
      return absl::InvalidArgumentError(absl::StrCat(what, " id ", id, " out of range"));
    }
    return absl::OkStatus();
  };
  for (const auto* list : {&config.prefix_ids, &config.suffix_ids}) {
    for (int32_t id : *list) {
      if (id < 0 || id >= n) {
        return absl::InvalidArgumentError(absl::StrCat("post-processor id ", id, " out of range"));
      }
    }
  }
  if (auto s = check_id(config.bos_id, "bos"); !s.ok()) return s;
  if (auto s = check_id(config.eos_id, "eos"); !s.ok()) return s;
  if (auto s = check_id(config.unk_id, "unk"); !s.ok()) return s;

  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer(std::move(config)));
  const BpeConfig& c = t->cfg_;
  t->token_to_id_.reserve(c.vocab.size());
  for (int32_t id = 0; id < n; ++id) {
    if (!c.vocab[id].empty()) t->token_to_id_.try_emplace(c.vocab[id], id);
  }
  t->kind_.assign(n, kNormal);
  t->added_by_byte_.resize(256);
  for (const AddedToken& a : c.added_tokens) {
    t->kind_[a.id] = a.special ? kSpecial : kAdded;
    t->token_to_id_.try_emplace(a.content, a.id);
    if (a.content.empty()) continue;  // can never be matched
    t->added_by_byte_[static_cast<unsigned char>(a.content[0])].push_back(&a);
  }
  for (auto& bucket : t->added_by_byte_) {
    std::stable_sort(bucket.begin(), bucket.end(), [](const AddedToken* x, const AddedToken* y) {
      return x->content.size() > y->content.size();
    });
  }
  t->merges_.reserve(c.merges.size());
  for (size_t rank = 0; rank < c.merges.size(); ++rank) {
    const auto& [a, b] = c.merges[rank];
    auto ia = t->Lookup(a);
    auto ib = t->Lookup(b);
    // With a continuing-subword prefix the merged token drops b's prefix.
    std::string_view b_body = b;
    if (!c.continuing_subword_prefix.empty() && b_body.starts_with(c.continuing_subword_prefix)) {
      b_body.remove_prefix(c.continuing_subword_prefix.size());
    }
    auto im = t->Lookup(a + std::string(b_body));
    if (!ia || !ib || !im) {
      return absl::InvalidArgumentError(
          absl::StrCat("merge ", rank, " (\"", a, "\" \"", b,
                       "\") uses tokens not in the vocabulary"));
    }
    // Later duplicates overwrite earlier ones, as in HF tokenizers.
    t->merges_[PairKey(*ia, *ib)] = Merge{static_cast<int32_t>(rank), *im};
  }
  if (c.byte_fallback) {
    t->byte_fallback_ids_.assign(256, -1);
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      if (auto id = t->Lookup(name)) t->byte_fallback_ids_[b] = *id;
    }
  }
  return std::unique_ptr<Tokenizer>(std::move(t));
}

const AddedToken* BpeTokenizer::MatchAddedAt(std::string_view text, size_t pos) const {
  for (const AddedToken* a : added_by_byte_[static_cast<unsigned char>(text[pos])]) {
    if (text.substr(pos).starts_with(a->content)) return a;
  }
  return nullptr;
}

std::vector<int32_t> BpeTokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos) ids = cfg_.prefix_ids;
  size_t start = 0;  // beginning of the text not yet encoded
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* a = MatchAddedAt(text, pos);
    if (a == nullptr) {
      ++pos;
      continue;
    }
    size_t match_begin = pos;
    size_t match_end = pos + a->content.size();
    if (a->lstrip) {
      while (match_begin > start && IsSpaceByte(text[match_begin - 1])) --match_begin;
    }
    if (a->rstrip) {
      while (match_end < text.size() && IsSpaceByte(text[match_end])) ++match_end;
    }
    EncodeSegment(text.substr(start, match_begin - start), &ids);
    ids.push_back(a->id);
    start = pos = match_end;
  }
  EncodeSegment(text.substr(start), &ids);
  if (add_bos) ids.insert(ids.end(), cfg_.suffix_ids.begin(), cfg_.suffix_ids.end());
  return ids;
}

void BpeTokenizer::EncodeSegment(std::string_view segment, std::vector<int32_t>* out) const {
  if (segment.empty()) return;
  if (cfg_.pre_tokenizer.empty()) {
    EncodeWord(segment, out);
    return;
  }
  for (const std::string& piece : cfg_.pre_tokenizer.Run(segment)) EncodeWord(piece, out);
}

void BpeTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (cfg_.ignore_merges) {
    if (auto id = Lookup(word)) {
      out->push_back(*id);
      return;
    }
  }
  // Initial symbols: one per UTF-8 character (HF BPE::merge_word).
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  auto add = [&syms](int32_t id, uint32_t len) {
    const auto i = static_cast<int32_t>(syms.size());
    syms.push_back(Symbol{id, i - 1, -1, len});
    if (i > 0) syms[i - 1].next = i;
  };
  int32_t pending_unk_len = 0;  // fused unknown bytes not yet emitted
  std::string buf;
  for (size_t i = 0; i < word.size();) {
    const size_t len = Utf8CharLen(word, i);
    const bool first = i == 0;
    const bool last = i + len == word.size();
    buf.clear();
    if (!first) buf += cfg_.continuing_subword_prefix;
    buf.append(word.substr(i, len));
    if (last) buf += cfg_.end_of_word_suffix;
    i += len;
    if (auto id = Lookup(buf)) {
      if (pending_unk_len > 0) add(cfg_.unk_id, pending_unk_len), pending_unk_len = 0;
      add(*id, static_cast<uint32_t>(len));
      continue;
    }
    if (cfg_.byte_fallback &&
        std::all_of(buf.begin(), buf.end(),
                    [this](char b) { return byte_fallback_ids_[static_cast<unsigned char>(b)] >= 0; })) {
      if (pending_unk_len > 0) add(cfg_.unk_id, pending_unk_len), pending_unk_len = 0;
      for (char b : buf) add(byte_fallback_ids_[static_cast<unsigned char>(b)], 1);
      continue;
    }
    if (cfg_.unk_id < 0) continue;  // no unk token: the character is dropped
    if (pending_unk_len > 0 && !cfg_.fuse_unk) add(cfg_.unk_id, pending_unk_len), pending_unk_len = 0;
    pending_unk_len += static_cast<int32_t>(len);
  }
  if (pending_unk_len > 0) add(cfg_.unk_id, pending_unk_len);

  // Merge the lowest-ranked adjacent pair first (leftmost on ties), with lazy
  // invalidation of stale queue entries exactly as HF's Word::merge_all.
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push_pair = [&](int32_t left) {
    const int32_t right = syms[left].next;
    if (right < 0) return;
    auto it = merges_.find(PairKey(syms[left].id, syms[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push_pair(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = syms[top.pos];
    if (left.len == 0 || left.next < 0) continue;
    Symbol& right = syms[left.next];
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    left.len += right.len;
    right.len = 0;
    left.next = right.next;
    if (left.next >= 0) syms[left.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev);
    push_pair(top.pos);
  }
  for (const Symbol& s : syms) {
    if (s.len > 0) out->push_back(s.id);
  }
}

std::string BpeTokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;  // unknown ids decode to nothing
    const std::string& text = cfg_.vocab[id];
    if (kind_[id] != kNormal) {
      // Added tokens are emitted verbatim, never byte-level mapped.
      if (!(skip_special && kind_[id] == kSpecial)) out += text;
      continue;
    }
    if (cfg_.byte_fallback && text.size() == 6 && text.starts_with("<0x") && text.back() == '>') {
      unsigned v = 0;
      if (std::sscanf(text.c_str() + 3, "%2X", &v) == 1) {
        out.push_back(static_cast<char>(v));
        continue;
      }
    }
    if (cfg_.byte_level_decode) {
      ByteLevelDecodeAppend(text, &out);
    } else {
      out += text;
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> BuildBpeTokenizer(BpeConfig config) {
  return BpeTokenizer::Create(std::move(config));
}

}  // namespace spear::model::tok
