// spear bench: prefill/decode speed of a model on the CPU (or, with
// --device cuda, on the GPU through the engine), side by side with the
// host memory bandwidth measured in the same run.
//
// Decode reads every weight once per step, so weight bytes x steps/s is the
// bandwidth the decode step achieves; on the CPU its ratio to the copy
// bandwidth says how close decode is to the memory-bound floor (on the GPU
// the host copy bandwidth is no floor: those fields are null / not printed).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/model_session.h"
#include "kernels/thread_pool.h"
#include "nlohmann/json.hpp"

namespace spear::cli {
namespace {

// Copy bandwidth in bytes/s (bytes read + bytes written) with `threads`
// threads over `bytes`-sized buffers (best of several runs).
double CopyBandwidth(int threads, size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  kernels::ThreadPool pool(threads);
  double best = 0;
  for (int rep = 0; rep < 6; ++rep) {
    const double t0 = NowSeconds();
    pool.ParallelFor(static_cast<int64_t>(bytes >> 20), 1, [&](int64_t lo, int64_t hi) {
      std::memcpy(b.data() + (lo << 20), a.data() + (lo << 20), static_cast<size_t>(hi - lo) << 20);
    });
    const double dt = NowSeconds() - t0;
    if (rep > 0) best = std::max(best, 2.0 * bytes / dt);
  }
  if (b[bytes / 2] != 1) std::fprintf(stderr, "copy check failed\n");
  return best;
}

int64_t DecodeWeightBytes(const model::LoadedModel& m) {
  int64_t total = m.weights.lm_head ? m.weights.lm_head->weight_bytes() : 0;
  for (const auto& l : m.weights.layers) {
    for (const auto* lin : {&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj,
                            &l.down_proj}) {
      if (*lin) total += (*lin)->weight_bytes();
    }
  }
  return total;
}

}  // namespace

int CmdBench(const std::vector<std::string>& args) {
  Flags f("bench");
  f.Declare("model", "smollm2-135m", "model path or cache name")
      .Declare("prompt-tokens", "128", "prompt length for the prefill measurement")
      .Declare("gen-tokens", "64", "decode steps measured")
      .Declare("batch", "8", "second decode measurement with this many sequences")
      .Declare("threads", "0", "CPU threads, 0 = all")
      .Declare("device", "cpu", "cpu | cuda | auto (cuda when built with CUDA and a GPU is present)")
      .DeclareBool("json", "print one JSON object")
      .DeclareBool("help", "show flags");
  if (absl::Status s = f.Parse(args); !s.ok()) return Fail("bench", s, true);
  if (f.Bool("help")) return std::printf("%s", f.Usage().c_str()), 0;
  auto prompt_tokens = f.Int("prompt-tokens", 1, 1 << 16);
  auto gen_tokens = f.Int("gen-tokens", 2, 1 << 16);
  auto batch = f.Int("batch", 1, 256);
  auto threads = f.Int("threads", 0, 1024);
  auto device = DeviceFlag(f.Str("device"));
  for (const absl::Status& s : {prompt_tokens.status(), gen_tokens.status(), batch.status(),
                                threads.status(), device.status()}) {
    if (!s.ok()) return Fail("bench", s, true);
  }
  const int64_t kv_tokens =
      std::max(*prompt_tokens + *gen_tokens + 1, *batch * (16 + *gen_tokens + 1));
  auto session = OpenModel(f.Str("model"), static_cast<int>(*threads), kv_tokens, *device,
                           f.Bool("json"));
  if (!session.ok()) return Fail("bench", session.status());
  engine::Engine& eng = *session->engine;
  const model::LoadedModel& m = *session->model;
  const int pool_threads = eng.num_threads();
  const bool on_cpu = eng.backend().device() == engine::Device::kCpu;

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> dist(100, static_cast<int32_t>(m.config.vocab_size) - 1);
  auto random_prompt = [&](int64_t n) {
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& t : p) t = dist(rng);
    return p;
  };
  engine::SamplingParams greedy;
  engine::GenerateOptions go;
  go.stop_on_eos = false;

  // Warm-up, then prefill: time to the first token of a prompt.
  go.max_new_tokens = 2;
  if (auto r = eng.Generate(random_prompt(16), greedy, go); !r.ok()) return Fail("bench", r.status());
  go.max_new_tokens = *gen_tokens + 1;
  double t_first = 0, t_last = 0;
  const double t0 = NowSeconds();
  int64_t n = 0;
  auto r = eng.Generate(random_prompt(*prompt_tokens), greedy, go, [&](int32_t) {
    (n++ == 0 ? t_first : t_last) = NowSeconds();
    return true;
  });
  if (!r.ok()) return Fail("bench", r.status());
  const double prefill_s = t_first - t0;
  const double decode_tps = (n - 1) / std::max(1e-9, t_last - t_first);

  // Batched decode: `batch` sequences with short prompts.
  std::vector<engine::GenerateRequest> reqs(static_cast<size_t>(*batch));
  for (auto& q : reqs) {
    q.prompt = random_prompt(16);
    q.options = go;
  }
  const double tb0 = NowSeconds();
  auto results = eng.GenerateBatch(reqs);
  const double tb = NowSeconds() - tb0;
  int64_t batch_tokens = 0;
  for (const auto& res : results) {
    if (!res.status.ok()) return Fail("bench", res.status);
    batch_tokens += static_cast<int64_t>(res.tokens.size());
  }

  const double copy_bw = on_cpu ? CopyBandwidth(pool_threads, size_t{256} << 20) : 0;
  const int64_t wbytes = DecodeWeightBytes(m);
  const double decode_bw = wbytes * decode_tps;
  nlohmann::json j = {{"model", f.Str("model")},
                      {"device", eng.backend().name()},
                      {"threads", pool_threads},
                      {"prompt_tokens", *prompt_tokens},
                      {"prefill_seconds", prefill_s},
                      {"prefill_tokens_per_second", *prompt_tokens / std::max(1e-9, prefill_s)},
                      {"decode_tokens_per_second", decode_tps},
                      {"decode_ms_per_token", 1e3 / std::max(1e-9, decode_tps)},
                      {"batch", *batch},
                      {"batch_tokens_per_second", batch_tokens / std::max(1e-9, tb)},
                      {"decode_weight_bytes", wbytes},
                      {"decode_weight_bandwidth_gbps", decode_bw / 1e9},
                      {"copy_bandwidth_gbps", on_cpu ? nlohmann::json(copy_bw / 1e9) : nullptr},
                      {"decode_bandwidth_over_copy",
                       on_cpu ? nlohmann::json(decode_bw / copy_bw) : nullptr}};
  if (f.Bool("json")) {
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model %s, %s\n", f.Str("model").c_str(), eng.backend().Describe().c_str());
  std::printf("  prefill   %5lld tokens  %8.1f tok/s\n", static_cast<long long>(*prompt_tokens),
              *prompt_tokens / std::max(1e-9, prefill_s));
  std::printf("  decode    batch 1        %8.2f tok/s  (%.1f ms/token)\n", decode_tps,
              1e3 / std::max(1e-9, decode_tps));
  std::printf("  decode    batch %-3lld      %8.2f tok/s  (with 16-token prefills)\n",
              static_cast<long long>(*batch), batch_tokens / std::max(1e-9, tb));
  std::printf("  weights read per decode step  %.1f MiB\n", wbytes / 1048576.0);
  std::printf("  decode weight bandwidth       %.2f GB/s\n", decode_bw / 1e9);
  if (on_cpu) {
    std::printf("  copy bandwidth (same run)     %.2f GB/s  (read+write)\n", copy_bw / 1e9);
    std::printf("  ratio decode / copy           %.2f\n", decode_bw / copy_bw);
  }
  return 0;
}

}  // namespace spear::cli
