// cpu:: ops: validation, ISA dispatch and the split of work over the pool.
// The SIMD bodies live in ops_simd.inc (instantiated per ISA); this file is
// compiled with baseline flags and only reaches AVX code through the kernel
// table chosen by ActiveIsa().
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/validate.h"
#include "cpu/ops_isa.h"
#include "kernels/cpu_features.h"
#include "kernels/ops.h"

namespace spear::kernels::cpu {
namespace {

const internal::IsaKernels& Kernels() {
  switch (ActiveIsa()) {
    case Isa::kAvx512:
      return internal::kAvx512Kernels;
    case Isa::kAvx2:
      return internal::kAvx2Kernels;
    case Isa::kScalar:
      break;
  }
  return internal::kScalarKernels;
}

int Threads(const ThreadPool* pool) { return pool == nullptr ? 1 : pool->size(); }

// Runs fn(begin, end) over [0, n) on the pool, or inline without one.
template <class Fn>
void Run(ThreadPool* pool, int64_t n, int64_t grain, Fn&& fn) {
  if (pool == nullptr || n <= grain) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  pool->ParallelFor(n, grain, fn);
}

// Boundary b of `parts` near-equal pieces of [0, n), rounded to `align`.
int64_t Split(int64_t n, int64_t parts, int64_t b, int64_t align) {
  if (b >= parts) return n;
  const int64_t v = n * b / parts / align * align;
  return v < n ? v : n;
}

// Per-thread scratch buffers, grown on demand; each Slot is its own buffer
// (an attention item uses three at once).
enum ScratchSlot { kScoresSlot, kKtSlot, kStatsSlot, kLinearSlot, kKlSlot };

template <ScratchSlot Slot>
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
  return buf.data();
}

// Linear with m >= kGemmMinM: tasks of (column block, row block) pulled
// from a shared counter by every thread, so a thread that the OS
// descheduled (the machine is shared) does not hold up the others. Column
// blocks are gemm_nr-aligned; each task packs its own W columns, so row
// blocks (which repack the same W) are only added when there are too few
// column blocks to go around.
void LinearGemm(const internal::GemmKernel& kern, const LinearParams& p, ThreadPool* pool,
                int threads) {
  const int64_t nr = kern.nr, mr = kern.mr;
  int64_t cols = (64 + nr - 1) / nr * nr;
  // Long rows (the lm_head's transpose, k = 49,152) on a kernel that reads
  // x once per range: every task streams all of x from memory, so as few
  // column tasks as keep the threads busy. (The F32 GEMM reads x once per
  // panel of ~32 outputs whatever the task's width, and measured 164 vs 178
  // GFLOP/s with such wide tasks in one spear_bench_cpu run: not for it.)
  if (kern.x_once_per_range && p.k >= 8192) {
    const int64_t even = (p.n + threads - 1) / threads;
    cols = std::max(cols, (even + nr - 1) / nr * nr);
  }
  int64_t n_tasks = (p.n + cols - 1) / cols;
  int64_t m_parts = 1;
  const int64_t want = 4 * static_cast<int64_t>(threads);
  while (n_tasks * m_parts < want && p.m / (m_parts + 1) >= 48) ++m_parts;
  // Few tasks overall: coarser column blocks are as good and pack less often.
  if (n_tasks * m_parts > 64 * threads) {
    cols *= 4;
    n_tasks = (p.n + cols - 1) / cols;
  }
  const int64_t tasks = n_tasks * m_parts;
  if (threads == 1 || tasks == 1) {
    kern.range(p, 0, p.m, 0, p.n, Scratch<kLinearSlot>(kern.scratch(p.k)));
    return;
  }
  std::atomic<int64_t> next{0};
  pool->ParallelFor(threads, 1, [&](int64_t, int64_t) {
    float* scratch = Scratch<kLinearSlot>(kern.scratch(p.k));
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t mi = t / n_tasks, ni = t % n_tasks;
      const int64_t m0 = Split(p.m, m_parts, mi, mr), m1 = Split(p.m, m_parts, mi + 1, mr);
      const int64_t n0 = ni * cols, n1 = n0 + cols < p.n ? n0 + cols : p.n;
      if (m0 < m1) kern.range(p, m0, m1, n0, n1, scratch);
    }
  });
}

}  // namespace

absl::Status Linear(const LinearParams& p, ThreadPool* pool) {
  if (absl::Status s = kernels::internal::ValidateLinear(p); !s.ok()) return s;
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  if (p.k == 0) {  // empty dot products: y (+)= bias
    for (int64_t i = 0; i < p.m; ++i) {
      float* y = p.y + i * p.ldy;
      for (int64_t j = 0; j < p.n; ++j) {
        const float b = p.bias != nullptr ? p.bias[j] : 0.f;
        y[j] = p.accumulate ? y[j] + b : b;
      }
    }
    return absl::OkStatus();
  }
  const internal::IsaKernels& kern = Kernels();
  const int threads = Threads(pool);
  if (p.m >= internal::kGemmMinM) {
    const int gemm_threads = p.m * p.n * p.k < (int64_t{1} << 18) ? 1 : threads;
    if (p.f16_products && p.w_dtype == DType::kBF16 && CpuHasF16Fma()) {
      LinearGemm(internal::kAvx512F16Gemm, p, pool, gemm_threads);
    } else if (p.bf16_products && p.w_dtype == DType::kBF16 && CpuHasBf16Dot()) {
      LinearGemm(internal::kAvx512Bf16Gemm, p, pool, gemm_threads);
    } else {
      const internal::GemmKernel gemm = {kern.linear, kern.linear_scratch, kern.gemm_mr,
                                         kern.gemm_nr, false};
      LinearGemm(gemm, p, pool, gemm_threads);
    }
    return absl::OkStatus();
  }
  // Small problems are not worth waking the pool (~10 us).
  if (threads == 1 || p.m * p.n * p.k < (int64_t{1} << 16)) {
    kern.linear(p, 0, p.m, 0, p.n, nullptr);
    return absl::OkStatus();
  }
  // Output rows in chunks of >= 64 (aligned to 16) so each thread streams a
  // contiguous slab of W. When that leaves threads idle and m is large
  // (prefill), x rows are split too: each extra m chunk re-reads its W slab,
  // mostly from cache.
  constexpr int64_t kRowAlign = 16, kMinRows = 64;
  int64_t n_parts = p.n / kMinRows;
  if (n_parts < 1) n_parts = 1;
  if (n_parts > threads) n_parts = threads;
  int64_t m_parts = 1;
  if (n_parts < threads && p.m >= 32) {
    m_parts = (threads + n_parts - 1) / n_parts;
    if (m_parts > p.m / 16) m_parts = p.m / 16;
  }
  pool->ParallelFor(n_parts * m_parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mi = t / n_parts, ni = t % n_parts;
      const int64_t m0 = Split(p.m, m_parts, mi, 4), m1 = Split(p.m, m_parts, mi + 1, 4);
      const int64_t n0 = Split(p.n, n_parts, ni, kRowAlign);
      const int64_t n1 = Split(p.n, n_parts, ni + 1, kRowAlign);
      if (m0 < m1 && n0 < n1) kern.linear(p, m0, m1, n0, n1, nullptr);
    }
  });
  return absl::OkStatus();
}

absl::Status RmsNorm(const RmsNormParams& p, ThreadPool* pool) {
  if (absl::Status s = kernels::internal::ValidateRmsNorm(p); !s.ok()) return s;
  const internal::IsaKernels& kern = Kernels();
  const int64_t grain = (int64_t{1} << 14) / p.d + 1;
  Run(pool, p.m, grain, [&](int64_t r0, int64_t r1) { kern.rms_norm(p, r0, r1); });
  return absl::OkStatus();
}

absl::Status Rope(const RopeParams& p, ThreadPool* pool) {
  if (absl::Status s = kernels::internal::ValidateRope(p); !s.ok()) return s;
  const internal::IsaKernels& kern = Kernels();
  const int64_t grain = (int64_t{1} << 14) / (int64_t{p.n_heads} * p.head_dim) + 1;
  Run(pool, p.m, grain, [&](int64_t r0, int64_t r1) { kern.rope(p, r0, r1); });
  return absl::OkStatus();
}

absl::Status SiluMul(const SiluMulParams& p, ThreadPool* pool) {
  if (absl::Status s = kernels::internal::ValidateSiluMul(p); !s.ok()) return s;
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  const internal::IsaKernels& kern = Kernels();
  // Work items are (row, column chunk of 4096) so a single wide row (decode)
  // can still be split.
  constexpr int64_t kCols = 4096;
  const int64_t col_chunks = (p.n + kCols - 1) / kCols;
  Run(pool, p.m * col_chunks, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / col_chunks, c0 = (t % col_chunks) * kCols;
      kern.silu_mul(p, i, i + 1, c0, c0 + kCols < p.n ? c0 + kCols : p.n);
    }
  });
  return absl::OkStatus();
}

absl::Status LogSumExp(const LogSumExpParams& p, ThreadPool* pool) {
  if (absl::Status s = kernels::internal::ValidateLogSumExp(p); !s.ok()) return s;
  if (p.m == 0) return absl::OkStatus();
  const internal::IsaKernels& kern = Kernels();
  const int64_t grain = (int64_t{1} << 14) / p.n + 1;
  Run(pool, p.m, grain, [&](int64_t r0, int64_t r1) { kern.log_sum_exp(p, r0, r1); });
  return absl::OkStatus();
}

absl::Status KlDivergence(const KlDivergenceParams& p, ThreadPool* pool) {
  if (absl::Status s = kernels::internal::ValidateKlDivergence(p); !s.ok()) return s;
  if (p.m == 0) return absl::OkStatus();
  const internal::IsaKernels& kern = Kernels();
  const int64_t grain = (int64_t{1} << 14) / p.n + 1;
  Run(pool, p.m, grain, [&](int64_t r0, int64_t r1) {
    kern.kl_divergence(p, r0, r1, Scratch<kKlSlot>(2 * p.n));
  });
  return absl::OkStatus();
}

absl::Status Attention(const AttentionParams& p, ThreadPool* pool) {
  if (absl::Status s = kernels::internal::ValidateAttention(p); !s.ok()) return s;
  if (p.m == 0) return absl::OkStatus();
  const internal::IsaKernels& kern = Kernels();
  const int threads = Threads(pool);
  const int64_t hd = p.head_dim;
  const int64_t groups = p.n_heads / p.n_kv_heads;
  const int64_t gw = groups * hd;  // a kv head's query heads' outputs: contiguous
  // Work items: (token, kv head), each for the kv head's query heads (every
  // K / V row read once per group).
  const int64_t rows = p.m * p.n_kv_heads;
  const int64_t max_len = p.q_start + p.m;

  // Split the key range (flash-decoding) when there are fewer rows than
  // twice the threads and the context is long enough: each split produces a
  // partial softmax (max, sum, unnormalised output) per head, merged below.
  constexpr int64_t kMinSplitLen = 128;
  int64_t splits = 1;
  if (rows < 2 * threads && max_len >= 2 * kMinSplitLen) {
    splits = (2 * threads + rows - 1) / rows;
    if (splits > max_len / kMinSplitLen) splits = max_len / kMinSplitLen;
  }

  // Software prefetch of the K / V rows where they are likely cold (the
  // per-token forms below): the first token of the call (decode: every
  // call) and the first item a thread takes. A later token of a chunk (m > 1
  // with the keys split) reads the rows the token before it just read, which
  // are in cache; there the prefetches would only cost instructions.
  auto Prefetch = [](int64_t i, int64_t item, int64_t first_item) {
    return i == 0 || item == first_item;
  };

  if (splits == 1 && p.m > 1) {
    // Prefill: tiles of consecutive query tokens (about 24 query rows a
    // tile: a kv head's G heads x the tile's tokens) share each block of
    // keys (AttentionTileRange). Items are taken in the order first tile,
    // last tile, second, second to last, ... so that each thread's
    // contiguous chunk holds as much of the causal triangle as the others'.
    const int64_t tq = std::max<int64_t>(1, 24 / groups);
    const int64_t tiles = (p.m + tq - 1) / tq;
    const int64_t items = tiles * p.n_kv_heads;
    Run(pool, items, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t k = r / p.n_kv_heads, kvh = r % p.n_kv_heads;
        const int64_t tile = k % 2 == 0 ? k / 2 : tiles - 1 - k / 2;
        const int64_t i0 = tile * tq, i1 = std::min(p.m, i0 + tq);
        kern.attention_tile(p, i0, i1, kvh,
                            Scratch<kScoresSlot>((i1 - i0) * groups * (p.q_start + i1)),
                            Scratch<kKtSlot>(hd * internal::kMaxVectorFloats),
                            Scratch<kStatsSlot>(2 * groups));
      }
    });
    return absl::OkStatus();
  }

  if (splits == 1) {
    Run(pool, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r / p.n_kv_heads, kvh = r % p.n_kv_heads;
        const int64_t len = p.q_start + i + 1;
        float* out = p.out + i * p.ldo + kvh * gw;
        kern.attention(p, i, kvh, 0, len, Scratch<kScoresSlot>(groups * len), out,
                       Scratch<kStatsSlot>(2 * groups),
                       /*normalize=*/true, /*prefetch=*/Prefetch(i, r, r0));
      }
    });
    return absl::OkStatus();
  }

  std::vector<float> part(rows * splits * gw);
  std::vector<float> stats(rows * splits * 2 * groups);
  Run(pool, rows * splits, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / splits, s = t % splits;
      const int64_t i = r / p.n_kv_heads, kvh = r % p.n_kv_heads;
      const int64_t len = p.q_start + i + 1;
      const int64_t pos0 = Split(len, splits, s, 1), pos1 = Split(len, splits, s + 1, 1);
      float* st = stats.data() + t * 2 * groups;
      if (pos0 >= pos1) {  // short row: this split is empty
        for (int64_t g = 0; g < groups; ++g) {
          st[2 * g] = -INFINITY;
          st[2 * g + 1] = 0.f;
        }
        continue;
      }
      kern.attention(p, i, kvh, pos0, pos1, Scratch<kScoresSlot>(groups * (pos1 - pos0)),
                     part.data() + t * gw, st, /*normalize=*/false,
                     /*prefetch=*/Prefetch(i, t, t0));
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / p.n_kv_heads, kvh = r % p.n_kv_heads;
    for (int64_t g = 0; g < groups; ++g) {
      const float* st = stats.data() + r * splits * 2 * groups + 2 * g;  // split s: + s * 2G
      float mx = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) {
        mx = st[s * 2 * groups] > mx ? st[s * 2 * groups] : mx;
      }
      float* out = p.out + i * p.ldo + kvh * gw + g * hd;
      float total = 0.f;
      for (int64_t d = 0; d < hd; ++d) out[d] = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        if (st[s * 2 * groups + 1] == 0.f) continue;
        const float f = std::exp(st[s * 2 * groups] - mx);
        total += f * st[s * 2 * groups + 1];
        const float* a = part.data() + (r * splits + s) * gw + g * hd;
        for (int64_t d = 0; d < hd; ++d) out[d] += f * a[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < hd; ++d) out[d] *= inv;
    }
  }
  return absl::OkStatus();
}

}  // namespace cpu
