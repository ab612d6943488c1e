// Whole-model quantization: W4 backbone + SPEAR error compensators.
//
// QuantizeModel turns a loaded FP16/FP32 model into a W4 (+EC) model IN
// PLACE: every transformer linear layer is replaced (through
// LlamaWeights::ForEachLinear) by a model::W4Linear, some of them carrying
// an EC. Steps (each documented in quantize_model.cc):
//  1. calibration tokens: sequences the FP16 model samples itself
//     (self:N,LEN: N sequences of LEN tokens, seeded) or a text file;
//  2. the CKA/entropy diagnostic (ec == kSpear or kStatic with placement):
//     damage of each module = 1 - CKA(final hidden states of the FP16 model,
//     those of the model with only that module quantized); entropy of the
//     damage distribution -> how widely the budget is spread; modules ranked
//     by damage per byte; placement within budget_pct of the served model;
//  3. layer by layer, in order: quantize the backbone (RTN | AWQ | GPTQ)
//     from this layer's calibration inputs as produced by the
//     already-quantized-and-compensated layers below (sequential), fit ECs
//     on placed modules (stage 1 closed form; with e2e == false also the
//     per-module stage 2 against the sequential target), then propagate;
//  4. (ec == kSpear, e2e) stage 2 end to end: all placed ECs trained
//     jointly so the W4 + EC model's next-token distribution matches the
//     FP16 model's (KL on the logits) on the calibration sequences, early
//     stopping on the held-out ~10% of them (distill.h).
// Thread-safety: not re-entrant; uses the given thread pool.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "kernels/w4_format.h"
#include "worker/model/weights.h"
#include "worker/quantize/pipeline/distill.h"
#include "worker/quantize/pipeline/ec_latency.h"

namespace spear::quantize {

enum class Backbone { kRtn, kAwq, kGptq };
enum class EcMode { kNone, kStatic, kSpear };

struct CalibrationOptions {
  // Self-generated: num_sequences of seq_len tokens sampled by the FP16
  // model (temperature 1, top_p 0.95, seed). Or text_file: its tokens cut
  // into num_sequences windows of seq_len.
  std::string text_file;  // empty = self-generated
  int64_t num_sequences = 256;  // 65,536 tokens: ~2 minutes of sampling on 2 cores
  int64_t seq_len = 256;
  uint64_t seed = 1;
  // Self-generated only. Nucleus mass of the sampler (1 = the full
  // distribution).
  double top_p = 0.95;
  // Self-generated only. Sampling temperature (> 1: less typical text,
  // more of the contexts the model would not write itself).
  double temperature = 1.0;
  // Self-generated only: each of the num_sequences samples is
  // windows_per_sequence * seq_len tokens long and is cut into that many
  // windows of seq_len (so the pipeline gets num_sequences *
  // windows_per_sequence sequences). Windows after the first start
  // mid-text, as the windows of a long document do when it is scored in
  // chunks; the first starts at BOS, as a served prompt does.
  int64_t windows_per_sequence = 1;
  // Self-generated only: the fraction of samples (spread evenly over the
  // set) whose first sampled position is instead a token drawn uniformly
  // from the vocabulary's non-special tokens (after BOS when the model has
  // one), as LLM-QAT's data-free generation does: the model continues from
  // a random word, so the set covers more than what it writes after BOS.
  double random_start_fraction = 0.0;
  // Self-generated only: plus, per mix text, the first `sequences` windows
  // of seq_len tokens of `file` (as text_file cuts them). The texts'
  // windows are interleaved evenly (the second text's spread among the
  // first's, the third's among those, ...), and the result spread evenly
  // among the self-generated sequences, so that the fit and the held-out
  // part (the last tenth) both hold some of every text. Empty = none.
  struct MixText {
    std::string file;
    int64_t sequences = 0;
  };
  std::vector<MixText> mix_texts;
  // Self-generated only: prompted samples. A fraction prompt_fraction of
  // the samples (an even spread, as random starts) continue from a prompt
  // instead of from BOS alone: the prompts are prompt_file's non-empty lines
  // (tokenized without BOS; needs a tokenizer), or prompt_ids when the
  // caller tokenized them, taken in order and cycled. A sample is BOS (when
  // the model has one) + its prompt + what the model writes, seq_len x
  // windows tokens in all; a prompt must be shorter than half of that
  // (InvalidArgument naming the line otherwise; only the lines a run uses
  // are read). Excludes random starts.
  std::string prompt_file;
  std::vector<std::vector<int32_t>> prompt_ids;
  double prompt_fraction = 1.0;
  // prompt_file's lines are user messages: each is rendered through the
  // model's chat template with the assistant's turn opened (as `spear
  // generate --chat` does), so an instruct model answers the request; the
  // rendering's leading BOS, if it has one, stands for the sample's BOS.
  // Needs a chat template (FailedPrecondition otherwise).
  bool prompt_chat = false;
};

struct QuantizeOptions {
  Backbone backbone = Backbone::kRtn;
  int64_t group_size = -1;  // -1 = per-channel, else 32/64/128
  bool symmetric = false;
  EcMode ec = EcMode::kSpear;
  double ec_budget_pct = 1.0;  // EC bytes as % of the served W4 model bytes
  // kStatic with place_static_like_spear=false: the same rank on every
  // module at the budget (the "all modules" baseline); true: the
  // diagnostic's placement, closed-form fit only.
  bool place_static_like_spear = false;
  // Scales the entropy rule's module cap (placement.h): N = breadth * N_eff.
  double placement_breadth = 1.0;
  // Smallest EC rank the placement may give (then powers of two up to 256).
  int64_t min_ec_rank = 4;
  // Largest EC rank the placement may give (>= min_ec_rank; 256 = no cap).
  int64_t max_ec_rank = 256;
  // Non-empty: the placement's latency cost of module i is the measured
  // relative latency of its shape at m = 1 and rank min_ec_rank on the
  // target GPU (ec_latency.h); a shape missing from the table is an error
  // (NotFound, before anything runs). Empty: the bytes proxy.
  EcLatencyTable ec_latency;
  // < 1: at most round(F L) of the model's L GEMM launches carry an EC
  // (the GPU's fused GEMMs: a layer's q/k/v one launch, its gate/up one,
  // every other linear its own; FusedLaunchGroups), since the GPU's EC cost
  // is mostly one prologue launch per EC-carrying GEMM. 1: no cap.
  double ec_launch_budget = 1.0;
  bool gate = true;  // false: the ablation (gate fixed at 1, same training)
  int64_t gate_hidden = 0;  // 0 = default (documented in the .cc)
  // How the ECs' A and B are stored (kernels/w4_format.h): the budget is
  // charged at that size, and at the end every EC's factors are rounded to
  // it (kI8: int8 codes, fp16 scales per 64 values; the stage-2 trainer
  // rounds its kept parameters and scores them again, DistillReport).
  kernels::EcFactors ec_factors = kernels::EcFactors::kF16;
  // Stage 2 (kSpear). e2e = true: end-to-end distillation (distill.h,
  // options in `distill`; the per-module training is skipped). false: the
  // per-module training (module_quant.h) with train_steps / learning_rate.
  bool e2e = true;
  DistillOptions distill;
  // > 0: wall-clock budget of the whole QuantizeModel call; the end-to-end
  // stage gets what the earlier stages left (minus a small margin), on top
  // of distill.max_seconds.
  // Default: the 15 minutes for calibration + EC fitting.
  double time_budget_seconds = 900;
  int64_t train_steps = 300;
  double learning_rate = 1e-3;
  // Non-empty: the placement is given (module -> EC rank, e.g. another
  // checkpoint's: `spear quantize --ec-placement`) and the diagnostic does
  // not run. Every entry must name a module of the model with its shape
  // (n x k), at most once, at a rank in [1, min(n, k)]; the ECs' bytes
  // (this run's gate) must fit the budget. InvalidArgument otherwise, before
  // any EC is fitted. Only with kSpear or kStatic + place_static_like_spear.
  struct GivenEc {
    std::string module;
    int64_t n = 0, k = 0, rank = 0;
  };
  std::vector<GivenEc> given_placement;
  std::string given_placement_source;  // for messages and the report
  int64_t diagnostic_tokens = 128;  // calibration tokens used for CKA (cost: ~7 L^2 / 2 layer-runs of them)
  // The diagnostic's tokens come from this many fit sequences, spread evenly
  // over them (sequence floor(j F / K) for j < K), the first
  // ceil(diagnostic_tokens / K) tokens of each; 1 = the first sequence
  // alone (one sample decides the placement).
  int64_t diagnostic_sequences = 1;
  // Fit tokens of the sequential (closed-form) pass: a prefix of the fit
  // sequences (at least one; 0 = all).
  int64_t sequential_max_tokens = 1024;
  // Held-out tokens of the sequential pass: a prefix of the held-out
  // sequences (at least one; 0 = all of them). They score each module's
  // output error (ModuleReport's err_*) and pick GPTQ's dampening; the
  // end-to-end stage scores on all held-out sequences.
  int64_t sequential_holdout_max_tokens = 1024;
  // Held-out calibration: the last ~10 % of the sequences, capped at this
  // many tokens (at least one sequence; 0 = no cap).
  int64_t holdout_max_tokens = 4096;
  CalibrationOptions calib;
};

struct ModuleReport {
  std::string name;  // "model.layers.3.mlp.down_proj"
  double damage = 0;  // 1 - CKA, when the diagnostic ran
  double ec_latency = 0;  // the placement's relative latency cost (measured or proxy)
  int64_t ec_rank = 0;  // 0 = no EC
  int64_t ec_bytes = 0;
  double err_w4 = 0;      // mean squared output error vs FP16 on held-out calibration tokens
  double err_static = 0;  // after stage 1
  double err_final = 0;   // after stage 2 (or = err_static)
};

struct QuantizeReport {
  std::vector<ModuleReport> modules;
  double damage_entropy = 0;          // natural log
  double normalized_entropy = 0;
  double effective_modules = 0;
  bool measured_latency = false;  // the placement used QuantizeOptions::ec_latency
  // GEMM launches of the model as the GPU fuses them (FusedLaunchGroups), and
  // how many of them carry an EC (whatever placed the ECs).
  int64_t gemm_launches = 0, ec_launches = 0;
  int64_t launch_cap = -1;  // the placement's cap (ec_launch_budget), -1 = none
  // Non-empty: the placement was given (QuantizeOptions::given_placement),
  // no diagnostic ran (damages and entropy stay 0).
  std::string placement_source;
  int64_t w4_model_bytes = 0;  // served bytes of the W4 model, embeddings included
  int64_t ec_bytes = 0;
  double ec_pct() const { return w4_model_bytes ? 100.0 * ec_bytes / w4_model_bytes : 0; }
  double seconds = 0;
  int64_t calibration_tokens = 0;
  // Calibration sequences whose teacher states were captured while the
  // FP16 model sampled them (calibration.h); the teacher stage ran the rest.
  int64_t teacher_captured_sequences = 0;
  // Wall seconds per stage (0 when a stage did not run).
  double calibration_seconds = 0, diagnostic_seconds = 0, teacher_seconds = 0,
         sequential_seconds = 0, distill_seconds = 0;
  bool distilled = false;
  DistillReport distill;  // when distilled
};

// Progress callback: (stage name, done, total).
using QuantizeProgress = std::function<void(const std::string&, int64_t, int64_t)>;

absl::StatusOr<QuantizeReport> QuantizeModel(model::LoadedModel* model,
                                              const QuantizeOptions& options,
                                              kernels::ThreadPool* pool,
                                              const QuantizeProgress& progress = nullptr);

// Served bytes of a model as it would be stored in a .spear checkpoint:
// W4 layers (codes, scales, zeros, act scales), ECs (fp16), embeddings and
// norms (fp16), lm_head (0 when tied).
int64_t ServedModelBytes(const model::LoadedModel& model, int64_t* ec_bytes = nullptr);

}  // namespace spear::quantize
