// cpu::W4Linear: validation, ISA dispatch, the EC's small GEMMs and the
// split of work over the pool. The SIMD bodies are in w4_simd.inc; this file
// is compiled with baseline flags and reaches AVX code only through the
// table ActiveIsa() picks.
//
// Two paths:
//  - m <= 8 (decode): one fused dequantize-GEMV over the packed codes
//    (0.5 byte/weight streamed once; scale and zero point applied per group
//    through per-token group sums of x, see w4_simd.inc), threads over
//    output rows; the EC's
//    u = A x and gate run first (tiny), and B (g ⊙ u) is added per output
//    row in the GEMV epilogue, so y is written exactly once.
//  - m > 8 (prefill): tiles of W rows are dequantized into thread-local F32
//    scratch and multiplied by the public cpu::Linear (compute bound: the
//    dequantization is O(n k), the GEMM O(m n k)); the EC is two small
//    GEMMs through cpu::Linear (u = A x; y += B (g ⊙ u)). With bf16
//    products (W4LinearParams::bf16_products, AVX512-BF16 CPUs) all of W is
//    dequantized to one bf16 matrix first and multiplied in one Linear.
// Both paths permute the activations into "xp order" (w4_isa.h) once, with
// the act_scale division folded into that copy.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "cpu/ops_isa.h"
#include "cpu/w4_isa.h"
#include "kernels/cpu_features.h"
#include "kernels/ec_factors.h"
#include "kernels/ops.h"
#include "kernels/w4_ops.h"

namespace spear::kernels::cpu {
namespace {

const internal::W4IsaKernels& W4Kernels() {
  switch (ActiveIsa()) {
    case Isa::kAvx512:
      return internal::kW4Avx512Kernels;
    case Isa::kAvx2:
      return internal::kW4Avx2Kernels;
    case Isa::kScalar:
      break;
  }
  return internal::kW4ScalarKernels;
}

// Per-thread scratch, grown on demand (never shrinks: the engine calls with
// the same shapes over and over), its start aligned to a 64-byte cache line:
// the GEMV's vector loads of x (rows of k floats at a 64-byte multiple
// apart for the model shapes) then never straddle two lines.
float* Scratch(std::vector<float>& buf, int64_t len) {
  constexpr int64_t kPad = 16;  // floats = 64 bytes
  if (static_cast<int64_t>(buf.size()) < len + kPad) buf.resize(static_cast<size_t>(len + kPad));
  const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
  return buf.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

// xp[t, :] = permute(x[t, :] / act_scale) for t < m (see w4_ops.h / w4_isa.h).
// With xsum != nullptr also xsum[t, g] = sum of xp[t, :] over group g.
void PermuteActivations(const W4LinearParams& p, int block, float* xp, float* xsum,
                        ThreadPool* pool) {
  const W4Weight& w = *p.w;
  const int64_t k = w.fmt.k, gs = w.fmt.group_size, ng = w.fmt.num_groups();
  const int64_t half = block / 2;
  const float* as = w.act_scale.empty() ? nullptr : w.act_scale.data();
  auto rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* x = p.x + t * p.ldx;
      float* o = xp + t * k;
      for (int64_t g = 0; g < ng; ++g) {
        // A ragged last group has fewer blocks (see w4_isa.h).
        const int64_t c0 = g * gs, len = w.fmt.group_len(g);
        const int64_t nb = (gs & 1) ? 0 : len / block;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t c = c0 + b * block;
          for (int64_t l = 0; l < half; ++l) {
            const float xe = x[c + 2 * l], xo = x[c + 2 * l + 1];
            o[c + l] = as ? xe / as[c + 2 * l] : xe;
            o[c + half + l] = as ? xo / as[c + 2 * l + 1] : xo;
          }
        }
        for (int64_t c = c0 + nb * block; c < c0 + len; ++c) o[c] = as ? x[c] / as[c] : x[c];
        if (xsum != nullptr) {
          float sum = 0.f;
          for (int64_t c = c0; c < c0 + len; ++c) sum += o[c];
          xsum[t * ng + g] = sum;
        }
      }
    }
  };
  if (pool == nullptr || p.m < 64) {
    rows(0, p.m);
  } else {
    pool->ParallelFor(p.m, 16, rows);
  }
}

LinearParams DenseParams(const float* x, int64_t m, int64_t k, int64_t ldx, const float* w,
                         int64_t n, const float* bias, float* y, int64_t ldy, bool accumulate) {
  LinearParams l;
  l.x = x;
  l.m = m;
  l.k = k;
  l.ldx = ldx;
  l.w = w;
  l.w_dtype = DType::kF32;
  l.n = n;
  l.bias = bias;
  l.y = y;
  l.ldy = ldy;
  l.accumulate = accumulate;
  return l;
}

// What the EC adds to y: B (g ⊙ u). v [m, r] = g ⊙ u in this thread's
// scratch (valid until its next call); B as floats (b) or, for a decode
// call (m <= 8) on an int8 EC held compact (EcWeights::compact_i8), as its
// codes (b8) with their scales widened into this thread's scratch.
struct EcTerms {
  const float* v = nullptr;
  const float* b = nullptr;
  const int8_t* b8 = nullptr;
  const float* b8_scales = nullptr;
};

// hid = silu(W1 u + b1); z = W2 hid + b2 (into v); g = 1 + tanh(z); v = g ⊙ u
// (u, hid, v: [m, r], [m, h], [m, r]); the gate into gate_out when asked.
absl::Status GateTimesU(int64_t m, int64_t r, int64_t h, const EcFloatView& f, const float* u,
                        float* hid, float* v, float* gate_out, ThreadPool* pool) {
  if (absl::Status s = Linear(DenseParams(u, m, r, r, f.w1, h, f.b1, hid, h, false), pool);
      !s.ok()) {
    return s;
  }
  for (int64_t i = 0; i < m * h; ++i) hid[i] = hid[i] / (1.f + std::exp(-hid[i]));
  if (absl::Status s = Linear(DenseParams(hid, m, h, h, f.w2, r, f.b2, v, r, false), pool);
      !s.ok()) {
    return s;
  }
  for (int64_t i = 0; i < m * r; ++i) {
    const float g = 1.f + std::tanh(v[i]);
    if (gate_out != nullptr) gate_out[i] = g;
    v[i] = g * u[i];
  }
  return absl::OkStatus();
}

// Splits `rows` rows over the pool in `parts` contiguous ranges.
template <class Fn>
void SplitRows(ThreadPool* pool, int64_t rows, int64_t parts, Fn&& fn) {
  pool->ParallelFor(parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(rows * t / parts, rows * (t + 1) / parts);
  });
}

// The EC's terms (EcTerms) with u = A x (raw x) and the gate of w4_ops.h.
// kern != null (a decode call, m <= 8): u by kern->ec_u straight from A as
// held, float32 or int8 codes (no per-call copy of A or B; the same sums
// either way, so a compact int8 EC gives its float form's outputs bit for
// bit); only the small gate MLP (2 h r + h + r values) is widened from fp16.
// A compact EC's codes are valid by construction (CompactEcFactorsI8 makes
// them from values on the grid; the loader decodes and checks them first).
// kern == null (prefill): A, B and the gate as floats (EcFloats: a compact
// EC decoded into this thread's scratch, r (k + n) + 2 h r + h + r floats,
// amortized over the m tokens) and u by cpu::Linear.
absl::Status EcLowRank(const W4LinearParams& p, const internal::W4IsaKernels* kern,
                       ThreadPool* pool, EcTerms* out) {
  thread_local std::vector<float> ec_buf, b8_scales;
  thread_local EcScratch dec;
  const EcWeights& e = *p.ec;
  const int64_t m = p.m, r = e.rank, h = e.gated ? e.gate_hidden : 0;
  float* u = Scratch(ec_buf, m * (2 * r + h));
  float* v = u + m * r;
  float* hid = v + m * r;
  out->v = v;
  const int threads = pool == nullptr ? 1 : pool->size();
  // Decode: A is r x k values read once from memory (512 KiB of floats at
  // r=32, k=4096); split its rows over the pool (measured at 4096 x 4096,
  // r=32, 16 threads, float A through cpu::Linear: the EC's cost fell from
  // +140 us to +15 us over a 243 us GEMV). Small A (< 64 K values) is not
  // worth a second pool wake-up.
  const bool split = threads > 1 && r > 1 && r * e.k >= (int64_t{1} << 16);
  EcFloatView f;
  if (kern != nullptr) {
    const bool c = e.compact_i8();
    internal::EcUArgs ua;
    ua.x = p.x, ua.ldx = p.ldx, ua.m = m, ua.k = e.k, ua.u = u, ua.ldu = r;
    if (c) {
      ua.a8 = e.i8.a.data(), ua.a8_scales = e.i8.a_scales.data();
    } else {
      ua.a = e.a.data();
    }
    if (split) {
      SplitRows(pool, r, r < threads ? r : threads,
                [&](int64_t i0, int64_t i1) { kern->ec_u(ua, i0, i1); });
    } else {
      kern->ec_u(ua, 0, r);
    }
    if (c) {
      auto widen = [kern](const std::vector<uint16_t>& in, std::vector<float>* o) {
        o->resize(in.size());
        kern->widen_f16(in.data(), static_cast<int64_t>(in.size()), o->data());
        return o->data();
      };
      out->b8 = e.i8.b.data(), out->b8_scales = widen(e.i8.b_scales, &b8_scales);
      if (e.gated) {
        const EcWeights::Gate16& g = e.gate16;
        f.w1 = widen(g.w1, &dec.w1), f.b1 = widen(g.b1, &dec.b1);
        f.w2 = widen(g.w2, &dec.w2), f.b2 = widen(g.b2, &dec.b2);
      }
    } else {
      out->b = e.b.data();
      if (e.gated) f.w1 = e.w1.data(), f.b1 = e.b1.data(), f.w2 = e.w2.data(), f.b2 = e.b2.data();
    }
  } else {
    if (absl::Status s = EcFloats(e, &dec, &f); !s.ok()) return s;
    out->b = f.b;
    if (absl::Status s =
            Linear(DenseParams(p.x, m, e.k, p.ldx, f.a, r, nullptr, u, r, false), pool);
        !s.ok()) {
      return s;
    }
  }
  if (!e.gated) {
    for (int64_t i = 0; i < m * r; ++i) v[i] = u[i];
    if (p.gate_out != nullptr) {
      for (int64_t i = 0; i < m * r; ++i) p.gate_out[i] = 1.f;
    }
    return absl::OkStatus();
  }
  return GateTimesU(m, r, h, f, u, hid, v, p.gate_out, pool);
}

internal::W4KernelArgs WeightArgs(const W4Weight& w) {
  internal::W4KernelArgs a;
  a.packed = w.packed.data();
  a.scales = w.scales.data();
  a.zeros = w.zeros.data();
  a.n = w.fmt.n;
  a.k = w.fmt.k;
  a.group_size = w.fmt.group_size;
  a.num_groups = w.fmt.num_groups();
  a.packed_row_bytes = w.fmt.packed_row_bytes();
  return a;
}

absl::Status Decode(const W4LinearParams& p, const internal::W4IsaKernels& kern, ThreadPool* pool) {
  thread_local std::vector<float> xp_buf;
  const W4Weight& w = *p.w;
  const int64_t n = w.fmt.n, k = w.fmt.k;
  const int64_t ng = w.fmt.num_groups();
  float* xp = Scratch(xp_buf, p.m * (k + ng));
  float* xsum = xp + p.m * k;
  PermuteActivations(p, kern.block, xp, xsum, nullptr);

  internal::W4KernelArgs a = WeightArgs(w);
  a.xp = xp;
  a.xsum = xsum;
  a.m = p.m;
  a.bias = p.bias;
  a.y = p.y;
  a.ldy = p.ldy;
  a.accumulate = p.accumulate;
  if (p.ec != nullptr) {
    EcTerms ec;
    if (absl::Status s = EcLowRank(p, &kern, pool, &ec); !s.ok()) return s;
    a.ec_v = ec.v;
    a.ec_b = ec.b;
    a.ec_b8 = ec.b8;
    a.ec_b8_scales = ec.b8_scales;
    a.rank = p.ec->rank;
  }
  // Rows in chunks of >= 64 (multiples of 16) so each thread streams a
  // contiguous slab of codes. Below 32 KiB of codes one thread does it
  // (a guess; SmolLM2's 576 x 576, 162 KiB, measured 31 us on 16 threads vs
  // 36 us on one with cold weights: wake-up and TLB costs dominate there).
  const int threads = pool == nullptr ? 1 : pool->size();
  if (threads == 1 || n * k < (int64_t{1} << 16)) {
    kern.gemv(a, 0, n);
    return absl::OkStatus();
  }
  int64_t chunk = (n + threads - 1) / threads;
  chunk = chunk < 64 ? 64 : (chunk + 15) / 16 * 16;
  const int64_t parts = (n + chunk - 1) / chunk;
  pool->ParallelFor(parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * chunk, j1 = j0 + chunk < n ? j0 + chunk : n;
      kern.gemv(a, j0, j1);
    }
  });
  return absl::OkStatus();
}

// SPEAR_CPU_BF16_PREFILL=1: W4LinearParams::bf16_products for every call.
bool Bf16PrefillFromEnv() {
  static const bool on = [] {
    const char* e = std::getenv("SPEAR_CPU_BF16_PREFILL");
    return e != nullptr && std::string_view(e) == "1";
  }();
  return on;
}

// The EC's part of a prefill: y += B (g ⊙ u), u = A x.
absl::Status PrefillEc(const W4LinearParams& p, ThreadPool* pool) {
  if (p.ec == nullptr) return absl::OkStatus();
  EcTerms ec;
  if (absl::Status s = EcLowRank(p, nullptr, pool, &ec); !s.ok()) return s;
  const int64_t r = p.ec->rank;
  return Linear(DenseParams(ec.v, p.m, r, r, ec.b, p.w->fmt.n, nullptr, p.y, p.ldy, true), pool);
}

// Tiles of ~256 KiB of F32 weights (32..256 rows, multiples of 16): small
// enough to stay in L2 between being written and being used, and at least
// one AVX-512 GEMM column panel (32 outputs) tall: k = 4096 gave 16-row
// tiles, which left half of every panel's FMAs idle (the W4 prefill at 128
// tokens ran at 100 GFLOP/s, 200 with 32 rows; docs/results/foundation.md).
// At k > 2048 a tile is then 32 rows = 128 k bytes (512 KiB at k = 4096).
struct DequantTiling {
  int64_t rows, count;
};
DequantTiling TilingOf(const W4Weight& w) {
  const int64_t n = w.fmt.n, k = w.fmt.k;
  int64_t rows = (int64_t{256} << 10) / (4 * k);
  rows = rows < 32 ? 32 : (rows > 256 ? 256 : rows / 16 * 16);
  return {rows, (n + rows - 1) / rows};
}

// Dequantizes the tiles of W (TilingOf) into thread-local F32 scratch, in
// parallel over the pool, and calls fn(t, j0, j1, tile) for tile t = rows
// [j0, j1) of W_eff on the thread that dequantized it.
template <class Fn>
void ForEachDequantTile(const W4Weight& w, const internal::W4IsaKernels& kern, ThreadPool* pool,
                        Fn&& fn) {
  const int64_t n = w.fmt.n, k = w.fmt.k;
  const DequantTiling tl = TilingOf(w);
  const internal::W4KernelArgs a = WeightArgs(w);
  auto run = [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> tile_buf;
    float* wt = Scratch(tile_buf, tl.rows * k);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * tl.rows, j1 = j0 + tl.rows < n ? j0 + tl.rows : n;
      kern.dequant(a, j0, j1, wt);
      fn(t, j0, j1, static_cast<const float*>(wt));
    }
  };
  if (pool == nullptr || tl.count == 1) {
    run(0, tl.count);
  } else {
    pool->ParallelFor(tl.count, 1, run);
  }
}

// bf16 products: all of W dequantized into one bf16 matrix, then one
// Linear over it, so that x is converted to bf16 once per range of the
// GEMM, not once per tile. The matrix is the calling thread's scratch: 2
// bytes per weight of the largest linear it ran (SmolLM2 1.7 MB, a
// Llama-3-8B down projection 117 MB).
absl::Status PrefillBf16(const W4LinearParams& p, const internal::W4IsaKernels& kern,
                         const float* xp, ThreadPool* pool) {
  thread_local std::vector<uint16_t> wb_buf;
  const W4Weight& w = *p.w;
  const int64_t n = w.fmt.n, k = w.fmt.k;
  if (static_cast<int64_t>(wb_buf.size()) < n * k) wb_buf.resize(static_cast<size_t>(n * k));
  uint16_t* wb = wb_buf.data();
  ForEachDequantTile(w, kern, pool, [&](int64_t, int64_t j0, int64_t j1, const float* wt) {
    uint16_t* o = wb + j0 * k;
    for (int64_t i = 0; i < (j1 - j0) * k; ++i) o[i] = FloatToBF16(wt[i]);
  });
  LinearParams l = DenseParams(xp, p.m, k, k, nullptr, n, p.bias, p.y, p.ldy, p.accumulate);
  l.w = wb;
  l.w_dtype = DType::kBF16;
  l.bf16_products = true;
  if (absl::Status s = Linear(l, pool); !s.ok()) return s;
  return PrefillEc(p, pool);
}

absl::Status Prefill(const W4LinearParams& p, const internal::W4IsaKernels& kern,
                     ThreadPool* pool) {
  thread_local std::vector<float> xp_buf;
  const W4Weight& w = *p.w;
  const int64_t k = w.fmt.k;
  float* xp = Scratch(xp_buf, p.m * k);
  PermuteActivations(p, kern.block, xp, nullptr, pool);
  if ((p.bf16_products || Bf16PrefillFromEnv()) && p.m >= internal::kGemmMinM && CpuHasBf16Dot()) {
    return PrefillBf16(p, kern, xp, pool);
  }
  // Each tile times x on the thread that dequantized it; one status per tile
  // (written by that thread only).
  std::vector<absl::Status> errors(static_cast<size_t>(TilingOf(w).count));
  ForEachDequantTile(w, kern, pool, [&](int64_t t, int64_t j0, int64_t j1, const float* wt) {
    errors[static_cast<size_t>(t)] =
        Linear(DenseParams(xp, p.m, k, k, wt, j1 - j0, p.bias ? p.bias + j0 : nullptr, p.y + j0,
                           p.ldy, p.accumulate),
               nullptr);
  });
  for (const absl::Status& s : errors) {
    if (!s.ok()) return s;
  }
  return PrefillEc(p, pool);
}

}  // namespace

absl::Status W4Linear(const W4LinearParams& p, ThreadPool* pool) {
  if (absl::Status s = ValidateW4Linear(p); !s.ok()) return s;
  if (p.m == 0) return absl::OkStatus();
  const internal::W4IsaKernels& kern = W4Kernels();
  if (p.m <= internal::kW4MaxGemvTokens) return Decode(p, kern, pool);
  return Prefill(p, kern, pool);
}

}  // namespace spear::kernels::cpu
