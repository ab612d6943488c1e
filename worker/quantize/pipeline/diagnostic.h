// The CKA/entropy diagnostic and the EC placement built on it.
//
// Diagnostic (RunCkaDiagnostic): the FP16 model runs the diagnostic tokens
// once; the residual stream at every layer's input and the final-normed
// hidden states Y_fp are kept. Then, for every module i (layer l, 7 per
// layer, ForEachLinear order), only that module is replaced by its
// quantized effective weight (a DenseLinear over the dequantized weight:
// the same function as the W4 layer, served by the dense GEMM), the model
// is run from layer l's cached input (layers below are unaffected) to the
// final norm, and damage_i = clamp(1 - CKA(Y_fp, Y_i), 0, 1). The module is
// restored before the next one. The 7 streams of one layer run layer l
// each on their own (their module swapped in turn), then the layers above
// together, stacked 7 deep (one GEMM over 7x the rows, weights packed once).
// Cost: sum over modules of (L - l) layers, i.e. about 7 L^2 / 2
// layer-forwards of the diagnostic tokens.
//
// The diagnostic quantizer is RTN of the pipeline's format by default
// (data-free, so the diagnostic does not depend on which backbone the
// pipeline uses; AWQ/GPTQ would need each module's inputs and Hessian under
// the FP16 model, i.e. a second calibration pass, for ranking only).
//
// Placement:
//  * PlanDiagnosticPlacement: placement.h's entropy-aware rule over the
//    damages, with each EC's bytes affine in its rank (fixed gate hidden
//    size) and relative latency = the measured one when given (per module:
//    ec_latency.h's table on the target GPU), else the proxy EC bytes at
//    the smallest rank / W4 bytes of the module (a bandwidth-bound GEMM's
//    time is its bytes); ranks above min(n, k) are clamped (bytes only
//    shrink).
//  * UniformRank: the largest rank r such that an EC of rank r on EVERY
//    module fits the budget (the "static on all modules" baseline).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "kernels/w4_format.h"
#include "worker/model/weights.h"
#include "worker/quantize/matrix.h"
#include "worker/quantize/placement.h"
#include "worker/quantize/pipeline/quantize_model.h"

namespace spear::quantize {

// Returns the effective weight [n, k] that replaces module `index` (name,
// FP16 weight w) in the diagnostic.
using DiagnosticQuantizer =
    std::function<absl::StatusOr<Matrix>(int64_t index, const std::string& name, MatrixView w)>;
DiagnosticQuantizer RtnDiagnosticQuantizer(const QuantizeOptions& options);

struct DiagnosticResult {
  std::vector<std::string> names;  // ForEachLinear order
  std::vector<double> damages;     // in [0, 1]
  double seconds = 0;
};

// The model's linears must be dense (not yet quantized); they are swapped
// temporarily and restored (also on error). progress: (done, total).
absl::StatusOr<DiagnosticResult> RunCkaDiagnostic(
    model::LoadedModel* model, kernels::ThreadPool* pool,
    std::vector<std::vector<int32_t>> sequences, const DiagnosticQuantizer& quantizer,
    const std::function<void(int64_t, int64_t)>& progress = nullptr);

// Shape and W4 bytes of one module (for costs).
struct ModuleShape {
  int64_t n = 0, k = 0;
  int64_t w4_bytes = 0;
};
// Bytes of an EC of rank r on an [n, k] module (gate hidden h or none), its
// factors stored as `factors` (kernels::EcWeights::bytes(): the same count).
int64_t EcBytes(int64_t n, int64_t k, int64_t rank, bool gated, int64_t gate_hidden,
                kernels::EcFactors factors = kernels::EcFactors::kF16);

// Rank options used by the placement: min_rank, then the powers of two
// above it, up to max_rank (both clamped to [1, 256]; max_rank >= min_rank).
std::vector<int64_t> PlacementRankOptions(int64_t min_rank = 4, int64_t max_rank = 256);

// Per-module rank (0 = no EC) within budget_bytes. measured_latency (one
// finite value >= 0 per module, or null): the relative latency of each
// module's EC; launch_groups (one value >= -1 per module, or null):
// placement.h's launch groups; *latency_used (if non-null) receives the
// values the ranking used, measured or proxy. launch_budget < 1 (needs
// launch_groups): at most LaunchCap(launch_budget, CountLaunches(groups))
// launches carry an EC (placement.h, rule 2's cap).
absl::StatusOr<std::vector<int64_t>> PlanDiagnosticPlacement(
    const std::vector<double>& damages, const std::vector<ModuleShape>& shapes,
    double budget_bytes, bool gated, int64_t gate_hidden, double breadth = 1.0,
    int64_t min_rank = 4, const std::vector<double>* measured_latency = nullptr,
    std::vector<double>* latency_used = nullptr,
    const std::vector<int64_t>* launch_groups = nullptr,
    kernels::EcFactors factors = kernels::EcFactors::kF16, int64_t max_rank = 256,
    double launch_budget = 1.0);
// The number of GEMM launches of modules with these launch groups: the
// distinct groups >= 0 plus one per module of group -1.
int64_t CountLaunches(const std::vector<int64_t>& launch_groups);
// The launch cap of a launch budget F in (0, 1] over L launches:
// max(1, round(F L)) (round half up); -1 (no cap) at F >= 1.
int64_t LaunchCap(double launch_budget, int64_t launches);
// The GPU runner's fused GEMMs (worker/engine/cuda_model_weights.cc): a
// layer's q/k/v projections form one launch group (2 L), gate/up another
// (2 L + 1); o_proj, down_proj and anything else: -1 (a GEMM of its own).
// Names as ForEachLinear gives them ("model.layers.3.self_attn.q_proj").
std::vector<int64_t> FusedLaunchGroups(const std::vector<std::string>& names);
// 0 if not even rank 1 fits on every module.
int64_t UniformRank(const std::vector<ModuleShape>& shapes, double budget_bytes,
                    kernels::EcFactors factors = kernels::EcFactors::kF16);

}  // namespace spear::quantize
