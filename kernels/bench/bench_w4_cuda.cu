// spear_bench_w4_cuda: the GPU W4 GEMM table of issue 5, all numbers from
// one run. For Llama-3-8B and Llama-3.2-1B layer shapes (qkv, o, gate_up,
// down; g128 asymmetric W4, fp16 activations and outputs) and
// M in {1,2,4,8,16,32,64,128,512,2048}:
//   W4        cuda::W4Linear without EC (decode kernel for M <= 64, decode
//             kernel per 64 rows below kPrefillM, prefill path above)
//   W4+EC     the same with a gated EC of rank 32 (gate hidden 16), fused
//   naive     W4 + EcGate + EcApply as separate launches (extra pass over y)
//   cuBLAS    FP16 weights, cublasGemmEx (fp32 accumulate)
//   torch     torch._weight_int4pack_mm g128 (bf16), read from --torch=CSV
//             written by scripts/gpu/torch_int4_bench.py in the same command
// Time: each variant is captured R times into one CUDA graph, rotating
// through weight copies whose total is >= 3x the L2, the graph replayed 7
// times; median replay / R. Bandwidth: bytes read (weights as laid out on
// the device, x) + written (y) over time, against a device-to-device copy
// (read + write) measured in this run. Plus the four GEMMs of an 8B decoder
// layer back to back in a graph at M = 1, 16 and 32 (aggregate % of copy
// bandwidth), the same layer at M = 1, 2, 4, 8 with the fold kernel's
// configurations measured by cuda::TuneDecode against the cost model's
// (v23), and a dispatch section (decode kernel vs prefill path; for
// M <= 16 the "decode-kernel" column is the v8 swapped-operand cp.async-ring
// kernel, which the fold kernel replaced at M <= 8; at M = 32 the x-as-m16
// kernel, which the fold kernel's four token tiles replaced, v43). --decode: M in
// {1, 2, 4, 8, 16} only. --sweep: the fold kernel's k splits x ring depths
// for 8-warp and 4-warp blocks, 8-warp blocks with one tile per block (no
// persistent loop), with the L2 prefetch before the dependency wait and in
// 2 / 4 / 8 warp groups (v40, each group on its own tile), on
// the 8B shapes at M in {1, 4, 8} (--ms= narrows them; W4 only). --profile: the four 8B GEMMs
// at M = the first --ms (default 1), launched directly (fold as dispatched, fold with one tile per
// block, v8, fold in 8 and in 4 warp groups; for ncu), then exit. --ec-latency=NxK[,NxK...] (with
// --ec-ranks=4,8,... --ec-ms=1,... --group=128|-1): the measured EC latency
// table that `spear quantize --ec-latency-table` reads (format:
// worker/quantize/pipeline/ec_latency.h): per module shape, rank and M, the W4 GEMM alone and
// with a gated EC (gate hidden 16), each timed as above; CSV on stdout,
// then exit. --prefill [--ms=...] [--only=MODEL/LAYER] [--prefill-splits=N] [--no-tune]
// [--steady-ms=N]:
// the prefill path's main GEMMs side by side (PrefillTable below), then exit.
// --small-tiles [--ms=...]: the wgmma kernel's 16- / 32- / 64-token tiles at
// decode-sized M (SmallTileTable below, v44), then exit.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda_ops.h"
#include "kernels/dtype.h"
#include "kernels/w4_cuda.h"
#include "bench_cuda_common.cuh"

namespace spear::kernels {
namespace {


constexpr double kL2Bytes = 60e6;
constexpr int kGroup = 128;

struct Shape {
  const char* model;
  const char* layer;
  int64_t n, k;
};
const Shape kShapes[] = {
    {"8B", "qkv", 6144, 4096},  {"8B", "o", 4096, 4096},    {"8B", "gate_up", 28672, 4096},
    {"8B", "down", 4096, 14336}, {"1B", "qkv", 3072, 2048}, {"1B", "o", 2048, 2048},
    {"1B", "gate_up", 16384, 2048}, {"1B", "down", 2048, 8192}};
const int64_t kMs[] = {1, 2, 4, 8, 16, 32, 64, 128, 512, 2048};

cudaStream_t g_stream;

// Graphs timed side by side: each body captured (reps enqueues; i = the
// rotation index), every graph replayed twice to warm up, then `rounds`
// rounds over the graphs in a rotating order; per graph, in us per
// enqueue, the median timed replay and a spread (lo, hi).
// steady_ms == 0: one replay per graph per round (v38, interleaved, as
// TunePrefill times its candidates: a drift of the GPU's clocks over the
// run falls on all alike; timed one after another, the same dequantize +
// cuBLAS path measured 725.6 and 845.1 us on 8B gate_up at M = 2048 in one
// run, v37 call 1); the spread is the lowest and highest replay.
// steady_ms > 0 (v39): each graph runs alone for steady_ms of GPU time per
// round (its own power state: the H200 sits at its power cap during these
// GEMMs, and interleaved with cuBLAS's more power-hungry graph ours ran
// ~10 % slower than alone), then 9 timed replays; the spread is the
// lowest and highest round median.
struct GraphTime {
  double med, lo, hi;
};
std::vector<GraphTime> TimeGraphs(int reps, int rounds,
                                  const std::vector<std::function<void(int)>>& bodies,
                                  double steady_ms = 0) {
  const size_t ng = bodies.size();
  std::vector<cudaGraphExec_t> ge(ng);
  for (size_t j = 0; j < ng; ++j) {
    absl::StatusOr<cudaGraphExec_t> e = cuda::CaptureGraph(g_stream, [&] {
      for (int i = 0; i < reps; ++i) bodies[j](i);
      return absl::OkStatus();
    });
    CKS(e.status());
    ge[j] = *e;
    for (int i = 0; i < 2; ++i) CK(cudaGraphLaunch(ge[j], g_stream));
  }
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  auto replay_ms = [&](size_t j) {
    CK(cudaEventRecord(a, g_stream));
    CK(cudaGraphLaunch(ge[j], g_stream));
    CK(cudaEventRecord(b, g_stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  };
  std::vector<std::vector<float>> t(ng), round_med(ng);
  for (int r = 0; r < rounds; ++r) {
    for (size_t q = 0; q < ng; ++q) {
      const size_t j = (q + static_cast<size_t>(r)) % ng;
      if (steady_ms <= 0) {
        t[j].push_back(replay_ms(j));
        continue;
      }
      for (double warm = 0; warm < steady_ms;) warm += replay_ms(j);
      std::vector<float> v;
      for (int i = 0; i < 9; ++i) v.push_back(replay_ms(j));
      t[j].insert(t[j].end(), v.begin(), v.end());
      std::sort(v.begin(), v.end());
      round_med[j].push_back(v[v.size() / 2]);
    }
  }
  CK(cudaGetLastError());
  std::vector<GraphTime> out(ng);
  for (size_t j = 0; j < ng; ++j) {
    std::vector<float>& spread = steady_ms > 0 ? round_med[j] : t[j];
    std::sort(t[j].begin(), t[j].end());
    std::sort(spread.begin(), spread.end());
    const double k = 1000.0 / reps;
    out[j] = {k * t[j][t[j].size() / 2], k * spread.front(), k * spread.back()};
    CK(cudaGraphExecDestroy(ge[j]));
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return out;
}

// Median time of one enqueue of `body(i)` (i = rotation index), in us:
// one graph, 7 timed replays.
double TimeGraph(int reps, const std::function<void(int)>& body) {
  return TimeGraphs(reps, 7, {body})[0].med;
}

// A device-to-device copy by a grid-stride kernel (a graph memcpy node runs
// on the copy engines and reads low: 2.7 TB/s in the first run).
double CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const double us = TimeGraph(4, [&](int) {
    bench::CopyKernel<<<sms * 8, 512, 0, g_stream>>>(static_cast<const uint4*>(a), static_cast<uint4*>(b),
                                               bytes / 16);
  });
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * bytes / (us * 1e-6);  // bytes/s, read + write
}



struct Weights {
  std::vector<std::unique_ptr<cuda::W4DeviceWeight>> rot;  // rotation copies (with EC)
};

std::map<std::string, double> ReadTorch(const std::string& path) {
  std::map<std::string, double> t;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    std::stringstream ss(line);
    std::string a, b, c, d;
    if (std::getline(ss, a, ',') && std::getline(ss, b, ',') && std::getline(ss, c, ',') &&
        std::getline(ss, d, ',')) {
      try {
        t[a + "/" + b + "/" + c] = std::stod(d);
      } catch (...) {
      }
    }
  }
  return t;
}

// `first` and nrot - 1 device copies of it, rotated through by the timed
// graphs so that the L2 does not serve the weights.
std::vector<std::unique_ptr<cuda::W4DeviceWeight>> WithCopies(
    std::unique_ptr<cuda::W4DeviceWeight> first, int nrot) {
  std::vector<std::unique_ptr<cuda::W4DeviceWeight>> rot;
  rot.push_back(std::move(first));
  for (int i = 1; i < nrot; ++i) {
    auto c = rot[0]->Clone();
    CKS(c.status());
    rot.push_back(std::move(*c));
  }
  return rot;
}

// --ec-latency (see the top comment): CSV, one row per shape x rank x m.
int EcLatencyTable(const std::string& shapes_arg, const std::vector<int64_t>& ranks,
                   const std::vector<int64_t>& ms, int64_t group, const uint16_t* x, uint16_t* y16,
                   cuda::W4Workspace* ws, const cudaDeviceProp& prop, std::mt19937& rng) {
  std::vector<std::pair<int64_t, int64_t>> shapes;
  std::stringstream ss(shapes_arg);
  std::string t;
  while (std::getline(ss, t, ',')) {
    const size_t xpos = t.find('x');
    int64_t n = 0, k = 0;
    try {
      if (xpos == std::string::npos) throw std::invalid_argument(t);
      n = std::stoll(t.substr(0, xpos));
      k = std::stoll(t.substr(xpos + 1));
    } catch (...) {
      std::fprintf(stderr, "--ec-latency: bad shape '%s' (want NxK)\n", t.c_str());
      return 2;
    }
    if (n < 1 || k < 2 || k % 2 != 0 || n > 28672 || k > 14336) {
      std::fprintf(stderr, "--ec-latency: shape %lldx%lld outside 1..28672 x 2..14336 (k even)\n",
                   static_cast<long long>(n), static_cast<long long>(k));
      return 2;
    }
    shapes.emplace_back(n, k);
  }
  for (int64_t r : ranks) {
    if (r < 1 || r > 256) {
      std::fprintf(stderr, "--ec-ranks: rank %lld outside 1..256\n", static_cast<long long>(r));
      return 2;
    }
  }
  for (int64_t m : ms) {
    if (m < 1 || m > 2048) {
      std::fprintf(stderr, "--ec-ms: m %lld outside 1..2048\n", static_cast<long long>(m));
      return 2;
    }
  }
  std::printf("# spear EC latency table v1: %s, %d SMs; W4 group %lld asymmetric, gated EC (gate "
              "hidden 16); per row a CUDA graph of R launches over rotated weight copies, median "
              "of 7 replays / R\n",
              prop.name, prop.multiProcessorCount, static_cast<long long>(group));
  std::printf("n,k,m,rank,w4_us,ec_us\n");
  for (const auto& shape : shapes) {
    // (no structured bindings: the lambdas below capture n and k)
    const int64_t n = shape.first, k = shape.second;
    const int64_t g = group > 0 ? group : k;
    const W4Weight w = bench::RandomW4(n, k, g, rng);
    for (int64_t r : ranks) {
      const EcWeights ec = bench::RandomEc(n, k, rng, std::min<int64_t>(r, std::min(n, k)));
      auto first = cuda::W4DeviceWeight::Create(w, &ec);
      CKS(first.status());
      const double wbytes = static_cast<double>((*first)->backbone_bytes() + (*first)->ec_bytes());
      const int nrot = std::clamp(static_cast<int>(std::ceil(3 * kL2Bytes / wbytes)), 2, 256);
      const auto rot = WithCopies(std::move(*first), nrot);
      for (int64_t m : ms) {
        CKS(ws->Reserve(*rot[0], m));
        auto run = [&](bool use_ec) {
          return TimeGraph(std::max(nrot, 10), [&](int i) {
            cuda::W4CudaParams p = bench::GemmParams(x, m, k, y16, n);
            p.use_ec = use_ec;
            CKS(cuda::W4Linear(*rot[i % nrot], p, ws, g_stream));
          });
        };
        const double t_w4 = run(false), t_ec = run(true);
        std::printf("%lld,%lld,%lld,%lld,%.3f,%.3f\n", static_cast<long long>(n),
                    static_cast<long long>(k), static_cast<long long>(m),
                    static_cast<long long>(ec.rank), t_w4, t_ec);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

// --sweep / --profile (see the top comment).
int SweepOrProfile(bool profile, const std::vector<int64_t>& sweep_ms, const uint16_t* x,
                   uint16_t* y16, cuda::W4Workspace* ws, double copy_bw, std::mt19937& rng) {
  if (!profile) {
    std::printf("\n## fold kernel sweep (W4 us; auto = the dispatched choice; v8 = the ring kernel; W = warps per block, S = k splits, d = ring depth; - = does not fit)\n");
    std::printf("| layer | M | W | v8 | auto | S1 d2 | S1 d3 | S1 d4 | S2 d2 | S2 d3 | S2 d4 | S4 d2 | S4 d3 | S4 d4 | S8 d2 | S8 d3 | S8 d4 | auto %%BW |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  }
  const int64_t profile_m = sweep_ms.empty() ? 1 : sweep_ms[0];
  for (const Shape& sh : kShapes) {
    if (std::string(sh.model) != "8B") continue;
    const W4Weight w = bench::RandomW4(sh.n, sh.k, kGroup, rng);
    auto first = cuda::W4DeviceWeight::Create(w, nullptr);
    CKS(first.status());
    const double wbytes = static_cast<double>((*first)->backbone_bytes());
    const int nrot = std::max(2, static_cast<int>(std::ceil(3 * kL2Bytes / wbytes)));
    const auto rot = WithCopies(std::move(*first), nrot);
    auto params = [&](int64_t m, int dk, int s, int d, int nw = 0) {
      cuda::W4CudaParams p = bench::GemmParams(x, m, sh.k, y16, sh.n);
      p.decode_kernel = dk;
      p.decode_splits = s;
      p.decode_depth = d;
      return p;
    };
    if (profile) {
      // at the first --ms (default 1): the fold kernel (auto), the fold kernel with one tile per block, the v8 ring kernel
      // (v40: then 8 warps in 8 and in 4 groups, k splits as the cost model picks)
      for (int i = 0; i < 5; ++i) {
        const int dk = i == 0 ? 0 : i == 1 ? 5 | 64 : i == 2 ? 3 : i == 3 ? 5 | 768 : 5 | 512;
        CKS(cuda::W4Linear(*rot[i % nrot], params(profile_m, dk, 0, 0), ws, g_stream));
      }
      CK(cudaStreamSynchronize(g_stream));
      continue;
    }
    for (int64_t m : sweep_ms) {
      auto t = [&](int dk, int s, int d, int nw = 0) {
        // a forced configuration that does not fit is refused (InvalidArgument): "-"
        if (!cuda::W4Linear(*rot[0], params(m, dk, s, d, nw), ws, g_stream).ok()) return -1.0;
        return TimeGraph(std::max(nrot, 10), [&](int i) {
          CKS(cuda::W4Linear(*rot[i % nrot], params(m, dk, s, d, nw), ws, g_stream));
        });
      };
      const double t_auto = t(0, 0, 0), t_v8 = t(3, 0, 0);
      // fold with 8 warps, 4 warps (v12 defaults: a persistent loop over the
      // tiles beyond one wave, no L2 prefetch), 8 warps one tile per block
      // (64), 8 warps with the L2 prefetch in the first wave's blocks (16);
      // v40: 8 warps in 2 / 4 / 8 groups, each group on its own tile
      static const struct {
        int dk;
        const char* label;
      } kRows[] = {{5, "8"},         {4, "4"},           {5 | 64, "8 1-tile"}, {5 | 16, "8 pf"},
                   {5 | 256, "8 G2"}, {5 | 512, "8 G4"}, {5 | 768, "8 G8"}};
      for (const auto& [dk, label] : kRows) {
        std::printf("| %s | %lld | %s | %.1f | %.1f", sh.layer, static_cast<long long>(m), label,
                    t_v8, t_auto);
        for (int s : {1, 2, 4, 8}) {
          for (int d : {2, 3, 4}) {
            const double v = t(dk, s, d);
            if (v < 0) {
              std::printf(" | -");
            } else {
              std::printf(" | %.1f", v);
            }
          }
        }
        const double io = 2.0 * m * sh.k + 2.0 * m * sh.n;
        std::printf(" | %.0f |\n", (wbytes + io) / (t_auto * 1e-6) / copy_bw * 100);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

// One shape's weights for the tables against cuBLAS (--prefill,
// --small-tiles): W4 copies with a random EC rotated through >= 3x the L2,
// and an fp16 copy of the weight for cuBLAS (freed by FreeShapes).
struct ShapeWeights {
  const Shape* sh;
  std::vector<std::unique_ptr<cuda::W4DeviceWeight>> rot;
  uint16_t* w16;
  double bytes;  // one W4 copy's backbone bytes
};
// The model's shapes (only: "MODEL/LAYER" narrows them, "" all four).
std::vector<ShapeWeights> LoadShapes(const char* model, const std::string& only,
                                     const uint16_t* wpool, size_t pool_halfs, std::mt19937& rng) {
  std::vector<ShapeWeights> mods;
  for (const Shape& sh : kShapes) {
    if (std::string(sh.model) != model) continue;
    if (!only.empty() && only != std::string(sh.model) + "/" + sh.layer) continue;
    const W4Weight w = bench::RandomW4(sh.n, sh.k, kGroup, rng);
    const EcWeights ec = bench::RandomEc(sh.n, sh.k, rng);
    auto first = cuda::W4DeviceWeight::Create(w, &ec);
    CKS(first.status());
    const double wbytes = static_cast<double>((*first)->backbone_bytes());
    ShapeWeights md{&sh,
                    WithCopies(std::move(*first),
                               std::max(2, static_cast<int>(std::ceil(3 * kL2Bytes / wbytes)))),
                    nullptr, wbytes};
    const size_t halfs = static_cast<size_t>(sh.n * sh.k);
    CK(cudaMalloc(&md.w16, halfs * 2));
    for (size_t o = 0; o < halfs; o += pool_halfs) {
      CK(cudaMemcpy(md.w16 + o, wpool, std::min(pool_halfs, halfs - o) * 2, cudaMemcpyDeviceToDevice));
    }
    mods.push_back(std::move(md));
  }
  return mods;
}
void FreeShapes(std::vector<ShapeWeights>& mods) {
  for (ShapeWeights& md : mods) CK(cudaFree(md.w16));
}
// y16 = x W^T by cuBLAS FP16 (fp32 accumulate), m rows.
void CublasGemm(cublasHandle_t cub, const ShapeWeights& md, int64_t m, const uint16_t* x,
                uint16_t* y16) {
  const float one = 1.f, zero = 0.f;
  CKB(cublasGemmEx(cub, CUBLAS_OP_T, CUBLAS_OP_N, md.sh->n, m, md.sh->k, &one, md.w16,
                   CUDA_R_16F, md.sh->k, x, CUDA_R_16F, md.sh->k, &zero, y16, CUDA_R_16F,
                   md.sh->n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
// The W4 GEMM on copy i % copies without its EC: path = {prefill_kernel,
// prefill_splits}; force_prefill as given.
void W4Gemm(const ShapeWeights& md, int i, int64_t m, std::pair<int, int> path, bool force_prefill,
            const uint16_t* x, uint16_t* y16, cuda::W4Workspace* ws) {
  cuda::W4CudaParams p = bench::GemmParams(x, m, md.sh->k, y16, md.sh->n);
  p.force_prefill = force_prefill;
  p.prefill_kernel = path.first;
  p.prefill_splits = path.second;
  p.use_ec = false;
  CKS(cuda::W4Linear(*md.rot[i % md.rot.size()], p, ws, g_stream));
}

// --small-tiles [--ms=...] (v44): the warp-specialized wgmma kernel with
// 16- / 32- / 64-token tiles (prefill_kernel 6 / 5 / 4 + 128, k splits 1..4)
// against the automatic dispatch (the decode kernels below kPrefillM; at
// M >= 64 the prefill path untuned: dequantize + cuBLAS) and cuBLAS FP16,
// per shape at M in `ms` (default 16, 24, 32, 40, 48, 64); then the 8B and
// 1B layers' four GEMMs in one graph (cuBLAS, automatic, each GEMM on its
// fastest small-tile form), timed interleaved (15 rounds), with % of the copy
// bandwidth; and W4+EC (r 32) automatic and on the fastest small-tile form
// (its EC through the prefill path's cuBLAS U / gate / V B^T), and that form
// with its code words not dequantized (prefill_kernel + 32) and with its
// consumers only waiting for and releasing the stages (+ 64): timing only,
// the shares of its time the dequantization and the stream take.
int SmallTileTable(const std::vector<int64_t>& ms, const uint16_t* x, uint16_t* y16,
                   const uint16_t* wpool, size_t pool_halfs, cublasHandle_t cub,
                   cuda::W4Workspace* ws, double copy_bw, std::mt19937& rng) {
  std::printf("\n## Small token tiles (v44; us; - where the splits do not fit)\n");
  std::printf("| model | layer | M | auto us | cuBLAS us | WS 16-token tiles, k splits 1 / 2 / 3 / 4 | WS 32-token tiles, 1 / 2 / 3 / 4 | WS 64-token tiles, 1 / 2 / 3 / 4 | fastest (kernel/splits) | us | /auto | /cuBLAS | W4+EC auto us | W4+EC fastest us | fastest, no dequantization (timing only) us | fastest, the producer's stream alone (timing only) us |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  const int kTok[3] = {6 | 128, 5 | 128, 4 | 128};  // 16, 32, 64 tokens
  for (const char* model : {"8B", "1B"}) {
    std::vector<ShapeWeights> mods = LoadShapes(model, "", wpool, pool_halfs, rng);
    for (int64_t m : ms) {
      std::vector<std::pair<int, int>> best;
      double layer_bytes = 0;
      for (ShapeWeights& md : mods) {
        const Shape& sh = *md.sh;
        const int nrot = static_cast<int>(md.rot.size());
        CKS(ws->Reserve(*md.rot[0], std::max<int64_t>(m, cuda::kPrefillM)));
        layer_bytes += md.bytes + 2.0 * m * (sh.k + sh.n);
        const int reps = std::max(nrot, 8);
        // pk 0: the automatic dispatch; else forced through the prefill path.
        auto w4 = [&](int pk, int splits, bool ec) {
          cuda::W4CudaParams p0 = bench::GemmParams(x, m, sh.k, y16, sh.n);
          p0.force_prefill = pk != 0;
          p0.prefill_kernel = pk;
          p0.prefill_splits = splits;
          p0.use_ec = ec;
          const absl::Status st = cuda::W4Linear(*md.rot[0], p0, ws, g_stream);
          if (st.code() == absl::StatusCode::kInvalidArgument && splits > 1) {
            return std::numeric_limits<double>::infinity();
          }
          CKS(st);
          CK(cudaStreamSynchronize(g_stream));
          return TimeGraph(reps, [&](int i) {
            cuda::W4CudaParams p = p0;
            CKS(cuda::W4Linear(*md.rot[i % nrot], p, ws, g_stream));
          });
        };
        const double t_auto = w4(0, 0, false);
        const double t_cub = TimeGraph(6, [&](int) { CublasGemm(cub, md, m, x, y16); });
        double t[3][4];
        double tb = std::numeric_limits<double>::infinity();
        std::pair<int, int> pick{0, 0};
        for (int j = 0; j < 3; ++j) {
          for (int sp = 1; sp <= 4; ++sp) {
            t[j][sp - 1] = w4(kTok[j], sp, false);
            if (t[j][sp - 1] < tb) {
              tb = t[j][sp - 1];
              pick = {kTok[j], sp};
            }
          }
        }
        best.push_back(pick);
        const double t_ec_auto = w4(0, 0, true), t_ec_best = w4(pick.first, pick.second, true);
        // timing only (wrong output): the fastest form without the dequantization
        const double t_nodq = w4(pick.first | 32, pick.second, false);
        // timing only: the producer's stream alone (consumers wait and release)
        const double t_prod = w4(pick.first | 64, pick.second, false);
        auto us = [](double v) {
          char b[32] = "-";
          if (!std::isinf(v)) std::snprintf(b, sizeof b, "%.1f", v);
          return std::string(b);
        };
        std::string cols[3];
        for (int j = 0; j < 3; ++j) {
          cols[j] = us(t[j][0]) + " / " + us(t[j][1]) + " / " + us(t[j][2]) + " / " + us(t[j][3]);
        }
        std::printf("| %s | %s | %lld | %.1f | %.1f | %s | %s | %s | %d/%d | %.1f | %.2f | %.2f | %.1f | %.1f | %.1f | %.1f |\n",
                    sh.model, sh.layer, static_cast<long long>(m), t_auto, t_cub, cols[0].c_str(),
                    cols[1].c_str(), cols[2].c_str(), pick.first, pick.second, tb, tb / t_auto,
                    tb / t_cub, t_ec_auto, t_ec_best, t_nodq, t_prod);
        std::fflush(stdout);
      }
      auto w4_gemm = [&](ShapeWeights& md, int i, std::pair<int, int> path) {
        W4Gemm(md, i, m, path, path.first != 0, x, y16, ws);
      };
      const std::vector<GraphTime> lt = TimeGraphs(
          8, 15,
          {[&](int) {
             for (ShapeWeights& md : mods) CublasGemm(cub, md, m, x, y16);
           },
           [&](int i) {
             for (ShapeWeights& md : mods) w4_gemm(md, i, {0, 0});
           },
           [&](int i) {
             for (size_t j = 0; j < mods.size(); ++j) w4_gemm(mods[j], i, best[j]);
           }});
      const double bw = layer_bytes / copy_bw * 1e6;  // us at copy speed
      std::printf("| %s | layer | %lld | auto %.1f (%.0f %%BW) | cuBLAS %.1f | | | | small tiles, each GEMM's fastest | %.1f (%.0f %%BW) | %.2f | %.2f | | | | |\n",
                  model, static_cast<long long>(m), lt[1].med, 100 * bw / lt[1].med, lt[0].med,
                  lt[2].med, 100 * bw / lt[2].med, lt[2].med / lt[1].med, lt[2].med / lt[0].med);
      std::fflush(stdout);
    }
    FreeShapes(mods);
  }
  return 0;
}

// --prefill-ec=0|1|2: W4CudaParams::prefill_ec_stream of the table's W4+EC
// column (the A/B of the prefill EC on a second stream).
int g_prefill_ec = 0;
// --prefill-split: also time it without the dequantization (A = the raw code
// words) and without the code-word loads (constant A): timing splits.
bool g_prefill_split = false;
// --prefill-splits=N: W4CudaParams::prefill_splits of the wgmma columns (0,
// the default: no split; 2..4 forced, e.g. for ncu: the first launch of
// W4WgmmaKernel<256> is then that column's eager call).
int g_prefill_splits = 0;
// --steady-ms=N: the prefill layer's steady rows run each graph alone for
// N ms per round (default 150; v44: 1000 for the acceptance reading).
double g_steady_ms = 150.0;
// --no-tune: no TunePrefill (the automatic columns run dequantize + cuBLAS;
// under a profiler, the first launches are then the forced columns').
bool g_prefill_no_tune = false;

// --prefill: the prefill path's main GEMMs side by side at M in `ms` (default
// 128, 512, 2048) on the eight shapes: cuBLAS FP16 (the peer), the W4
// weight dequantized into fp16 scratch + cuBLAS, the wgmma kernel from the
// W4 layout with 128- and 256-token tiles, the automatic
// choice, and the automatic choice with the EC (r 32); then each model's
// four GEMMs back to back in one graph (cuBLAS FP16 vs the automatic W4
// path, every GEMM on its own weights), and the same with each GEMM on the
// path that was fastest for its shape. only (--only=MODEL/LAYER, e.g. 8B/o):
// that shape's rows only, no layer rows.
int PrefillTable(const std::vector<int64_t>& ms, const uint16_t* x, uint16_t* y16,
                 const uint16_t* wpool, size_t pool_halfs, cublasHandle_t cub,
                 cuda::W4Workspace* ws, std::mt19937& rng, const std::string& only) {
  std::printf("\n## Prefill GEMMs (us; ratios over cuBLAS FP16 in the same run; TF/s of the automatic W4 path; - where a forced split does not fit)\n");
  std::printf("| model | layer | M | cuBLAS us | cuBLAS TF/s | dequant+cuBLAS us | ratio | wgmma 128 / 256-token tiles us | warp-specialized 128-token tiles, k splits 1 / 2 us | warp-specialized 256-token tiles, k splits 1 / 2 / 3 / 4 us | stream-K 128 / 256-token tiles us | fastest (kernel/splits) | ratio | W4 auto us | W4 TF/s | ratio | W4+EC auto us | EC/W4 |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const char* model : {"8B", "1B"}) {
    std::vector<ShapeWeights> mods = LoadShapes(model, only, wpool, pool_halfs, rng);
    // v34: the automatic columns as a loaded model runs them: each shape's
    // prefill kernel measured by TunePrefill over its rotated copies.
    const int64_t max_m = std::max<int64_t>(cuda::kPrefillM, *std::max_element(ms.begin(), ms.end()));
    for (ShapeWeights& md : mods) {
      if (g_prefill_no_tune) break;  // the automatic columns: dequantize + cuBLAS
      std::vector<cuda::W4DeviceWeight*> ptrs;
      for (auto& r : md.rot) ptrs.push_back(r.get());
      std::vector<cuda::PrefillTuneRow> rows;
      CKS(cuda::TunePrefill(ptrs, max_m, ws, g_stream, &rows));
      std::printf("TunePrefill %s %s:", model, md.sh->layer);
      for (int b = 0; b < cuda::W4DeviceWeight::kPrefillBuckets && (int64_t{64} << b) <= max_m; ++b) {
        const auto t = md.rot[0]->prefill_tuning(int64_t{64} << b);
        std::printf(" m %lld: %d/%d", static_cast<long long>(int64_t{64} << b), t.kernel, t.splits);
      }
      std::printf("\n");
      // What the tuner measured (us per launch, kernel/splits), per m.
      for (size_t i = 0; i < rows.size(); ++i) {
        if (i == 0 || rows[i].m != rows[i - 1].m) {
          std::printf("%s  tuned at m %lld:", i == 0 ? "" : "\n", static_cast<long long>(rows[i].m));
        }
        std::printf(" %d/%d %.1f", rows[i].kernel, rows[i].splits, rows[i].us);
      }
      std::printf("\n");
    }
    for (int64_t m : ms) {
      double sum_cub = 0, sum_auto = 0, sum_best = 0;
      // per shape, the fastest measured path: prefill_kernel, prefill_splits
      std::vector<std::pair<int, int>> best;
      for (ShapeWeights& md : mods) {
        const Shape& sh = *md.sh;
        const int nrot = static_cast<int>(md.rot.size());
        CKS(ws->Reserve(*md.rot[0], m));
        const double flops = 2.0 * m * sh.n * sh.k;
        const int reps = std::max(nrot, 6);
        // splits: W4CudaParams::prefill_splits (wgmma kernels; 0 automatic).
        // Infinity where the eager call refuses the forced splits.
        auto w4 = [&](int pk, bool ec, int splits = 0) {
          // One eager call first: the dequantizing path grows its scratch
          // then (not allowed inside the capture).
          cuda::W4CudaParams p0 = bench::GemmParams(x, m, sh.k, y16, sh.n);
          p0.force_prefill = true;
          p0.prefill_kernel = pk;
          p0.prefill_splits = splits;
          p0.use_ec = ec;
          const absl::Status st = cuda::W4Linear(*md.rot[0], p0, ws, g_stream);
          if (splits > 1 && st.code() == absl::StatusCode::kInvalidArgument) {
            return std::numeric_limits<double>::infinity();
          }
          CKS(st);
          CK(cudaStreamSynchronize(g_stream));
          return TimeGraph(reps, [&](int i) {
            cuda::W4CudaParams p = bench::GemmParams(x, m, sh.k, y16, sh.n);
            p.force_prefill = true;
            p.prefill_kernel = pk;
            p.prefill_splits = splits;
            p.use_ec = ec;
            CKS(cuda::W4Linear(*md.rot[i % nrot], p, ws, g_stream));
          });
        };
        const double t_cub = TimeGraph(6, [&](int) { CublasGemm(cub, md, m, x, y16); });
        // The candidates: {prefill_kernel, prefill_splits} and their times:
        // dequantize + cuBLAS and TunePrefill's, the plain kernels' splits
        // from --prefill-splits where given.
        static_assert(cuda::kNumPrefillCandidates == 10, "the table's columns");
        std::vector<std::pair<int, int>> cand = {{1, 0}};
        for (const auto& [pk, sp] : cuda::kPrefillCandidates) {
          cand.emplace_back(pk, pk < 16 && g_prefill_splits != 0 ? g_prefill_splits : sp);
        }
        std::vector<double> t(cand.size());
        for (size_t c = 0; c < cand.size(); ++c) t[c] = w4(cand[c].first, false, cand[c].second);
        const double t_auto = w4(0, false), t_ec = w4(0, true);
        const size_t ib = static_cast<size_t>(std::min_element(t.begin(), t.end()) - t.begin());
        best.push_back(cand[ib]);
        sum_best += t[ib];
        if (g_prefill_split) {
          std::printf("| %s | %s | %lld | timing splits (wrong output), 128 / 256-token tiles: no dequantization %.1f / %.1f us, no A loads either %.1f / %.1f us |\n",
                      sh.model, sh.layer, static_cast<long long>(m), w4(2 + 32, false),
                      w4(3 + 32, false), w4(2 + 64, false), w4(3 + 64, false));
          // v36: the stream-K kernel (256-token tiles) with whole tiles only
          // (no stream-K part), and without its output stores
          std::printf("| %s | %s | %lld | timing splits (wrong output), stream-K 256-token tiles: whole tiles only %.1f us, no output stores %.1f us, both %.1f us |\n",
                      sh.model, sh.layer, static_cast<long long>(m), w4(3 | 128 | 256 | 512, false, 1),
                      w4(3 | 128 | 256 | 1024, false, 1), w4(3 | 128 | 256 | 512 | 1024, false, 1));
          // v38: at most 2 / 3 blocks per stream-K tile (the column: 4)
          std::printf("| %s | %s | %lld | stream-K 256-token tiles, at most 2 / 3 pieces per tile: %.1f / %.1f us; no output stores: %.1f / %.1f us |\n",
                      sh.model, sh.layer, static_cast<long long>(m), w4(3 | 128 | 256, false, 2),
                      w4(3 | 128 | 256, false, 3), w4(3 | 128 | 256 | 1024, false, 2),
                      w4(3 | 128 | 256 | 1024, false, 3));
        }
        sum_cub += t_cub;
        sum_auto += t_auto;
        auto us = [](double v) {
          char b[32] = "-";
          if (!std::isinf(v)) std::snprintf(b, sizeof b, "%.1f", v);
          return std::string(b);
        };
        std::printf("| %s | %s | %lld | %.1f | %.0f | %.1f | %.2f | %s / %s | %s / %s | %s / %s / %s / %s | %s / %s | %d/%d | %.2f | %.1f | %.0f | %.2f | %.1f | %.2f |\n",
                    sh.model, sh.layer, static_cast<long long>(m), t_cub, flops / t_cub * 1e-6,
                    t[0], t[0] / t_cub, us(t[1]).c_str(), us(t[2]).c_str(), us(t[3]).c_str(),
                    us(t[4]).c_str(), us(t[5]).c_str(), us(t[6]).c_str(), us(t[7]).c_str(),
                    us(t[8]).c_str(), us(t[9]).c_str(), us(t[10]).c_str(), cand[ib].first, cand[ib].second, t[ib] / t_cub, t_auto,
                    flops / t_auto * 1e-6, t_auto / t_cub, t_ec, t_ec / t_auto);
        std::fflush(stdout);
      }
      if (mods.size() != 4) continue;  // --only: no layer rows
      // The four GEMMs back to back, one graph each for cuBLAS, the
      // automatic W4 path and each GEMM on its fastest path; timed
      // interleaved (v38), median of 15 rounds and the rounds' spread.
      // v39: also cuBLAS and the automatic path with each GEMM's four
      // launches grouped (qkv x 4, o x 4, ..; the same launches as the
      // layer's, in another order): is our layer slower than the sum of
      // its rows because of what runs before each GEMM?
      auto cub_gemm = [&](ShapeWeights& md) { CublasGemm(cub, md, m, x, y16); };
      // path: {prefill_kernel, prefill_splits}, {0, 0} the automatic one
      auto w4_gemm = [&](ShapeWeights& md, int i, std::pair<int, int> path) {
        W4Gemm(md, i, m, path, /*force_prefill=*/true, x, y16, ws);
      };
      const std::vector<std::function<void(int)>> layer_bodies = {
          [&](int) {
            for (ShapeWeights& md : mods) cub_gemm(md);
          },
          [&](int i) {
            for (ShapeWeights& md : mods) w4_gemm(md, i, {0, 0});
          },
          [&](int i) {
            for (size_t j = 0; j < mods.size(); ++j) w4_gemm(mods[j], i, best[j]);
          },
          [&](int i) {  // grouped: call i runs GEMM i four times
            for (int r = 0; r < 4; ++r) cub_gemm(mods[i]);
          },
          [&](int i) {
            for (int r = 0; r < 4; ++r) w4_gemm(mods[i], r, {0, 0});
          }};
      const auto lay = TimeGraphs(4, 15, layer_bodies);
      // v39: the same graphs, each alone for --steady-ms (150) then 9 timed
      // replays, 3 rounds
      const auto st = TimeGraphs(4, 3, layer_bodies, g_steady_ms);
      const double l_cub = lay[0].med, l_auto = lay[1].med, l_best = lay[2].med;
      std::printf("| %s | layer (4 GEMMs, one graph; interleaved, median of 15 rounds [min-max]: cuBLAS %.1f-%.1f, W4 %.1f-%.1f) | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, lay[0].lo, lay[0].hi, lay[1].lo, lay[1].hi, static_cast<long long>(m),
                  l_cub, l_auto, l_auto / l_cub);
      std::printf("| %s | layer, each GEMM on its fastest path (%d/%d %d/%d %d/%d %d/%d) | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, best[0].first, best[0].second, best[1].first, best[1].second,
                  best[2].first, best[2].second, best[3].first, best[3].second,
                  static_cast<long long>(m),
                  l_cub, l_best, l_best / l_cub);
      std::printf("| %s | the same launches, each GEMM's four grouped (same rounds) | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, static_cast<long long>(m), lay[3].med, lay[4].med, lay[4].med / lay[3].med);
      std::printf("| %s | layer, steady: each graph alone for %.0f ms, then 9 replays; 3 rounds (round medians: cuBLAS %.1f-%.1f, W4 %.1f-%.1f) | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, g_steady_ms, st[0].lo, st[0].hi, st[1].lo, st[1].hi, static_cast<long long>(m),
                  st[0].med, st[1].med, st[1].med / st[0].med);
      std::printf("| %s | layer on the fastest paths, steady | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, static_cast<long long>(m), st[0].med, st[2].med, st[2].med / st[0].med);
      std::printf("| %s | grouped, steady | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, static_cast<long long>(m), st[3].med, st[4].med, st[4].med / st[3].med);
      std::printf("| %s | sum of the rows above | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, static_cast<long long>(m), sum_cub, sum_auto, sum_auto / sum_cub);
      std::printf("| %s | sum of the fastest paths | %lld | %.1f | | | | | | | | | | %.1f | | %.2f | | |\n",
                  model, static_cast<long long>(m), sum_cub, sum_best, sum_best / sum_cub);
      std::fflush(stdout);
    }
    FreeShapes(mods);
  }
  return 0;
}

int Main(int argc, char** argv) {
  std::string torch_csv, only, ec_latency;
  bool quick = false, no_layer = false, sweep = false, profile = false, prefill = false, small_tiles = false;
  std::vector<int64_t> ms_only, ec_ranks = {4}, ec_ms = {1};
  int64_t group = kGroup;
  auto ints = [](const std::string& v) {
    std::vector<int64_t> out;
    std::stringstream ss(v);
    std::string t;
    while (std::getline(ss, t, ',')) out.push_back(std::stoll(t));
    return out;
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    // Flags ending in '=' take a value; the others are exact.
    static const char* const kFlags[] = {
        "--torch=",        "--only=",        "--ms=",        "--quick",           "--decode",
        "--no-layer",      "--prefill-ec=",  "--sweep",      "--profile",         "--prefill",
        "--prefill-split", "--prefill-splits=", "--no-tune", "--ec-latency=", "--ec-ranks=",
        "--ec-ms=",        "--group=",       "--small-tiles",  "--steady-ms="};
    bool known = false;
    for (const char* f : kFlags) {
      const std::string fs(f);
      known = known || (fs.back() == '=' ? a.rfind(fs, 0) == 0 : a == fs);
    }
    if (!known) {
      std::fprintf(stderr, "unknown flag %s (see the comment at the top of bench_w4_cuda.cu)\n",
                   a.c_str());
      return 2;
    }
    if (a.rfind("--torch=", 0) == 0) torch_csv = a.substr(8);
    if (a.rfind("--only=", 0) == 0) only = a.substr(7);  // e.g. 8B/gate_up
    if (a.rfind("--ms=", 0) == 0) {
      std::stringstream ss(a.substr(5));
      std::string t;
      while (std::getline(ss, t, ',')) ms_only.push_back(std::stoll(t));
    }
    if (a == "--quick") quick = true;
    if (a == "--decode") ms_only = {1, 2, 4, 8, 16};  // the decode rows only
    if (a == "--no-layer") no_layer = true;
    if (a.rfind("--prefill-ec=", 0) == 0) g_prefill_ec = std::atoi(a.c_str() + 13);
    if (a == "--sweep") sweep = true;
    if (a == "--profile") profile = true;
    if (a == "--prefill") prefill = true;
    if (a == "--small-tiles") small_tiles = true;
    if (a == "--prefill-split") g_prefill_split = true;
    if (a == "--no-tune") g_prefill_no_tune = true;
    if (a.rfind("--steady-ms=", 0) == 0) {
      g_steady_ms = std::atof(a.c_str() + 12);
      if (!(g_steady_ms > 0 && g_steady_ms <= 10000)) {
        std::fprintf(stderr, "--steady-ms: 0 < N <= 10000\n");
        return 2;
      }
    }
    if (a.rfind("--prefill-splits=", 0) == 0) g_prefill_splits = std::atoi(a.c_str() + 17);
    try {
      if (a.rfind("--ec-latency=", 0) == 0) ec_latency = a.substr(13);
      if (a.rfind("--ec-ranks=", 0) == 0) ec_ranks = ints(a.substr(11));
      if (a.rfind("--ec-ms=", 0) == 0) ec_ms = ints(a.substr(8));
      if (a.rfind("--group=", 0) == 0) group = std::stoll(a.substr(8));
    } catch (...) {
      std::fprintf(stderr, "bad value in %s\n", a.c_str());
      return 2;
    }
  }
  if (group != -1 && group != 32 && group != 64 && group != 128) {
    std::fprintf(stderr, "--group: -1 (per channel), 32, 64 or 128\n");
    return 2;
  }
  const auto torch = ReadTorch(torch_csv);
  auto tget = [&](const std::string& key) -> double {
    auto it = torch.find(key);
    return it == torch.end() ? -1 : it->second;
  };
  CK(cudaSetDevice(0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  const double copy_bw = CopyBandwidth();
  // (a comment line of the --ec-latency CSV, which ec_latency.h reads)
  std::printf("%sdevice: %s, %d SMs, L2 %d MB; copy bandwidth (read+write) %.0f GB/s\n",
              ec_latency.empty() ? "" : "# ", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, copy_bw / 1e9);

  auto ws_or = cuda::W4Workspace::Create();
  CKS(ws_or.status());
  auto ws = std::move(*ws_or);
  cublasHandle_t cub;
  CKB(cublasCreate(&cub));
  CKB(cublasSetStream(cub, g_stream));

  // Activation / output / fp16 weight pools (random, reused).
  const int64_t max_m = 2048, max_k = 14336, max_n = 28672;
  const size_t pool_halfs = size_t{256} << 20 >> 1;  // 256 MiB of fp16
  uint16_t *x, *y16, *wpool;
  float* v32;
  CK(cudaMalloc(&x, max_m * max_k * 2));
  CK(cudaMalloc(&y16, max_m * max_n * 2));
  CK(cudaMalloc(&v32, max_m * 32 * 4));
  CK(cudaMalloc(&wpool, pool_halfs * 2));
  {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    std::vector<uint16_t> h(static_cast<size_t>(max_m * max_k));
    for (auto& v : h) v = FloatToHalf(nd(rng));
    CK(cudaMemcpy(x, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    std::vector<uint16_t> hw(pool_halfs);
    for (size_t i = 0; i < hw.size(); ++i) hw[i] = h[i % h.size()] & 0xbfff;  // |w| < 2
    CK(cudaMemcpy(wpool, hw.data(), hw.size() * 2, cudaMemcpyHostToDevice));
  }

  std::mt19937 rng(1234);
  if (!ec_latency.empty()) {
    return EcLatencyTable(ec_latency, ec_ranks, ec_ms, group, x, y16, ws.get(), prop, rng);
  }
  if (small_tiles) {
    return SmallTileTable(ms_only.empty() ? std::vector<int64_t>{16, 24, 32, 40, 48, 64} : ms_only, x,
                          y16, wpool, pool_halfs, cub, ws.get(), copy_bw, rng);
  }
  if (prefill) {
    return PrefillTable(ms_only.empty() ? std::vector<int64_t>{128, 512, 2048} : ms_only, x, y16,
                        wpool, pool_halfs, cub, ws.get(), rng, only);
  }
  if (sweep || profile) {
    return SweepOrProfile(profile, ms_only.empty() ? std::vector<int64_t>{1, 4, 8} : ms_only, x, y16,
                          ws.get(), copy_bw, rng);
  }
  std::map<std::string, Weights> weights;
  std::printf("\n## GEMM table (times in us; %%BW = achieved bytes/s over the copy bandwidth)\n");
  std::printf("| model | layer | M | W4 us | W4 %%BW | W4 TF/s | W4+EC us | EC/W4 | naive us | naive/W4 | cuBLAS us | cuBLAS %%BW | cuBLAS TF/s | W4/cuBLAS | torch us | torch/W4 | decode-kernel us | prefill-path us |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Shape& sh : kShapes) {
    if (!only.empty() && only != std::string(sh.model) + "/" + sh.layer) continue;
    const W4Weight w = bench::RandomW4(sh.n, sh.k, kGroup, rng);
    const EcWeights ec = bench::RandomEc(sh.n, sh.k, rng);
    Weights& W = weights[std::string(sh.model) + sh.layer];
    auto first = cuda::W4DeviceWeight::Create(w, &ec);
    CKS(first.status());
    const double wbytes = static_cast<double>((*first)->backbone_bytes());
    const int nrot = std::max(2, static_cast<int>(std::ceil(3 * kL2Bytes / wbytes)));
    W.rot = WithCopies(std::move(*first), nrot);
    const double fp16_bytes = 2.0 * sh.n * sh.k;
    const int nrot16 = std::max(1, static_cast<int>(std::ceil(3 * kL2Bytes / fp16_bytes)));
    const int64_t slots16 = static_cast<int64_t>(pool_halfs / (sh.n * sh.k));
    // --ms= replaces the table's M list (any M, e.g. 24 or 48)
    const std::vector<int64_t> table_ms =
        ms_only.empty() ? std::vector<int64_t>(std::begin(kMs), std::end(kMs)) : ms_only;
    for (int64_t m : table_ms) {
      if (quick && m > 16 && m != 512) continue;
      const int reps = std::max(nrot, 10);
      const double flops = 2.0 * m * sh.n * sh.k;
      const double io = 2.0 * m * sh.k + 2.0 * m * sh.n;
      CKS(ws->Reserve(*W.rot[0], m));
      auto w4 = [&](bool use_ec, bool fd, bool fp, int dk = 0) {
        return TimeGraph(reps, [&](int i) {
          cuda::W4CudaParams p = bench::GemmParams(x, m, sh.k, y16, sh.n);
          p.use_ec = use_ec;
          p.prefill_ec_stream = use_ec ? g_prefill_ec : 0;
          p.force_decode = fd;
          p.force_prefill = fp;
          p.decode_kernel = dk;
          CKS(cuda::W4Linear(*W.rot[i % nrot], p, ws.get(), g_stream));
        });
      };
      const double t_w4 = w4(false, false, false);
      const double t_ec = w4(true, false, false);
      const double t_naive = TimeGraph(reps, [&](int i) {
        const auto& dw = *W.rot[i % nrot];
        cuda::W4CudaParams p = bench::GemmParams(x, m, sh.k, y16, sh.n);
        p.use_ec = false;
        CKS(cuda::W4Linear(dw, p, ws.get(), g_stream));
        CKS(cuda::EcGate(dw, x, m, sh.k, v32, ws.get(), g_stream));
        CKS(cuda::EcApply(dw, v32, m, nullptr, y16, sh.n, g_stream));
      });
      const int nr16 = static_cast<int>(std::min<int64_t>(nrot16, slots16));
      const double t_cub = TimeGraph(std::max(nr16, 10), [&](int i) {
        const float one = 1.f, zero = 0.f;
        const uint16_t* wp = wpool + static_cast<size_t>(i % nr16) * sh.n * sh.k;
        CKB(cublasGemmEx(cub, CUBLAS_OP_T, CUBLAS_OP_N, sh.n, m, sh.k, &one, wp, CUDA_R_16F,
                         sh.k, x, CUDA_R_16F, sh.k, &zero, y16, CUDA_R_16F, sh.n,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      });
      double t_dec = -1, t_pre = -1;
      if (m >= 64 && m <= 512) {
        t_dec = w4(false, true, false);
        t_pre = w4(false, false, true);
      } else if (m <= 16) {
        t_dec = w4(false, false, false, 3);  // the v8 ring kernel (before the fold kernel)
      } else {
        t_dec = w4(false, false, false, 1);  // the x-as-m16 kernel (v6; before v43 at 17..32)
      }
      const double t_torch = tget(std::string(sh.model) + "/" + sh.layer + "/" + std::to_string(m));
      const double bw_w4 = (wbytes + io) / (t_w4 * 1e-6) / copy_bw * 100;
      const double bw_cub = (fp16_bytes + io) / (t_cub * 1e-6) / copy_bw * 100;
      auto opt = [](double v) {
        char b[32];
        if (v < 0) return std::string("-");
        std::snprintf(b, sizeof b, "%.1f", v);
        return std::string(b);
      };
      char tr[32] = "-";
      if (t_torch > 0) std::snprintf(tr, sizeof tr, "%.2f", t_torch / t_w4);
      std::printf("| %s | %s | %lld | %.1f | %.0f | %.1f | %.1f | %.2f | %.1f | %.2f | %.1f | %.0f | %.1f | %.2f | %s | %s | %s | %s |\n",
                  sh.model, sh.layer, static_cast<long long>(m), t_w4, bw_w4, flops / t_w4 * 1e-6,
                  t_ec, t_ec / t_w4, t_naive, t_naive / t_w4, t_cub, bw_cub,
                  flops / t_cub * 1e-6, t_w4 / t_cub, opt(t_torch).c_str(), tr,
                  opt(t_dec).c_str(), opt(t_pre).c_str());
      std::fflush(stdout);
    }
    // Keep only 2 copies of the 8B shapes for the layer graph.
    if (std::string(sh.model) == "8B") {
      W.rot.resize(2);
    } else {
      W.rot.clear();
    }
  }

  // The four GEMMs of an 8B decoder layer, back to back in one graph; two
  // weight sets alternate so that nothing is served from the L2.
  std::printf("\n## 8B decoder layer: qkv, o, gate_up, down back to back in one CUDA graph\n");
  std::printf("| M | variant | layer us | bytes MB | %% of copy BW | torch us | vs torch |\n|---|---|---|---|---|---|---|\n");
  const char* layers[] = {"qkv", "o", "gate_up", "down"};
  // Per-GEMM forced fold configurations (W4CudaParams decode_kernel |
  // flags, splits, depth) of the layer variants 5 to 8.
  struct Cfg {
    int dk = 0, s = 0, d = 0;
  };
  auto layer_cfg = [](int variant, int li) -> Cfg {
    switch (variant) {
      case 5: {  // the v11 dispatch (call 3): qkv / o S2 d2, gate_up S1 d3, down S2 d3, no prefetch
        const Cfg v11[4] = {{5 | 64, 2, 2}, {5 | 64, 2, 2}, {5 | 64, 1, 3}, {5 | 64, 2, 3}};
        return v11[li];
      }
      case 6: return {64, 0, 0};  // automatic, one tile per block (no persistent loop)
      case 7: return {16, 0, 0};  // automatic + the L2 prefetch in the first wave
      case 8: return {64 | 16, 0, 0};  // call 1's default: one tile per block + prefetch
      default: return {};
    }
  };
  // The layer variants: name, EC on, W4CudaParams ec_prologue and
  // decode_kernel (variants 5-8 take theirs from layer_cfg).
  struct LayerVariant {
    const char* name;
    bool ec;
    int ec_prologue, decode_kernel;
  };
  const LayerVariant lvs[] = {
      {"W4", false, 0, 0},
      {"W4+EC r32 (fused)", true, 0, 0},
      {"W4+EC r32 (naive)", false, 0, 0},
      {"W4, x-as-m16 kernel (v6)", false, 0, 1},
      {"W4, swapped, cp.async ring (v8)", false, 0, 3},
      {"W4, fold as dispatched by v11 (no L2 prefetch, gate_up d3)", false, 0, 0},
      {"W4, fold with one tile per block (no persistent loop)", false, 0, 0},
      {"W4, fold + L2 prefetch before the wait (first wave)", false, 0, 0},
      {"W4, fold one tile per block + L2 prefetch (call 1's default)", false, 0, 0},
      {"W4 (again: the spread between two runs)", false, 0, 0},
      {"W4+EC r32 (fused), v12 prologue shape (one block per rank, all of k; warp-per-token gate)",
       true, 1, 0},
      {"W4+EC r32 (fused), prologue as a plain launch (v14b)", true, 2, 0},
      {"W4+EC r32 (fused), v12 prologue as a plain launch (v12)", true, 3, 0},
      {"W4+EC r32 (fused), B fragments from global memory (v13 epilogue)", true, 0, 128},
      {"W4+EC r32, epilogue only (no prologue: timing only)", true, 4, 0},
      {"W4+EC r32, prologue only (no epilogue: timing only)", true, 8, 0},
  };
  constexpr int kLayerVariants = sizeof(lvs) / sizeof(lvs[0]);
  for (int64_t m : {1, 16, 32}) {
    if (no_layer || !only.empty()) break;
    for (const char* l : layers) CKS(ws->Reserve(*weights[std::string("8B") + l].rot[0], m));
    for (int variant = 0; variant < kLayerVariants; ++variant) {
      const LayerVariant& lv = lvs[variant];
      if (m > 8 && variant > 4 && variant < 10) continue;  // the fold variants: M <= 8 only
      // v43, M = 32: W4 (the fold kernel's four token tiles), the fused EC
      // and the x-as-m16 kernel (the path before v43)
      if (m > 16 && variant != 0 && variant != 1 && variant != 3) continue;
      double bytes = 0;
      for (const char* l : layers) {
        const auto& dw = *weights[std::string("8B") + l].rot[0];
        bytes += dw.backbone_bytes() + (lv.ec || variant == 2 ? dw.ec_bytes() : 0) +
                 2.0 * m * (dw.fmt().k + dw.fmt().n);
      }
      const double t = TimeGraph(10, [&](int i) {
        for (int li = 0; li < 4; ++li) {
          const char* l = layers[li];
          const auto& dw = *weights[std::string("8B") + l].rot[i % 2];
          cuda::W4CudaParams p = bench::GemmParams(x, m, dw.fmt().k, y16, dw.fmt().n);
          p.use_ec = lv.ec;
          p.ec_prologue = lv.ec_prologue;
          p.decode_kernel = lv.decode_kernel;
          const Cfg c = layer_cfg(variant, li);
          if (variant >= 5 && variant < 10) {
            p.decode_kernel = c.dk;
            p.decode_splits = c.s;
            p.decode_depth = c.d;
          }
          CKS(cuda::W4Linear(dw, p, ws.get(), g_stream));
          if (variant == 2) {
            CKS(cuda::EcGate(dw, x, m, dw.fmt().k, v32, ws.get(), g_stream));
            CKS(cuda::EcApply(dw, v32, m, nullptr, y16, dw.fmt().n, g_stream));
          }
        }
      });
      const double tt = tget("layer8B/all/" + std::to_string(m));
      char tr[32] = "-", tv[32] = "-";
      if (tt > 0 && (variant == 0 || (variant >= 3 && variant < 10)) && !(m > 8 && variant > 4)) {
        std::snprintf(tr, sizeof tr, "%.1f", tt);
        std::snprintf(tv, sizeof tv, "%.2fx", tt / t);
      }
      std::printf("| %lld | %s | %.1f | %.1f | %.0f | %s | %s |\n", static_cast<long long>(m),
                  lv.name, t, bytes / 1e6, bytes / (t * 1e-6) / copy_bw * 100, tr, tv);
      std::fflush(stdout);
    }
  }
  // v23: the fold kernel's configurations measured at load (TuneDecode) for
  // the four 8B GEMMs, each tuned over clones of its weight totalling >= 3x
  // the L2 (so that it streams from DRAM, as in a model's layers); then the
  // layer graph at M = 1, 2, 4, 8 as the cost model dispatches it and with
  // the measured configurations, alternately (twice each).
  if (!no_layer && only.empty()) {
    std::printf("\n## v23: 8B layer with the fold kernel's configurations measured at load (TuneDecode)\n");
    using Tuning = cuda::W4DeviceWeight::DecodeTuning;
    constexpr int kT = cuda::W4DeviceWeight::kMaxTunedM;
    std::map<std::string, std::vector<Tuning>> tuned;
    for (const char* l : layers) {
      auto& rot = weights[std::string("8B") + l].rot;
      const double wb = static_cast<double>(rot[0]->backbone_bytes());
      const int ncopies = std::max(2, static_cast<int>(std::ceil(3 * kL2Bytes / wb)));
      std::vector<std::unique_ptr<cuda::W4DeviceWeight>> extra;
      std::vector<cuda::W4DeviceWeight*> ptrs;
      for (int i = 0; i < ncopies; ++i) {
        if (i < static_cast<int>(rot.size())) {
          ptrs.push_back(rot[i].get());
        } else {
          auto c = rot[0]->Clone();
          CKS(c.status());
          extra.push_back(std::move(*c));
          ptrs.push_back(extra.back().get());
        }
      }
      CKS(cuda::TuneDecode(ptrs, kT, ws.get(), g_stream));
      std::printf("# %s: measured picks for m = 1..8 (warps/splits/depth[ Gg: g warp groups]; - = the cost model's choice):", l);
      for (int m = 1; m <= kT; ++m) {
        const Tuning t = rot[0]->decode_tuning(m);
        tuned[l].push_back(t);
        if (t.warps > 0) {
          std::printf(" %d/%d/%d", t.warps, t.splits, t.depth);
          if (t.groups > 1) std::printf(" G%d", t.groups);
        } else {
          std::printf(" -");
        }
      }
      std::printf("\n");
    }
    auto apply = [&](bool on) {
      for (const char* l : layers) {
        for (auto& w : weights[std::string("8B") + l].rot) {
          for (int m = 1; m <= kT; ++m) w->set_decode_tuning(m, on ? tuned[l][m - 1] : Tuning{});
        }
      }
    };
    std::printf("| M | cost model us | measured us | measured / cost model | bytes MB | %% of copy BW (measured) |\n|---|---|---|---|---|---|\n");
    for (int64_t m : {1, 2, 4, 8}) {
      double bytes = 0;
      for (const char* l : layers) {
        const auto& dw = *weights[std::string("8B") + l].rot[0];
        bytes += dw.backbone_bytes() + 2.0 * m * (dw.fmt().k + dw.fmt().n);
      }
      auto layer_us = [&]() {
        return TimeGraph(10, [&](int i) {
          for (const char* l : layers) {
            const auto& dw = *weights[std::string("8B") + l].rot[i % 2];
            cuda::W4CudaParams p = bench::GemmParams(x, m, dw.fmt().k, y16, dw.fmt().n);
            p.use_ec = false;
            CKS(cuda::W4Linear(dw, p, ws.get(), g_stream));
          }
        });
      };
      double t_cm = 1e30, t_me = 1e30;
      for (int rep = 0; rep < 2; ++rep) {
        apply(false);
        t_cm = std::min(t_cm, layer_us());
        apply(true);
        t_me = std::min(t_me, layer_us());
      }
      apply(false);
      std::printf("| %lld | %.1f | %.1f | %.3f | %.1f | %.0f |\n", static_cast<long long>(m), t_cm,
                  t_me, t_me / t_cm, bytes / 1e6, bytes / (t_me * 1e-6) / copy_bw * 100);
      std::fflush(stdout);
    }
  }
  CKB(cublasDestroy(cub));
  CK(cudaFree(x));
  CK(cudaFree(y16));
  CK(cudaFree(v32));
  CK(cudaFree(wpool));
  return 0;
}

}  // namespace
}  // namespace spear::kernels

int main(int argc, char** argv) { return spear::kernels::Main(argc, argv); }
