// QuantizeModel: the orchestration (see quantize_model.h for the steps).
//
// Sequential schedule inside decoder layer l (both streams hold layer l's
// input [T, d]; T = all calibration tokens, fit sequences first, held-out
// sequences last):
//  0. FP16 stream: layer l still holds its original linears; one run of the
//     layer over the FP16 stream captures the FP16 inputs of the four input
//     groups ({q,k,v}, {o}, {gate,up}, {down}) and advances that stream.
//  1. {q,k,v}: the current stream's normed layer input is captured (a run
//     stopped at q_proj); q, k, v are quantized (+EC) from it and installed.
//  2. {o}: the layer is re-run on the current stream up to o_proj (attention
//     now uses the quantized q/k/v), o's input captured; o quantized and
//     installed.
//  3. {gate, up}: re-run up to gate_proj (quantized attention block), same.
//  4. {down}: re-run up to down_proj (quantized gate/up), same.
//  5. The whole, now quantized, layer advances the current stream.
// So every module is fitted on exactly the inputs it will see at serving
// time given everything quantized before it (in forward order), and its
// stage-2 target is W x_fp - Qeff(W) x_q (module_quant.h). Runs stopped
// early cost only the part of the layer before the stop.
#include "worker/quantize/pipeline/quantize_model.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/ec_factors.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/w4_linear.h"
#include "worker/quantize/cka.h"
#include "worker/quantize/pipeline/calibration.h"
#include "worker/quantize/pipeline/diagnostic.h"
#include "worker/quantize/pipeline/fast_stats.h"
#include "worker/quantize/pipeline/layerwise.h"
#include "worker/quantize/pipeline/module_quant.h"
#include "worker/quantize/w4_quant.h"

namespace spear::quantize {
namespace {

using engine::kModulesPerLayer;
constexpr int kGroupOf[kModulesPerLayer] = {0, 0, 0, 1, 2, 2, 3};
constexpr LayerModule kGroupCapture[4] = {LayerModule::kQ, LayerModule::kO, LayerModule::kGate,
                                          LayerModule::kDown};

int64_t W4Bytes(const kernels::W4Format& f) {
  return f.n * f.packed_row_bytes() + f.n * f.num_groups() * 3;
}

class Pipeline {
 public:
  Pipeline(model::LoadedModel* model, const QuantizeOptions& o, kernels::ThreadPool* pool,
           const QuantizeProgress& progress)
      : model_(model), o_(o), pool_(pool), progress_(progress) {}

  absl::StatusOr<QuantizeReport> Run();

 private:
  void Progress(const std::string& stage, int64_t done, int64_t total) {
    if (progress_) progress_(stage, done, total);
  }
  absl::Status CollectModules();
  absl::Status Place();
  absl::Status PlaceGiven();
  absl::Status QuantizeDataFree();
  absl::Status QuantizeSequential();
  absl::Status QuantizeGroup(int64_t layer, int group);
  absl::Status ComputeTeacher();
  absl::Status Distill();
  absl::Status StoreFactorsI8();

  model::LoadedModel* model_;
  QuantizeOptions o_;
  kernels::ThreadPool* pool_;
  QuantizeProgress progress_;

  std::vector<std::unique_ptr<model::Linear>*> slots_;
  std::vector<ModuleShape> shapes_;
  std::vector<double> measured_latency_;  // per module, from o_.ec_latency (else empty)
  std::vector<int64_t> ranks_;
  QuantizeReport report_;
  double budget_bytes_ = 0;
  double model_bytes_ = 0;  // the W4 model the budget is a share of
  std::vector<std::vector<int32_t>> seqs_;
  int64_t fit_seqs_ = 0, fit_rows_ = 0, total_rows_ = 0;
  // The sequential pass's sequences (a prefix of the fit sequences, at most
  // sequential_max_tokens, then a prefix of the held-out ones, at most
  // sequential_holdout_max_tokens) and their row counts.
  std::vector<std::vector<int32_t>> seq_pass_;
  int64_t sp_fit_rows_ = 0, sp_total_rows_ = 0;

  // Sequential state.
  std::unique_ptr<LayerwiseRunner> runner_;
  std::vector<float> h_fp_, h_cur_;
  DistillTeacher teacher_;  // the FP16 model's states over all rows (e2e; distill.h)
  // Per sequence: its teacher states captured while sampling it (calibration.h), or empty.
  std::vector<std::vector<float>> captured_final_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::vector<float> x_fp_[4], x_q_[4];
  int64_t group_k_[4] = {0, 0, 0, 0};
};

absl::Status Pipeline::CollectModules() {
  const model::ModelConfig& c = model_->config;
  int64_t fixed = c.vocab_size * c.hidden_size * 2 + (2 * c.num_layers + 1) * c.hidden_size * 2 +
                  (c.tie_word_embeddings ? 0 : c.vocab_size * c.hidden_size * 2);
  absl::Status st;
  model_->weights.ForEachLinear([&](const std::string& name, std::unique_ptr<model::Linear>& l) {
    if (!st.ok()) return;
    if (dynamic_cast<const model::DenseLinear*>(l.get()) == nullptr) {
      st = absl::FailedPreconditionError(absl::StrCat(name, " is not dense (already quantized?): ",
                                                      l->DebugString()));
      return;
    }
    const kernels::W4Format f = MakeW4Format(l->out_features(), l->in_features(), o_);
    if (auto s = ValidateFormat(f); !s.ok()) {
      st = absl::InvalidArgumentError(absl::StrCat(name, ": ", s.message()));
      return;
    }
    ModuleShape s;
    s.n = f.n;
    s.k = f.k;
    s.w4_bytes = W4Bytes(f);
    fixed += s.w4_bytes + (DenseBias(*l).empty() ? 0 : 4 * f.n);
    shapes_.push_back(s);
    slots_.push_back(&l);
    ModuleReport mr;
    mr.name = name;
    report_.modules.push_back(mr);
  });
  if (!st.ok()) return st;
  // The budget uses the W4 bytes without AWQ's act_scale (a lower bound of
  // the served W4 model), so it holds whatever the backbone adds.
  model_bytes_ = static_cast<double>(fixed);
  budget_bytes_ = o_.ec_budget_pct / 100.0 * model_bytes_;
  ranks_.assign(slots_.size(), 0);
  // The measured EC latency of every module's shape, looked up now so that
  // a table without some shape fails before the calibration runs.
  if (!o_.ec_latency.rows.empty()) {
    if (o_.ec_latency.group != 0 && o_.ec_latency.group != o_.group_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "EC latency table ", o_.ec_latency.source, " was measured with W4 group ",
          o_.ec_latency.group, ", this quantize uses group ", o_.group_size,
          " (measure it with spear_bench_w4_cuda --group=", o_.group_size, ")"));
    }
    for (const ModuleShape& s : shapes_) {
      auto rel = o_.ec_latency.Relative(s.n, s.k, 1, o_.min_ec_rank);
      if (!rel.ok()) return rel.status();
      measured_latency_.push_back(*rel);
    }
  }
  return absl::OkStatus();
}

absl::Status Pipeline::Place() {
  if (o_.ec == EcMode::kNone) return absl::OkStatus();
  if (o_.ec == EcMode::kStatic && !o_.place_static_like_spear) {
    const int64_t r = UniformRank(shapes_, budget_bytes_, o_.ec_factors);
    if (r < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "EC budget ", static_cast<int64_t>(budget_bytes_),
          " bytes is too small for a rank-1 EC on every module"));
    }
    ranks_.assign(slots_.size(), r);
    return absl::OkStatus();
  }
  if (!o_.given_placement.empty()) return absl::OkStatus();  // PlaceGiven ran in Run()
  // Diagnostic on diagnostic_tokens tokens: the first ones of the fit
  // sequences (diagnostic_sequences = 1), or the first
  // ceil(tokens / K) of K fit sequences spread evenly over them.
  std::vector<std::vector<int32_t>> diag;
  int64_t left = o_.diagnostic_tokens;
  const int64_t K = std::min<int64_t>(std::max<int64_t>(o_.diagnostic_sequences, 1), fit_seqs_);
  if (K <= 1) {
    for (int64_t i = 0; i < fit_seqs_ && left > 0; ++i) {
      const int64_t n = std::min<int64_t>(left, seqs_[i].size());
      diag.emplace_back(seqs_[i].begin(), seqs_[i].begin() + n);
      left -= n;
    }
  } else {
    const int64_t per = (o_.diagnostic_tokens + K - 1) / K;
    for (int64_t j = 0; j < K && left > 0; ++j) {
      const auto& q = seqs_[static_cast<size_t>(j * fit_seqs_ / K)];
      const int64_t n = std::min<int64_t>({left, per, static_cast<int64_t>(q.size())});
      diag.emplace_back(q.begin(), q.begin() + n);
      left -= n;
    }
  }
  auto res = RunCkaDiagnostic(model_, pool_, std::move(diag), RtnDiagnosticQuantizer(o_),
                              [&](int64_t d, int64_t t) { Progress("diagnostic", d, t); });
  if (!res.ok()) return res.status();
  for (size_t i = 0; i < res->damages.size(); ++i) report_.modules[i].damage = res->damages[i];
  auto ent = ComputeDamageEntropy(res->damages);
  if (!ent.ok()) return ent.status();
  report_.damage_entropy = ent->entropy;
  report_.normalized_entropy = ent->normalized_entropy;
  report_.effective_modules = ent->effective_modules;
  const bool gated = o_.ec == EcMode::kSpear && o_.gate;
  // With measured latencies (a GPU's EC cost, mostly the prologue launch of
  // each EC-carrying GEMM), the modules the GPU runner fuses into one GEMM
  // share that launch (placement.h, rule 2).
  std::vector<double> latency;
  // A launch budget counts launches the same way.
  const bool measured = !measured_latency_.empty();
  const bool grouped = measured || o_.ec_launch_budget < 1.0;
  const std::vector<int64_t> groups =
      grouped ? FusedLaunchGroups(res->names) : std::vector<int64_t>();
  if (grouped) report_.launch_cap = LaunchCap(o_.ec_launch_budget, CountLaunches(groups));
  auto plan = PlanDiagnosticPlacement(res->damages, shapes_, budget_bytes_, gated,
                                      GateHidden(o_), o_.placement_breadth, o_.min_ec_rank,
                                      measured ? &measured_latency_ : nullptr, &latency,
                                      grouped ? &groups : nullptr, o_.ec_factors,
                                      o_.max_ec_rank, o_.ec_launch_budget);
  if (!plan.ok()) return plan.status();
  report_.measured_latency = measured;
  for (size_t i = 0; i < latency.size(); ++i) report_.modules[i].ec_latency = latency[i];
  ranks_ = std::move(*plan);
  return absl::OkStatus();
}

absl::Status Pipeline::PlaceGiven() {
  const std::string& src = o_.given_placement_source;
  std::vector<int64_t> ranks(slots_.size(), 0);
  const bool gated = o_.ec == EcMode::kSpear && o_.gate;
  double bytes = 0;
  for (const QuantizeOptions::GivenEc& g : o_.given_placement) {
    size_t i = 0;
    while (i < report_.modules.size() && report_.modules[i].name != g.module) ++i;
    if (i == report_.modules.size()) {
      return absl::InvalidArgumentError(absl::StrCat("EC placement ", src, ": module '", g.module,
                                                     "' is not a linear module of this model"));
    }
    const ModuleShape& s = shapes_[i];
    if (g.n != s.n || g.k != s.k) {
      return absl::InvalidArgumentError(absl::StrCat("EC placement ", src, ": ", g.module, " is ",
                                                     g.n, " x ", g.k, " there, ", s.n, " x ", s.k,
                                                     " in this model"));
    }
    if (g.rank < 1 || g.rank > std::min(s.n, s.k)) {
      return absl::InvalidArgumentError(absl::StrCat("EC placement ", src, ": ", g.module,
                                                     " has rank ", g.rank, ", outside [1, ",
                                                     std::min(s.n, s.k), "]"));
    }
    if (ranks[i] != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("EC placement ", src, ": ", g.module, " is listed twice"));
    }
    ranks[i] = g.rank;
    bytes += static_cast<double>(EcBytes(s.n, s.k, g.rank, gated, GateHidden(o_), o_.ec_factors));
  }
  if (bytes > budget_bytes_) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "EC placement %s needs %.0f EC bytes = %.3f%% of the W4 model, over the budget of "
        "%.3f%% (%.0f bytes); raise --ec-budget",
        src, bytes, 100.0 * bytes / model_bytes_, o_.ec_budget_pct, budget_bytes_));
  }
  report_.placement_source = src.empty() ? "given" : src;
  ranks_ = std::move(ranks);
  return absl::OkStatus();
}

absl::Status Pipeline::QuantizeDataFree() {
  std::vector<absl::Status> status(slots_.size());
  pool_->ParallelFor(static_cast<int64_t>(slots_.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      std::unique_ptr<model::Linear>& slot = *slots_[i];
      auto w = DenseWeightMatrix(*slot);
      if (!w.ok()) {
        status[i] = w.status();
        continue;
      }
      ModuleData d;
      d.w = w->view();
      auto q = QuantizeBackbone(d, o_);
      if (!q.ok()) {
        status[i] = q.status();
        continue;
      }
      auto lin = model::W4Linear::Create(std::move(*q), std::nullopt, DenseBias(*slot));
      if (!lin.ok()) {
        status[i] = lin.status();
        continue;
      }
      slot = std::move(*lin);
    }
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status Pipeline::QuantizeGroup(int64_t l, int g) {
  const int64_t k = group_k_[g], T = sp_total_rows_, fit_rows = sp_fit_rows_;
  // Current-stream inputs of this group (the run stops at the capture point).
  const LayerModule cap = kGroupCapture[g];
  float* xq = x_q_[g].data();
  auto st = runner_->RunLayers(
      l, l + 1, h_cur_.data(),
      [&](int64_t, LayerModule m, const float* x, int64_t row0, int64_t m_rows, int64_t ldx) {
        if (m != cap) return true;
        for (int64_t t = 0; t < m_rows; ++t) {
          std::memcpy(xq + (row0 + t) * k, x + t * ldx, k * sizeof(float));
        }
        return false;
      });
  if (!st.ok()) return st;

  std::vector<int> mods;
  bool any_ec = false;
  for (int j = 0; j < kModulesPerLayer; ++j) {
    if (kGroupOf[j] != g) continue;
    mods.push_back(j);
    any_ec |= ranks_[l * kModulesPerLayer + j] > 0;
  }
  const MatrixView xq_fit{xq, fit_rows, k}, xfp_fit{x_fp_[g].data(), fit_rows, k};
  const MatrixView xq_eval{xq + fit_rows * k, T - fit_rows, k};
  const MatrixView xfp_eval{x_fp_[g].data() + fit_rows * k, T - fit_rows, k};
  std::optional<Eigen::MatrixXd> s2;
  std::optional<std::vector<double>> mabs;
  if (any_ec || o_.backbone == Backbone::kGptq) {
    auto m2 = SecondMomentGemm(xq_fit, pool_);
    if (!m2.ok()) return m2.status();
    s2 = std::move(*m2);
  }
  if (o_.backbone == Backbone::kAwq) mabs = MeanAbs(xq_fit);

  std::vector<absl::Status> status(mods.size());
  std::vector<std::unique_ptr<model::Linear>> built(mods.size());
  pool_->ParallelFor(static_cast<int64_t>(mods.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t mi = b; mi < e; ++mi) {
      const int64_t idx = l * kModulesPerLayer + mods[mi];
      std::unique_ptr<model::Linear>& slot = *slots_[idx];
      auto w = DenseWeightMatrix(*slot);
      if (!w.ok()) {
        status[mi] = w.status();
        continue;
      }
      ModuleData d;
      d.w = w->view();
      d.x_q_fit = xq_fit;
      d.x_fp_fit = xfp_fit;
      d.x_q_eval = xq_eval;
      d.x_fp_eval = xfp_eval;
      d.second_moment = s2 ? &*s2 : nullptr;
      d.mean_abs = mabs ? &*mabs : nullptr;
      ModulePlan p;
      p.index = idx;
      p.ec_rank = ranks_[idx];
      p.gated = o_.ec == EcMode::kSpear && o_.gate;
      p.train = o_.ec == EcMode::kSpear && !o_.e2e;
      auto r = QuantizeModule(d, p, o_);
      if (!r.ok()) {
        status[mi] = r.status();
        continue;
      }
      ModuleReport& mr = report_.modules[idx];
      mr.err_w4 = r->err_w4;
      mr.err_static = r->err_static;
      mr.err_final = r->err_final;
      mr.ec_rank = r->ec ? r->ec->rank : 0;
      mr.ec_bytes = r->ec ? static_cast<int64_t>(r->ec->bytes()) : 0;
      auto lin = model::W4Linear::Create(std::move(r->q), std::move(r->ec), DenseBias(*slot));
      if (!lin.ok()) {
        status[mi] = lin.status();
        continue;
      }
      built[mi] = std::move(*lin);
    }
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  for (size_t mi = 0; mi < mods.size(); ++mi) {
    *slots_[l * kModulesPerLayer + mods[mi]] = std::move(built[mi]);
  }
  return absl::OkStatus();
}

absl::Status Pipeline::QuantizeSequential() {
  const model::ModelConfig& c = model_->config;
  const int64_t d = c.hidden_size;
  auto runner = LayerwiseRunner::Create(model_, pool_, seq_pass_);
  if (!runner.ok()) return runner.status();
  runner_ = std::move(*runner);
  const int64_t T = sp_total_rows_;
  group_k_[0] = d;
  group_k_[1] = c.num_heads * c.head_dim;
  group_k_[2] = d;
  group_k_[3] = c.intermediate_size;
  for (int g = 0; g < 4; ++g) {
    x_fp_[g].assign(static_cast<size_t>(T * group_k_[g]), 0.f);
    x_q_[g].assign(static_cast<size_t>(T * group_k_[g]), 0.f);
  }
  h_fp_.assign(static_cast<size_t>(T * d), 0.f);
  if (auto s = runner_->Embed(h_fp_.data()); !s.ok()) return s;
  h_cur_ = h_fp_;

  for (int64_t l = 0; l < c.num_layers; ++l) {
    // 0. FP16 stream through the original layer, capturing group inputs.
    auto st = runner_->RunLayers(
        l, l + 1, h_fp_.data(),
        [&](int64_t, LayerModule m, const float* x, int64_t row0, int64_t rows, int64_t ldx) {
          for (int g = 0; g < 4; ++g) {
            if (m != kGroupCapture[g]) continue;
            const int64_t k = group_k_[g];
            for (int64_t t = 0; t < rows; ++t) {
              std::memcpy(x_fp_[g].data() + (row0 + t) * k, x + t * ldx, k * sizeof(float));
            }
          }
          return true;
        });
    if (!st.ok()) return st;
    // 1-4. Groups in forward order, each from freshly recomputed inputs.
    for (int g = 0; g < 4; ++g) {
      if (auto s = QuantizeGroup(l, g); !s.ok()) return s;
    }
    // 5. Advance the current stream through the quantized layer.
    if (auto s = runner_->RunLayers(l, l + 1, h_cur_.data()); !s.ok()) return s;
    Progress("quantize", l + 1, c.num_layers);
  }
  for (int g = 0; g < 4; ++g) {
    std::vector<float>().swap(x_fp_[g]);
    std::vector<float>().swap(x_q_[g]);
  }
  std::vector<float>().swap(h_cur_);
  std::vector<float>().swap(h_fp_);
  runner_.reset();
  return absl::OkStatus();
}

absl::Status Pipeline::ComputeTeacher() {
  // The FP16 model (still dense) over ALL calibration sequences: the final-
  // normed hidden states are the end-to-end stage's teacher.
  // With layer targets, also the residual stream after every layer (fp16).
  auto t = ComputeDistillTeacher(model_, pool_, seqs_, o_.distill.layer_mse_weight > 0,
                                 captured_final_.empty() ? nullptr : &captured_final_);
  if (!t.ok()) return t.status();
  teacher_ = std::move(*t);
  std::vector<std::vector<float>>().swap(captured_final_);
  return absl::OkStatus();
}

absl::Status Pipeline::Distill() {
  auto dist = EcDistiller::Create(model_, pool_, o_.distill.gemm);
  if (!dist.ok()) return dist.status();
  if ((*dist)->num_ecs() == 0) return absl::OkStatus();
  if (fit_seqs_ < 1 || fit_seqs_ >= static_cast<int64_t>(seqs_.size())) {
    return absl::InvalidArgumentError(
        "end-to-end EC training needs at least 2 calibration sequences (one held out)");
  }
  DistillOptions d = o_.distill;
  d.train_gate = o_.gate;
  d.round_factors_i8 = o_.ec_factors == kernels::EcFactors::kI8;
  if (o_.time_budget_seconds > 0) {
    // Write-back, the int8 storage and the report (< 0.1 s measured); the
    // scorings after stage 2's last step are in its own budget (distill.cc).
    constexpr double kMargin = 5;
    const double left = std::max(
        1.0, o_.time_budget_seconds - kMargin -
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    d.max_seconds = d.max_seconds > 0 ? std::min(d.max_seconds, left) : left;
  }
  auto rep = (*dist)->Train(
      seqs_, fit_seqs_, teacher_.final_hidden.data(), d,
      [&](int64_t s, int64_t n, double) { Progress("distill", s, n); },
      teacher_.layers.empty() ? nullptr : teacher_.layers.data());
  if (!rep.ok()) return rep.status();
  if (auto s = (*dist)->WriteBack(model_); !s.ok()) return s;
  report_.distilled = true;
  report_.distill = std::move(*rep);
  teacher_ = DistillTeacher();
  return absl::OkStatus();
}

absl::Status Pipeline::StoreFactorsI8() {
  // Every EC's A and B on the int8 grid they are stored on (the trained ones
  // are on it already: the rounding is idempotent, kernels/ec_factors.h).
  for (size_t i = 0; i < slots_.size(); ++i) {
    const auto* w4 = dynamic_cast<const model::W4Linear*>(slots_[i]->get());
    if (w4 == nullptr || !w4->has_ec()) continue;
    kernels::EcWeights ec = *w4->ec();
    if (absl::Status s = kernels::RoundEcFactorsI8(&ec); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat(report_.modules[i].name, ": ", s.message()));
    }
    report_.modules[i].ec_bytes = static_cast<int64_t>(ec.bytes());
    auto q = model::W4Linear::Create(w4->weight(), std::move(ec), w4->bias());
    if (!q.ok()) return q.status();
    *slots_[i] = std::move(*q);
  }
  return absl::OkStatus();
}

absl::StatusOr<QuantizeReport> Pipeline::Run() {
  const auto t0 = std::chrono::steady_clock::now();
  if (o_.ec_budget_pct < 0) return absl::InvalidArgumentError("ec_budget_pct must be >= 0");
  if (auto s = CollectModules(); !s.ok()) return s;
  if (!o_.given_placement.empty()) {
    // A given placement is checked before the calibration runs.
    if (o_.ec == EcMode::kNone || (o_.ec == EcMode::kStatic && !o_.place_static_like_spear)) {
      return absl::InvalidArgumentError(
          "a given EC placement replaces the diagnostic's: it needs EC spear or static");
    }
    if (auto s = PlaceGiven(); !s.ok()) return s;
  }

  const bool data_free = o_.backbone == Backbone::kRtn && o_.ec == EcMode::kNone;
  auto lap = std::chrono::steady_clock::now();
  auto take_lap = [&lap]() {
    const auto now = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(now - lap).count();
    lap = now;
    return s;
  };
  const bool e2e = o_.ec == EcMode::kSpear && o_.e2e && !data_free;
  if (!data_free) {
    // The end-to-end stage's teacher (final states only) is captured while
    // the FP16 model samples its calibration text: no second pass over it.
    const bool capture = e2e && !(o_.distill.layer_mse_weight > 0);
    auto set = MakeCalibrationSet(*model_, o_.calib, pool_->size(), capture,
                                  [&](int64_t d, int64_t t) { Progress("calibration", d, t); });
    if (!set.ok()) return set.status();
    seqs_ = std::move(set->sequences);
    int64_t captured = 0;
    for (const auto& h : set->final_hidden) captured += h.empty() ? 0 : 1;
    if (captured > 0) captured_final_ = std::move(set->final_hidden);
    report_.teacher_captured_sequences = captured;
    const int64_t n = static_cast<int64_t>(seqs_.size());
    // Held-out split: the last ~10% of the sequences (none with one
    // sequence), at most holdout_max_tokens of them (it is forwarded at every
    // held-out evaluation and in the sequential pass: a cost, not data).
    int64_t held = n >= 2 ? std::max<int64_t>(1, n / 10) : 0;
    if (o_.holdout_max_tokens > 0 && held > 1) {
      int64_t tokens = 0, keep = 0;
      for (int64_t i = n - 1; i >= n - held; --i) {
        tokens += static_cast<int64_t>(seqs_[i].size());
        if (keep >= 1 && tokens > o_.holdout_max_tokens) break;
        ++keep;
      }
      held = keep;
    }
    fit_seqs_ = n - held;
    for (int64_t i = 0; i < n; ++i) {
      total_rows_ += seqs_[i].size();
      if (i < fit_seqs_) fit_rows_ += seqs_[i].size();
    }
    report_.calibration_tokens = total_rows_;
    // The sequential (closed-form) pass: seqs_[begin, end) as far as `cap`
    // tokens go (at least one sequence; cap 0 = all), appended to seq_pass_;
    // returns their rows.
    auto append_prefix = [&](int64_t begin, int64_t end, int64_t cap) {
      int64_t rows = 0;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t len = static_cast<int64_t>(seqs_[i].size());
        if (cap > 0 && i > begin && rows + len > cap) break;
        seq_pass_.push_back(seqs_[i]);
        rows += len;
      }
      return rows;
    };
    // It needs only E[x x^T] per module from the fit sequences (the
    // end-to-end stage uses all of them), and its held-out rows only score
    // the modules (err_*, GPTQ's dampening; they were ~80 % of its rows at
    // 4,096 held-out tokens).
    sp_fit_rows_ = append_prefix(0, fit_seqs_, o_.sequential_max_tokens);
    sp_total_rows_ = sp_fit_rows_ + append_prefix(fit_seqs_, n, o_.sequential_holdout_max_tokens);
  }
  report_.calibration_seconds = take_lap();
  if (auto s = Place(); !s.ok()) return s;
  report_.diagnostic_seconds = take_lap();
  if (e2e) {
    if (auto s = ComputeTeacher(); !s.ok()) return s;
    report_.teacher_seconds = take_lap();
  }
  if (data_free) {
    if (auto s = QuantizeDataFree(); !s.ok()) return s;
  } else {
    if (auto s = QuantizeSequential(); !s.ok()) return s;
  }
  report_.sequential_seconds = take_lap();
  if (e2e) {
    if (auto s = Distill(); !s.ok()) return s;
    report_.distill_seconds = take_lap();
  }
  if (o_.ec_factors == kernels::EcFactors::kI8) {
    if (auto s = StoreFactorsI8(); !s.ok()) return s;
  }
  int64_t ec = 0;
  const int64_t total = ServedModelBytes(*model_, &ec);
  report_.ec_bytes = ec;
  report_.w4_model_bytes = total - ec;
  {
    std::vector<std::string> names;
    for (const ModuleReport& m : report_.modules) names.push_back(m.name);
    const std::vector<int64_t> groups = FusedLaunchGroups(names);
    report_.gemm_launches = CountLaunches(groups);
    std::vector<int64_t> ec_groups;
    for (size_t i = 0; i < groups.size(); ++i) {
      if (report_.modules[i].ec_rank > 0) ec_groups.push_back(groups[i]);
    }
    report_.ec_launches = CountLaunches(ec_groups);
  }
  report_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::move(report_);
}

}  // namespace

absl::StatusOr<QuantizeReport> QuantizeModel(model::LoadedModel* model,
                                              const QuantizeOptions& options,
                                              kernels::ThreadPool* pool,
                                              const QuantizeProgress& progress) {
  if (model == nullptr || pool == nullptr) {
    return absl::InvalidArgumentError("QuantizeModel: null model or pool");
  }
  Pipeline p(model, options, pool, progress);
  return p.Run();
}

int64_t ServedModelBytes(const model::LoadedModel& model, int64_t* ec_bytes) {
  // One definition of "served bytes" for the checkpoint, the eval table and
  // the pipeline's budget: the checkpoint's.
  const model::ServedBytes sb = model::ComputeServedBytes(model);
  if (ec_bytes != nullptr) *ec_bytes = sb.ec_bytes;
  return sb.w4_model_bytes + sb.ec_bytes;
}

}  // namespace spear::quantize
