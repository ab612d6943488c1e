// HF tokenizer.json (+ optional tokenizer_config.json) -> BpeConfig.
//
// Supported subset (anything else is InvalidArgument, never silently wrong):
//   model:          BPE (vocab, merges as "a b" or ["a","b"], unk_token,
//                   fuse_unk, byte_fallback, ignore_merges,
//                   continuing_subword_prefix, end_of_word_suffix)
//   added_tokens:   id, content, special, lstrip, rstrip
//   normalizer:     null, NFC (treated as identity: input is assumed to be
//                   NFC already), Sequence of those
//   pre_tokenizer:  null, ByteLevel, Split (Regex|String, any behavior,
//                   invert), Digits, Sequence of those
//   post_processor: null, ByteLevel, TemplateProcessing ("single"),
//                   BertProcessing / RobertaProcessing, Sequence of those
//   decoder:        null, ByteLevel, ByteFallback, Fuse, Sequence of those
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "worker/model/tokenizer.h"
#include "worker/model/tokenizer/bpe_tokenizer.h"

namespace spear::model {
namespace {

using json = nlohmann::json;
using tok::BpeConfig;
using tok::SplitBehavior;

// Sequence nesting allowed in components (real files use one level).
constexpr int kMaxDepth = 8;

bool GetBool(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : def;
}

std::string GetString(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::string TypeOf(const json& j) { return j.is_object() ? GetString(j, "type") : ""; }

absl::Status ParseNormalizer(const json& j, int depth = 0) {
  if (j.is_null()) return absl::OkStatus();
  if (depth > kMaxDepth) return absl::InvalidArgumentError("normalizer nested too deeply");
  const std::string type = TypeOf(j);
  if (type == "NFC") return absl::OkStatus();
  if (type == "Sequence") {
    auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) return absl::InvalidArgumentError("bad normalizer");
    for (const json& n : *it) {
      if (auto s = ParseNormalizer(n, depth + 1); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported normalizer type '", type, "'"));
}

absl::Status ParsePreTokenizer(const json& j, tok::PreTokenizer* pre, int depth = 0) {
  if (j.is_null()) return absl::OkStatus();
  if (depth > kMaxDepth) return absl::InvalidArgumentError("pre_tokenizer nested too deeply");
  const std::string type = TypeOf(j);
  if (type == "Sequence") {
    auto it = j.find("pretokenizers");
    if (it == j.end() || !it->is_array()) return absl::InvalidArgumentError("bad pre_tokenizer");
    for (const json& p : *it) {
      if (auto s = ParsePreTokenizer(p, pre, depth + 1); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    return pre->AddByteLevel(GetBool(j, "add_prefix_space", true), GetBool(j, "use_regex", true));
  }
  if (type == "Digits") return pre->AddDigits(GetBool(j, "individual_digits", false));
  if (type == "Split") {
    auto pat = j.find("pattern");
    if (pat == j.end() || !pat->is_object()) return absl::InvalidArgumentError("Split without pattern");
    const bool literal = pat->contains("String");
    const std::string pattern = GetString(*pat, literal ? "String" : "Regex");
    if (pattern.empty()) return absl::InvalidArgumentError("Split with an empty pattern");
    static const std::pair<const char*, SplitBehavior> kBehaviors[] = {
        {"Removed", SplitBehavior::kRemoved},
        {"Isolated", SplitBehavior::kIsolated},
        {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
        {"MergedWithNext", SplitBehavior::kMergedWithNext},
        {"Contiguous", SplitBehavior::kContiguous}};
    const std::string behavior = GetString(j, "behavior");
    for (const auto& [name, b] : kBehaviors) {
      if (behavior == name) return pre->AddSplit(pattern, literal, b, GetBool(j, "invert", false));
    }
    return absl::InvalidArgumentError(absl::StrCat("unsupported Split behavior '", behavior, "'"));
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported pre_tokenizer type '", type, "'"));
}

// Resolves a special token name of a post-processor to its id.
absl::StatusOr<int32_t> SpecialId(const BpeConfig& c, const json& specials, const std::string& name) {
  auto it = specials.find(name);
  if (it != specials.end() && it->is_object()) {
    auto ids = it->find("ids");
    if (ids != it->end() && ids->is_array() && ids->size() == 1 && (*ids)[0].is_number_integer()) {
      return (*ids)[0].get<int32_t>();
    }
  }
  for (const auto& a : c.added_tokens) {
    if (a.content == name) return a.id;
  }
  return absl::InvalidArgumentError(absl::StrCat("post_processor token '", name, "' unknown"));
}

absl::Status ParsePostProcessor(const json& j, BpeConfig* c, int depth = 0) {
  if (j.is_null()) return absl::OkStatus();
  if (depth > kMaxDepth) return absl::InvalidArgumentError("post_processor nested too deeply");
  const std::string type = TypeOf(j);
  if (type == "ByteLevel") return absl::OkStatus();  // only adjusts offsets
  if (type == "Sequence") {
    auto it = j.find("processors");
    if (it == j.end() || !it->is_array()) return absl::InvalidArgumentError("bad post_processor");
    for (const json& p : *it) {
      if (auto s = ParsePostProcessor(p, c, depth + 1); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    auto cls = j.find("cls");
    auto sep = j.find("sep");
    if (cls == j.end() || sep == j.end() || !cls->is_array() || !sep->is_array() ||
        cls->size() != 2 || sep->size() != 2 || !(*cls)[1].is_number_integer() ||
        !(*sep)[1].is_number_integer()) {
      return absl::InvalidArgumentError("bad cls/sep in post_processor");
    }
    c->prefix_ids = {(*cls)[1].get<int32_t>()};
    c->suffix_ids = {(*sep)[1].get<int32_t>()};
    return absl::OkStatus();
  }
  if (type == "TemplateProcessing") {
    auto single = j.find("single");
    if (single == j.end() || !single->is_array()) return absl::InvalidArgumentError("bad template");
    const json empty = json::object();
    auto sp = j.find("special_tokens");
    const json& specials = sp != j.end() && sp->is_object() ? *sp : empty;
    c->prefix_ids.clear();
    c->suffix_ids.clear();
    bool seen_sequence = false;
    for (const json& piece : *single) {
      if (piece.is_object() && piece.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      auto st = piece.is_object() ? piece.find("SpecialToken") : piece.end();
      if (!piece.is_object() || st == piece.end() || !st->is_object()) {
        return absl::InvalidArgumentError("bad TemplateProcessing piece");
      }
      auto id = SpecialId(*c, specials, GetString(*st, "id"));
      if (!id.ok()) return id.status();
      (seen_sequence ? c->suffix_ids : c->prefix_ids).push_back(*id);
    }
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported post_processor type '", type, "'"));
}

absl::Status ParseDecoder(const json& j, BpeConfig* c, int depth = 0) {
  if (depth > kMaxDepth) return absl::InvalidArgumentError("decoder nested too deeply");
  const std::string type = TypeOf(j);
  if (type == "ByteLevel") {
    c->byte_level_decode = true;
  } else if (type == "Sequence") {
    auto it = j.find("decoders");
    if (it == j.end() || !it->is_array()) return absl::InvalidArgumentError("bad decoder");
    for (const json& d : *it) {
      if (auto s = ParseDecoder(d, c, depth + 1); !s.ok()) return s;
    }
  } else if (type != "ByteFallback" && type != "Fuse") {
    return absl::InvalidArgumentError(absl::StrCat("unsupported decoder type '", type, "'"));
  }
  return absl::OkStatus();
}

absl::Status ParseModel(const json& m, BpeConfig* c) {
  if (!m.is_object()) return absl::InvalidArgumentError("tokenizer.json has no model");
  const std::string type = TypeOf(m);
  if (!type.empty() && type != "BPE") {
    return absl::InvalidArgumentError(absl::StrCat("unsupported model type '", type, "'"));
  }
  auto vocab = m.find("vocab");
  if (vocab == m.end() || !vocab->is_object()) return absl::InvalidArgumentError("model has no vocab");
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= tok::kMaxVocab) {
      return absl::InvalidArgumentError(absl::StrCat("bad id for vocab entry '", token, "'"));
    }
    const auto i = id.get<int32_t>();
    if (static_cast<size_t>(i) >= c->vocab.size()) c->vocab.resize(i + 1);
    c->vocab[i] = token;
  }
  auto merges = m.find("merges");
  if (merges != m.end() && merges->is_array()) {
    c->merges.reserve(merges->size());
    for (const json& mg : *merges) {
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ', 1);
        if (sp == std::string::npos) return absl::InvalidArgumentError("bad merge '" + s + "'");
        c->merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
        c->merges.emplace_back(mg[0].get<std::string>(), mg[1].get<std::string>());
      } else {
        return absl::InvalidArgumentError("bad merge entry");
      }
    }
  }
  c->ignore_merges = GetBool(m, "ignore_merges", false);
  c->byte_fallback = GetBool(m, "byte_fallback", false);
  c->fuse_unk = GetBool(m, "fuse_unk", false);
  c->continuing_subword_prefix = GetString(m, "continuing_subword_prefix");
  c->end_of_word_suffix = GetString(m, "end_of_word_suffix");
  return absl::OkStatus();
}

// Token text of a tokenizer_config.json entry: "text" or {"content": "text"}.
std::string ConfigToken(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  return it->is_object() ? GetString(*it, "content") : "";
}

absl::StatusOr<BpeConfig> ParseAll(std::string_view json_text, std::string_view config_text) {
  const json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("tokenizer.json: bad JSON");
  BpeConfig c;
  c.byte_level_decode = false;
  const json null_json;
  auto field = [&](const char* k) -> const json& {
    auto it = j.find(k);
    return it == j.end() ? null_json : *it;
  };
  if (auto s = ParseModel(field("model"), &c); !s.ok()) return s;
  const json& added = field("added_tokens");
  if (added.is_array()) {
    for (const json& a : added) {
      auto id = a.is_object() ? a.find("id") : a.end();
      if (!a.is_object() || id == a.end() || !id->is_number_integer() ||
          id->get<int64_t>() < 0 || id->get<int64_t>() >= tok::kMaxVocab) {
        return absl::InvalidArgumentError("bad added_tokens entry");
      }
      c.added_tokens.push_back(tok::AddedToken{id->get<int32_t>(), GetString(a, "content"),
                                               GetBool(a, "special", false),
                                               GetBool(a, "lstrip", false), GetBool(a, "rstrip", false)});
    }
  }
  // Added tokens first: post-processors may refer to them by name.
  if (auto s = ParseNormalizer(field("normalizer")); !s.ok()) return s;
  if (auto s = ParsePreTokenizer(field("pre_tokenizer"), &c.pre_tokenizer); !s.ok()) return s;
  if (auto s = ParsePostProcessor(field("post_processor"), &c); !s.ok()) return s;
  const json& decoder = field("decoder");
  if (decoder.is_null()) {
    c.byte_level_decode = c.pre_tokenizer.has_byte_level();
  } else if (auto s = ParseDecoder(decoder, &c); !s.ok()) {
    return s;
  }
  const std::string unk = GetString(field("model"), "unk_token");

  // Named ids: tokenizer_config.json when given, else the template's prefix.
  auto id_of = [&c](const std::string& text) -> int32_t {
    for (const auto& a : c.added_tokens) {
      if (a.content == text) return a.id;
    }
    for (size_t i = 0; i < c.vocab.size(); ++i) {
      if (c.vocab[i] == text) return static_cast<int32_t>(i);
    }
    return -1;
  };
  if (!unk.empty()) c.unk_id = id_of(unk);
  if (!c.prefix_ids.empty()) c.bos_id = c.prefix_ids.front();
  if (!config_text.empty()) {
    const json cfg = json::parse(config_text, nullptr, /*allow_exceptions=*/false);
    if (cfg.is_discarded() || !cfg.is_object()) {
      return absl::InvalidArgumentError("tokenizer_config.json: bad JSON");
    }
    if (auto b = ConfigToken(cfg, "bos_token"); !b.empty()) c.bos_id = id_of(b);
    if (auto e = ConfigToken(cfg, "eos_token"); !e.empty()) c.eos_id = id_of(e);
    if (GetBool(cfg, "add_bos_token", false) && c.prefix_ids.empty() && c.bos_id >= 0) {
      c.prefix_ids = {c.bos_id};
    }
    auto tmpl = cfg.find("chat_template");
    if (tmpl != cfg.end() && tmpl->is_string()) {
      c.chat_template = tmpl->get<std::string>();
    } else if (tmpl != cfg.end() && tmpl->is_array()) {  // [{name, template}, ...]
      for (const json& t : *tmpl) {
        if (t.is_object() && GetString(t, "name") == "default") c.chat_template = GetString(t, "template");
      }
    }
  }
  return c;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> HfTokenizerFromJson(std::string_view json_text,
                                                               std::string_view config_json) {
  absl::StatusOr<BpeConfig> c;
  try {
    c = ParseAll(json_text, config_json);
  } catch (const json::exception& e) {  // defensive: accessors are type-checked
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", e.what()));
  }
  if (!c.ok()) return c.status();
  return tok::BuildBpeTokenizer(*std::move(c));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> HfTokenizerFromJson(std::string_view json_text) {
  return HfTokenizerFromJson(json_text, std::string_view());
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& tokenizer_json_path) {
  auto text = ReadFile(tokenizer_json_path);
  if (!text.ok()) return text.status();
  // tokenizer_config.json beside it carries bos/eos and the chat template.
  const size_t slash = tokenizer_json_path.find_last_of('/');
  const std::string dir =
      slash == std::string::npos ? std::string(".") : tokenizer_json_path.substr(0, slash);
  auto config = ReadFile(dir + "/tokenizer_config.json");
  return HfTokenizerFromJson(*text, config.ok() ? *config : std::string());
}

}  // namespace spear::model
