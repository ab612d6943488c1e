#include "worker/quantize/pipeline/diagnostic.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "worker/quantize/cka.h"
#include "worker/quantize/pipeline/layerwise.h"
#include "worker/quantize/pipeline/module_quant.h"
#include "worker/quantize/w4_quant.h"

namespace spear::quantize {
namespace {

std::unique_ptr<model::Linear>& ModuleSlot(model::LayerWeights& L, int j) {
  switch (j) {
    case 0: return L.q_proj;
    case 1: return L.k_proj;
    case 2: return L.v_proj;
    case 3: return L.o_proj;
    case 4: return L.gate_proj;
    case 5: return L.up_proj;
    default: return L.down_proj;
  }
}

}  // namespace

DiagnosticQuantizer RtnDiagnosticQuantizer(const QuantizeOptions& options) {
  return [options](int64_t, const std::string&, MatrixView w) -> absl::StatusOr<Matrix> {
    auto q = QuantizeRtn(w, MakeW4Format(w.rows, w.cols, options));
    if (!q.ok()) return q.status();
    return DequantizeW4Effective(*q);
  };
}

absl::StatusOr<DiagnosticResult> RunCkaDiagnostic(
    model::LoadedModel* model, kernels::ThreadPool* pool,
    std::vector<std::vector<int32_t>> sequences, const DiagnosticQuantizer& quantizer,
    const std::function<void(int64_t, int64_t)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  auto runner = LayerwiseRunner::Create(model, pool, std::move(sequences));
  if (!runner.ok()) return runner.status();
  LayerwiseRunner& run = **runner;
  const int64_t L = model->config.num_layers, d = model->config.hidden_size;
  const int64_t T = run.num_tokens();

  // FP16 pass: cache every layer's input stream and the final states.
  std::vector<std::vector<float>> inputs(static_cast<size_t>(L));
  std::vector<float> h(static_cast<size_t>(T * d)), y(h.size());
  if (auto s = run.Embed(h.data()); !s.ok()) return s;
  for (int64_t l = 0; l < L; ++l) {
    inputs[l] = h;
    if (auto s = run.RunLayers(l, l + 1, h.data()); !s.ok()) return s;
  }
  if (auto s = run.FinalNorm(h.data(), y.data()); !s.ok()) return s;
  auto ref = CkaReference::Create(MatrixView{y.data(), T, d});
  if (!ref.ok()) return ref.status();

  // The 7 streams of one layer's modules (each with only its module
  // quantized) differ from layer l + 1 on only in their inputs: they run the
  // remaining layers together, stacked [7 T, d] through a runner over 7
  // copies of the sequences, so each later layer's GEMMs see 7x the rows and
  // its weights are packed once for all 7 (SmolLM2, 128 tokens, 2 threads:
  // 22.4-24.2 s per module -> 18.4-18.8 s stacked, the same damages to the
  // bit). Attention stays per sequence, so every stream's result is the one
  // it would have alone.
  constexpr int kM = engine::kModulesPerLayer;
  std::vector<std::vector<int32_t>> stacked_seqs;
  stacked_seqs.reserve(run.sequences().size() * kM);
  for (int j = 0; j < kM; ++j) {
    stacked_seqs.insert(stacked_seqs.end(), run.sequences().begin(), run.sequences().end());
  }
  auto stacked_runner = LayerwiseRunner::Create(model, pool, std::move(stacked_seqs));
  if (!stacked_runner.ok()) return stacked_runner.status();
  LayerwiseRunner& stacked = **stacked_runner;
  std::vector<float> hs(static_cast<size_t>(kM * T * d)), ys(hs.size());

  DiagnosticResult out;
  const int64_t total = L * kM;
  static const char* kNames[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                 "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                 "mlp.down_proj"};
  for (int64_t l = 0; l < L; ++l) {
    // Layer l once per module, that module swapped for its quantized
    // effective weight, from layer l's cached FP16 input.
    for (int j = 0; j < kM; ++j) {
      const int64_t idx = l * kM + j;
      std::unique_ptr<model::Linear>& slot = ModuleSlot(model->weights.layers[l], j);
      const std::string name = absl::StrCat("model.layers.", l, ".", kNames[j]);
      auto w = DenseWeightMatrix(*slot);
      if (!w.ok()) return w.status();
      auto qeff = quantizer(idx, name, w->view());
      if (!qeff.ok()) return qeff.status();
      if (qeff->rows != w->rows || qeff->cols != w->cols) {
        return absl::InvalidArgumentError(absl::StrCat("diagnostic quantizer: wrong shape for ",
                                                       name));
      }
      const auto* dense = dynamic_cast<const model::DenseLinear*>(slot.get());
      auto repl = model::DenseLinear::Create(qeff->data.data(), kernels::DType::kF32, w->rows,
                                             w->cols, dense->bias());
      if (!repl.ok()) return repl.status();
      std::unique_ptr<model::Linear> orig = std::move(slot);
      slot = std::move(*repl);
      float* hj = hs.data() + static_cast<size_t>(j) * T * d;
      std::memcpy(hj, inputs[l].data(), static_cast<size_t>(T * d) * sizeof(float));
      absl::Status st = run.RunLayers(l, l + 1, hj);
      slot = std::move(orig);  // restore before anything can return
      if (!st.ok()) return st;
      out.names.push_back(name);
    }
    // The rest of the model (unmodified) over the 7 streams at once.
    if (l + 1 < L) {
      if (auto s = stacked.RunLayers(l + 1, L, hs.data()); !s.ok()) return s;
    }
    if (auto s = stacked.FinalNorm(hs.data(), ys.data()); !s.ok()) return s;
    for (int j = 0; j < kM; ++j) {
      auto cka = ref->Cka(MatrixView{ys.data() + static_cast<size_t>(j) * T * d, T, d});
      if (!cka.ok()) return cka.status();
      out.damages.push_back(std::clamp(1.0 - *cka, 0.0, 1.0));
      if (progress) progress(l * kM + j + 1, total);
    }
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

int64_t EcBytes(int64_t n, int64_t k, int64_t rank, bool gated, int64_t h,
                kernels::EcFactors factors) {
  if (rank <= 0) return 0;
  const int64_t gate_params = gated ? 2 * h * rank + h + rank : 0;
  return rank * kernels::EcFactorBytesPerRank(n, k, factors) + 2 * gate_params;
}

std::vector<int64_t> PlacementRankOptions(int64_t min_rank, int64_t max_rank) {
  min_rank = std::clamp<int64_t>(min_rank, 1, 256);
  max_rank = std::clamp<int64_t>(max_rank, min_rank, 256);
  std::vector<int64_t> r = {min_rank};
  int64_t p = 1;
  while (p <= min_rank) p *= 2;
  for (; p <= max_rank; p *= 2) r.push_back(p);
  return r;
}

absl::StatusOr<std::vector<int64_t>> PlanDiagnosticPlacement(
    const std::vector<double>& damages, const std::vector<ModuleShape>& shapes,
    double budget_bytes, bool gated, int64_t h, double breadth, int64_t min_rank,
    const std::vector<double>* measured_latency, std::vector<double>* latency_used,
    const std::vector<int64_t>* launch_groups, kernels::EcFactors factors, int64_t max_rank,
    double launch_budget) {
  if (damages.size() != shapes.size()) {
    return absl::InvalidArgumentError("placement: damages and shapes differ in size");
  }
  if (launch_groups != nullptr && launch_groups->size() != shapes.size()) {
    return absl::InvalidArgumentError("placement: launch groups and shapes differ in size");
  }
  if (!(launch_budget > 0.0 && launch_budget <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement: the launch budget must be in (0, 1], got ", launch_budget));
  }
  if (launch_budget < 1.0 && launch_groups == nullptr) {
    return absl::InvalidArgumentError("placement: a launch budget needs the launch groups");
  }
  if (measured_latency != nullptr) {
    if (measured_latency->size() != shapes.size()) {
      return absl::InvalidArgumentError("placement: measured latencies and shapes differ in size");
    }
    for (double v : *measured_latency) {
      if (!std::isfinite(v) || v < 0) {
        return absl::InvalidArgumentError("placement: a measured latency is negative or not finite");
      }
    }
  }
  const std::vector<int64_t> ranks = PlacementRankOptions(min_rank, max_rank);
  std::vector<ModuleEcCost> costs(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    const ModuleShape& s = shapes[i];
    costs[i].fixed_bytes = gated ? 2.0 * h : 0.0;
    costs[i].bytes_per_rank = static_cast<double>(kernels::EcFactorBytesPerRank(s.n, s.k, factors)) +
                              (gated ? 2.0 * (2 * h + 1) : 0.0);
    if (launch_groups != nullptr) costs[i].launch_group = (*launch_groups)[i];
    if (measured_latency != nullptr) {
      costs[i].relative_latency = (*measured_latency)[i];
    } else if (s.w4_bytes > 0) {
      costs[i].relative_latency = costs[i].Bytes(ranks.front()) / static_cast<double>(s.w4_bytes);
    }
  }
  if (latency_used != nullptr) {
    latency_used->resize(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) (*latency_used)[i] = costs[i].relative_latency;
  }
  PlacementOptions po;
  po.breadth = breadth;
  if (launch_groups != nullptr) {
    po.max_launches = LaunchCap(launch_budget, CountLaunches(*launch_groups));
  }
  auto plan = PlanEcPlacement(damages, costs, budget_bytes, ranks, po);
  if (!plan.ok()) return plan.status();
  std::vector<int64_t> out(shapes.size(), 0);
  for (const EcPlacement& p : *plan) {
    const ModuleShape& s = shapes[static_cast<size_t>(p.module)];
    out[static_cast<size_t>(p.module)] = std::min({p.rank, s.n, s.k});
  }
  return out;
}

int64_t CountLaunches(const std::vector<int64_t>& launch_groups) {
  std::set<int64_t> groups;
  int64_t alone = 0;
  for (int64_t g : launch_groups) {
    if (g >= 0) {
      groups.insert(g);
    } else {
      ++alone;
    }
  }
  return static_cast<int64_t>(groups.size()) + alone;
}

int64_t LaunchCap(double launch_budget, int64_t launches) {
  if (launch_budget >= 1.0) return -1;
  const double cap = std::floor(launch_budget * static_cast<double>(launches) + 0.5);
  return std::max<int64_t>(1, static_cast<int64_t>(cap));
}

std::vector<int64_t> FusedLaunchGroups(const std::vector<std::string>& names) {
  using model::LayerLinear;
  std::vector<int64_t> g(names.size(), -1);
  for (size_t i = 0; i < names.size(); ++i) {
    const std::optional<model::LinearName> n = model::ParseLinearName(names[i]);
    if (!n) continue;
    switch (n->which) {
      case LayerLinear::kQ:
      case LayerLinear::kK:
      case LayerLinear::kV: g[i] = 2 * n->layer; break;
      case LayerLinear::kGate:
      case LayerLinear::kUp: g[i] = 2 * n->layer + 1; break;
      default: break;
    }
  }
  return g;
}

int64_t UniformRank(const std::vector<ModuleShape>& shapes, double budget_bytes,
                    kernels::EcFactors factors) {
  double per_rank = 0;
  int64_t max_rank = INT64_MAX;
  for (const ModuleShape& s : shapes) {
    per_rank += static_cast<double>(kernels::EcFactorBytesPerRank(s.n, s.k, factors));
    max_rank = std::min({max_rank, s.n, s.k});
  }
  if (per_rank <= 0) return 0;
  return std::min<int64_t>(max_rank, static_cast<int64_t>(budget_bytes / per_rank));
}

}  // namespace spear::quantize
