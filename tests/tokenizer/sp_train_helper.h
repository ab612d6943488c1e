// Trains a SentencePiece model. Kept in its own translation unit because
// sentencepiece_trainer.h cannot share one with Abseil headers (see
// worker/model/tokenizer/sp_processor.h).
#pragma once

#include <string>

namespace spear::model::testing {

// Returns "" on success, else the error text.
std::string TrainSentencePiece(const std::string& args);

}  // namespace spear::model::testing
