// Calibration tokens for the quantization pipeline.
//
// Self-generated (the SPEAR paper's choice: no external data): the FP16
// model samples num_sequences sequences of exactly seq_len tokens with
// temperature 1.0 and top_p (default 0.95). Each starts from the model's BOS token,
// or, when the model has none, from a token drawn uniformly from the
// vocabulary (seeded); EOS does not stop a sequence. Sequence i uses the
// sampling seed seed * 1000003 + i, so the set is reproducible and a
// sequence does not depend on how many others are generated. With
// windows_per_sequence = W > 1 each sample is W * seq_len tokens long and is
// returned as W consecutive windows (sample 0's windows first): windows
// after the first start mid-text. With random_start_fraction f > 0, an
// even spread of round(N f) samples get a second prompt token (the first
// when there is no BOS) drawn uniformly from the non-special vocabulary
// (seeded by seed), and the model continues from that word. With prompts
// (prompt_file's lines or prompt_ids), an even spread of round(N
// prompt_fraction) samples continue from BOS + the next prompt in order
// (cycled) instead: the model writes the rest of the sample about a topic
// it was given.
// Text file: the file's tokens (no BOS inserted) cut into consecutive,
// non-overlapping windows of seq_len; the first num_sequences windows (fewer
// if the file is short; InvalidArgument if not even one fits).
// Mixed (self-generated + mix_texts): the self-generated sequences with each
// file's first `sequences` windows spread evenly among them (SpreadAmong:
// the texts' windows interleaved first, in the order given), so both ends
// of the list (fit and held-out) mix.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/model/weights.h"
#include "worker/quantize/pipeline/quantize_model.h"

namespace spear::quantize {

// a's sequences in order with b's spread evenly among them: b[j] follows
// a[max(0, floor((j + 1) |a| / |b|) - 1)] (so b's last follows a's last).
std::vector<std::vector<int32_t>> SpreadAmong(std::vector<std::vector<int32_t>> a,
                                              std::vector<std::vector<int32_t>> b);

// Calibration sequences and, where they were captured while sampling, the
// FP16 model's final-normed hidden states over them: the end-to-end
// stage's teacher (distill.h) without a second forward pass.
struct CalibrationSet {
  std::vector<std::vector<int32_t>> sequences;
  // Per sequence: [size, hidden] floats, or empty where not captured (text
  // windows, windows_per_sequence > 1, capture off).
  std::vector<std::vector<float>> final_hidden;
};

// With capture_hidden, self-generated samples of one window each are
// sampled one token longer (the extra token, drawn last, is dropped: the
// sequences are the same as without) so that the model runs every kept
// position, and the engine's final-normed hidden states of those positions
// are kept. Progress: (tokens generated, total tokens).
absl::StatusOr<CalibrationSet> MakeCalibrationSet(
    const model::LoadedModel& model, const CalibrationOptions& options, int num_threads,
    bool capture_hidden, const std::function<void(int64_t, int64_t)>& progress = nullptr);

// MakeCalibrationSet's sequences, nothing captured.
absl::StatusOr<std::vector<std::vector<int32_t>>> MakeCalibrationSequences(
    const model::LoadedModel& model, const CalibrationOptions& options, int num_threads,
    const std::function<void(int64_t, int64_t)>& progress = nullptr);

}  // namespace spear::quantize
