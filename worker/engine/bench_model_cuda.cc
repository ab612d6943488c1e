// spear_bench_model_cuda: a real model (.spear W4(+EC), e.g. SmolLM2-135M
// from `spear quantize`) through CudaModelRunner on one GPU, one table:
//   - decode tokens/s at each --batches size: B sequences prefilled to
//     ctx - steps - 3 tokens, then steps + 3 greedy decode steps (argmax on
//     the device, only the B next ids come back); the first steps capture
//     the CUDA graph, the last `steps` are timed (each a replay); context
//     grows to ~ctx;
//   - prefill tokens/s of one --prefill-token sequence (one Forward,
//     logits of the last row to the host), median of 5 after a warm-up;
//   - with --ec-off-rows (a model with ECs): each decode batch again with
//     every EC switched off (W4Linear::set_ec_enabled(false): the same
//     weights, the backbone alone), so the row pair is the EC's cost at the
//     checkpoint's own diagnostic placement, measured side by side;
//   - --no-tune: the decode kernel's configurations from its cost model
//     and the prefill GEMMs on dequantize + cuBLAS (CudaRunnerOptions::
//     tune_decode and tune_prefill_max_m off) instead of measured at load
//     (the prefill kernels for up to --prefill rows).
// Times are host wall-clock per Forward (input copy, graph launch or eager
// launches, result copy, the one synchronisation): what the engine sees.
//
// usage: spear_bench_model_cuda --model=PATH.spear [--batches=1,8,32]
//                               [--ctx=256] [--steps=32] [--prefill=512] [--ec-off-rows]
//                               [--no-tune]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "worker/engine/cuda_model_runner.h"
#include "worker/model/w4_linear.h"
#include "worker/model/weights.h"

namespace spear::engine {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double NowMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::vector<int> SplitInts(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ',')) out.push_back(std::stoi(t));
  return out;
}

int Main(int argc, char** argv) {
  std::string path;
  std::vector<int> batches = {1, 8, 32};
  int ctx = 256, steps = 32, prefill = 512;
  bool ec_off_rows = false, no_tune = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--model=", 0) == 0) {
      path = a.substr(8);
    } else if (a.rfind("--batches=", 0) == 0) {
      batches = SplitInts(a.substr(10));
    } else if (a.rfind("--ctx=", 0) == 0) {
      ctx = std::stoi(a.substr(6));
    } else if (a.rfind("--steps=", 0) == 0) {
      steps = std::stoi(a.substr(8));
    } else if (a.rfind("--prefill=", 0) == 0) {
      prefill = std::stoi(a.substr(10));
    } else if (a == "--ec-off-rows") {
      ec_off_rows = true;
    } else if (a == "--no-tune") {
      no_tune = true;
    } else {
      std::fprintf(stderr,
                   "unknown flag %s\nusage: %s --model=PATH.spear [--batches=1,8,32] [--ctx=256] "
                   "[--steps=32] [--prefill=512] [--ec-off-rows] [--no-tune]\n",
                   a.c_str(), argv[0]);
      return 2;
    }
  }
  if (path.empty() || batches.empty() || steps < 1 || ctx < steps + 8 || prefill < 1) {
    std::fprintf(stderr, "bad flags (--model is required; ctx >= steps + 8)\n");
    return 2;
  }
  auto lm = model::LoadModel(path);
  if (!lm.ok()) {
    std::fprintf(stderr, "load %s: %s\n", path.c_str(), std::string(lm.status().message()).c_str());
    return 1;
  }
  const model::LoadedModel& m = **lm;
  // The modules with an EC (switched off and on again for --ec-off-rows).
  std::vector<model::W4Linear*> with_ec;
  (*lm)->weights.ForEachLinear([&](const std::string&, std::unique_ptr<model::Linear>& l) {
    auto* w = dynamic_cast<model::W4Linear*>(l.get());
    if (w != nullptr && w->has_ec()) with_ec.push_back(w);
  });
  if (ec_off_rows && with_ec.empty()) {
    std::fprintf(stderr, "--ec-off-rows: %s has no EC\n", path.c_str());
    return 2;
  }
  const int max_b = *std::max_element(batches.begin(), batches.end());
  const int64_t per_seq = (std::max(ctx, prefill) + 16 + 15) / 16;
  CudaRunnerOptions o;
  o.num_blocks = per_seq * max_b;
  o.max_graph_batch = std::max(64, max_b);
  o.tune_decode = !no_tune;
  o.tune_prefill_max_m = no_tune || prefill < 64 ? 0 : std::min<int64_t>(prefill, 65536);
  const double t_load = NowMs();
  auto r = CudaModelRunner::Create(&m, o);
  if (!r.ok()) {
    std::fprintf(stderr, "%s\n", std::string(r.status().message()).c_str());
    return 1;
  }
  CudaModelRunner& run = **r;
  std::printf(
      "# model %s: %lld layers, hidden %lld, vocab %lld; device weights %.1f MB, %lld W4 "
      "launches per forward, %zu modules with an EC; upload%s %.0f ms\n",
      path.c_str(), static_cast<long long>(m.config.num_layers),
      static_cast<long long>(m.config.hidden_size), static_cast<long long>(m.config.vocab_size),
      run.weights().bytes() / 1e6, static_cast<long long>(run.weights().num_pieces()),
      with_ec.size(), no_tune ? "" : " + decode and prefill tuning", NowMs() - t_load);
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(m.config.vocab_size - 1));
  std::vector<std::vector<int32_t>> tables(max_b), toks(max_b);
  for (int s = 0; s < max_b; ++s) {
    for (int64_t j = 0; j < per_seq; ++j)
      tables[s].push_back(static_cast<int32_t>(s * per_seq + j));
  }
  std::printf(
      "\n| phase | batch | context | ms / forward (median) | tokens/s |\n|---|---|---|---|---|\n");
  // Prefill.
  {
    toks[0].resize(prefill);
    for (auto& t : toks[0]) t = tok(rng);
    SeqChunk c;
    c.tokens = toks[0];
    c.block_table = tables[0];
    ForwardOutput out;
    std::vector<double> ms;
    for (int i = 0; i < 6; ++i) {
      const double t0 = NowMs();
      if (absl::Status s = run.Forward({c}, &out); !s.ok()) {
        std::fprintf(stderr, "prefill: %s\n", std::string(s.message()).c_str());
        return 1;
      }
      if (i > 0) ms.push_back(NowMs() - t0);
    }
    const double med = Median(ms);
    std::printf("| prefill (logits of the last row to the host) | 1 | %d | %.3f | %.0f |\n",
                prefill, med, prefill / (med * 1e-3));
    std::fflush(stdout);
  }
  // Decode (ECs as loaded; with --ec-off-rows then again with them off).
  for (int pass = 0; pass < (ec_off_rows ? 2 : 1); ++pass) {
    for (model::W4Linear* w : with_ec) w->set_ec_enabled(pass == 0);
    const char* ec_note = with_ec.empty() ? "" : pass == 0 ? ", ECs on" : ", ECs off";
    for (int b : batches) {
      const int start = ctx - steps - 3;
      std::vector<SeqChunk> batch(b);
      for (int s = 0; s < b; ++s) {
        toks[s].assign(start, 0);
        for (auto& t : toks[s]) t = tok(rng);
        toks[s].reserve(ctx + 1);
        batch[s].tokens = toks[s];
        batch[s].block_table = tables[s];
        batch[s].start_pos = 0;
      }
      std::vector<int32_t> next;
      if (absl::Status s = run.Forward(batch, nullptr, &next); !s.ok()) {
        std::fprintf(stderr, "prefill of batch %d: %s\n", b, std::string(s.message()).c_str());
        return 1;
      }
      std::vector<double> ms;
      const int64_t replays0 = run.graph_replays();
      for (int i = 0; i < steps + 3; ++i) {
        for (int s = 0; s < b; ++s) {
          toks[s].push_back(next[s]);
          batch[s].start_pos = static_cast<int64_t>(toks[s].size()) - 1;
          batch[s].tokens = std::span<const int32_t>(toks[s].data() + batch[s].start_pos, 1);
        }
        const double t0 = NowMs();
        if (absl::Status s = run.Forward(batch, nullptr, &next); !s.ok()) {
          std::fprintf(stderr, "decode batch %d: %s\n", b, std::string(s.message()).c_str());
          return 1;
        }
        if (i >= 3) ms.push_back(NowMs() - t0);
      }
      const double med = Median(ms);
      std::printf("| decode (graph replay, argmax on device%s) | %d | %d..%d | %.3f | %.0f |\n",
                  ec_note, b, start + 1, start + steps + 3, med, b / (med * 1e-3));
      std::printf("# batch %d: %lld graph replays in %d steps; next id of seq 0 = %d\n", b,
                  static_cast<long long>(run.graph_replays() - replays0), steps + 3, next[0]);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace
}  // namespace spear::engine

int main(int argc, char** argv) { return spear::engine::Main(argc, argv); }
