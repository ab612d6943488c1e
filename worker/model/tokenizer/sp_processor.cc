// No Abseil header may be included here (see sp_processor.h).
#include "worker/model/tokenizer/sp_processor.h"

#include <sentencepiece_processor.h>

namespace spear::model::tok {

struct SpProcessor::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SpProcessor::SpProcessor() : impl_(std::make_unique<Impl>()) {}
SpProcessor::~SpProcessor() = default;

std::unique_ptr<SpProcessor> SpProcessor::Load(const std::string& path, std::string* error) {
  std::unique_ptr<SpProcessor> p(new SpProcessor());
  const auto status = p->impl_->sp.Load(path);
  if (!status.ok()) {
    *error = status.ToString();
    return nullptr;
  }
  return p;
}

bool SpProcessor::Encode(std::string_view text, std::vector<int>* ids) const {
  return impl_->sp.Encode(text, ids).ok();
}
bool SpProcessor::Decode(const std::vector<int>& ids, std::string* text) const {
  return impl_->sp.Decode(ids, text).ok();
}
int SpProcessor::PieceSize() const { return impl_->sp.GetPieceSize(); }
std::string SpProcessor::IdToPiece(int id) const { return impl_->sp.IdToPiece(id); }
int SpProcessor::PieceToId(std::string_view piece) const { return impl_->sp.PieceToId(piece); }
bool SpProcessor::IsControl(int id) const { return impl_->sp.IsControl(id); }
bool SpProcessor::IsUnknown(int id) const { return impl_->sp.IsUnknown(id); }
int SpProcessor::bos_id() const { return impl_->sp.bos_id(); }
int SpProcessor::eos_id() const { return impl_->sp.eos_id(); }

}  // namespace spear::model::tok
