// spear quantize: FP16 model -> W4 (+EC) .spear checkpoint.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/model_session.h"
#include "nlohmann/json.hpp"
#include "worker/model/model_cache.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/quantize/pipeline/quantize_model.h"

namespace spear::cli {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

// --calib self:N,LEN | text:FILE[,N,LEN]
absl::Status ParseCalib(const std::string& v, quantize::CalibrationOptions* c) {
  const auto bad = [&v] {
    return absl::InvalidArgumentError(absl::StrCat(
        "--calib must be self:N,LEN or text:FILE (optionally text:FILE,N,LEN), got '", v, "'"));
  };
  auto parse_n_len = [&](absl::string_view spec) -> absl::Status {
    std::vector<std::string> p = absl::StrSplit(spec, ',');
    int64_t n, len;
    if (p.size() != 2 || !absl::SimpleAtoi(p[0], &n) || !absl::SimpleAtoi(p[1], &len)) return bad();
    if (n < 1 || n > 100000 || len < 2 || len > 1 << 20) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--calib: need 1 <= N <= 100000 sequences of 2 <= LEN <= 1048576 tokens, got '", v, "'"));
    }
    c->num_sequences = n;
    c->seq_len = len;
    return absl::OkStatus();
  };
  if (v.starts_with("self:")) {
    c->text_file.clear();
    return parse_n_len(absl::string_view(v).substr(5));
  }
  if (v.starts_with("text:")) {
    std::string rest = v.substr(5);
    // FILE or FILE,N,LEN (a file name may itself contain commas: split from the right).
    const size_t c2 = rest.rfind(',');
    const size_t c1 = c2 == std::string::npos || c2 == 0 ? std::string::npos : rest.rfind(',', c2 - 1);
    int64_t tmp;
    if (c1 != std::string::npos && absl::SimpleAtoi(rest.substr(c1 + 1, c2 - c1 - 1), &tmp) &&
        absl::SimpleAtoi(rest.substr(c2 + 1), &tmp)) {
      if (auto s = parse_n_len(rest.substr(c1 + 1)); !s.ok()) return s;
      rest = rest.substr(0, c1);
    }
    if (rest.empty()) return bad();
    std::error_code ec;
    if (!fs::is_regular_file(rest, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--calib: no such text file '", rest, "'"));
    }
    c->text_file = rest;
    return absl::OkStatus();
  }
  return bad();
}

struct Parsed {
  quantize::QuantizeOptions opts;
  std::string method, ec;
};

// The first of `names` given on the command line as an error: it has no
// effect `why` (e.g. "with --ec none").
absl::Status RefuseGiven(const Flags& f, std::initializer_list<const char*> names,
                         const std::string& why) {
  for (const char* name : names) {
    if (f.Has(name)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " has no effect ", why));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseOptions(const Flags& f, Parsed* p) {
  quantize::QuantizeOptions& o = p->opts;
  p->method = f.Str("method");
  if (p->method == "rtn") {
    o.backbone = quantize::Backbone::kRtn;
  } else if (p->method == "awq") {
    o.backbone = quantize::Backbone::kAwq;
  } else if (p->method == "gptq") {
    o.backbone = quantize::Backbone::kGptq;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--method must be rtn, awq or gptq, got '", p->method, "'"));
  }
  int64_t group;
  if (!absl::SimpleAtoi(f.Str("group"), &group) ||
      (group != -1 && group != 32 && group != 64 && group != 128)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--group must be -1 (per-channel), 32, 64 or 128, got '", f.Str("group"), "'"));
  }
  o.group_size = group;
  o.symmetric = f.Bool("symmetric");
  p->ec = f.Str("ec");
  if (p->ec == "spear") {
    o.ec = quantize::EcMode::kSpear;
  } else if (p->ec == "static") {
    o.ec = quantize::EcMode::kStatic;
    o.place_static_like_spear = true;
  } else if (p->ec == "static-all") {
    o.ec = quantize::EcMode::kStatic;
    o.place_static_like_spear = false;
  } else if (p->ec == "none") {
    o.ec = quantize::EcMode::kNone;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--ec must be spear, static, static-all or none, got '", p->ec, "'"));
  }
  auto budget = f.Double("ec-budget", 0.0, 100.0);
  if (!budget.ok()) return budget.status();
  o.ec_budget_pct = *budget;
  o.gate = !f.Bool("no-gate");
  auto breadth = f.Double("ec-breadth", 0.01, 100.0);
  if (!breadth.ok()) return breadth.status();
  o.placement_breadth = *breadth;
  auto min_rank = f.Int("ec-min-rank", 1, 256);
  if (!min_rank.ok()) return min_rank.status();
  o.min_ec_rank = *min_rank;
  auto max_rank = f.Int("ec-max-rank", 1, 256);
  if (!max_rank.ok()) return max_rank.status();
  if (*max_rank < *min_rank) {
    return absl::InvalidArgumentError(absl::StrCat("--ec-max-rank ", *max_rank,
                                                   " is below --ec-min-rank ", *min_rank));
  }
  o.max_ec_rank = *max_rank;
  auto launch_budget = f.Double("ec-launch-budget", -1e300, 1e300);  // finite
  if (!launch_budget.ok()) return launch_budget.status();
  if (!(*launch_budget > 0.0 && *launch_budget <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ec-launch-budget must be in (0, 1], got ", *launch_budget));
  }
  o.ec_launch_budget = *launch_budget;
  // static-all takes every module at the one rank the budget buys, none
  // places nothing: neither runs the diagnostic's placement.
  const bool diagnostic_placement =
      o.ec == quantize::EcMode::kSpear ||
      (o.ec == quantize::EcMode::kStatic && o.place_static_like_spear);
  if (!diagnostic_placement) {
    if (absl::Status s = RefuseGiven(
            f, {"ec-breadth", "ec-min-rank", "ec-max-rank", "ec-launch-budget"},
            absl::StrCat("with --ec ", p->ec,
                         p->ec == "none" ? "" : " (every module at the rank the budget buys)"));
        !s.ok()) {
      return s;
    }
  }
  if (const std::string fac = f.Str("ec-factors"); fac == "i8") {
    o.ec_factors = kernels::EcFactors::kI8;
  } else if (fac != "f16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--ec-factors must be f16 or i8, got '", fac, "'"));
  }
  if (f.Has("ec-factors") && o.ec == quantize::EcMode::kNone) {
    return absl::InvalidArgumentError("--ec-factors has no effect with --ec none");
  }
  if (!o.gate && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--no-gate only applies to --ec spear");
  }
  auto steps = f.Int("train-steps", 0, 1000000);
  if (!steps.ok()) return steps.status();
  o.distill.steps = *steps;  // stage 2 is end to end (distill.h)
  o.train_steps = *steps;
  auto budget_s = f.Double("time-budget", 0.0, 1e7);
  if (!budget_s.ok()) return budget_s.status();
  o.time_budget_seconds = *budget_s;
  auto seed = f.Int("seed", 0, INT64_MAX);
  if (!seed.ok()) return seed.status();
  o.calib.seed = static_cast<uint64_t>(*seed);
  if (absl::Status s = ParseCalib(f.Str("calib"), &o.calib); !s.ok()) return s;
  auto diag_tokens = f.Int("diagnostic-tokens", 16, 1 << 20);
  if (!diag_tokens.ok()) return diag_tokens.status();
  auto diag_seqs = f.Int("diagnostic-seqs", 1, 4096);
  if (!diag_seqs.ok()) return diag_seqs.status();
  if ((f.Has("diagnostic-tokens") || f.Has("diagnostic-seqs")) && o.ec == quantize::EcMode::kNone) {
    return absl::InvalidArgumentError("--diagnostic-tokens / --diagnostic-seqs need --ec spear or static");
  }
  o.diagnostic_tokens = *diag_tokens;
  o.diagnostic_sequences = *diag_seqs;
  auto windows = f.Int("calib-windows", 1, 64);
  if (!windows.ok()) return windows.status();
  auto top_p = f.Double("calib-top-p", 1e-6, 1.0);
  auto temp = f.Double("calib-temperature", 0.05, 10.0);
  if (!temp.ok()) return temp.status();
  auto random_start = f.Double("calib-random-start", 0.0, 1.0);
  if (!top_p.ok()) return top_p.status();
  if (!random_start.ok()) return random_start.status();
  if (!o.calib.text_file.empty() &&
      (f.Has("calib-windows") || f.Has("calib-top-p") || f.Has("calib-random-start") ||
       f.Has("calib-temperature"))) {
    return absl::InvalidArgumentError(
        "--calib-windows, --calib-top-p, --calib-temperature and --calib-random-start only apply "
        "to --calib self:N,LEN");
  }
  o.calib.temperature = *temp;
  o.calib.windows_per_sequence = *windows;
  o.calib.top_p = *top_p;
  if (f.Has("calib-mix-text")) {
    // FILE,M[;FILE,M...]: M windows of each text spread among the
    // self-generated ones.
    if (!o.calib.text_file.empty()) {
      return absl::InvalidArgumentError("--calib-mix-text only applies to --calib self:N,LEN");
    }
    const std::string all = f.Str("calib-mix-text");
    for (const std::string& v : std::vector<std::string>(absl::StrSplit(all, ';'))) {
      const size_t comma = v.rfind(',');
      int64_t m = 0;
      if (comma == std::string::npos || comma == 0 ||
          !absl::SimpleAtoi(v.substr(comma + 1), &m) || m < 1 || m > 100000) {
        return absl::InvalidArgumentError(
            absl::StrCat("--calib-mix-text must be FILE,M[;FILE,M...] with 1 <= M <= 100000 "
                         "windows each, got '",
                         all, "'"));
      }
      const std::string file = v.substr(0, comma);
      std::error_code ec;
      if (!fs::is_regular_file(file, ec)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--calib-mix-text: no such text file '", file, "'"));
      }
      o.calib.mix_texts.push_back({file, m});
    }
  }
  o.calib.random_start_fraction = *random_start;
  if (f.Has("calib-prompts")) {
    // FILE[,F]: a fraction F (default 1) of the samples continue from the
    // file's prompts (one per line).
    std::string file = f.Str("calib-prompts");
    double frac = 1.0;
    const size_t comma = file.rfind(',');
    if (comma != std::string::npos) {
      const std::string tail = file.substr(comma + 1);
      if (!absl::SimpleAtod(tail, &frac) || !(frac > 0 && frac <= 1)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--calib-prompts must be FILE[,F] with 0 < F <= 1, got '", file, "'"));
      }
      file = file.substr(0, comma);
    }
    if (!o.calib.text_file.empty()) {
      return absl::InvalidArgumentError("--calib-prompts only applies to --calib self:N,LEN");
    }
    if (f.Has("calib-random-start")) {
      return absl::InvalidArgumentError("--calib-prompts and --calib-random-start exclude each other");
    }
    std::error_code ec;
    if (file.empty() || !fs::is_regular_file(file, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--calib-prompts: no such file '", file, "'"));
    }
    o.calib.prompt_file = file;
    o.calib.prompt_fraction = frac;
  }
  if (f.Bool("calib-chat")) {
    if (o.calib.prompt_file.empty()) {
      return absl::InvalidArgumentError("--calib-chat only applies with --calib-prompts");
    }
    o.calib.prompt_chat = true;
  }
  auto mse = f.Double("mse-weight", 0.0, 1e6);
  if (!mse.ok()) return mse.status();
  if (f.Has("mse-weight") && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--mse-weight only applies to --ec spear");
  }
  o.distill.hidden_mse_weight = o.ec == quantize::EcMode::kSpear ? *mse : 0.0;
  auto lmse = f.Double("layer-mse-weight", 0.0, 1e6);
  if (!lmse.ok()) return lmse.status();
  if (f.Has("layer-mse-weight") && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--layer-mse-weight only applies to --ec spear");
  }
  o.distill.layer_mse_weight = o.ec == quantize::EcMode::kSpear ? *lmse : 0.0;
  auto tau = f.Double("kl-temperature", 0.05, 100.0);
  if (!tau.ok()) return tau.status();
  if (f.Has("kl-temperature") && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--kl-temperature only applies to --ec spear");
  }
  o.distill.kl_temperature = *tau;
  auto ema = f.Double("ec-ema", 0.0, 0.9999);
  if (!ema.ok()) return ema.status();
  if (f.Has("ec-ema") && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--ec-ema only applies to --ec spear");
  }
  o.distill.ema_decay = *ema;
  auto lr = f.Double("ec-lr", 1e-6, 1.0);
  if (!lr.ok()) return lr.status();
  if (f.Has("ec-lr") && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--ec-lr only applies to --ec spear");
  }
  o.distill.lr = *lr;
  auto glr = f.Double("gate-lr-scale", 0.0, 100.0);
  if (!glr.ok()) return glr.status();
  if (f.Has("gate-lr-scale") && (o.ec != quantize::EcMode::kSpear || !o.gate)) {
    return absl::InvalidArgumentError("--gate-lr-scale only applies to --ec spear with the gate");
  }
  o.distill.gate_lr_scale = *glr;
  auto tb = f.Int("train-batch", 1, 64);
  if (!tb.ok()) return tb.status();
  if (f.Has("train-batch") && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--train-batch only applies to --ec spear");
  }
  o.distill.batch_sequences = *tb;
  auto gemm = quantize::ParseDistillGemm(f.Str("ec-train-gemm"));
  if (!gemm.ok()) return gemm.status();
  if (f.Has("ec-train-gemm") && o.ec != quantize::EcMode::kSpear) {
    return absl::InvalidArgumentError("--ec-train-gemm only applies to --ec spear");
  }
  o.distill.gemm = *gemm;
  if (f.Has("ec-latency-table")) {
    if (!diagnostic_placement) {
      return absl::InvalidArgumentError(
          "--ec-latency-table only applies to the diagnostic's placement (--ec spear or static)");
    }
    auto table = quantize::ReadEcLatencyTable(f.Str("ec-latency-table"));
    if (!table.ok()) return absl::InvalidArgumentError(table.status().message());
    o.ec_latency = std::move(*table);
  }
  if (f.Has("ec-placement")) {
    // The modules and ranks of another checkpoint's ECs; no diagnostic.
    const std::string dir = f.Str("ec-placement");
    if (!diagnostic_placement) {
      return absl::InvalidArgumentError("--ec-placement only applies to --ec spear or static");
    }
    if (absl::Status s =
            RefuseGiven(f,
                        {"ec-breadth", "ec-min-rank", "ec-max-rank", "ec-launch-budget",
                         "ec-latency-table", "diagnostic-tokens", "diagnostic-seqs"},
                        "with --ec-placement (the placement is given)");
        !s.ok()) {
      return s;
    }
    if (dir.empty() || !model::IsSpearDir(dir)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--ec-placement: '", dir, "' is not a .spear checkpoint (no ", model::kSpearManifestFile, ")"));
    }
    auto man = model::ReadSpearManifest(dir);
    if (!man.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--ec-placement: ", dir, ": ", man.status().message()));
    }
    for (const model::SpearModuleInfo& mi : man->modules) {
      if (mi.ec_rank > 0) o.given_placement.push_back({mi.name, mi.n, mi.k, mi.ec_rank});
    }
    if (o.given_placement.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--ec-placement: ", dir, " has no EC"));
    }
    o.given_placement_source = dir;
  }
  return absl::OkStatus();
}

// One line per stage, redrawn in place on a terminal; on a pipe only the
// stage's start and end (and every 10%) are printed.
class ProgressBar {
 public:
  ProgressBar() : tty_(isatty(fileno(stderr))), t0_(NowSeconds()) {}
  void Update(const std::string& stage, int64_t done, int64_t total) {
    const int pct = total > 0 ? static_cast<int>(100 * done / total) : 100;
    if (stage != stage_) {
      if (open_) std::fputc('\n', stderr);
      stage_ = stage, last_pct_ = -100, open_ = false;
    }
    if (!tty_ && pct < last_pct_ + 10 && done != total) return;
    last_pct_ = pct;
    constexpr int kWidth = 30;
    const int filled = total > 0 ? static_cast<int>(kWidth * done / total) : kWidth;
    std::fprintf(stderr, "%s%-14s [%s%s] %lld/%lld  %.0f s", tty_ ? "\r" : "", stage.c_str(),
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
                 static_cast<long long>(done), static_cast<long long>(total), NowSeconds() - t0_);
    open_ = tty_ && done != total;
    if (!open_) std::fputc('\n', stderr);
    std::fflush(stderr);
  }
  void Close() {
    if (open_) std::fputc('\n', stderr);
    open_ = false;
  }

 private:
  bool tty_;
  double t0_;
  std::string stage_;
  int last_pct_ = -100;
  bool open_ = false;
};

std::string Mib(int64_t bytes) { return absl::StrFormat("%.2f MiB", bytes / 1048576.0); }

void PrintReport(const quantize::QuantizeReport& r, bool diagnostic) {
  std::printf("%-36s %9s %7s %5s %10s %11s %11s %11s\n", "module", "damage",
              r.measured_latency ? "lat(m)" : "lat", "rank", "EC bytes", "err W4", "err static",
              "err final");
  for (const quantize::ModuleReport& m : r.modules) {
    std::printf("%-36s %9s %7s %5lld %10lld %11.4g %11s %11s\n", m.name.c_str(),
                diagnostic ? absl::StrFormat("%.5f", m.damage).c_str() : "-",
                diagnostic ? absl::StrFormat("%.3f", m.ec_latency).c_str() : "-",
                static_cast<long long>(m.ec_rank), static_cast<long long>(m.ec_bytes), m.err_w4,
                m.ec_rank ? absl::StrFormat("%.4g", m.err_static).c_str() : "-",
                m.ec_rank ? absl::StrFormat("%.4g", m.err_final).c_str() : "-");
  }
  int64_t with_ec = 0;
  for (const auto& m : r.modules) with_ec += m.ec_rank > 0;
  std::printf("\nW4 model %s (%lld bytes), EC %s (%lld bytes) = %.3f%% of the model; "
              "%lld of %zu modules with an EC\n",
              Mib(r.w4_model_bytes).c_str(), static_cast<long long>(r.w4_model_bytes),
              Mib(r.ec_bytes).c_str(), static_cast<long long>(r.ec_bytes), r.ec_pct(),
              static_cast<long long>(with_ec), r.modules.size());
  std::printf("GEMM launches on the GPU (q/k/v and gate/up fused): %lld of %lld carry an EC%s\n",
              static_cast<long long>(r.ec_launches), static_cast<long long>(r.gemm_launches),
              r.launch_cap >= 0 ? absl::StrFormat(" (launch budget: at most %lld)",
                                                  static_cast<long long>(r.launch_cap))
                                      .c_str()
                                : "");
  if (!r.placement_source.empty()) {
    std::printf("EC placement given by %s (no diagnostic)\n", r.placement_source.c_str());
  } else if (diagnostic) {
    std::printf("damage entropy %.4f nats (normalized %.4f, %.1f effective modules)\n",
                r.damage_entropy, r.normalized_entropy, r.effective_modules);
    std::printf("placement latency cost (lat): %s\n",
                r.measured_latency
                    ? "measured on the GPU, (EC - W4) / W4 at m = 1 (--ec-latency-table)"
                    : "EC bytes / W4 bytes (the bandwidth proxy)");
  }
  std::printf("calibration tokens %lld; quantized in %.1f s\n",
              static_cast<long long>(r.calibration_tokens), r.seconds);
  std::printf("stage seconds: calibration %.1f, diagnostic %.1f, teacher %.1f, sequential "
              "(backbone + closed form) %.1f, end-to-end EC training %.1f\n",
              r.calibration_seconds, r.diagnostic_seconds, r.teacher_seconds,
              r.sequential_seconds, r.distill_seconds);
  if (r.teacher_captured_sequences > 0) {
    std::printf("teacher: %lld calibration sequences captured while sampling, the rest run\n",
                static_cast<long long>(r.teacher_captured_sequences));
  }
  if (r.distilled) {
    const quantize::DistillReport& d = r.distill;
    std::printf("EC training: %lld ECs, %lld parameters, %lld fit / %lld held-out tokens; held-out "
                "KL %.4f -> %.4f (best step %lld of %lld%s, %.2f s/step%s%s)\n",
                static_cast<long long>(d.num_ecs), static_cast<long long>(d.num_params),
                static_cast<long long>(d.fit_tokens), static_cast<long long>(d.val_tokens),
                d.init_val_kl, d.final_val_kl, static_cast<long long>(d.best_step),
                static_cast<long long>(d.steps_run), d.best_is_ema ? ", the moving average" : "",
                d.seconds_per_step, d.stopped_early ? ", stopped early" : "",
                d.time_capped ? ", time budget" : "");
    if (d.rounded_val_kl >= 0) {
      std::printf("EC factors rounded to int8: held-out KL %.4f -> %.4f\n", d.final_val_kl,
                  d.rounded_val_kl);
    }
    if (const std::string w = d.UnderTrainedWarning(); !w.empty()) {
      std::fprintf(stderr, "warning: %s\n", w.c_str());
    }
  }
}

json ReportJson(const quantize::QuantizeReport& r) {
  json mods = json::array();
  for (const auto& m : r.modules) {
    mods.push_back({{"name", m.name}, {"damage", m.damage}, {"ec_latency", m.ec_latency},
                    {"rank", m.ec_rank},
                    {"ec_bytes", m.ec_bytes}, {"err_w4", m.err_w4}, {"err_static", m.err_static},
                    {"err_final", m.err_final}});
  }
  return {{"placement_source", r.placement_source.empty() ? json(nullptr) : json(r.placement_source)},
          {"damage_entropy", r.damage_entropy},
          {"measured_latency", r.measured_latency},
          {"normalized_entropy", r.normalized_entropy},
          {"effective_modules", r.effective_modules},
          {"w4_model_bytes", r.w4_model_bytes},
          {"ec_bytes", r.ec_bytes},
          {"ec_pct", r.ec_pct()},
          {"calibration_tokens", r.calibration_tokens},
          {"teacher_captured_sequences", r.teacher_captured_sequences},
          {"seconds", r.seconds},
          {"stage_seconds",
           {{"calibration", r.calibration_seconds},
            {"diagnostic", r.diagnostic_seconds},
            {"teacher", r.teacher_seconds},
            {"sequential", r.sequential_seconds},
            {"distill", r.distill_seconds}}},
          {"distill", r.distilled ? json{{"num_ecs", r.distill.num_ecs},
                                         {"num_params", r.distill.num_params},
                                         {"fit_tokens", r.distill.fit_tokens},
                                         {"val_tokens", r.distill.val_tokens},
                                         {"init_val_kl", r.distill.init_val_kl},
                                         {"final_val_kl", r.distill.final_val_kl},
                                         {"rounded_val_kl", r.distill.rounded_val_kl >= 0
                                                                ? json(r.distill.rounded_val_kl)
                                                                : json(nullptr)},
                                         {"best_step", r.distill.best_step},
                                         {"best_is_ema", r.distill.best_is_ema},
                                         {"steps_run", r.distill.steps_run},
                                         {"seconds_per_step", r.distill.seconds_per_step},
                                         {"stopped_early", r.distill.stopped_early},
                                         {"time_capped", r.distill.time_capped}}
                                  : json(nullptr)},
          {"modules", mods}};
}

}  // namespace

int CmdQuantize(const std::vector<std::string>& args) {
  Flags f("quantize");
  f.Declare("model", "", "source model (FP16/FP32/BF16 HF directory, GGUF, or cache name)")
      .Declare("out", "", "output .spear directory")
      .Declare("method", "rtn", "W4 backbone: rtn | awq | gptq")
      .Declare("group", "-1", "group size: -1 (per-channel) | 32 | 64 | 128")
      .DeclareBool("symmetric", "symmetric grid (zero point fixed at 8)")
      .Declare("ec", "spear",
               "error compensators: spear (placed by the diagnostic, gated, trained) | static "
               "(same placement, closed-form) | static-all (every module, same rank) | none")
      .Declare("ec-budget", "1.0", "EC memory budget, % of the served W4 model")
      .DeclareBool("no-gate", "ablation: gate fixed at 1 (same training)")
      .Declare("ec-breadth", "1.0",
               "placement: at most breadth x N_eff modules get an EC (N_eff = exp(entropy of "
               "the damage distribution))")
      .Declare("ec-min-rank", "4", "placement: smallest EC rank (then powers of two to 256)")
      .Declare("ec-max-rank", "256", "placement: largest EC rank")
      .Declare("ec-factors", "f16",
               "storage of the ECs' A and B: f16 | i8 (int8 codes, an fp16 scale per 64 values: "
               "about twice the rank in the same budget; kernels/FORMAT.md)")
      .Declare("ec-launch-budget", "1.0",
               "placement: at most this fraction of the model's GEMM launches (q/k/v fused, "
               "gate/up fused, as on the GPU) carry an EC; the GPU's EC cost is mostly one "
               "launch per EC-carrying GEMM (1 = no cap)")
      .Declare("ec-latency-table", "",
               "placement: a CSV of measured EC latency per module shape on the target GPU "
               "(spear_bench_w4_cuda --ec-latency; worker/quantize/pipeline/ec_latency.h); "
               "default: the bytes proxy")
      .Declare("ec-placement", "",
               "placement: take the EC modules and ranks from a .spear checkpoint of the same "
               "architecture instead of running the diagnostic (the ranks' bytes must fit "
               "--ec-budget)")
      .Declare("calib", "self:256,256",
               "calibration data: self:N,LEN (sequences the model samples itself) or "
               "text:FILE[,N,LEN]")
      .Declare("calib-windows", "1",
               "self: each sample is W x LEN tokens, cut into W windows of LEN (windows after "
               "the first start mid-text, like chunks of a long document); N x W sequences in all")
      .Declare("calib-top-p", "0.95", "self: nucleus mass of the calibration sampler (1 = off)")
      .Declare("calib-temperature", "1", "self: temperature of the calibration sampler")
      .Declare("calib-mix-text", "",
               "self: FILE,M[;FILE,M...] adds the first M windows of LEN tokens of each text "
               "file, the texts interleaved and spread among the self-generated sequences "
               "(both the fit and the held-out part)")
      .Declare("calib-random-start", "0",
               "self: fraction of samples that continue from a random non-special vocabulary "
               "token instead of from BOS alone (data-free diversity, as LLM-QAT)")
      .Declare("calib-prompts", "",
               "self: FILE[,F]: a fraction F (default 1) of the samples continue from the "
               "file's prompts (one per line, in order, cycled) instead of from BOS alone "
               "(scripts/eval/calib_text.py --source=wordnet-topics writes one)")
      .DeclareBool("calib-chat",
                   "with --calib-prompts: each prompt line is a user message in the model's chat "
                   "template, the assistant's answer is the sample (calib_text.py "
                   "--source=wordnet-requests writes requests)")
      .Declare("diagnostic-tokens", "128",
               "CKA diagnostic: calibration tokens it runs on (time ~ tokens)")
      .Declare("diagnostic-seqs", "1",
               "CKA diagnostic: the tokens come from this many calibration sequences spread "
               "over the set (1 = the first sequence alone)")
      .Declare("seed", "1", "calibration sampling seed")
      .Declare("mse-weight", "1",
               "stage 2: weight of the final hidden-state MSE term added to the KL (distill.h; "
               "0 = KL only)")
      .Declare("layer-mse-weight", "0",
               "stage 2: weight of the layer targets (the residual stream after every layer from "
               "the first EC's on against the FP16 model's, relative squared error; distill.h). "
               "Stores the teacher's layer states: 2 x layers x hidden bytes per token")
      .Declare("kl-temperature", "1",
               "stage 2: distillation temperature of the training KL (tau^2 KL of the "
               "distributions at temperature tau; the held-out KL stays at 1)")
      .Declare("ec-ema", "0",
               "stage 2: decay per step of a moving average of the EC parameters, scored on "
               "the held-out calibration data from half of the run on and kept where better "
               "(distill.h; 0 = off)")
      .Declare("ec-lr", "0.003",
               "stage 2: peak learning rate of Adam (5 warm-up steps, then cosine to 0.1x "
               "over the steps or the time budget; distill.h)")
      .Declare("gate-lr-scale", "1",
               "stage 2: learning-rate multiplier of the gate MLP against A and B (distill.h; "
               "0 = the gate stays at its initial value 1)")
      .Declare("ec-train-gemm", "bf16",
               "stage 2: GEMMs with the frozen weights: bf16 (weights stored as bf16; 16-bit "
               "products: fp16 on CPUs with AVX512-FP16, else bf16 on CPUs with AVX512-BF16: "
               "steps ~1.4x faster there) | f32 (distill.h)")
      .Declare("train-batch", "2",
               "stage 2: calibration sequences per training step (Adam update)")
      .Declare("train-steps", "1000",
               "stage 2 (end-to-end EC distillation) steps of --train-batch x LEN tokens; the "
               "time budget or early stopping on held-out calibration KL usually ends it first")
      .Declare("time-budget", "900",
               "seconds for calibration + EC fitting; stage 2 gets what the earlier stages left "
               "(0 = no limit)")
      .Declare("threads", "0", "CPU threads, 0 = all")
      .DeclareBool("force", "replace --out if it exists")
      .DeclareBool("help", "show flags");
  if (absl::Status s = f.Parse(args); !s.ok()) return Fail("quantize", s, true);
  if (f.Bool("help")) return std::printf("%s", f.Usage().c_str()), 0;
  if (!f.positional().empty()) {
    return Fail("quantize", absl::InvalidArgumentError(absl::StrCat(
                                "unexpected argument '", f.positional()[0], "'")), true);
  }
  if (f.Str("model").empty()) return Fail("quantize", absl::InvalidArgumentError("--model is required"), true);
  if (f.Str("out").empty()) return Fail("quantize", absl::InvalidArgumentError("--out is required"), true);
  Parsed p;
  if (absl::Status s = ParseOptions(f, &p); !s.ok()) return Fail("quantize", s, true);
  auto threads = f.Int("threads", 0, 1024);
  if (!threads.ok()) return Fail("quantize", threads.status(), true);

  const std::string out = f.Str("out");
  std::error_code ec;
  if (fs::exists(out, ec) && !f.Bool("force") &&
      (!fs::is_directory(out, ec) || !fs::is_empty(out, ec))) {
    return Fail("quantize", absl::AlreadyExistsError(absl::StrCat(
                                "--out ", out, " exists and is not empty; use --force to replace it")));
  }
  auto src = model::ResolveModel(f.Str("model"));
  if (!src.ok()) return Fail("quantize", src.status());
  if (fs::exists(out, ec) && fs::equivalent(*src, out, ec)) {
    return Fail("quantize", absl::InvalidArgumentError("--out must differ from --model"), true);
  }
  const double t0 = NowSeconds();
  auto m = model::LoadModel(*src);
  if (!m.ok()) return Fail("quantize", m.status());
  if (model::IsSpearDir(*src)) {
    return Fail("quantize", absl::InvalidArgumentError(
                                absl::StrCat(*src, " is already quantized (.spear); give the FP16 model")));
  }
  std::fprintf(stderr, "loaded %s in %.1f s: %lld layers, hidden %lld; %s W4 %s%s, EC %s (budget %.2f%%)\n",
               src->c_str(), NowSeconds() - t0, static_cast<long long>((*m)->config.num_layers),
               static_cast<long long>((*m)->config.hidden_size), p.method.c_str(),
               p.opts.group_size < 0 ? "per-channel" : absl::StrCat("g", p.opts.group_size).c_str(),
               p.opts.symmetric ? " sym" : "", p.ec.c_str(), p.opts.ec_budget_pct);

  kernels::ThreadPool pool(static_cast<int>(*threads));
  ProgressBar bar;
  auto report = quantize::QuantizeModel(
      m->get(), p.opts, &pool,
      [&bar](const std::string& stage, int64_t done, int64_t total) { bar.Update(stage, done, total); });
  bar.Close();
  if (!report.ok()) return Fail("quantize", report.status());
  const bool diagnostic = p.opts.given_placement.empty() &&
                          (p.opts.ec == quantize::EcMode::kSpear ||
                           (p.opts.ec == quantize::EcMode::kStatic && p.opts.place_static_like_spear));
  PrintReport(*report, diagnostic);

  const quantize::QuantizeOptions& o = p.opts;
  model::SpearProvenance prov;
  prov.source_path = *src;
  prov.command = absl::StrCat("spear quantize ", absl::StrJoin(args, " "));
  prov.calibration_json =
      json{{"kind", o.calib.text_file.empty() ? "self" : "text"},
           {"text_file", o.calib.text_file},
           {"num_sequences", o.calib.num_sequences},
           {"seq_len", o.calib.seq_len},
           {"windows_per_sequence", o.calib.windows_per_sequence},
           {"top_p", o.calib.top_p},
           {"temperature", o.calib.temperature},
           {"random_start_fraction", o.calib.random_start_fraction},
           {"mix_texts",
            [&] {
              json a = json::array();
              for (const auto& m : o.calib.mix_texts) {
                a.push_back({{"file", m.file}, {"sequences", m.sequences}});
              }
              return a;
            }()},
           {"prompt_file", o.calib.prompt_file},
           {"prompt_fraction", o.calib.prompt_file.empty() ? 0.0 : o.calib.prompt_fraction},
           {"prompt_chat", o.calib.prompt_chat},
           {"seed", o.calib.seed},
           {"tokens", report->calibration_tokens}}
          .dump();
  prov.quantize_options_json =
      json{{"method", p.method},        {"group_size", o.group_size},
           {"symmetric", o.symmetric},  {"ec", p.ec},
           {"ec_budget_pct", o.ec_budget_pct}, {"gate", o.gate},
           {"placement_breadth", o.placement_breadth}, {"min_ec_rank", o.min_ec_rank},
           {"max_ec_rank", o.max_ec_rank}, {"ec_launch_budget", o.ec_launch_budget},
           {"ec_factors", o.ec_factors == kernels::EcFactors::kI8 ? "i8" : "f16"},
           {"ec_latency_table",
            o.ec_latency.rows.empty()
                ? json(nullptr)
                : json{{"file", std::filesystem::path(o.ec_latency.source).filename().string()},
                       {"comments", o.ec_latency.comments},
                       {"rows", o.ec_latency.rows.size()}}},
           {"ec_placement", o.given_placement_source.empty() ? json(nullptr)
                                                              : json(o.given_placement_source)},
           {"diagnostic_tokens", o.diagnostic_tokens},
           {"diagnostic_sequences", o.diagnostic_sequences},
           {"sequential_max_tokens", o.sequential_max_tokens},
           {"sequential_holdout_max_tokens", o.sequential_holdout_max_tokens},
           {"holdout_max_tokens", o.holdout_max_tokens},
           {"time_budget_seconds", o.time_budget_seconds},
           {"ec_training", o.e2e ? json{{"kind", "end-to-end KL distillation"},
                                        {"max_steps", o.distill.steps},
                                        {"batch_sequences", o.distill.batch_sequences},
                                        {"lr", o.distill.lr},
                                        {"lr_min_ratio", o.distill.lr_min_ratio},
                                        {"gate_lr_scale", o.distill.gate_lr_scale},
                                        {"hidden_mse_weight", o.distill.hidden_mse_weight},
                                        {"layer_mse_weight", o.distill.layer_mse_weight},
                                        {"kl_temperature", o.distill.kl_temperature},
                                        {"ema_decay", o.distill.ema_decay},
                                        {"gemm", quantize::DistillGemmName(o.distill.gemm)},
                                        {"eval_every", o.distill.eval_every},
                                        {"eval_every_early", o.distill.eval_every_early},
                                        {"patience", o.distill.patience},
                                        {"patience_from", o.distill.patience_from}}
                                 : json{{"kind", "per module"},
                                        {"train_steps", o.train_steps},
                                        {"learning_rate", o.learning_rate}}}}
          .dump();
  prov.diagnostic_json = ReportJson(*report).dump();
  if (absl::Status s = model::SaveSpearModel(**m, prov, out, f.Bool("force")); !s.ok()) {
    return Fail("quantize", s);
  }
  std::printf("saved %s\n", out.c_str());
  return 0;
}

}  // namespace spear::cli
