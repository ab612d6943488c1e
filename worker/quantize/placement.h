// Entropy-aware EC placement: which modules get an EC, at which rank, within
// a byte budget.
//
// Inputs per module i: damage d_i >= 0 (1 - CKA, cka.h), the EC's byte cost
// bytes_i(r) = fixed_bytes_i + bytes_per_rank_i * r (fp16 A, B and a gate
// whose hidden size is fixed or proportional to r), and optionally its
// measured relative latency cost lat_i >= 0 (added decode time / module
// time). Rank options R = {r_1 < r_2 < ...}.
//
// Rule (deterministic):
//  1. Entropy (cka.h): N_eff = exp(H) of the damage distribution. At most
//     M = min(#{d_i > 0}, max(1, round(breadth * N_eff))) modules get
//     an EC (round half up; rounding rather than ceil so that a sprinkle of
//     negligible damages, N_eff = 1.0001, does not buy a second module):
//     concentrated damage -> few modules, spread damage -> many.
//  2. Selection: modules with d_i > 0 in decreasing order of
//     d_i / (bytes_i(r_1) * (1 + latency_weight * lat_i)) (damage per byte,
//     penalised by latency; ties: lower index); each is taken at r_1 if it
//     still fits the budget (a module that does not fit is skipped, not a
//     stop), until M are taken. Modules of one launch group (>= 0: fused
//     into one GEMM on the GPU, whose ECs merge into one EC and one
//     prologue launch) share the latency: once one of them is taken, the
//     others' lat_i counts as 0, so the order is re-evaluated after every
//     pick (without groups it is the static order above). With a launch
//     cap (max_launches >= 0) at most that many distinct launches carry an
//     EC (a launch: a launch group, or a module of group -1 on its own):
//     once the cap is reached only modules of launches already taken stay
//     eligible (the GPU's EC cost is mostly one prologue launch per
//     EC-carrying GEMM, whatever the rank: docs/results/gpu.md).
//  3. Proportional ranks: with D = sum of selected damages, module i's fair
//     share is budget * d_i / D bytes; in decreasing damage order each is
//     raised to the largest rank whose cost is within its share, if the
//     total still fits.
//  4. Leftover: while some selected module's next rank fits the remaining
//     budget, upgrade (one step) the one with the largest d_i / bytes_i(r)
//     at its current rank (the most under-served per byte).
// Guarantee: sum of bytes_i(rank_i) <= budget_bytes. The plan is sorted by
// module index.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::quantize {

struct ModuleEcCost {
  double fixed_bytes = 0.0;
  double bytes_per_rank = 0.0;  // > 0
  double relative_latency = 0.0;
  int64_t launch_group = -1;  // >= 0: shares its EC launch with the group (rule 2)
  double Bytes(int64_t rank) const { return fixed_bytes + bytes_per_rank * static_cast<double>(rank); }
};

struct PlacementOptions {
  double breadth = 1.0;         // scales the module cap M
  double latency_weight = 1.0;  // weight of relative_latency in the ranking
  int64_t max_launches = -1;    // >= 0: at most this many launches carry an EC (rule 2)
};

struct EcPlacement {
  int64_t module = 0;
  int64_t rank = 0;
  double bytes = 0.0;
};

// InvalidArgument on mismatched sizes, negative/non-finite damages or costs,
// bytes_per_rank <= 0, no or non-positive rank options, negative budget,
// max_launches < -1.
absl::StatusOr<std::vector<EcPlacement>> PlanEcPlacement(const std::vector<double>& damages,
                                                         const std::vector<ModuleEcCost>& costs,
                                                         double budget_bytes,
                                                         std::vector<int64_t> rank_options,
                                                         const PlacementOptions& opt = {});

}  // namespace spear::quantize
