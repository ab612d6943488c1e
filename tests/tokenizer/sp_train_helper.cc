#include "tests/tokenizer/sp_train_helper.h"

#include <sentencepiece_trainer.h>

namespace spear::model::testing {

std::string TrainSentencePiece(const std::string& args) {
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  return status.ok() ? std::string() : status.ToString();
}

}  // namespace spear::model::testing
