// libFuzzer target for the tokenizer library.
//
// 1. A byte-level BPE tokenizer built once from an in-memory tokenizer.json
//    (all 256 byte tokens, a few merges, special and plain added tokens,
//    Split(llama3 regex) + Digits + ByteLevel pre-tokenizers) encodes the
//    input as arbitrary bytes. Documented behavior for invalid UTF-8: an
//    invalid byte never matches a pre-tokenizer regex and is encoded through
//    its byte token, so Decode(Encode(x)) == x must hold for every input;
//    the target aborts if it does not. StreamingDecoder must reproduce the
//    same bytes.
// 2. The input reinterpreted as token ids is decoded (ids may be invalid).
// 3. The input is parsed as a tokenizer.json; whatever loads must encode and
//    decode without crashing.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "worker/model/tokenizer.h"

namespace {

using spear::model::Tokenizer;

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else {  // GPT-2 byte characters are all < 0x800
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// JSON string literal for the GPT-2 byte character of b.
std::string ByteChar(int b) {
  static std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    int n = 0;
    for (int c = 0; c < 256; ++c) {
      const bool printable = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE;
      AppendUtf8(printable ? c : 256 + n++, &t[c]);
    }
    return t;
  }();
  const std::string& s = table[b];
  if (s == "\"") return "\\\"";
  if (s == "\\") return "\\\\";
  return s;
}

std::string FixtureJson() {
  std::string vocab;
  for (int b = 0; b < 256; ++b) {
    vocab += "\"" + ByteChar(b) + "\": " + std::to_string(b) + ",";
  }
  const std::string sp = ByteChar(' ');
  vocab += "\"th\": 256, \"the\": 257, \"" + sp + "the\": 258, \"in\": 259, \"" + sp +
           "in\": 260, \"12\": 261, \"" + sp + sp + "\": 262, \"\xc3\xa4\xc2\xb8\": 263";
  return R"({"version": "1.0",
    "added_tokens": [
      {"id": 264, "content": "<|im_start|>", "special": true},
      {"id": 265, "content": "<|im_end|>", "special": true},
      {"id": 266, "content": "<tool>", "special": false}],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "Digits", "individual_digits": false},
      {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]},
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [264], "tokens": ["<|im_start|>"]}}},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {)" +
         vocab + R"(}, "merges": ["t h", "th e", ")" + sp + R"( the", "i n", ")" + sp +
         R"( in", "1 2", ")" + sp + " " + sp + R"(", ["\u00e4", "\u00b8"]]}})";
}

const Tokenizer& Fixture() {
  static const Tokenizer* tok = [] {
    auto t = spear::model::HfTokenizerFromJson(FixtureJson());
    if (!t.ok()) {
      std::fprintf(stderr, "fixture tokenizer failed to load: %s\n", t.status().ToString().c_str());
      std::abort();
    }
    return t->release();
  }();
  return *tok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const Tokenizer& tok = Fixture();

  // 1. Encode arbitrary bytes; the round trip must be exact.
  const std::vector<int32_t> ids = tok.Encode(input, /*add_bos=*/false);
  if (tok.Decode(ids) != input) {
    std::fprintf(stderr, "round trip mismatch\n");
    std::abort();
  }
  spear::model::StreamingDecoder stream(&tok);
  std::string streamed;
  for (int32_t id : ids) streamed += stream.Push(id);
  streamed += stream.Flush();
  if (streamed != input) {
    std::fprintf(stderr, "streaming mismatch\n");
    std::abort();
  }
  const std::vector<int32_t> with_bos = tok.Encode(input, /*add_bos=*/true);
  if (with_bos.size() != ids.size() + 1 || tok.Decode(with_bos, /*skip_special=*/true).size() > size) {
    std::fprintf(stderr, "add_bos / skip_special mismatch\n");
    std::abort();
  }

  // 2. The input as token ids (valid or not).
  std::vector<int32_t> raw(size / sizeof(int32_t));
  if (!raw.empty()) std::memcpy(raw.data(), data, raw.size() * sizeof(int32_t));
  (void)tok.Decode(raw);
  (void)tok.Decode(raw, /*skip_special=*/true);

  // 3. The input as a tokenizer.json.
  auto parsed = spear::model::HfTokenizerFromJson(input);
  if (parsed.ok()) {
    const Tokenizer& t = **parsed;
    const auto a = t.Encode("Hello, world! 123 <|im_start|>", true);
    (void)t.Decode(a);
    const auto b = t.Encode(input.substr(0, 256), false);
    (void)t.Decode(b, true);
    for (int32_t id = -1; id < 4; ++id) {
      (void)t.TokenText(id);
      (void)t.IsSpecial(id);
    }
  }
  return 0;
}
