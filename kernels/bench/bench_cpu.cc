// spear_bench_cpu: memory bandwidth vs cpu::Linear, in one run.
//
//   spear_bench_cpu [--threads N] [--iters N]
//
// memcpy GB/s counts bytes read + bytes written (STREAM "copy" convention),
// over 256 MiB buffers, on the pool and on one thread. Linear m=1 (decode
// GEMV) GB/s is weight bytes / time with the weights cold: the benchmark
// cycles through enough copies of W (>= 256 MiB in all) that no call finds
// its W in the last-level cache, as in a real forward pass. m=16 / m=128
// report GFLOP/s (2*m*n*k / time) with W warm.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu_features.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "kernels/thread_pool.h"

namespace spear::kernels {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Runs fn repeatedly: `iters` times if > 0, else until ~0.3 s (at least 3).
// Returns seconds per call (after one warm-up call).
template <class Fn>
double TimeIt(int iters, Fn&& fn) {
  fn(0);
  const auto t0 = Clock::now();
  int done = 0;
  while (true) {
    fn(done + 1);
    ++done;
    const double el = Seconds(t0, Clock::now());
    if (iters > 0 ? done >= iters : (done >= 3 && el >= 0.3)) return el / done;
  }
}

double MemcpyGbps(ThreadPool* pool, int iters) {
  constexpr int64_t kBytes = int64_t{256} << 20;
  std::vector<char> src(kBytes, 1), dst(kBytes, 0);
  const int64_t chunks = pool == nullptr ? 1 : pool->size();
  const double s = TimeIt(iters, [&](int) {
    if (pool == nullptr) {
      std::memcpy(dst.data(), src.data(), kBytes);
      return;
    }
    pool->ParallelFor(chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = kBytes * c / chunks, e = kBytes * (c + 1) / chunks;
        std::memcpy(dst.data() + b, src.data() + b, e - b);
      }
    });
  });
  return 2.0 * kBytes / s / 1e9;
}

struct Shape {
  int64_t n, k;
  const char* what;
};

// Weight copies, each n*k elements of `dt` with random values.
std::vector<std::vector<uint16_t>> MakeWeights(const Shape& s, DType dt, int copies,
                                               std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  const int64_t elems = s.n * s.k;
  const int64_t words = dt == DType::kF32 ? 2 * elems : elems;  // uint16 units
  std::vector<std::vector<uint16_t>> out(copies, std::vector<uint16_t>(words));
  for (int64_t i = 0; i < elems; ++i) {
    const float v = d(rng);
    if (dt == DType::kF32) {
      std::memcpy(out[0].data() + 2 * i, &v, 4);
    } else {
      out[0][i] = dt == DType::kF16 ? FloatToHalf(v) : FloatToBF16(v);
    }
  }
  // Same values, different addresses: enough to keep the caches cold.
  for (int c = 1; c < copies; ++c) out[c] = out[0];
  return out;
}

double LinearSeconds(const Shape& s, DType dt, int64_t m,
                     const std::vector<std::vector<uint16_t>>& ws, ThreadPool* pool, int iters) {
  std::vector<float> x(m * s.k, 0.5f), y(m * s.n);
  LinearParams p;
  p.x = x.data();
  p.m = m;
  p.k = s.k;
  p.ldx = s.k;
  p.w_dtype = dt;
  p.n = s.n;
  p.y = y.data();
  p.ldy = s.n;
  return TimeIt(iters, [&](int i) {
    p.w = ws[i % ws.size()].data();
    if (absl::Status st = cpu::Linear(p, pool); !st.ok()) {
      std::fprintf(stderr, "Linear failed: %s\n", st.ToString().c_str());
      std::exit(1);
    }
  });
}

int Main(int argc, char** argv) {
  int threads = 0, iters = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--iters N]\n", argv[0]);
      return 2;
    }
  }
  ThreadPool pool(threads);
  std::printf("spear_bench_cpu: isa=%s threads=%d\n", std::string(IsaName(ActiveIsa())).c_str(),
              pool.size());
  const double bw1 = MemcpyGbps(nullptr, iters);
  const double bwn = MemcpyGbps(&pool, iters);
  std::printf("memcpy 256 MiB (read+write): 1 thread %.1f GB/s, %d threads %.1f GB/s\n\n", bw1,
              pool.size(), bwn);

  const Shape shapes[] = {{576, 576, "q/o proj"},     {192, 576, "k/v proj"},
                          {1536, 576, "gate/up"},     {576, 1536, "down"},
                          {49152, 576, "lm_head"},    {4096, 4096, "7B-class"}};
  std::printf("%-9s %-12s %-4s | %10s %8s %7s | %12s %13s\n", "what", "n x k", "dt",
              "m=1 us", "GB/s", "/memcpy", "m=16 GFLOP/s", "m=128 GFLOP/s");
  std::mt19937 rng(1);
  for (const Shape& s : shapes) {
    for (DType dt : {DType::kF32, DType::kF16}) {
      const double wbytes = static_cast<double>(s.n) * s.k * DTypeSize(dt);
      const int copies = static_cast<int>((256.0 * (1 << 20)) / wbytes) + 1;
      const auto ws = MakeWeights(s, dt, copies, rng);
      const double t1 = LinearSeconds(s, dt, 1, ws, &pool, iters);
      const std::vector<std::vector<uint16_t>> warm(ws.begin(), ws.begin() + 1);
      const double t16 = LinearSeconds(s, dt, 16, warm, &pool, iters);
      const double t128 = LinearSeconds(s, dt, 128, warm, &pool, iters);
      const double flop = 2.0 * s.n * s.k;
      const std::string nk = std::to_string(s.n) + "x" + std::to_string(s.k);
      std::printf("%-9s %-12s %-4s | %10.1f %8.1f %7.2f | %12.1f %13.1f\n", s.what, nk.c_str(),
                  std::string(DTypeName(dt)).c_str(), t1 * 1e6, wbytes / t1 / 1e9,
                  wbytes / t1 / 1e9 / bwn, 16 * flop / t16 / 1e9, 128 * flop / t128 / 1e9);
    }
  }
  return 0;
}

}  // namespace
}  // namespace spear::kernels

int main(int argc, char** argv) { return spear::kernels::Main(argc, argv); }
