// Per-iteration control of a model's error compensators (ECs) and the gate
// statistics of the last iteration.
//
// An "EC unit" is one linear module that has an EC (a model::W4Linear with
// has_ec()). Units are numbered in model order (layer by layer, q k v o
// gate up down). The mask of an iteration says which units run their EC;
// a disabled unit runs the plain W4 backbone (W4Linear::set_ec_enabled, an
// atomic flag read once per Forward, so switching costs nothing).
//
// EC density of a mask = sum of enabled units' EC FLOPs / all EC FLOPs
// (EC FLOPs per token of a module: rank * (k + n) for A and B, plus
// 2 * rank * gate_hidden for a gated EC). A model with no EC has density 0.
//
// Value of a unit (what shedding keeps longest): from the .spear manifest's
// diagnostic when the model came from one — damage * (1 - err_final /
// err_w4), i.e. the module's CKA damage times the share of its output error
// the EC removes (damage alone when the errors are missing) — else the
// unit's EC size (rank * (k + n)). ShedOrder lists units by ascending
// value: the first ones are shed first.
//
// Thread-safety: Apply and the gate statistics are for the engine thread
// (the observers run on the thread that calls Forward). Read-only accessors
// are immutable after Create.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "worker/model/weights.h"

namespace spear::model {
class W4Linear;
}

namespace spear::engine {

struct EcUnit {
  std::string name;  // "model.layers.3.mlp.down_proj"
  int64_t layer = 0;
  double flops = 0;  // EC FLOPs per token
  double share = 0;  // flops / total
  double value = 0;
};

struct GateStats {
  int64_t count = 0;  // gate values seen
  double mean = 0, stddev = 0;
};

class EcControl {
 public:
  // Finds the EC units of `model` (borrowed; must outlive this) and their
  // values (manifest at model->source_path when it is a .spear dir).
  // Installs gate observers on every unit.
  static absl::StatusOr<std::unique_ptr<EcControl>> Create(model::LoadedModel* model);
  ~EcControl();

  int num_units() const { return static_cast<int>(units_.size()); }
  const std::vector<EcUnit>& units() const { return units_; }
  // Unit indices by ascending value (shed first first).
  const std::vector<int>& shed_order() const { return shed_order_; }
  // Where unit values came from: "manifest diagnostic" or "ec size".
  const std::string& value_source() const { return value_source_; }

  // Enables exactly the units whose mask entry is true (mask.size() ==
  // num_units(); an empty mask means all on).
  void Apply(const std::vector<bool>& mask);
  void EnableAll();
  void DisableAll();
  double Density(const std::vector<bool>& mask) const;

  // Gate statistics since the last ResetGateStats (engine thread).
  void ResetGateStats() ABSL_LOCKS_EXCLUDED(mu_);
  GateStats gate_stats() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  EcControl() = default;
  void OnGate(const float* g, int64_t m, int64_t r) ABSL_LOCKS_EXCLUDED(mu_);

  std::vector<model::W4Linear*> layers_;
  std::vector<EcUnit> units_;
  std::vector<int> shed_order_;
  std::string value_source_;

  mutable absl::Mutex mu_;
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
  double sumsq_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t count_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace spear::engine
