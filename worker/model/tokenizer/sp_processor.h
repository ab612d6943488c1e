// Thin wrapper over sentencepiece::SentencePieceProcessor using only std
// types. Why: sentencepiece_processor.h declares `absl::string_view` as an
// alias of std::string_view, which collides with Debian's Abseil (where it is
// a distinct class); the two headers cannot share a translation unit, so only
// sp_processor.cc includes the SentencePiece header. Private to
// spear_tokenizer. All const methods are thread-safe.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace spear::model::tok {

class SpProcessor {
 public:
  // Null on failure, with the reason in *error.
  static std::unique_ptr<SpProcessor> Load(const std::string& path, std::string* error);
  ~SpProcessor();

  bool Encode(std::string_view text, std::vector<int>* ids) const;
  bool Decode(const std::vector<int>& ids, std::string* text) const;
  int PieceSize() const;
  std::string IdToPiece(int id) const;
  int PieceToId(std::string_view piece) const;
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  int bos_id() const;
  int eos_id() const;

 private:
  struct Impl;
  SpProcessor();
  std::unique_ptr<Impl> impl_;
};

}  // namespace spear::model::tok
