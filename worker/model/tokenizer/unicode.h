// UTF-8 helpers and the GPT-2 byte <-> unicode mapping used by byte-level
// BPE. Private to spear_tokenizer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace spear::model::tok {

// Length in bytes of the UTF-8 character starting at s[pos] if it is a valid,
// complete sequence; 1 for an invalid or truncated byte (so callers always
// make progress). Precondition: pos < s.size().
size_t Utf8CharLen(std::string_view s, size_t pos);

// Appends the UTF-8 encoding of code point cp (must be <= 0x10FFFF).
void AppendUtf8(uint32_t cp, std::string* out);

// Number of trailing bytes of s that form the beginning of a valid but
// incomplete multi-byte sequence (0..3). Streaming decoders hold these back.
size_t IncompleteUtf8Suffix(std::string_view s);

// GPT-2 bytes_to_unicode(): every byte maps to one printable code point.
// ByteLevelEncode maps each byte of `bytes` to its code point (UTF-8 encoded).
std::string ByteLevelEncode(std::string_view bytes);
// Inverse mapping. Characters outside the mapping (e.g. added tokens stored
// verbatim) are copied through unchanged, as are invalid bytes.
void ByteLevelDecodeAppend(std::string_view text, std::string* out);

}  // namespace spear::model::tok
