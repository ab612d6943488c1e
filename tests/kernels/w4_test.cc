// W4 + EC linear: cpu::W4Linear vs ref::W4Linear on every ISA variant and
// pool (ops_harness.h rules: seeded inputs, NaN-poisoned outputs and row
// padding, stated tolerances), an independent check of the reference
// against dense ref::Linear on a dequantized matrix plus the EC formula
// written out here, parameter validation, and model::W4Linear.
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <vector>

#include "kernels/cpu_features.h"
#include "kernels/ec_factors.h"
#include "kernels/w4_ops.h"
#include "ops_harness.h"
#include "worker/model/w4_linear.h"

namespace spear::kernels::testing {
namespace {

// cpu accumulates in float32 (k <= 1536 terms of size <= ~1, plus the EC's
// r <= 32 terms and a float32 gate) against double: |err| stays far below
// these; NaN (an unwritten output) always fails.
constexpr double kW4Tol = 2e-4;
constexpr double kW4Nmse = 1e-9;
constexpr double kGateTol = 1e-5;

struct KCase {
  int64_t k, group;  // group == k: per-channel
};
constexpr KCase kKCases[] = {{32, 32},   {64, 64},   {96, 96},    {576, 576},
                             {576, 32}, {576, 64}, {1536, 128}};
constexpr int64_t kMs[] = {1, 2, 3, 5, 8, 9, 17, 64};
constexpr int64_t kNs[] = {1, 3, 65, 576};

W4Weight MakeW4(int64_t n, int64_t k, int64_t group, bool symmetric, bool act_scale,
                std::mt19937_64& rng) {
  W4Weight w;
  w.fmt = {n, k, group, symmetric};
  std::uniform_int_distribution<int> code(0, 15);
  std::uniform_real_distribution<float> scale(0.005f, 0.05f), as(0.5f, 2.f);
  w.packed.resize(static_cast<size_t>(n * w.fmt.packed_row_bytes()));
  for (uint8_t& b : w.packed) b = static_cast<uint8_t>(code(rng) | (code(rng) << 4));
  const size_t ng = static_cast<size_t>(n * w.fmt.num_groups());
  w.scales.resize(ng);
  w.zeros.resize(ng);
  for (size_t i = 0; i < ng; ++i) {
    w.scales[i] = FloatToHalf(scale(rng));
    w.zeros[i] = symmetric ? 8 : static_cast<uint8_t>(code(rng));
  }
  if (act_scale) {
    w.act_scale.resize(static_cast<size_t>(k));
    for (float& s : w.act_scale) s = as(rng);
  }
  return w;
}

EcWeights MakeEc(int64_t n, int64_t k, int64_t rank, bool gated, std::mt19937_64& rng) {
  EcWeights e;
  e.n = n;
  e.k = k;
  e.rank = rank;
  e.gated = gated;
  e.gate_hidden = gated ? 16 : 0;
  const int64_t h = e.gate_hidden;
  auto fill = [&](std::vector<float>* v, size_t size, float amp) {
    std::uniform_real_distribution<float> d(-amp, amp);
    v->resize(size);
    for (float& x : *v) x = d(rng);
  };
  fill(&e.a, static_cast<size_t>(rank * k), 2.f / std::sqrt(static_cast<float>(k)));
  fill(&e.b, static_cast<size_t>(n * rank), 0.3f);
  if (gated) {  // large enough that the gate really varies over (0, 2)
    fill(&e.w1, static_cast<size_t>(h * rank), 1.5f);
    fill(&e.b1, static_cast<size_t>(h), 0.5f);
    fill(&e.w2, static_cast<size_t>(rank * h), 1.f);
    fill(&e.b2, static_cast<size_t>(rank), 0.5f);
  }
  return e;
}

// Dense W_eff [n, k] = scale * (nibble - zero) / act_scale[c], decoded from
// the bytes without W4Weight's helpers.
std::vector<float> DecodeDense(const W4Weight& w) {
  const int64_t n = w.fmt.n, k = w.fmt.k, group = w.fmt.group_size;
  std::vector<float> dense(n * k);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t c = 0; c < k; ++c) {
      const uint8_t byte = w.packed[j * ((k + 1) / 2) + c / 2];
      const int q = c % 2 == 0 ? byte & 15 : byte >> 4;
      const int64_t g = j * ((k + group - 1) / group) + c / group;
      dense[j * k + c] = HalfToFloat(w.scales[g]) * static_cast<float>(q - w.zeros[g]) /
                         (w.act_scale.empty() ? 1.f : w.act_scale[c]);
    }
  }
  return dense;
}

class W4Test : public OpsTest {
 protected:
  // The call's parameters but its outputs (y, gate_out).
  static W4LinearParams Params(const std::vector<float>& x, int64_t m, int64_t ldx,
                               const W4Weight& w, const std::optional<EcWeights>& ec,
                               const std::vector<float>* bias, int64_t ldy, bool acc) {
    W4LinearParams p;
    p.x = x.data();
    p.m = m;
    p.k = w.fmt.k;
    p.ldx = ldx;
    p.w = &w;
    p.ec = ec ? &*ec : nullptr;
    p.bias = bias != nullptr ? bias->data() : nullptr;
    p.ldy = ldy;
    p.accumulate = acc;
    return p;
  }
  // One case of cpu vs ref. ec_mode: 0 none, else rank {1, 8, 32} and gated
  // chosen by the caller.
  void RunCase(int64_t m, const KCase& kc, int64_t n, bool sym, bool act, bool bias, bool acc,
               int64_t rank, bool gated) {
    SCOPED_TRACE(::testing::Message()
                 << "m=" << m << " k=" << kc.k << " g=" << kc.group << " n=" << n
                 << " sym=" << sym << " act_scale=" << act << " bias=" << bias
                 << " accumulate=" << acc << " rank=" << rank << " gated=" << gated
                 << " seed=" << seed_);
    const int64_t k = kc.k, ldx = k + (m > 1 ? 5 : 0), ldy = n + 3;
    const W4Weight w = MakeW4(n, k, kc.group, sym, act, rng_);
    std::optional<EcWeights> ec;
    if (rank > 0) ec = MakeEc(n, k, rank, gated, rng_);
    const std::vector<float> x = RandomRows(m, k, ldx);
    const std::vector<float> b = Random(n);
    const std::vector<float> y0 = acc ? RandomRows(m, n, ldy) : std::vector<float>(m * ldy, kPoison);
    std::vector<float> y_ref = y0, y_cpu = y0;
    const size_t gsize = static_cast<size_t>(m * (rank > 0 ? rank : 1));
    std::vector<float> g_ref(gsize, kPoison), g_cpu(gsize, kPoison);

    W4LinearParams p = Params(x, m, ldx, w, ec, bias ? &b : nullptr, ldy, acc);
    p.y = y_ref.data();
    p.gate_out = g_ref.data();
    ASSERT_TRUE(ref::W4Linear(p).ok());
    p.y = y_cpu.data();
    p.gate_out = g_cpu.data();
    const absl::Status s = cpu::W4Linear(p, pool());
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_TRUE(Close(y_cpu, y_ref, m, n, ldy, kW4Tol, kW4Nmse));
    if (rank > 0) {
      EXPECT_TRUE(Close(g_cpu, g_ref, m, rank, rank, kGateTol, 1e-10)) << "gate_out";
      if (!gated) {
        for (float g : g_cpu) ASSERT_EQ(g, 1.f);
      }
    } else {
      for (float g : g_cpu) ASSERT_TRUE(std::isnan(g)) << "gate_out written without an EC";
    }
  }

  // Every m and n for one k case; the flags and EC variants cycle with a
  // case counter so that each combination appears across the sweep.
  void Sweep(const KCase& kc) {
    constexpr int64_t kRanks[] = {0, 1, 8, 32};
    int c = 0;
    for (int64_t m : kMs) {
      for (int64_t n : kNs) {
        const int64_t rank = kRanks[c % 4];
        RunCase(m, kc, n, (c & 1) != 0, ((c >> 1) & 1) != 0, ((c >> 2) & 1) != 0,
                ((c >> 3) & 1) != 0, rank, ((c / 4) & 1) == 0);
        if (HasFatalFailure()) return;
        ++c;
      }
    }
  }
};

TEST_P(W4Test, K32PerChannel) { Sweep(kKCases[0]); }
TEST_P(W4Test, K64PerChannel) { Sweep(kKCases[1]); }
TEST_P(W4Test, K96PerChannel) { Sweep(kKCases[2]); }
TEST_P(W4Test, K576PerChannel) { Sweep(kKCases[3]); }
TEST_P(W4Test, K576G32) { Sweep(kKCases[4]); }
TEST_P(W4Test, K576G64) { Sweep(kKCases[5]); }
TEST_P(W4Test, K1536G128) { Sweep(kKCases[6]); }

// Every combination of the flags once, on a small decode and prefill shape.
TEST_P(W4Test, AllFlagCombinations) {
  for (int64_t m : {int64_t{4}, int64_t{12}}) {
    for (int bits = 0; bits < 16; ++bits) {
      for (int64_t rank : {0, 8}) {
        for (bool gated : {false, true}) {
          if (rank == 0 && gated) continue;
          RunCase(m, {128, 64}, 70, bits & 1, bits & 2, bits & 4, bits & 8, rank, gated);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

// Odd group sizes (groups starting mid-byte) and odd k take the tail path.
TEST_P(W4Test, OddGroupsAndOddK) {
  RunCase(1, {45, 15}, 33, false, true, true, false, 8, true);
  RunCase(3, {33, 33}, 17, true, false, false, true, 1, false);
  RunCase(20, {45, 15}, 40, false, false, true, true, 8, true);
  RunCase(2, {100, 50}, 20, false, true, false, false, 0, false);  // block tail in a group
}

// Ragged last group (group_size does not divide k): SmolLM2's k = 576 with
// groups of 128 (last group 64), a last group shorter than one SIMD block,
// and an odd k with an odd last group.
TEST_P(W4Test, RaggedLastGroup) {
  RunCase(1, {576, 128}, 40, false, true, true, false, 8, true);
  RunCase(4, {576, 128}, 33, true, false, false, true, 0, false);
  RunCase(9, {576, 128}, 21, false, false, true, true, 4, true);  // tiled prefill path
  RunCase(1, {100, 32}, 19, false, true, false, false, 3, false);  // last group of 4
  RunCase(2, {77, 20}, 13, true, true, true, false, 2, true);      // odd k, last group of 17
  RunCase(17, {90, 64}, 30, false, true, false, true, 0, false);   // last group of 26
}

// Decode with r * k >= 64K: the EC's A x is split over the pool's threads.
// Prefill with bf16 products (W4LinearParams::bf16_products): W_eff and x
// rounded to bf16 (2^-9 of each), so per output |y - y_ref| <= 2^-8 sum_c
// |W_eff x| (+ the fp32 path's tolerance), and over all outputs the rms
// error stays under 2^-8 of y's rms (random rounding: ~2^-9 sqrt(2/3) is
// expected). Where the CPU has no AVX512-BF16 the flag changes nothing
// (bitwise the fp32 path); where it has, the outputs must differ from it.
TEST_P(W4Test, Bf16ProductsPrefill) {
  SCOPED_TRACE(CpuHasBf16Dot() ? "bf16 products run" : "no AVX512-BF16 here: the fp32 path");
  int c = 0;
  for (const KCase& kc : {kKCases[3], kKCases[4], kKCases[6]}) {
    for (int64_t m : {16, 17, 64}) {
      for (int64_t n : {65, 576}) {
        SCOPED_TRACE(::testing::Message() << "m=" << m << " k=" << kc.k << " g=" << kc.group
                                          << " n=" << n << " case " << c << " seed=" << seed_);
        const bool act = c & 1, bias = c & 2, acc = c & 4;
        const int64_t rank = c % 3 == 0 ? 0 : 8, k = kc.k, ldx = k + 5, ldy = n + 3;
        ++c;
        const W4Weight w = MakeW4(n, k, kc.group, false, act, rng_);
        std::optional<EcWeights> ec;
        if (rank > 0) ec = MakeEc(n, k, rank, true, rng_);
        const std::vector<float> x = RandomRows(m, k, ldx), b = Random(n);
        const std::vector<float> y0 =
            acc ? RandomRows(m, n, ldy) : std::vector<float>(m * ldy, kPoison);
        std::vector<float> y_ref = y0, y_f32 = y0, y_bf = y0;
        W4LinearParams p = Params(x, m, ldx, w, ec, bias ? &b : nullptr, ldy, acc);
        p.y = y_ref.data();
        ASSERT_TRUE(ref::W4Linear(p).ok());
        p.y = y_f32.data();
        ASSERT_TRUE(cpu::W4Linear(p, pool()).ok());
        p.y = y_bf.data();
        p.bf16_products = true;
        ASSERT_TRUE(cpu::W4Linear(p, pool()).ok());
        const std::vector<float> dense = DecodeDense(w);
        double err2 = 0, y2 = 0;
        bool differs = false;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            double sabs = 0;
            for (int64_t q = 0; q < k; ++q) sabs += std::fabs(double{dense[j * k + q]} * x[i * ldx + q]);
            const double r = y_ref[i * ldy + j], got = y_bf[i * ldy + j];
            ASSERT_LE(std::fabs(got - r), sabs / 256 + kW4Tol * (1 + std::fabs(r)))
                << "row " << i << " output " << j;
            err2 += (got - r) * (got - r);
            y2 += (r - (acc ? y0[i * ldy + j] : 0.0)) * (r - (acc ? y0[i * ldy + j] : 0.0));
            differs |= y_bf[i * ldy + j] != y_f32[i * ldy + j];
          }
          for (int64_t j = n; j < ldy; ++j) {
            ASSERT_EQ(std::memcmp(&y_bf[i * ldy + j], &y0[i * ldy + j], 4), 0) << "padding written";
          }
        }
        EXPECT_LE(std::sqrt(err2), std::sqrt(y2) / 256);
        EXPECT_EQ(differs, CpuHasBf16Dot());
      }
    }
  }
}

TEST_P(W4Test, LargeEcSplitAcrossPool) {
  RunCase(1, {2304, 128}, 70, false, true, true, false, 32, true);
  RunCase(5, {2304, 2304}, 33, true, false, false, true, 29, false);
}

// An int8 EC held compact (EcWeights::compact_i8: codes and scales only, as
// a loaded .spear holds it) must give the very floats its decoded form gives:
// the kernels decode A and B exactly, then run the same code. Decode sizes
// (the GEMV and its EC epilogue) and prefill sizes (the dequantized tiles,
// PrefillEc), the pool's split of A's rows included (rank 32, k 2304).
TEST_P(W4Test, CompactInt8EcEqualsItsFloats) {
  struct Case {
    int64_t m, n, k, group, rank;
  };
  for (const Case& c : {Case{1, 576, 576, 576, 4}, Case{3, 65, 1536, 128, 2}, Case{9, 576, 576, 576, 8},
                        Case{64, 70, 576, 64, 4}, Case{1, 70, 2304, 2304, 32},
                        // B's row past the GEMV epilogue's 256-rank chunk; 8 tokens, k off 64
                        Case{3, 40, 576, 64, 260}, Case{8, 33, 1000, 1000, 19}}) {
    SCOPED_TRACE(::testing::Message() << "m=" << c.m << " n=" << c.n << " k=" << c.k
                                      << " rank=" << c.rank << " seed=" << seed_);
    const W4Weight w = MakeW4(c.n, c.k, c.group, false, false, rng_);
    EcWeights floats = MakeEc(c.n, c.k, c.rank, true, rng_);
    ASSERT_TRUE(RoundEcFactorsI8(&floats).ok());
    for (std::vector<float>* g : {&floats.w1, &floats.b1, &floats.w2, &floats.b2}) {
      for (float& v : *g) v = HalfToFloat(FloatToHalf(v));  // the gate as a checkpoint stores it
    }
    EcWeights compact = floats;
    ASSERT_TRUE(CompactEcFactorsI8(&compact).ok());
    ASSERT_TRUE(compact.compact_i8());
    ASSERT_TRUE(compact.a.empty() && compact.b.empty() && compact.w1.empty() &&
                compact.b2.empty());
    // Held: exactly the bytes a checkpoint stores (one byte per A / B value,
    // the fp16 scales, the fp16 gate), about a quarter of the float form.
    EXPECT_EQ(compact.resident_bytes(), compact.bytes());
    EXPECT_EQ(floats.resident_bytes(), 4 * floats.num_params());
    EXPECT_LT(compact.resident_bytes() * 3, floats.resident_bytes());
    const int64_t ldx = c.k + 3, ldy = c.n + 1;
    const std::vector<float> x = RandomRows(c.m, c.k, ldx);
    std::vector<float> y_f(c.m * ldy, kPoison), y_c(c.m * ldy, kPoison), y_rf = y_f, y_rc = y_f;
    std::vector<float> g_f(c.m * c.rank, kPoison), g_c = g_f;
    const std::optional<EcWeights> of = floats, oc = compact;  // Params keeps a pointer
    W4LinearParams p = Params(x, c.m, ldx, w, of, nullptr, ldy, false);
    p.y = y_f.data();
    p.gate_out = g_f.data();
    ASSERT_TRUE(cpu::W4Linear(p, pool()).ok());
    p.y = y_rf.data();
    ASSERT_TRUE(ref::W4Linear(p).ok());
    p = Params(x, c.m, ldx, w, oc, nullptr, ldy, false);
    p.y = y_c.data();
    p.gate_out = g_c.data();
    const absl::Status s = cpu::W4Linear(p, pool());
    ASSERT_TRUE(s.ok()) << s;
    p.y = y_rc.data();
    ASSERT_TRUE(ref::W4Linear(p).ok());
    for (int64_t t = 0; t < c.m; ++t) {
      for (int64_t j = 0; j < c.n; ++j) {
        ASSERT_EQ(y_c[t * ldy + j], y_f[t * ldy + j]) << t << "," << j;
        ASSERT_EQ(y_rc[t * ldy + j], y_rf[t * ldy + j]) << t << "," << j;
      }
    }
    ASSERT_EQ(g_c, g_f);
    EXPECT_TRUE(Close(y_c, y_rc, c.m, c.n, ldy, kW4Tol, kW4Nmse));
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, W4Test, ::testing::ValuesIn(AllVariants()), VariantName);

// ---- The reference against an independent formulation ---------------------

// Dense W_eff[j, c] = scale * (nibble - zero) / act_scale[c], decoded here
// from the bytes without W4Weight's helpers; the EC in double from its
// formula. ref::W4Linear must agree (to float32 output rounding).
TEST(W4RefTest, EqualsDenseReferencePlusExplicitEc) {
  std::mt19937_64 rng(BaseSeed());
  for (const KCase& kc : {KCase{64, 64}, KCase{96, 32}, KCase{256, 128}, KCase{200, 64}}) {
    for (bool gated : {false, true}) {
      const int64_t n = 37, m = 3, k = kc.k, r = 8;
      const W4Weight w = MakeW4(n, k, kc.group, false, true, rng);
      const EcWeights e = MakeEc(n, k, r, gated, rng);
      std::vector<float> x(m * k), bias(n);
      std::uniform_real_distribution<float> d(-1.f, 1.f);
      for (float& v : x) v = d(rng);
      for (float& v : bias) v = d(rng);

      const std::vector<float> dense = DecodeDense(w);
      std::vector<float> y_dense(m * n);
      LinearParams lp{x.data(), m, k, k, dense.data(), DType::kF32, n, bias.data(),
                      y_dense.data(), n, false};
      ASSERT_TRUE(ref::Linear(lp).ok());
      for (int64_t i = 0; i < m; ++i) {
        std::vector<double> u(r), g(r, 1.0);
        for (int64_t q = 0; q < r; ++q) {
          for (int64_t c = 0; c < k; ++c) u[q] += double{e.a[q * k + c]} * x[i * k + c];
        }
        if (gated) {
          std::vector<double> hid(e.gate_hidden);
          for (int64_t t = 0; t < e.gate_hidden; ++t) {
            double a = e.b1[t];
            for (int64_t q = 0; q < r; ++q) a += double{e.w1[t * r + q]} * u[q];
            hid[t] = a / (1 + std::exp(-a));
          }
          for (int64_t q = 0; q < r; ++q) {
            double z = e.b2[q];
            for (int64_t t = 0; t < e.gate_hidden; ++t) z += double{e.w2[q * e.gate_hidden + t]} * hid[t];
            g[q] = 1 + std::tanh(z);
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          double corr = 0;
          for (int64_t q = 0; q < r; ++q) corr += double{e.b[j * r + q]} * g[q] * u[q];
          y_dense[i * n + j] = static_cast<float>(y_dense[i * n + j] + corr);
        }
      }
      std::vector<float> y(m * n, kPoison);
      W4LinearParams p;
      p.x = x.data();
      p.m = m;
      p.k = k;
      p.ldx = k;
      p.w = &w;
      p.ec = &e;
      p.bias = bias.data();
      p.y = y.data();
      p.ldy = n;
      ASSERT_TRUE(ref::W4Linear(p).ok());
      EXPECT_TRUE(Close(y, y_dense, m, n, n, 1e-5, 1e-12)) << "k=" << k << " gated=" << gated;
    }
  }
}

// ---- Validation ----------------------------------------------------------------

TEST(W4ValidateTest, RejectsInconsistentParams) {
  std::mt19937_64 rng(1);
  const W4Weight w = MakeW4(16, 64, 32, false, false, rng);
  const EcWeights e = MakeEc(16, 64, 4, true, rng);
  std::vector<float> x(2 * 64), y(2 * 16);
  auto base = [&] {
    W4LinearParams p;
    p.x = x.data();
    p.m = 2;
    p.k = 64;
    p.ldx = 64;
    p.w = &w;
    p.ec = &e;
    p.y = y.data();
    p.ldy = 16;
    return p;
  };
  ASSERT_TRUE(cpu::W4Linear(base(), nullptr).ok());
  auto expect_bad = [&](const W4LinearParams& p, const char* what) {
    EXPECT_EQ(ref::W4Linear(p).code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(cpu::W4Linear(p, nullptr).code(), absl::StatusCode::kInvalidArgument) << what;
  };
  W4LinearParams p = base();
  p.x = nullptr;
  expect_bad(p, "null x");
  p = base();
  p.y = nullptr;
  expect_bad(p, "null y");
  p = base();
  p.w = nullptr;
  expect_bad(p, "null w");
  p = base();
  p.k = 32;
  expect_bad(p, "k mismatch");
  p = base();
  p.ldx = 63;
  expect_bad(p, "ldx < k");
  p = base();
  p.ldy = 15;
  expect_bad(p, "ldy < n");
  p = base();
  p.m = -1;
  expect_bad(p, "negative m");

  W4Weight bad = w;
  bad.fmt.group_size = 65;  // larger than k
  p = base();
  p.w = &bad;
  expect_bad(p, "group larger than k");
  bad = w;
  bad.fmt.group_size = 20;  // ragged: 4 groups per row, buffers hold 2
  p.w = &bad;
  expect_bad(p, "scales sized for another group size");
  bad = w;
  bad.packed.pop_back();
  p.w = &bad;
  expect_bad(p, "short packed");
  bad = w;
  bad.scales.push_back(0);
  p.w = &bad;
  expect_bad(p, "long scales");
  bad = w;
  bad.act_scale.assign(63, 1.f);
  p.w = &bad;
  expect_bad(p, "act_scale size");

  EcWeights be = e;
  be.n = 17;
  p = base();
  p.ec = &be;
  expect_bad(p, "EC n");
  be = e;
  be.a.pop_back();
  expect_bad(p, "EC A size");
  be = e;
  be.b2.clear();
  expect_bad(p, "EC gate b2");
  be = e;
  be.gate_hidden = 0;
  expect_bad(p, "EC gate hidden 0");
  be = e;
  be.gated = false;  // static: gate tensors ignored
  EXPECT_TRUE(cpu::W4Linear(p, nullptr).ok());

  // A compact int8 EC: its codes' and scales' sizes are checked in every
  // call. Its values are valid by construction (CompactEcFactorsI8 takes
  // values on the grid; the loader decodes and checks a file's codes first):
  // a code the format forbids (-128), put there by hand, is an error where a
  // call decodes the codes (the reference; a prefill call), while a decode
  // call (m <= 8) reads the codes in place without a per-call check.
  EcWeights ce = e;
  ASSERT_TRUE(RoundEcFactorsI8(&ce).ok());
  ASSERT_TRUE(CompactEcFactorsI8(&ce).ok());
  p = base();
  be = ce;
  p.ec = &be;
  EXPECT_TRUE(cpu::W4Linear(p, nullptr).ok());
  be.i8.a_scales.pop_back();
  expect_bad(p, "compact EC A scales size");
  be = ce;
  be.i8.b.pop_back();
  expect_bad(p, "compact EC B size");
  be = ce;
  be.i8.a[3] = -128;
  EXPECT_EQ(ref::W4Linear(p).code(), absl::StatusCode::kInvalidArgument);
  {
    std::vector<float> x9(9 * 64), y9(9 * 16);
    W4LinearParams p9 = p;
    p9.x = x9.data(), p9.y = y9.data(), p9.m = 9;
    EXPECT_EQ(cpu::W4Linear(p9, nullptr).code(), absl::StatusCode::kInvalidArgument);
  }
  be = ce;
  be.gate16.w2.pop_back();
  expect_bad(p, "compact EC gate w2 size");
  // Only int8 factors have a compact form, and only from values on the grid.
  EcWeights f16 = e;
  EXPECT_EQ(CompactEcFactorsI8(&f16).code(), absl::StatusCode::kInvalidArgument);
  EcWeights off = e;
  off.factors = EcFactors::kI8;
  EXPECT_EQ(CompactEcFactorsI8(&off).code(), absl::StatusCode::kInvalidArgument);
}

// ---- model::W4Linear ------------------------------------------------------------

TEST(W4LinearLayerTest, AccountingEcSwitchAndObserver) {
  std::mt19937_64 rng(BaseSeed());
  const int64_t n = 96, k = 128, r = 8, m = 5;
  const W4Weight w = MakeW4(n, k, 64, false, true, rng);
  const EcWeights e = MakeEc(n, k, r, true, rng);
  std::vector<float> bias(n, 0.25f);
  auto with_ec = model::W4Linear::Create(w, e, bias);
  auto no_ec = model::W4Linear::Create(w, std::nullopt, bias);
  ASSERT_TRUE(with_ec.ok()) << with_ec.status();
  ASSERT_TRUE(no_ec.ok()) << no_ec.status();
  model::W4Linear& a = **with_ec;
  model::W4Linear& b = **no_ec;
  EXPECT_EQ(a.in_features(), k);
  EXPECT_EQ(a.out_features(), n);
  // codes n*k/2 + fp16 scales + u8 zeros (2 groups per row) + fp16 act_scale.
  const int64_t w4 = n * k / 2 + n * 2 * 2 + n * 2 + k * 2;
  const int64_t ecb = (r * k + n * r + 16 * r + 16 + r * 16 + r) * 2;
  EXPECT_EQ(b.weight_bytes(), w4 + n * 4);
  EXPECT_EQ(a.weight_bytes(), w4 + ecb + n * 4);
  EXPECT_EQ(a.ec_bytes(), ecb);
  EXPECT_NE(a.DebugString().find("ec(r=8"), std::string::npos) << a.DebugString();

  std::vector<float> x(m * k);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  for (float& v : x) v = d(rng);
  std::vector<float> ya(m * n, kPoison), yb(m * n, kPoison), yref(m * n, kPoison);
  ThreadPool pool(2);

  // The observer sees exactly the reference gate values.
  std::vector<float> seen;
  int calls = 0;
  a.set_gate_observer([&](const float* g, int64_t mm, int64_t rr) {
    ++calls;
    seen.assign(g, g + mm * rr);
  });
  ASSERT_TRUE(a.Forward(x.data(), m, k, ya.data(), n, false, &pool).ok());
  EXPECT_EQ(calls, 1);
  std::vector<float> gref(m * r, kPoison);
  W4LinearParams p;
  p.x = x.data();
  p.m = m;
  p.k = k;
  p.ldx = k;
  p.w = &w;
  p.ec = &e;
  p.bias = bias.data();
  p.y = yref.data();
  p.ldy = n;
  p.gate_out = gref.data();
  ASSERT_TRUE(ref::W4Linear(p).ok());
  EXPECT_TRUE(Close(ya, yref, m, n, n, kW4Tol, kW4Nmse));
  ASSERT_EQ(seen.size(), gref.size());
  EXPECT_TRUE(Close(seen, gref, m, r, r, kGateTol, 1e-10));

  // Disabled EC == no EC, bit for bit; the observer is not called.
  a.set_ec_enabled(false);
  EXPECT_FALSE(a.ec_enabled());
  ASSERT_TRUE(a.Forward(x.data(), m, k, ya.data(), n, false, &pool).ok());
  ASSERT_TRUE(b.Forward(x.data(), m, k, yb.data(), n, false, &pool).ok());
  EXPECT_EQ(std::memcmp(ya.data(), yb.data(), ya.size() * 4), 0);
  EXPECT_EQ(calls, 1);
  a.set_ec_enabled(true);
  // Gates computed elsewhere (the CUDA runner) reach the same observer.
  EXPECT_TRUE(a.has_gate_observer());
  const std::vector<float> outside = {0.5f, 1.5f};
  a.ObserveGate(outside.data(), 1, 2);
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(seen, outside);
  a.set_gate_observer(nullptr);
  EXPECT_FALSE(a.has_gate_observer());
  a.ObserveGate(outside.data(), 1, 2);  // no observer: nothing happens
  ASSERT_TRUE(a.Forward(x.data(), m, k, ya.data(), n, false, &pool).ok());
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(a.Forward(x.data(), m, k - 1, ya.data(), n, false, &pool).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(W4LinearLayerTest, CreateRejectsBadShapes) {
  std::mt19937_64 rng(3);
  const W4Weight w = MakeW4(32, 64, 32, true, false, rng);
  const EcWeights e = MakeEc(32, 64, 4, true, rng);
  auto bad = [](const absl::StatusOr<std::unique_ptr<model::W4Linear>>& r) {
    return r.status().code() == absl::StatusCode::kInvalidArgument;
  };
  EXPECT_TRUE(model::W4Linear::Create(w, e).ok());
  EXPECT_TRUE(bad(model::W4Linear::Create(w, e, std::vector<float>(31))));
  EcWeights e2 = e;
  e2.k = 32;
  EXPECT_TRUE(bad(model::W4Linear::Create(w, e2)));
  e2 = e;
  e2.w1.pop_back();
  EXPECT_TRUE(bad(model::W4Linear::Create(w, e2)));
  W4Weight w2 = w;
  w2.zeros[3] = 16;
  EXPECT_TRUE(bad(model::W4Linear::Create(w2, std::nullopt)));
  w2 = w;
  w2.act_scale.assign(64, 1.f);
  w2.act_scale[5] = -1.f;
  EXPECT_TRUE(bad(model::W4Linear::Create(w2, std::nullopt)));
  w2 = w;
  w2.fmt.group_size = 0;
  EXPECT_TRUE(bad(model::W4Linear::Create(w2, std::nullopt)));
  w2 = w;
  w2.fmt.n = 33;
  EXPECT_TRUE(bad(model::W4Linear::Create(w2, std::nullopt)));
}

}  // namespace
}  // namespace spear::kernels::testing
