// Device sampling against host sampling, side by side in one run (issue 5,
// build item 2; docs/results/gpu.md, "Sampling on the device"). For each
// vocabulary (49152 = SmolLM2, 128256 = Llama-3) and batch of logits rows
// already on the GPU (fp32, N(0, 3) logits), per step:
//   device: kernels::cuda::SampleRows (1024 threads per row) + the ids to
//           the host (what CudaBackend::ForwardSample does after the step);
//   host:   the logits rows to a pageable host vector (what
//           CudaModelRunner::Forward does for ForwardOutput) + Sampler::Sample
//           per row on one thread (the engine spreads rows over its pool:
//           divide that column by the pool's threads for a lower bound).
// Settings: greedy; T = 0.8 with top-p 0.9; T = 0.8 with top-k 50 and a
// repetition penalty of 1.1 over 512 history tokens. Median of 20 steps
// after 3 warm-ups, wall clock around a stream sync.
// usage: spear_bench_sampling_cuda [--batches=1,8,32] [--iters=20]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/cuda_ops.h"
#include "worker/engine/sampler.h"

namespace {

namespace kc = spear::kernels::cuda;
using spear::engine::Sampler;
using spear::engine::SamplingParams;

#define CK(x)                                                                  \
  do {                                                                         \
    const cudaError_t e_ = (x);                                                \
    if (e_ != cudaSuccess) {                                                   \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));            \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

double NowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int Main(int argc, char** argv) {
  std::vector<int64_t> batches = {1, 8, 32};
  int iters = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--batches=", 0) == 0) {
      batches.clear();
      for (absl::string_view s : absl::StrSplit(a.substr(10), ',')) {
        int64_t v = 0;
        if (!absl::SimpleAtoi(s, &v) || v < 1 || v > 4096) {
          std::fprintf(stderr, "bad --batches value '%s'\n", std::string(s).c_str());
          return 2;
        }
        batches.push_back(v);
      }
    } else if (a.rfind("--iters=", 0) == 0) {
      if (!absl::SimpleAtoi(a.substr(8), &iters) || iters < 1) {
        std::fprintf(stderr, "bad --iters\n");
        return 2;
      }
    } else {
      std::fprintf(stderr, "usage: spear_bench_sampling_cuda [--batches=1,8,32] [--iters=20]\n");
      return 2;
    }
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  std::printf("| vocab | batch | setting | device us | host us (D2H + Sampler, 1 thread) | host / device |\n");
  std::printf("|---|---|---|---|---|---|\n");
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (int64_t vocab : {int64_t{49152}, int64_t{128256}}) {
    const int64_t maxb = *std::max_element(batches.begin(), batches.end());
    std::vector<float> logits(static_cast<size_t>(maxb * vocab));
    for (auto& v : logits) v = nd(rng);
    std::vector<int32_t> hist(512);
    for (auto& t : hist) t = static_cast<int32_t>(rng() % vocab);
    float *dl = nullptr, *dorig = nullptr, *dhv = nullptr;
    int32_t *dc = nullptr, *dout = nullptr, *dh = nullptr;
    kc::SampleRowParams* dp = nullptr;
    CK(cudaMalloc(&dl, logits.size() * 4));
    CK(cudaMalloc(&dorig, logits.size() * 4));
    CK(cudaMalloc(&dc, logits.size() * 16));
    CK(cudaMalloc(&dout, maxb * 4));
    CK(cudaMalloc(&dp, maxb * sizeof(kc::SampleRowParams)));
    CK(cudaMalloc(&dh, maxb * hist.size() * 4));
    CK(cudaMalloc(&dhv, maxb * hist.size() * 4));
    CK(cudaMemcpy(dorig, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
    for (int64_t b = 0; b < maxb; ++b) {
      CK(cudaMemcpy(dh + b * hist.size(), hist.data(), hist.size() * 4, cudaMemcpyHostToDevice));
    }
    int32_t* host_ids = nullptr;
    CK(cudaHostAlloc(reinterpret_cast<void**>(&host_ids), maxb * 4, cudaHostAllocDefault));
    std::vector<float> host_logits(logits.size());
    for (int setting = 0; setting < 3; ++setting) {
      SamplingParams sp;
      if (setting >= 1) sp.temperature = 0.8f;
      if (setting == 1) sp.top_p = 0.9f;
      if (setting == 2) {
        sp.top_k = 50;
        sp.repetition_penalty = 1.1f;
      }
      const char* name = setting == 0   ? "greedy"
                         : setting == 1 ? "T 0.8, top-p 0.9"
                                        : "T 0.8, top-k 50, penalty 1.1 (512 history)";
      for (int64_t B : batches) {
        std::vector<kc::SampleRowParams> ps(B);
        for (int64_t b = 0; b < B; ++b) {
          ps[b].temperature = sp.temperature;
          ps[b].top_k = sp.top_k;
          ps[b].top_p = sp.top_p;
          ps[b].repetition_penalty = sp.repetition_penalty;
          ps[b].uniform = 0.37 + 0.01 * static_cast<double>(b % 50);
          ps[b].hist_begin = b * static_cast<int64_t>(hist.size());
          ps[b].hist_len = sp.repetition_penalty != 1.f ? static_cast<int64_t>(hist.size()) : 0;
        }
        CK(cudaMemcpy(dp, ps.data(), B * sizeof(kc::SampleRowParams), cudaMemcpyHostToDevice));
        kc::SampleRowsArgs a;
        a.logits = dl;
        a.m = B;
        a.n = vocab;
        a.ld = vocab;
        a.params = dp;
        a.hist = dh;
        a.hist_vals = dhv;
        a.cand = dc;
        a.out = dout;
        // the penalty edits the logits: each step starts from a fresh copy,
        // done before the timer (both columns read the same rows)
        auto fresh = [&] {
          CK(cudaMemcpyAsync(dl, dorig, B * vocab * 4, cudaMemcpyDeviceToDevice, stream));
          CK(cudaStreamSynchronize(stream));
        };
        std::vector<double> td, th;
        for (int i = 0; i < iters + 3; ++i) {
          fresh();
          double t0 = NowUs();
          if (!kc::SampleRows(a, stream).ok()) return 1;
          CK(cudaMemcpyAsync(host_ids, dout, B * 4, cudaMemcpyDeviceToHost, stream));
          CK(cudaStreamSynchronize(stream));
          if (i >= 3) td.push_back(NowUs() - t0);
          fresh();
          t0 = NowUs();
          CK(cudaMemcpyAsync(host_logits.data(), dl, B * vocab * 4, cudaMemcpyDeviceToHost,
                             stream));
          CK(cudaStreamSynchronize(stream));
          int64_t sink = 0;
          for (int64_t b = 0; b < B; ++b) {
            Sampler s(sp);
            sink += s.Sample(host_logits.data() + b * vocab, vocab, hist);
          }
          if (i >= 3) th.push_back(NowUs() - t0);
          if (sink < 0) std::printf("#");
        }
        std::sort(td.begin(), td.end());
        std::sort(th.begin(), th.end());
        const double d = td[td.size() / 2], h = th[th.size() / 2];
        std::printf("| %lld | %lld | %s | %.1f | %.1f | %.1fx |\n", static_cast<long long>(vocab),
                    static_cast<long long>(B), name, d, h, h / d);
        std::fflush(stdout);
      }
    }
    cudaFree(dl);
    cudaFree(dorig);
    cudaFree(dc);
    cudaFree(dout);
    cudaFree(dp);
    cudaFree(dh);
    cudaFree(dhv);
    cudaFreeHost(host_ids);
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
