// spear_quantize_probe: quantize a model with QuantizeModel and measure
// WikiText-2 perplexity before/after (the record run of the pipeline until
// `spear quantize` + `spear eval` cover it).
//
//   spear_quantize_probe MODEL WIKI_RAW [--backbone rtn|awq|gptq] [--ec none|static|spear]
//       [--budget PCT] [--group G] [--seqs N] [--seq-len L] [--diag-tokens D]
//       [--steps S] [--static-placed] [--no-gate] [--ppl-tokens N] [--ctx C]
//       [--threads T] [--skip-fp16] [--text FILE] [--no-e2e] [--e2e-steps S]
//       [--e2e-lr LR] [--e2e-batch B] [--e2e-max-seconds S] [--e2e-mse W]
//       [--e2e-eval-every N] [--e2e-patience N] [--e2e-gate-lr-scale F] [--breadth F] [--seq-tokens
//       N]
//       [--text2 FILE] [--dump-gates CSV] [--dump-tokens N] [--time-budget S]
//       [--spear CKPT]
// --text2: perplexity also on a second text (same ctx and token count).
// --spear: no quantization; the quantized model is this .spear checkpoint of
// MODEL (perplexities and --dump-gates on it, MODEL the FP16 teacher).
// --dump-gates: per-token KL(FP16 || model) with and without the ECs and the
// gate values (mean and per EC) on the first --dump-tokens (1024) WikiText
// tokens, in windows of ctx, as CSV.
// Prints the FP16 perplexity (unless --skip-fp16), the report (per-module
// rows for modules with an EC), the quantized perplexity and wall times.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <span>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/engine/perplexity.h"
#include "worker/quantize/pipeline/distill.h"
#include "worker/quantize/pipeline/layerwise.h"
#include "worker/quantize/pipeline/quantize_model.h"

using namespace spear;

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

absl::StatusOr<double> Ppl(const model::LoadedModel& m, kernels::ThreadPool* pool,
                           const std::vector<int32_t>& toks, int ctx, int64_t max_tokens) {
  engine::KvCacheOptions ko;
  ko.num_blocks = (ctx + 15) / 16;
  auto cache = engine::KvCache::Create(m.config, ko);
  if (!cache.ok()) return cache.status();
  engine::ModelRunner runner(&m, cache->get(), pool);
  auto r = engine::EvalPerplexity(runner, toks, ctx, max_tokens);
  if (!r.ok()) return r.status();
  return r->ppl;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL WIKI_RAW [options] (see probe.cc)\n", argv[0]);
    return 2;
  }
  const std::string model_path = argv[1], wiki = argv[2];
  quantize::QuantizeOptions o;
  int64_t ppl_tokens = 16384;
  int ctx = 512, threads = 2;
  bool skip_fp16 = false;
  std::string text2, dump_path, spear_path;
  int64_t dump_tokens = 1024;
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--backbone") {
      const std::string v = next();
      o.backbone = v == "awq"    ? quantize::Backbone::kAwq
                   : v == "gptq" ? quantize::Backbone::kGptq
                                 : quantize::Backbone::kRtn;
    } else if (a == "--ec") {
      const std::string v = next();
      o.ec = v == "none"     ? quantize::EcMode::kNone
             : v == "static" ? quantize::EcMode::kStatic
                             : quantize::EcMode::kSpear;
    } else if (a == "--budget") {
      o.ec_budget_pct = std::atof(next().c_str());
    } else if (a == "--group") {
      o.group_size = std::atoll(next().c_str());
    } else if (a == "--seqs") {
      o.calib.num_sequences = std::atoll(next().c_str());
    } else if (a == "--seq-len") {
      o.calib.seq_len = std::atoll(next().c_str());
    } else if (a == "--diag-tokens") {
      o.diagnostic_tokens = std::atoll(next().c_str());
    } else if (a == "--steps") {
      o.train_steps = std::atoll(next().c_str());
    } else if (a == "--static-placed") {
      o.place_static_like_spear = true;
    } else if (a == "--no-gate") {
      o.gate = false;
    } else if (a == "--ppl-tokens") {
      ppl_tokens = std::atoll(next().c_str());
    } else if (a == "--ctx") {
      ctx = std::atoi(next().c_str());
    } else if (a == "--threads") {
      threads = std::atoi(next().c_str());
    } else if (a == "--skip-fp16") {
      skip_fp16 = true;
    } else if (a == "--text2") {
      text2 = next();
    } else if (a == "--dump-gates") {
      dump_path = next();
    } else if (a == "--dump-tokens") {
      dump_tokens = std::atoll(next().c_str());
    } else if (a == "--time-budget") {
      o.time_budget_seconds = std::atof(next().c_str());
    } else if (a == "--seq-tokens") {
      o.sequential_max_tokens = std::atoll(next().c_str());
    } else if (a == "--breadth") {
      o.placement_breadth = std::atof(next().c_str());
    } else if (a == "--no-e2e") {
      o.e2e = false;
    } else if (a == "--e2e-steps") {
      o.distill.steps = std::atoll(next().c_str());
    } else if (a == "--e2e-lr") {
      o.distill.lr = std::atof(next().c_str());
    } else if (a == "--e2e-batch") {
      o.distill.batch_sequences = std::atoll(next().c_str());
    } else if (a == "--e2e-max-seconds") {
      o.distill.max_seconds = std::atof(next().c_str());
    } else if (a == "--e2e-gate-lr-scale") {
      o.distill.gate_lr_scale = std::atof(next().c_str());
    } else if (a == "--e2e-mse") {
      o.distill.hidden_mse_weight = std::atof(next().c_str());
    } else if (a == "--e2e-eval-every") {
      o.distill.eval_every = std::atoll(next().c_str());
    } else if (a == "--e2e-patience") {
      o.distill.patience = std::atoll(next().c_str());
    } else if (a == "--text") {
      o.calib.text_file = next();
    } else if (a == "--spear") {
      spear_path = next();
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }

  double t = Now();
  auto model = model::LoadModel(model_path);
  if (!model.ok()) {
    std::fprintf(stderr, "load: %s\n", model.status().ToString().c_str());
    return 1;
  }
  std::printf("loaded %s in %.1f s\n", model_path.c_str(), Now() - t);
  std::ifstream f(wiki);
  if (!f || (*model)->tokenizer == nullptr) {
    std::fprintf(stderr, "cannot read %s or the model has no tokenizer\n", wiki.c_str());
    return 1;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  const std::vector<int32_t> toks = (*model)->tokenizer->Encode(ss.str(), /*add_bos=*/false);
  std::vector<int32_t> toks2;
  if (!text2.empty()) {
    std::ifstream f2(text2);
    if (!f2) {
      std::fprintf(stderr, "cannot read %s\n", text2.c_str());
      return 1;
    }
    std::stringstream ss2;
    ss2 << f2.rdbuf();
    toks2 = (*model)->tokenizer->Encode(ss2.str(), /*add_bos=*/false);
    std::printf("text2 %s: %zu tokens\n", text2.c_str(), toks2.size());
  }
  kernels::ThreadPool pool(threads);
  // Windows for the gate dump and their FP16 teacher (final-normed hidden).
  std::vector<std::vector<int32_t>> dump_seqs;
  std::vector<float> dump_teacher;
  if (!dump_path.empty()) {
    for (int64_t s0 = 0; s0 + ctx <= static_cast<int64_t>(toks.size()) && s0 < dump_tokens;
         s0 += ctx) {
      dump_seqs.emplace_back(toks.begin() + s0, toks.begin() + s0 + ctx);
    }
    auto run = quantize::LayerwiseRunner::Create(model->get(), &pool, dump_seqs);
    if (!run.ok()) {
      std::fprintf(stderr, "dump: %s\n", run.status().ToString().c_str());
      return 1;
    }
    dump_teacher.resize((*run)->num_tokens() * (*model)->config.hidden_size);
    if (!(*run)->Embed(dump_teacher.data()).ok() ||
        !(*run)->RunLayers(0, (*model)->config.num_layers, dump_teacher.data()).ok() ||
        !(*run)->FinalNorm(dump_teacher.data(), dump_teacher.data()).ok()) {
      std::fprintf(stderr, "dump: FP16 teacher failed\n");
      return 1;
    }
  }

  if (!skip_fp16) {
    t = Now();
    auto p = Ppl(**model, &pool, toks, ctx, ppl_tokens);
    if (!p.ok()) {
      std::fprintf(stderr, "ppl: %s\n", p.status().ToString().c_str());
      return 1;
    }
    std::printf("fp16 ppl %.4f  (ctx %d, %lld tokens, %.1f s)\n", *p, ctx,
                static_cast<long long>(ppl_tokens), Now() - t);
    std::fflush(stdout);
    if (!toks2.empty()) {
      t = Now();
      auto p2 = Ppl(**model, &pool, toks2, ctx, ppl_tokens);
      if (!p2.ok()) {
        std::fprintf(stderr, "ppl: %s\n", p2.status().ToString().c_str());
        return 1;
      }
      std::printf("fp16 ppl text2 %.4f  (%.1f s)\n", *p2, Now() - t);
      std::fflush(stdout);
    }
  }

  std::unique_ptr<model::LoadedModel> ckpt;
  if (!spear_path.empty()) {
    auto c = model::LoadModel(spear_path);
    if (!c.ok()) {
      std::fprintf(stderr, "load %s: %s\n", spear_path.c_str(), c.status().ToString().c_str());
      return 1;
    }
    if ((*c)->config.num_layers != (*model)->config.num_layers ||
        (*c)->config.hidden_size != (*model)->config.hidden_size) {
      std::fprintf(stderr, "%s is not a checkpoint of %s's architecture\n", spear_path.c_str(),
                   model_path.c_str());
      return 1;
    }
    ckpt = std::move(*c);
    std::printf("quantized model: %s\n", spear_path.c_str());
  }
  model::LoadedModel* qmodel = ckpt ? ckpt.get() : model->get();
  t = Now();
  double last = 0;
  if (!ckpt) {
    auto rep = quantize::QuantizeModel(
        model->get(), o, &pool, [&](const std::string& stage, int64_t d, int64_t n) {
          if (Now() - last > 20 || d == n) {
            std::printf("  [%7.1f s] %s %lld/%lld\n", Now() - t, stage.c_str(),
                        static_cast<long long>(d), static_cast<long long>(n));
            std::fflush(stdout);
            last = Now();
          }
        });
    if (!rep.ok()) {
      std::fprintf(stderr, "quantize: %s\n", rep.status().ToString().c_str());
      return 1;
    }
    std::printf(
        "quantized in %.1f s; calib tokens %lld; w4 model %lld bytes; ec %lld bytes "
        "(%.3f%%); damage entropy %.3f (normalized %.3f, N_eff %.1f)\n",
        rep->seconds, static_cast<long long>(rep->calibration_tokens),
        static_cast<long long>(rep->w4_model_bytes), static_cast<long long>(rep->ec_bytes),
        rep->ec_pct(), rep->damage_entropy, rep->normalized_entropy, rep->effective_modules);
    std::printf(
        "stage seconds: calibration %.1f  diagnostic %.1f  teacher %.1f  sequential %.1f  "
        "distill %.1f  (total %.1f)\n",
        rep->calibration_seconds, rep->diagnostic_seconds, rep->teacher_seconds,
        rep->sequential_seconds, rep->distill_seconds, rep->seconds);
    if (rep->distilled) {
      const auto& d = rep->distill;
      std::printf(
          "distill: %lld ECs, %lld params, fit %lld / held-out %lld tokens; held-out KL "
          "%.5f -> %.5f (best step %lld of %lld, %.2f s/step%s%s)\n",
          static_cast<long long>(d.num_ecs), static_cast<long long>(d.num_params),
          static_cast<long long>(d.fit_tokens), static_cast<long long>(d.val_tokens), d.init_val_kl,
          d.final_val_kl, static_cast<long long>(d.best_step), static_cast<long long>(d.steps_run),
          d.seconds_per_step, d.stopped_early ? ", stopped early" : "",
          d.time_capped ? ", time cap" : "");
      for (auto [s, v] : d.val_history)
        std::printf("  step %4lld held-out KL %.5f\n", (long long)s, v);
    }
    double w4 = 0, st = 0, fi = 0;
    for (const auto& m : rep->modules) {
      if (m.ec_rank > 0) {
        std::printf(
            "  %-36s damage %.5f rank %3lld bytes %7lld err w4 %.4g static %.4g final %.4g\n",
            m.name.c_str(), m.damage, static_cast<long long>(m.ec_rank),
            static_cast<long long>(m.ec_bytes), m.err_w4, m.err_static, m.err_final);
        w4 += m.err_w4;
        st += m.err_static;
        fi += m.err_final;
      }
    }
    if (w4 > 0) std::printf("  EC modules: sum err w4 %.4g static %.4g final %.4g\n", w4, st, fi);
  }
  t = Now();
  auto p = Ppl(*qmodel, &pool, toks, ctx, ppl_tokens);
  if (!p.ok()) {
    std::fprintf(stderr, "ppl: %s\n", p.status().ToString().c_str());
    return 1;
  }
  std::printf("quantized ppl %.4f  (%.1f s)\n", *p, Now() - t);
  std::fflush(stdout);
  if (!toks2.empty()) {
    t = Now();
    auto p2 = Ppl(*qmodel, &pool, toks2, ctx, ppl_tokens);
    if (!p2.ok()) {
      std::fprintf(stderr, "ppl: %s\n", p2.status().ToString().c_str());
      return 1;
    }
    std::printf("quantized ppl text2 %.4f  (%.1f s)\n", *p2, Now() - t);
  }
  if (!dump_path.empty()) {
    auto dist = quantize::EcDistiller::Create(qmodel, &pool);
    if (!dist.ok()) {
      std::fprintf(stderr, "dump: %s\n", dist.status().ToString().c_str());
      return 1;
    }
    std::vector<std::span<const int32_t>> sp(dump_seqs.begin(), dump_seqs.end());
    auto diag = (*dist)->TokenDiagnostics(sp, dump_teacher.data());
    if (!diag.ok()) {
      std::fprintf(stderr, "dump: %s\n", diag.status().ToString().c_str());
      return 1;
    }
    std::ofstream out(dump_path);
    out << "window,pos,token,kl_without_ec,kl_with_ec,mean_gate";
    for (const auto& n : diag->ec_names) out << ",gate:" << n;
    out << "\n";
    const int64_t ne = static_cast<int64_t>(diag->ec_names.size());
    int64_t row = 0;
    double kw = 0, ko = 0;
    for (size_t w = 0; w < dump_seqs.size(); ++w) {
      for (size_t i = 0; i < dump_seqs[w].size(); ++i, ++row) {
        out << w << "," << i << "," << dump_seqs[w][i] << "," << diag->kl_without[row] << ","
            << diag->kl_with[row] << "," << diag->mean_gate[row];
        for (int64_t e = 0; e < ne; ++e) out << "," << diag->ec_gate[row * ne + e];
        out << "\n";
        kw += diag->kl_with[row];
        ko += diag->kl_without[row];
      }
    }
    std::printf("gate dump: %lld tokens, %lld ECs -> %s (mean KL without EC %.4f, with %.4f)\n",
                static_cast<long long>(row), static_cast<long long>(ne), dump_path.c_str(),
                ko / std::max<int64_t>(row, 1), kw / std::max<int64_t>(row, 1));
  }
  return 0;
}
