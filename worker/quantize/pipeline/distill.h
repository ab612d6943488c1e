// End-to-end distillation of a W4 + EC model's ECs to the FP16 model
// (SPEAR stage 2, whole-model form).
//
// Why: a module-level objective (the EC reproduces its module's FP16 output)
// cannot repay the drift the un-compensated modules leave in the residual
// stream, and the budget allows ECs on only part of the modules. Training
// all placed ECs JOINTLY against the FP16 model's output distribution lets
// each EC correct whatever error is visible downstream, including other
// modules' error (cf. knowledge-distillation QAT / LoRA recovery).
//
// Objective, on calibration sequences the FP16 model sampled itself, per
// token t (mean over tokens):
//     KL(softmax(z_fp(t)) || softmax(z_q(t)))  +  mse_w * ||y_q(t) - y_fp(t)||^2 / d
//       + layer_w * mean over layers l >= L0 of ||h_q,l(t) - h_fp,l(t)||^2 / ||h_fp,l(t)||^2
// z = lm_head(y), y = the final-normed hidden state; the teacher is given
// by its final-normed hidden states Y_fp (the lm_head is not quantized, so
// z_fp = lm_head(Y_fp) is recomputed per step instead of storing T x vocab
// logits). The optional layer term (layer targets) compares the residual
// stream after every decoder layer from the first EC-carrying one (L0) on
// with the FP16 model's, as a per-token relative squared error (scale-free
// across layers and tokens, so no layer or outlier token dominates); its
// teacher is stored as fp16 [rows, num_layers, d] (2 bytes x layers x d
// per token: 2.3 GB for SmolLM2 at 65,536 tokens). Only EC parameters
// train (A, B and, unless frozen, the gate MLP); the W4 weights, norms and
// embeddings are frozen.
//
// Backward: hand-written, float32 (distill_ops.h for the ops; ec_model.h
// for the EC): W4 linears as their dequantized effective weight Qeff
// (act_scale folded), y = x Qeff^T + bias + B(g ⊙ A x), dX = dY Qeff + dU A,
// both products on kernels::cpu::Linear (packed GEMM, thread pool) with
// float32 copies of Qeff and Qeff^T (~8 bytes per weight: 0.85 GB for
// SmolLM2-135M). All activations of a minibatch are kept (about 1 MB per
// token for SmolLM2: 4 x 256 tokens ~ 1 GB).
//
// Procedure (Train): minibatches of whole fit sequences (reshuffled each
// epoch, seeded), Adam, linear warm-up then cosine decay to
// lr * lr_min_ratio; every eval_every steps (every eval_every_early before
// patience_from of the schedule) the mean KL on the held-out sequences; the
// best held-out parameters are kept (the initial ones
// included, so training never returns something worse on held-out
// calibration data); early stop after `patience` evaluations without
// improvement counted from `patience_from` of the schedule on (before, the
// lr is still high and a plateau is no sign of the end: keeping the best
// parameters already guards against overfitting), or when max_seconds is
// spent. Gate init: a gated EC whose
// gate is exactly 1 (W2 = 0, b2 = 0) has W1 rescaled so that W1 u has unit
// RMS on the first minibatch (u = A x can be tiny); outputs unchanged.
// Thread-safety: one call at a time; uses the pool.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "worker/model/weights.h"

namespace spear::quantize {

// Arithmetic of the training's GEMMs with frozen weights (the W4 backbone,
// dequantized, and the lm_head; the ECs' own products stay fp32):
//   kF32:  the weights kept as fp32, fp32 products (the exact dequantized
//          values; 8 bytes per weight for the two orientations).
//   kBf16: the weights kept as bf16 (half the memory; a W4 value rounds by
//          at most 2^-9 of itself), activations rounded to 16 bits and
//          multiplied by the CPU's 16-bit products where it has them: fp16
//          (AVX512-FP16: ~2x the bf16 products' rate on Intel cores,
//          docs/results/quality.md "fp16 products"),
//          else bf16 dot products (AVX512-BF16: ~1.8x the fp32 GEMM rate on
//          Zen 4, "bf16 products"); elsewhere fp32 products of the bf16 weights.
enum class DistillGemm { kF32, kBf16 };
std::string_view DistillGemmName(DistillGemm g);                    // "f32" | "bf16"
absl::StatusOr<DistillGemm> ParseDistillGemm(std::string_view s);  // the inverse

// Defaults = the SmolLM2 recipe of docs/results/quality.md (lr chosen on
// held-out calibration KL; batch 2 x 256 tokens because a CPU budget allows
// only a few hundred steps; `steps` is a ceiling — the time budget or early
// stopping normally ends the run and the cosine schedule follows the time).
struct DistillOptions {
  int64_t steps = 1000;
  int64_t batch_sequences = 2;
  double lr = 3e-3;
  double lr_min_ratio = 0.1;
  int64_t warmup_steps = 5;
  int64_t eval_every = 20;
  // Steps between held-out evaluations before patience_from of the
  // schedule (0: eval_every). There they only guard the kept parameters
  // (early stopping counts from patience_from on, and the cosine schedule's
  // best is late), yet each costs ~3 steps (4,096 held-out tokens of
  // forward against a 512-token step's forward and backward): 60 keeps one
  // in three. Step 0 (the initial parameters) is always scored.
  int64_t eval_every_early = 60;
  int64_t patience = 4;        // evaluations without improvement; 0: never stop early
  double patience_from = 0.75;  // fraction of the schedule (steps or time) before which
                                // evaluations do not count toward patience
  // > 0: Train returns within about this many seconds, keeping the best:
  // the last step is the one after which one more step and the scorings
  // that end the run (the last step's, the average's, the int8-rounded
  // factors'; each timed as the baseline's scoring) would not fit.
  double max_seconds = 0;
  double hidden_mse_weight = 0;
  // Weight of the layer-target term (see the header); > 0 needs the
  // teacher's layer states (DistillTeacher::layers).
  double layer_mse_weight = 0;
  // Distillation temperature of the training KL (Hinton: tau^2 KL of the
  // softened distributions; 1 = the plain KL). The held-out KL that picks
  // the best step is always at temperature 1.
  double kl_temperature = 1.0;
  bool train_gate = true;
  // lr multiplier of the gate MLP (W1, b1, W2, b2) against A and B. It was
  // 5 while stage 2 ran a few dozen steps (at 1 the gate, which starts at
  // exactly 1 with W2 = 0, barely moved then); at today's ~300 steps 1 fits
  // the held-out calibration data better (lower held-out KL on four of five
  // seeds at run S's recipe and at the default recipe's seed 1;
  // docs/results/quality.md, "Run U"). `spear quantize --gate-lr-scale`.
  double gate_lr_scale = 1.0;
  // > 0: also an exponential moving average of the EC parameters, decay
  // `ema_decay` per step from the end of the warm-up; from half of the run
  // on, every held-out evaluation scores the average too, and the best of
  // both kinds is what training keeps (a run's held-out calibration data
  // decides, as for the raw steps). 0: off.
  double ema_decay = 0;
  uint64_t seed = 1;
  // true: the kept parameters' A and B are rounded to the int8 grid
  // (kernels/ec_factors.h) at the end and scored once more on the held-out
  // sequences (DistillReport::rounded_val_kl).
  bool round_factors_i8 = false;
  // The GEMMs with frozen weights (EcDistiller::Create's argument; read by
  // the pipeline, not by Train).
  DistillGemm gemm = DistillGemm::kBf16;
};

struct DistillReport {
  double init_val_kl = 0, final_val_kl = 0;  // mean KL per token on held-out sequences
  double init_train_kl = 0, last_train_kl = 0;
  // round_factors_i8: the held-out KL after the rounding (final_val_kl is
  // the kept parameters' before it); -1 otherwise.
  double rounded_val_kl = -1;
  int64_t steps_run = 0, best_step = 0;
  int64_t num_ecs = 0, num_params = 0;
  int64_t fit_tokens = 0, val_tokens = 0;
  bool stopped_early = false, time_capped = false;
  double seconds = 0, seconds_per_step = 0;
  std::vector<std::pair<int64_t, double>> val_history;  // (step, val KL)
  // ema_decay > 0: the average's held-out KL per evaluation, and whether
  // the kept parameters are the average's (best_step: the step it was
  // evaluated at).
  std::vector<std::pair<int64_t, double>> ema_val_history;
  bool best_is_ema = false;

  // Fewer steps than this in a time-capped run: the ECs are under-trained
  // (docs/results/quality.md: the documented checkpoints trained 180-250
  // steps; on a CPU ~2.8x slower the 15-minute budget allowed 12).
  static constexpr int64_t kUnderTrainedSteps = 100;
  // A warning for the user when the time budget stopped training below
  // kUnderTrainedSteps (steps pinned by the user, not capped: none); empty
  // otherwise.
  std::string UnderTrainedWarning() const;
};

// Per-token data for the plot "output error with and without EC against the
// gate value": KL(FP16 || model) per token with the ECs and with every EC's
// B set to 0 (the W4 backbone alone), and the gates.
struct EcTokenDiagnostics {
  std::vector<std::string> ec_names;       // "layers.L.q_proj", per EC
  std::vector<float> kl_with, kl_without;  // [T]
  std::vector<float> mean_gate;            // [T] mean over ECs and coordinates
  std::vector<float> ec_gate;              // [T, num_ecs] mean over coordinates (1: static)
};

// The FP16 model's side of the objective over calibration sequences (rows
// in sequence order): final-normed hidden states [rows, d] and, if asked,
// the residual stream after every decoder layer [rows, num_layers, d] as
// IEEE fp16 bits.
struct DistillTeacher {
  std::vector<float> final_hidden;
  std::vector<uint16_t> layers;
  int64_t num_layers = 0, hidden = 0;
};
// Runs `fp_model` (dense) over `seqs`. InvalidArgument as LayerwiseRunner.
// known_final (optional, one entry per sequence, without layers only): the
// final-normed states of sequence i already computed ([size, d]; the
// calibration's capture, calibration.h) or empty; only the sequences
// without them are run. InvalidArgument for an entry of another size.
absl::StatusOr<DistillTeacher> ComputeDistillTeacher(
    const model::LoadedModel* fp_model, kernels::ThreadPool* pool,
    const std::vector<std::vector<int32_t>>& seqs, bool with_layers,
    const std::vector<std::vector<float>>* known_final = nullptr);

// Progress: (step, steps, latest held-out KL or -1).
using DistillProgress = std::function<void(int64_t, int64_t, double)>;

class EcDistiller {
 public:
  // Reads every decoder linear of `model` (each must be a model::W4Linear,
  // with or without an EC) and the dense lm_head. InvalidArgument otherwise.
  // head_slice: vocabulary rows per slice of the lm_head's transpose, the
  // backward's dY = dZ E (one product per slice, accumulated: a slice's
  // dZ block stays in cache; 1024 took ~20 % less time than one product
  // over the whole vocabulary on SmolLM2, docs/results/quality.md). The
  // result does not depend on it beyond float rounding (distill_test).
  static constexpr int64_t kDefaultHeadSlice = 1024;
  static absl::StatusOr<std::unique_ptr<EcDistiller>> Create(
      const model::LoadedModel* model, kernels::ThreadPool* pool,
      DistillGemm gemm = DistillGemm::kBf16, int64_t head_slice = kDefaultHeadSlice);
  ~EcDistiller();

  int64_t num_ecs() const;
  int64_t num_params() const;  // trainable EC parameters (gates included)
  // All EC parameters flattened (per EC in ForEachLinear order: A, B, W1,
  // b1, W2, b2).
  std::vector<float> GetParams() const;
  void SetParams(const std::vector<float>& p);

  // Mean over the tokens of `seqs` of the objective (see the header); if
  // grad != nullptr it receives d objective / d params (GetParams order).
  // teacher_hidden: [sum of lengths, d] rows in sequence order.
  // kl_temperature tau: the KL term is tau^2 KL of the distributions at
  // temperature tau (1: the plain KL); InvalidArgument unless > 0.
  // teacher_layers: [sum of lengths, num_layers, d] fp16 (DistillTeacher::
  // layers), used when layer_mse_weight > 0 (InvalidArgument if null then).
  absl::StatusOr<double> LossAndGrad(const std::vector<std::span<const int32_t>>& seqs,
                                     const float* teacher_hidden, double hidden_mse_weight,
                                     std::vector<float>* grad, double kl_temperature = 1.0,
                                     const uint16_t* teacher_layers = nullptr,
                                     double layer_mse_weight = 0);
  absl::StatusOr<EcTokenDiagnostics> TokenDiagnostics(
      const std::vector<std::span<const int32_t>>& seqs, const float* teacher_hidden);
  // Student logits [sum of lengths, vocab] of seqs (tests).
  absl::StatusOr<std::vector<float>> Logits(const std::vector<std::span<const int32_t>>& seqs);

  // seqs[0, num_fit) train, the rest is held out (>= 1 each).
  // teacher_hidden [sum of all lengths, d] in sequence order;
  // teacher_layers as in LossAndGrad (needed iff options.layer_mse_weight > 0).
  absl::StatusOr<DistillReport> Train(const std::vector<std::vector<int32_t>>& seqs,
                                      int64_t num_fit, const float* teacher_hidden,
                                      const DistillOptions& options,
                                      const DistillProgress& progress = nullptr,
                                      const uint16_t* teacher_layers = nullptr);

  // Replaces every EC-carrying linear of *model (the same model, or one with
  // the same structure) by a W4Linear with the trained EC.
  absl::Status WriteBack(model::LoadedModel* model) const;

 private:
  struct Impl;
  explicit EcDistiller(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace spear::quantize
