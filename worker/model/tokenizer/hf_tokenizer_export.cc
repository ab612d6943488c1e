// BpeConfig -> HF tokenizer.json + tokenizer_config.json (the inverse of
// hf_tokenizer_json.cc for everything that file accepts; see the contract of
// ExportHfTokenizer in worker/model/tokenizer.h).
//
// Known lossy corner: a JSON vocab maps strings to ids, so when two regular
// (non-added) ids share one string only the first survives; the other id
// becomes a hole after reloading. Encoding is unaffected (lookups already
// resolve to the first id). Added tokens keep their ids (added_tokens list).
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "worker/model/tokenizer.h"
#include "worker/model/tokenizer/bpe_tokenizer.h"

namespace spear::model {
namespace {

// Plain (key-sorted) json: ordered_json's lookups are linear, and the
// vocabulary has ~50k keys.
using ojson = nlohmann::json;
using tok::SplitBehavior;

const char* BehaviorName(SplitBehavior b) {
  switch (b) {
    case SplitBehavior::kRemoved: return "Removed";
    case SplitBehavior::kIsolated: return "Isolated";
    case SplitBehavior::kMergedWithPrevious: return "MergedWithPrevious";
    case SplitBehavior::kMergedWithNext: return "MergedWithNext";
    case SplitBehavior::kContiguous: return "Contiguous";
  }
  return "Isolated";
}

ojson PreTokenizerJson(const tok::PreTokenizer& pre) {
  ojson steps = ojson::array();
  for (const tok::PreTokenizer::Step& s : pre.steps()) {
    if (s.byte_level) {
      steps.push_back({{"type", "ByteLevel"},
                       {"add_prefix_space", s.add_prefix_space},
                       {"trim_offsets", true},
                       {"use_regex", s.regex != nullptr}});
    } else {
      steps.push_back({{"type", "Split"},
                       {"pattern", {{s.literal ? "String" : "Regex", s.pattern}}},
                       {"behavior", BehaviorName(s.behavior)},
                       {"invert", s.invert}});
    }
  }
  if (steps.empty()) return nullptr;
  if (steps.size() == 1) return steps[0];
  return {{"type", "Sequence"}, {"pretokenizers", steps}};
}

ojson NullableToken(const tok::BpeConfig& c, int32_t id) {
  if (id < 0 || static_cast<size_t>(id) >= c.vocab.size()) return nullptr;
  return c.vocab[id];
}

ojson PostProcessorJson(const tok::BpeConfig& c) {
  if (c.prefix_ids.empty() && c.suffix_ids.empty()) {
    if (!c.pre_tokenizer.has_byte_level()) return nullptr;
    return {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false},
            {"use_regex", true}};
  }
  ojson single = ojson::array(), pair = ojson::array(), specials = ojson::object();
  auto special = [&](int32_t id) {
    const std::string& name = c.vocab[id];
    specials[name] = {{"id", name}, {"ids", {id}}, {"tokens", {name}}};
    return ojson{{"SpecialToken", {{"id", name}, {"type_id", 0}}}};
  };
  for (int32_t id : c.prefix_ids) single.push_back(special(id)), pair.push_back(special(id));
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  pair.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  for (int32_t id : c.suffix_ids) single.push_back(special(id)), pair.push_back(special(id));
  for (int32_t id : c.prefix_ids) pair.push_back(special(id));
  pair.push_back({{"Sequence", {{"id", "B"}, {"type_id", 1}}}});
  for (int32_t id : c.suffix_ids) pair.push_back(special(id));
  return {{"type", "TemplateProcessing"},
          {"single", single},
          {"pair", pair},
          {"special_tokens", specials}};
}

ojson DecoderJson(const tok::BpeConfig& c) {
  if (c.byte_level_decode) {
    return {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
            {"use_regex", true}};
  }
  // Any non-ByteLevel decoder makes the loader decode token strings as they are.
  if (c.byte_fallback) {
    return {{"type", "Sequence"},
            {"decoders", {{{"type", "ByteFallback"}}, {{"type", "Fuse"}}}}};
  }
  return {{"type", "Fuse"}};
}

}  // namespace

absl::StatusOr<HfTokenizerFiles> ExportHfTokenizer(const Tokenizer& t) {
  const tok::BpeConfig* cp = t.bpe_config();
  if (cp == nullptr) {
    return absl::UnimplementedError(
        "only byte-level BPE tokenizers can be exported as tokenizer.json");
  }
  const tok::BpeConfig& c = *cp;
  ojson added = ojson::array();
  for (const tok::AddedToken& a : c.added_tokens) {
    added.push_back({{"id", a.id},
                     {"content", a.content},
                     {"single_word", false},
                     {"lstrip", a.lstrip},
                     {"rstrip", a.rstrip},
                     {"normalized", false},
                     {"special", a.special}});
  }
  ojson vocab = ojson::object();
  for (size_t id = 0; id < c.vocab.size(); ++id) {
    const std::string& s = c.vocab[id];
    if (s.empty()) continue;  // a hole
    vocab.emplace(s, static_cast<int64_t>(id));  // keeps the first of duplicates (see top)
  }
  ojson merges = ojson::array();
  for (const auto& [a, b] : c.merges) merges.push_back({a, b});
  auto or_null = [](const std::string& s) { return s.empty() ? ojson(nullptr) : ojson(s); };
  ojson model = {{"type", "BPE"},
                 {"dropout", nullptr},
                 {"unk_token", NullableToken(c, c.unk_id)},
                 {"continuing_subword_prefix", or_null(c.continuing_subword_prefix)},
                 {"end_of_word_suffix", or_null(c.end_of_word_suffix)},
                 {"fuse_unk", c.fuse_unk},
                 {"byte_fallback", c.byte_fallback},
                 {"ignore_merges", c.ignore_merges},
                 {"vocab", std::move(vocab)},
                 {"merges", std::move(merges)}};
  ojson j = {{"version", "1.0"},
             {"truncation", nullptr},
             {"padding", nullptr},
             {"added_tokens", std::move(added)},
             {"normalizer", nullptr},
             {"pre_tokenizer", PreTokenizerJson(c.pre_tokenizer)},
             {"post_processor", PostProcessorJson(c)},
             {"decoder", DecoderJson(c)},
             {"model", std::move(model)}};
  ojson cfg = {{"tokenizer_class", "PreTrainedTokenizerFast"},
               {"bos_token", NullableToken(c, c.bos_id)},
               {"eos_token", NullableToken(c, c.eos_id)},
               {"unk_token", NullableToken(c, c.unk_id)},
               {"clean_up_tokenization_spaces", false}};
  if (!c.chat_template.empty()) cfg["chat_template"] = c.chat_template;
  HfTokenizerFiles out;
  try {
    // Strict: a token that is not valid UTF-8 cannot be written faithfully.
    out.tokenizer_json = j.dump(1);
    out.tokenizer_config_json = cfg.dump(2);
  } catch (const ojson::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer cannot be written as JSON: ", e.what()));
  }
  return out;
}

}  // namespace spear::model
