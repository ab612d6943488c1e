// SentencePiece models through libsentencepiece.
//
// Control pieces (<s>, </s>, ...) and the unknown piece are "special": they
// are matched as whole strings in the input before SentencePiece runs (as HF
// does for its added special tokens), decoded as their text unless
// skip_special. add_bos prepends bos_id() when the model has one.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "worker/model/tokenizer.h"
#include "worker/model/tokenizer/sp_processor.h"

namespace spear::model {
namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path) {
    std::string error;
    auto sp = tok::SpProcessor::Load(path, &error);
    if (sp == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot load SentencePiece model ", path, ": ", error));
    }
    std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer(std::move(sp)));
    const int n = t->sp_->PieceSize();
    for (int id = 0; id < n; ++id) {
      std::string piece = t->sp_->IdToPiece(id);
      if (t->IsSpecial(id) && !piece.empty()) t->specials_.emplace_back(id, std::move(piece));
    }
    // Longest first so that the leftmost match is also the longest.
    std::stable_sort(t->specials_.begin(), t->specials_.end(), [](const auto& a, const auto& b) {
      return a.second.size() > b.second.size();
    });
    return std::unique_ptr<Tokenizer>(std::move(t));
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> ids;
    if (add_bos && bos_id() >= 0) ids.push_back(bos_id());
    size_t start = 0;
    for (size_t pos = 0; pos < text.size();) {
      const std::pair<int, std::string>* matched = nullptr;
      for (const auto& special : specials_) {
        if (text.substr(pos).starts_with(special.second)) {
          matched = &special;
          break;
        }
      }
      if (matched == nullptr) {
        ++pos;
        continue;
      }
      EncodePlain(text.substr(start, pos - start), &ids);
      ids.push_back(matched->first);
      pos = start = pos + matched->second.size();
    }
    EncodePlain(text.substr(start), &ids);
    return ids;
  }

  std::string Decode(std::span<const int32_t> ids, bool skip_special) const override {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      std::string piece;
      if (sp_->Decode(run, &piece)) out += piece;
      run.clear();
    };
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) continue;
      if (IsSpecial(id)) {
        flush();
        if (!skip_special) out += sp_->IdToPiece(id);
      } else {
        run.push_back(id);
      }
    }
    flush();
    return out;
  }

  int64_t vocab_size() const override { return sp_->PieceSize(); }
  std::optional<int32_t> TokenId(std::string_view token) const override {
    const int id = sp_->PieceToId(token);
    // PieceToId answers unk_id for unknown pieces; confirm the round trip.
    if (id < 0 || sp_->IdToPiece(id) != token) return std::nullopt;
    return id;
  }
  std::string TokenText(int32_t id) const override {
    return id >= 0 && id < vocab_size() ? sp_->IdToPiece(id) : std::string();
  }
  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < vocab_size() && (sp_->IsControl(id) || sp_->IsUnknown(id));
  }
  int32_t bos_id() const override { return sp_->bos_id(); }
  int32_t eos_id() const override { return sp_->eos_id(); }
  const std::string& chat_template() const override { return chat_template_; }

 private:
  explicit SentencePieceTokenizer(std::unique_ptr<tok::SpProcessor> sp) : sp_(std::move(sp)) {}

  void EncodePlain(std::string_view text, std::vector<int32_t>* ids) const {
    if (text.empty()) return;
    std::vector<int> piece_ids;
    if (!sp_->Encode(text, &piece_ids)) return;
    ids->insert(ids->end(), piece_ids.begin(), piece_ids.end());
  }

  std::unique_ptr<tok::SpProcessor> sp_;
  std::vector<std::pair<int, std::string>> specials_;  // (id, piece text)
  std::string chat_template_;  // SentencePiece models carry none
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& model_path) {
  return SentencePieceTokenizer::Load(model_path);
}

}  // namespace spear::model
