#include <algorithm>

#include "worker/model/tokenizer.h"
#include "worker/model/tokenizer/unicode.h"

namespace spear::model {

// Decoding token by token is wrong for SentencePiece (a piece's leading "▁"
// is dropped at the start of a text), so the decoder re-decodes a short
// window that starts one token before the unread ones and emits the
// difference (the approach of HF text-generation-inference).
std::string StreamingDecoder::Push(int32_t id) {
  window_.push_back(id);
  const std::string text = tok_->Decode(window_, skip_special_);
  std::string_view fresh;
  if (text.size() >= emitted_) fresh = std::string_view(text).substr(emitted_);
  // Hold back only a truncated-but-valid multi-byte prefix; invalid bytes can
  // never become valid later, so they are passed through.
  const size_t keep = tok::IncompleteUtf8Suffix(fresh);
  std::string out(fresh.substr(0, fresh.size() - keep));
  emitted_ += out.size();
  if (keep == 0 && window_.size() > 4) {
    // Everything is emitted: restart the window at the last token.
    window_.erase(window_.begin(), window_.end() - 1);
    emitted_ = tok_->Decode(window_, skip_special_).size();
  }
  return out;
}

std::string StreamingDecoder::Flush() {
  const std::string text = tok_->Decode(window_, skip_special_);
  std::string out = text.size() > emitted_ ? text.substr(emitted_) : std::string();
  window_.clear();
  emitted_ = 0;
  return out;
}

}  // namespace spear::model
