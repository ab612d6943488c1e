// Stage 2 of the EC fit: gradient training of one Error Compensator.
//
// Data: X [T, k] = the module's inputs (taken from the model that already
// carries the earlier ECs), R [T, n] = the residual the EC must produce,
// normally r = W x - Q(W) x (effective Q, act_scale included); for block-
// level training the caller passes any target. Loss = mean over tokens of
// sum_i w_i (EC(x)_i - r_i)^2 (see ec_model.h for the math and backward).
//
// Procedure: a seeded random 10% (val_fraction) of the tokens is held out;
// minibatches of `batch_tokens` are drawn from the rest (reshuffled each
// epoch); Adam with lr following a cosine decay from lr to lr * lr_min_ratio
// over `steps` (after an optional linear warm-up). Every `eval_every` steps
// the held-out loss is measured; the parameters with the best held-out loss
// (including the initial ones: training never returns something worse on
// val than what it was given) are returned. Training stops early after
// `patience` evaluations without improvement.
// Gate init: when the gate's W2 and b2 are zero (gate == 1, MakeGatedEc) and
// scale_gate_init is set, W1 is rescaled so that W1 u has unit RMS on the
// training tokens (u = A x can be tiny or huge depending on the weight
// error); the gate stays exactly 1, so the initial loss is unchanged.
// Freezing: train_a / train_b / train_gate; an EC with gated == false trains
// A, B only (the "gate fixed at 1" ablation).
// Threads: single-threaded, no global state; deterministic for a seed.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/w4_format.h"
#include "worker/quantize/matrix.h"

namespace spear::quantize {

using kernels::EcWeights;

struct EcTrainOptions {
  int64_t steps = 300;
  int64_t batch_tokens = 256;
  float lr = 1e-3f;
  float lr_min_ratio = 0.05f;   // cosine decays to lr * lr_min_ratio
  int64_t warmup_steps = 0;
  float beta1 = 0.9f, beta2 = 0.999f, adam_eps = 1e-8f;
  double val_fraction = 0.1;
  int64_t eval_every = 20;
  int64_t patience = 5;         // evaluations without improvement; 0: never stop early
  uint64_t seed = 0;
  bool train_a = true, train_b = true, train_gate = true;
  bool scale_gate_init = true;
  std::vector<float> channel_weights;  // empty or [n], >= 0
};

struct EcTrainReport {
  double init_train_loss = 0, init_val_loss = 0;    // before training
  double final_train_loss = 0, final_val_loss = 0;  // of the returned (best-val) parameters
  double zero_train_loss = 0, zero_val_loss = 0;    // with no EC at all (mean ||r||^2)
  int64_t steps_run = 0, best_step = 0;             // best_step 0: initial params kept
  int64_t train_tokens = 0, val_tokens = 0;
  bool stopped_early = false;
  double seconds = 0;
};

// OK iff the EC's buffers match its shapes.
absl::Status ValidateEc(const EcWeights& ec);

// Trains *ec in place (returns the best-val parameters). x [T, k], r [T, n]
// with k = ec->k, n = ec->n, T >= 2.
absl::StatusOr<EcTrainReport> TrainEc(MatrixView x, MatrixView r, EcWeights* ec,
                                      const EcTrainOptions& opt = {});

// Mean loss (as trained) of ec on (x, r), float64 accumulation.
absl::StatusOr<double> EcLoss(const EcWeights& ec, MatrixView x, MatrixView r);

// The EC's output B (g ⊙ u) [T, n] (reference for the kernels).
absl::StatusOr<Matrix> ApplyEc(const EcWeights& ec, MatrixView x);

// Per-token diagnostics for plots.
struct EcTokenStats {
  std::vector<float> mean_gate;    // [T] mean_j g_j(u) (1 when not gated)
  std::vector<float> err_without;  // [T] ||r_t||
  std::vector<float> err_with;     // [T] ||r_t - EC(x_t)||
};
absl::StatusOr<EcTokenStats> ComputeEcTokenStats(const EcWeights& ec, MatrixView x, MatrixView r);

}  // namespace spear::quantize
