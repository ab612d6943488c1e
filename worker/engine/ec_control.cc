#include "worker/engine/ec_control.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "nlohmann/json.hpp"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/w4_linear.h"
#include "worker/model/weights.h"

namespace spear::engine {
namespace {

// name -> value from the manifest's provenance.diagnostic.modules; empty
// when the model is not a .spear dir or has no diagnostic.
absl::flat_hash_map<std::string, double> ManifestValues(const std::string& source) {
  absl::flat_hash_map<std::string, double> out;
  if (source.empty() || !model::IsSpearDir(source)) return out;
  auto manifest = model::ReadSpearManifest(source);
  if (!manifest.ok() || manifest->provenance_json.empty()) return out;
  nlohmann::json prov = nlohmann::json::parse(manifest->provenance_json, nullptr, false);
  if (!prov.is_object()) return out;
  auto diag = prov.find("diagnostic");
  if (diag == prov.end() || !diag->is_object()) return out;
  auto mods = diag->find("modules");
  if (mods == diag->end() || !mods->is_array()) return out;
  for (const auto& m : *mods) {
    if (!m.is_object() || !m.contains("name") || !m["name"].is_string()) continue;
    const double damage = m.value("damage", 0.0);
    const double err_w4 = m.value("err_w4", 0.0);
    const double err_final = m.value("err_final", 0.0);
    double value = damage;
    if (err_w4 > 0 && std::isfinite(err_final)) {
      value = damage * std::max(0.0, 1.0 - err_final / err_w4);
    }
    if (std::isfinite(value)) out[m["name"].get<std::string>()] = value;
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<EcControl>> EcControl::Create(model::LoadedModel* model) {
  if (model == nullptr) return absl::InvalidArgumentError("EcControl: null model");
  std::unique_ptr<EcControl> c(new EcControl());
  model->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<model::Linear>& l) {
    auto* w4 = dynamic_cast<model::W4Linear*>(l.get());
    if (w4 == nullptr || !w4->has_ec()) return;
    const kernels::EcWeights& ec = *w4->ec();
    EcUnit u;
    u.name = name;
    const std::optional<model::LinearName> parsed = model::ParseLinearName(name);
    u.layer = parsed ? parsed->layer : 0;
    u.flops = 2.0 * ec.rank * (ec.k + ec.n) + (ec.gated ? 4.0 * ec.rank * ec.gate_hidden : 0.0);
    u.value = static_cast<double>(ec.rank) * (ec.k + ec.n);
    c->units_.push_back(u);
    c->layers_.push_back(w4);
  });
  double total = 0;
  for (const EcUnit& u : c->units_) total += u.flops;
  for (EcUnit& u : c->units_) u.share = total > 0 ? u.flops / total : 0;

  auto values = ManifestValues(model->source_path);
  bool all_found = !values.empty() && !c->units_.empty();
  for (const EcUnit& u : c->units_) all_found = all_found && values.contains(u.name);
  if (all_found) {
    for (EcUnit& u : c->units_) u.value = values[u.name];
    c->value_source_ = "manifest diagnostic";
  } else {
    c->value_source_ = "ec size";
  }
  c->shed_order_.resize(c->units_.size());
  std::iota(c->shed_order_.begin(), c->shed_order_.end(), 0);
  // Lowest value first; ties: later layers first (their errors have the
  // fewest layers left to propagate through).
  std::stable_sort(c->shed_order_.begin(), c->shed_order_.end(), [&](int a, int b) {
    const EcUnit &ua = c->units_[a], &ub = c->units_[b];
    if (ua.value != ub.value) return ua.value < ub.value;
    return ua.layer > ub.layer;
  });
  EcControl* self = c.get();
  for (model::W4Linear* l : c->layers_) {
    l->set_gate_observer(
        [self](const float* g, int64_t m, int64_t r) { self->OnGate(g, m, r); });
  }
  return c;
}

EcControl::~EcControl() {
  for (model::W4Linear* l : layers_) {
    l->set_gate_observer(nullptr);
    l->set_ec_enabled(true);
  }
}

void EcControl::Apply(const std::vector<bool>& mask) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i]->set_ec_enabled(mask.empty() || (i < mask.size() && mask[i]));
  }
}

void EcControl::EnableAll() { Apply({}); }

void EcControl::DisableAll() { Apply(std::vector<bool>(layers_.size(), false)); }

double EcControl::Density(const std::vector<bool>& mask) const {
  if (units_.empty()) return 0;
  if (mask.empty()) return 1;
  double d = 0;
  for (size_t i = 0; i < units_.size() && i < mask.size(); ++i) {
    if (mask[i]) d += units_[i].share;
  }
  return std::min(1.0, d);
}

void EcControl::OnGate(const float* g, int64_t m, int64_t r) {
  double s = 0, s2 = 0;
  const int64_t n = m * r;
  for (int64_t i = 0; i < n; ++i) {
    s += g[i];
    s2 += static_cast<double>(g[i]) * g[i];
  }
  absl::MutexLock lock(&mu_);
  sum_ += s;
  sumsq_ += s2;
  count_ += n;
}

void EcControl::ResetGateStats() {
  absl::MutexLock lock(&mu_);
  sum_ = sumsq_ = 0;
  count_ = 0;
}

GateStats EcControl::gate_stats() const {
  absl::MutexLock lock(&mu_);
  GateStats st;
  st.count = count_;
  if (count_ > 0) {
    st.mean = sum_ / count_;
    st.stddev = std::sqrt(std::max(0.0, sumsq_ / count_ - st.mean * st.mean));
  }
  return st;
}

}  // namespace spear::engine
