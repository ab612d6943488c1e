// spear_bench_cpu: memory bandwidth vs cpu::Linear, in one run.
//
//   spear_bench_cpu [--threads N] [--iters N] [--w4-only] [--gemm-only] [--attention-only]
//
// memcpy GB/s counts bytes read + bytes written (STREAM "copy" convention),
// over 256 MiB buffers, on the pool and on one thread. Linear m=1 (decode
// GEMV) GB/s is weight bytes / time with the weights cold: the benchmark
// cycles through enough copies of W (>= 256 MiB in all) that no call finds
// its W in the last-level cache, as in a real forward pass. m=16 / m=128
// report GFLOP/s (2*m*n*k / time) with W warm.
// W4 rows (cpu::W4Linear): m=1, m=4 and m=8 (batch-4 / -8 decode) with cold weights,
// GB/s = bytes the kernel reads (codes + fp16 scales + u8 zeros + the EC as
// held in memory: float32 for "r32", int8 codes + fp16 scales and gate for
// "r32i8", a served .spear's form) / time; m=128 GFLOP/s counts the
// backbone's 2*m*n*k only (the EC's extra flops are < 2% at r=32).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "kernels/aligned.h"
#include "kernels/cpu_features.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"
#include "kernels/ops.h"
#include "kernels/thread_pool.h"
#include "kernels/w4_ops.h"

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

// ---- W4 (+EC) ----------------------------------------------------------------

struct W4Case {
  W4Weight w;
  EcWeights ec;
};

// i8: the EC's factors int8 and held compact, as a served .spear holds them
// (EcWeights::compact_i8; else float32).
W4Case MakeW4Case(const Shape& s, int64_t group, int64_t rank, bool i8, std::mt19937& rng) {
  W4Case c;
  c.w.fmt = {s.n, s.k, group, false};
  std::uniform_int_distribution<int> code(0, 255);
  c.w.packed.resize(static_cast<size_t>(s.n * c.w.fmt.packed_row_bytes()));
  for (uint8_t& b : c.w.packed) b = static_cast<uint8_t>(code(rng));
  const size_t ng = static_cast<size_t>(s.n * c.w.fmt.num_groups());
  c.w.scales.assign(ng, FloatToHalf(0.01f));
  c.w.zeros.assign(ng, 8);
  if (rank > 0) {
    c.ec.n = s.n;
    c.ec.k = s.k;
    c.ec.rank = rank;
    c.ec.gated = true;
    c.ec.gate_hidden = 32;
    c.ec.a.assign(static_cast<size_t>(rank * s.k), 0.01f);
    c.ec.b.assign(static_cast<size_t>(s.n * rank), 0.01f);
    c.ec.w1.assign(static_cast<size_t>(32 * rank), 0.01f);
    c.ec.b1.assign(32, 0.f);
    c.ec.w2.assign(static_cast<size_t>(rank * 32), 0.01f);
    c.ec.b2.assign(static_cast<size_t>(rank), 0.f);
    if (i8 && (!RoundEcFactorsI8(&c.ec).ok() || !CompactEcFactorsI8(&c.ec).ok())) {
      std::fprintf(stderr, "int8 EC: encoding failed\n");
      std::exit(1);
    }
  }
  return c;
}

// Bytes one call reads from the weights (see the file comment).
double W4ReadBytes(const W4Case& c, int64_t rank) {
  double b = static_cast<double>(c.w.packed.size() + c.w.scales.size() * 2 + c.w.zeros.size());
  if (rank > 0) b += static_cast<double>(c.ec.resident_bytes());
  return b;
}

double W4Seconds(const std::vector<W4Case>& cases, int64_t rank, int64_t m, ThreadPool* pool,
                 int iters) {
  const int64_t n = cases[0].w.fmt.n, k = cases[0].w.fmt.k;
  std::vector<float> x(m * k, 0.5f), y(m * n);
  W4LinearParams p;
  p.x = x.data();
  p.m = m;
  p.k = k;
  p.ldx = k;
  p.y = y.data();
  p.ldy = n;
  return TimeIt(iters, [&](int i) {
    const W4Case& c = cases[i % cases.size()];
    p.w = &c.w;
    p.ec = rank > 0 ? &c.ec : nullptr;
    if (absl::Status st = cpu::W4Linear(p, pool); !st.ok()) {
      std::fprintf(stderr, "W4Linear failed: %s\n", st.ToString().c_str());
      std::exit(1);
    }
  });
}

void W4Rows(ThreadPool* pool, int iters, double bwn) {
  const Shape shapes[] = {{576, 576, "q/o proj"},  {192, 576, "k/v proj"}, {1536, 576, "gate/up"},
                          {576, 1536, "down"},     {4096, 4096, "7B-class"}};
  std::printf("\n%-9s %-10s %-5s %-5s | %10s %8s %7s | %10s | %10s %8s | %13s\n", "W4", "n x k",
              "group", "ec", "m=1 us", "GB/s", "/memcpy", "m=4 us", "m=8 us", "GB/s",
              "m=128 GFLOP/s");
  std::mt19937 rng(2);
  for (const Shape& s : shapes) {
    // g128 where it divides k; SmolLM2's k=576 takes g64 instead.
    for (int64_t group : {s.k, s.k % 128 == 0 ? int64_t{128} : int64_t{64}}) {
      for (int variant = 0; variant < 3; ++variant) {  // no EC, r = 32 float32, r = 32 int8
        const int64_t rank = variant == 0 ? 0 : 32;
        const W4Case proto = MakeW4Case(s, group, rank, variant == 2, rng);
        const double bytes = W4ReadBytes(proto, rank);
        const int copies = static_cast<int>((256.0 * (1 << 20)) / bytes) + 1;
        const std::vector<W4Case> cold(copies, proto);
        const double t1 = W4Seconds(cold, rank, 1, pool, iters);
        const double t4 = W4Seconds(cold, rank, 4, pool, iters);  // batch-4 decode
        const double t8 = W4Seconds(cold, rank, 8, pool, iters);  // batch-8 decode
        const std::vector<W4Case> warm(1, proto);
        const double t128 = W4Seconds(warm, rank, 128, pool, iters);
        const std::string nk = std::to_string(s.n) + "x" + std::to_string(s.k);
        const std::string g = group == s.k ? "chan" : "g" + std::to_string(group);
        std::printf("%-9s %-10s %-5s %-5s | %10.1f %8.1f %7.2f | %10.1f | %10.1f %8.1f | %13.1f\n",
                    s.what, nk.c_str(), g.c_str(),
                    variant == 0 ? "-" : (variant == 1 ? "r32" : "r32i8"), t1 * 1e6,
                    bytes / t1 / 1e9, bytes / t1 / 1e9 / bwn, t4 * 1e6, t8 * 1e6, bytes / t8 / 1e9,
                    2.0 * 128 * s.n * s.k / t128 / 1e9);
      }
    }
  }
}

// ---- FMA peak and GEMM (m >= 16) rows ---------------------------------------

// 12 independent FMA chains (enough to cover latency x 2 ports) of `iters`
// steps; returns flops done. The results feed a volatile sink.
__attribute__((target("avx2,fma"))) double FmaLoopAvx2(int64_t iters) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
  for (int64_t t = 0; t < iters; ++t) {
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  volatile float sink = _mm256_cvtss_f32(s);
  (void)sink;
  return static_cast<double>(iters) * 12 * 8 * 2;
}

__attribute__((target("avx512f"))) double FmaLoopAvx512(int64_t iters) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
  for (int64_t t = 0; t < iters; ++t) {
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  }
  __m512 s = a[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return static_cast<double>(iters) * 16 * 16 * 2;
}

// Peak FMA GFLOP/s of the active ISA on `pool` (or one thread), best of 5
// runs of ~20 ms per thread: the ceiling for the GEMM rows below, measured
// under the same machine load.
double PeakGflops(ThreadPool* pool) {
  if (ActiveIsa() == Isa::kScalar) return 0;
  const bool z = ActiveIsa() == Isa::kAvx512;
  constexpr int64_t kIters = int64_t{1} << 20;
  const int threads = pool == nullptr ? 1 : pool->size();
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    double flop = 0;
    if (pool == nullptr) {
      flop = z ? FmaLoopAvx512(kIters) : FmaLoopAvx2(kIters);
    } else {
      pool->ParallelFor(threads, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) z ? FmaLoopAvx512(kIters) : FmaLoopAvx2(kIters);
      });
      flop = threads * (z ? 16.0 * 16 * 2 : 12.0 * 8 * 2) * kIters;
    }
    best = std::max(best, flop / Seconds(t0, Clock::now()) / 1e9);
  }
  return best;
}

// CPU seconds used by the whole process (all threads) so far.
double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct BestTimes {
  double wall = 1e30;  // best wall seconds per call
  double cpu = 1e30;   // best process CPU seconds per call (time on cores)
};

// Best-of seconds per Linear call (W warm): at least 3 calls and ~0.4 s.
// On a loaded machine the CPU-time figure is the one that tells how well
// the kernel uses a core while it has one.
BestTimes LinearBestSeconds(const Shape& s, DType dt, int64_t m, const std::vector<uint16_t>& w,
                            ThreadPool* pool, int iters, bool bf16_products = false,
                            bool f16_products = false) {
  std::vector<float> x(m * s.k), y(m * s.n);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 17) * 0.03f - 0.2f;
  LinearParams p;
  p.x = x.data();
  p.m = m;
  p.k = s.k;
  p.ldx = s.k;
  p.w = w.data();
  p.w_dtype = dt;
  p.n = s.n;
  p.y = y.data();
  p.ldy = s.n;
  p.bf16_products = bf16_products;
  p.f16_products = f16_products;
  (void)cpu::Linear(p, pool);  // warm-up
  BestTimes best;
  double total = 0;
  for (int done = 0; iters > 0 ? done < iters : (done < 3 || total < 0.4); ++done) {
    const double c0 = ProcessCpuSeconds();
    const auto t0 = Clock::now();
    if (absl::Status st = cpu::Linear(p, pool); !st.ok()) {
      std::fprintf(stderr, "Linear failed: %s\n", st.ToString().c_str());
      std::exit(1);
    }
    const double el = Seconds(t0, Clock::now());
    best.wall = std::min(best.wall, el);
    best.cpu = std::min(best.cpu, ProcessCpuSeconds() - c0);
    total += el;
  }
  return best;
}

// Prefill-shaped Linear (m = 128, 512; best of N) next to the FMA peak:
// wall GFLOP/s over the pool's peak, and GFLOP per CPU-second (per core
// busy) over the one-thread peak, which the load of a shared machine
// disturbs much less. Row "bf16x": BF16 weights with
// LinearParams::bf16_products (VDPBF16PS where CpuHasBf16Dot(), which does
// two multiply-adds per lane: its peak is twice the FMA peak). Row "f16x":
// BF16 weights with LinearParams::f16_products (AVX512-FP16 where
// CpuHasF16Fma(): 32 fp16 multiply-adds per instruction). The last shape is
// the lm_head's transpose (the EC trainer's backward).
void GemmRows(ThreadPool* pool, int iters) {
  const double peak1 = PeakGflops(nullptr), peakn = PeakGflops(pool);
  std::printf("\nFMA peak (%s, best of 5): 1 thread %.1f GFLOP/s, %d threads %.1f GFLOP/s\n",
              std::string(IsaName(ActiveIsa())).c_str(), peak1, pool->size(), peakn);
  std::printf("%-9s %-12s %-5s | %13s %5s %8s %5s | %13s %5s %8s %5s\n", "GEMM", "n x k", "dt",
              "m=128 GFLOP/s", "/peak", "GF/cpu-s", "/pk1", "m=512 GFLOP/s", "/peak", "GF/cpu-s",
              "/pk1");
  const Shape shapes[] = {{576, 576, "q/o proj"}, {192, 576, "k/v proj"}, {1536, 576, "gate/up"},
                          {576, 1536, "down"},    {49152, 576, "lm_head"},
                          {576, 49152, "lm_headT"}};
  std::printf("bf16 products (VDPBF16PS): %s; fp16 products (AVX512-FP16): %s\n",
              CpuHasBf16Dot() ? "yes" : "no (bf16x = bf16)",
              CpuHasF16Fma() ? "yes" : "no (f16x = bf16x)");
  std::mt19937 rng(2);
  for (const Shape& s : shapes) {
    for (int form = 0; form < 5; ++form) {
      const DType dt = form == 0 ? DType::kF32 : form == 1 ? DType::kF16 : DType::kBF16;
      const bool bf16x = form >= 3, f16x = form == 4;
      const auto ws = MakeWeights(s, dt, 1, rng);
      const double flop = 2.0 * s.n * s.k;
      const BestTimes t128 = LinearBestSeconds(s, dt, 128, ws[0], pool, iters, bf16x, f16x);
      const BestTimes t512 = LinearBestSeconds(s, dt, 512, ws[0], pool, iters, bf16x, f16x);
      const double w128 = 128 * flop / t128.wall / 1e9, c128 = 128 * flop / t128.cpu / 1e9;
      const double w512 = 512 * flop / t512.wall / 1e9, c512 = 512 * flop / t512.cpu / 1e9;
      const auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
      const std::string nk = std::to_string(s.n) + "x" + std::to_string(s.k);
      std::printf("%-9s %-12s %-5s | %13.1f %5.2f %8.1f %5.2f | %13.1f %5.2f %8.1f %5.2f\n",
                  s.what, nk.c_str(),
                  f16x ? "f16x" : bf16x ? "bf16x" : std::string(DTypeName(dt)).c_str(), w128,
                  ratio(w128, peakn), c128, ratio(c128, peak1), w512, ratio(w512, peakn), c512,
                  ratio(c512, peak1));
      std::fflush(stdout);
    }
  }
}

// Decode attention (cpu::Attention, one new token of one sequence) with
// SmolLM2-135M's heads (9 query heads on 3 kv heads, head_dim 64), KV cold:
// the calls cycle through enough sequences' caches (>= 256 MiB in all) that
// none finds its K / V in the last-level cache, as in a batched decode
// (the quantizer's self-generated calibration). GB/s = K + V bytes read /
// time, against the memcpy bandwidth of the same run.
void AttentionRows(ThreadPool* pool, int iters, double bwn) {
  constexpr int kHeads = 9, kKv = 3, kHd = 64, kBlock = 16;
  std::printf("\ndecode attention, %d heads on %d kv heads, head_dim %d, KV cold\n", kHeads, kKv,
              kHd);
  std::printf("%-8s | %10s %8s %7s\n", "context", "us / call", "GB/s", "/memcpy");
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  for (const int64_t len : {256, 1024, 4096}) {
    const int64_t blocks = (len + kBlock - 1) / kBlock;
    const int64_t kv_row = int64_t{kKv} * kHd;
    const double kv_bytes = 2.0 * len * kv_row * 4;
    const int seqs = static_cast<int>((256.0 * (1 << 20)) / kv_bytes) + 1;
    // 64-byte aligned, as engine::KvCache allocates its cache.
    const size_t nel = static_cast<size_t>(seqs * blocks * kBlock * kv_row);
    const AlignedFloats kc = AllocateAlignedFloats(static_cast<int64_t>(nel)),
                        vc = AllocateAlignedFloats(static_cast<int64_t>(nel));
    if (kc == nullptr || vc == nullptr) {
      std::fprintf(stderr, "cannot allocate the attention rows' caches\n");
      std::exit(1);
    }
    for (size_t e = 0; e < nel; ++e) {
      kc[e] = dist(rng);
      vc[e] = dist(rng);
    }
    std::vector<std::vector<int32_t>> tables(seqs);
    for (int sq = 0; sq < seqs; ++sq) {
      for (int64_t b = 0; b < blocks; ++b) tables[sq].push_back(static_cast<int32_t>(sq * blocks + b));
    }
    std::vector<float> q(kHeads * kHd), out(kHeads * kHd);
    for (auto& v : q) v = dist(rng);
    AttentionParams p;
    p.q = q.data();
    p.m = 1;
    p.ldq = kHeads * kHd;
    p.n_heads = kHeads;
    p.n_kv_heads = kKv;
    p.head_dim = kHd;
    p.k_cache = kc.get();
    p.v_cache = vc.get();
    p.block_size = kBlock;
    p.num_blocks_in_table = blocks;
    p.num_cache_blocks = seqs * blocks;
    p.q_start = len - 1;
    p.scale = 0.125f;
    p.ldo = kHeads * kHd;
    p.out = out.data();
    const int n = std::max(iters > 0 ? iters : 0, 2 * seqs);
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = Clock::now();
      for (int c = 0; c < n; ++c) {
        p.block_table = tables[c % seqs].data();
        if (!cpu::Attention(p, pool).ok()) std::abort();
      }
      best = std::min(best, Seconds(t0, Clock::now()) / n);
    }
    std::printf("%-8lld | %10.2f %8.1f %7.2f\n", static_cast<long long>(len), best * 1e6,
                kv_bytes / best / 1e9, kv_bytes / best / 1e9 / bwn);
    std::fflush(stdout);
  }
}

int Main(int argc, char** argv) {
  int threads = 0, iters = 0;
  bool w4_only = false, gemm_only = false, attention_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else if (a == "--w4-only") {
      w4_only = true;
    } else if (a == "--gemm-only") {
      gemm_only = true;
    } else if (a == "--attention-only") {
      attention_only = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--threads N] [--iters N] [--w4-only] [--gemm-only] "
                   "[--attention-only]\n",
                   argv[0]);
      return 2;
    }
  }
  ThreadPool pool(threads);
  std::printf("spear_bench_cpu: isa=%s threads=%d\n", std::string(IsaName(ActiveIsa())).c_str(),
              pool.size());
  if (gemm_only) {
    GemmRows(&pool, iters);
    return 0;
  }
  const double bw1 = MemcpyGbps(nullptr, iters);
  const double bwn = MemcpyGbps(&pool, iters);
  std::printf("memcpy 256 MiB (read+write): 1 thread %.1f GB/s, %d threads %.1f GB/s\n\n", bw1,
              pool.size(), bwn);

  if (w4_only) {
    W4Rows(&pool, iters, bwn);
    return 0;
  }
  if (attention_only) {
    AttentionRows(&pool, iters, bwn);
    return 0;
  }
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
  W4Rows(&pool, iters, bwn);
  AttentionRows(&pool, iters, bwn);
  GemmRows(&pool, iters);
  return 0;
}

}  // namespace
}  // namespace spear::kernels

int main(int argc, char** argv) { return spear::kernels::Main(argc, argv); }
