// cpu::Linear vs ref::Linear for every ISA variant, weight dtype and
// awkward size, plus an exhaustive check of the F16 / BF16 weight decoders.
#include <cstring>

#include "ops_harness.h"

namespace spear::kernels::testing {
namespace {

// Both backends decode identical weight bits exactly, so the only
// difference is float32 vs double accumulation over k <= 577 terms of size
// <= 1: the same bound serves every dtype.
constexpr double kLinearTol = 1e-4;
constexpr double kLinearNmse = 1e-9;

std::vector<uint16_t> ToHalfBits(const std::vector<float>& v, DType t) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out[i] = t == DType::kF16 ? FloatToHalf(v[i]) : FloatToBF16(v[i]);
  }
  return out;
}

class LinearTest : public OpsTest {
 protected:
  // One case: returns false (after recording a failure) on mismatch.
  // bf16_products: the flag is set; where the bf16 GEMM runs (BF16 weights,
  // m >= 16, CpuHasBf16Dot() under this variant) the reference multiplies x
  // rounded to bf16 (round to nearest even), elsewhere the plain x.
  void RunCase(DType dt, int64_t m, int64_t k, int64_t n, bool bias, bool accumulate,
               bool bf16_products = false, double tol = kLinearTol) {
    SCOPED_TRACE(::testing::Message() << "dtype=" << DTypeName(dt) << " m=" << m << " k=" << k
                                      << " n=" << n << " bias=" << bias
                                      << " accumulate=" << accumulate
                                      << " bf16_products=" << bf16_products << " seed=" << seed_);
    const int64_t ldx = k + (m > 1 ? 3 : 0), ldy = n + 2;
    std::vector<float> x = RandomRows(m, k, ldx);
    std::vector<float> wf = Random(n * k);
    std::vector<uint16_t> wh;
    const void* w = wf.data();
    if (dt != DType::kF32) {
      wh = ToHalfBits(wf, dt);
      w = wh.data();
    }
    std::vector<float> b = Random(n);
    std::vector<float> y0 = accumulate ? RandomRows(m, n, ldy) : std::vector<float>(m * ldy, kPoison);
    std::vector<float> y_ref = y0, y_cpu = y0;

    LinearParams p;
    p.x = x.data();
    p.m = m;
    p.k = k;
    p.ldx = ldx;
    p.w = w;
    p.w_dtype = dt;
    p.n = n;
    p.bias = bias ? b.data() : nullptr;
    p.ldy = ldy;
    p.accumulate = accumulate;
    p.y = y_ref.data();
    std::vector<float> xr;
    if (bf16_products && dt == DType::kBF16 && m >= 16 && CpuHasBf16Dot()) {
      xr = x;
      for (float& v : xr) v = BF16ToFloat(FloatToBF16(v));
      p.x = xr.data();
    }
    ASSERT_TRUE(ref::Linear(p).ok());
    p.x = x.data();
    p.bf16_products = bf16_products;
    p.y = y_cpu.data();
    ASSERT_TRUE(cpu::Linear(p, pool()).ok());
    EXPECT_TRUE(Close(y_cpu, y_ref, m, n, ldy, tol, kLinearNmse));
  }
};

TEST_P(LinearTest, AwkwardSizesAllDtypes) {
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t m : {1, 2, 3, 5, 17}) {
      for (int64_t k : {1, 7, 33, 577}) {
        for (int64_t n : {1, 3, 65}) {
          for (int flags = 0; flags < 4; ++flags) {
            RunCase(dt, m, k, n, flags & 1, flags & 2);
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

// Shapes large enough to take the threaded paths: split over n (decode),
// and split over both m and n (prefill with few output rows).
TEST_P(LinearTest, ThreadedShapes) {
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    RunCase(dt, 1, 576, 1536, false, false);
    RunCase(dt, 1, 577, 1000, true, true);
    RunCase(dt, 40, 577, 130, true, false);
    RunCase(dt, 64, 33, 300, false, true);
    RunCase(dt, 8, 256, 4100, false, false);
  }
}

// The packed-GEMM path (m >= 16): row counts around the 6-row tile and the
// 144-row block, output counts around the 16/32-wide micro-panels and the
// packed panel width, k around the 256-step k blocks (and several blocks);
// bias / accumulate cycle through their four combinations.
TEST_P(LinearTest, GemmEdges) {
  int flags = 0;
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t m : {16, 19, 23, 150}) {
      for (int64_t n : {1, 17, 25, 49, 130}) {
        for (int64_t k : {7, 255, 257, 577}) {
          RunCase(dt, m, k, n, flags & 1, flags & 2);
          if (HasFatalFailure()) return;
          ++flags;
        }
      }
    }
    RunCase(dt, 48, 1600, 70, true, true);  // many k blocks, narrow panels
    RunCase(dt, 100, 64, 600, false, false);  // many column tasks
  }
}

// LinearParams::bf16_products: on a CPU with AVX512-BF16 the GEMM rounds x
// to bf16 and multiplies pairs of k with VDPBF16PS; its products are exact
// in fp32, so against the double reference of the rounded x the only error
// is fp32 accumulation (k up to 8,193 terms of size <= 1: tol 2e-4). Odd k
// (a zero-padded pair), k around the 512-wide k blocks and the 32-wide
// pair loads, rows around the 6-row tile and 144-row block, outputs around
// the 32-wide micro-panel and the panel width. Elsewhere (other ISAs, no
// BF16, F32 / F16 weights, fewer than 16 rows) the flag changes nothing.
TEST_P(LinearTest, Bf16Products) {
  SCOPED_TRACE(CpuHasBf16Dot() ? "bf16 products run" : "no AVX512-BF16 here: the plain path");
  int flags = 0;
  for (int64_t m : {16, 19, 150}) {
    for (int64_t n : {1, 31, 33, 130}) {
      for (int64_t k : {1, 7, 31, 32, 33, 511, 513, 1025}) {
        RunCase(DType::kBF16, m, k, n, flags & 1, flags & 2, true, 2e-4);
        if (HasFatalFailure()) return;
        ++flags;
      }
    }
  }
  RunCase(DType::kBF16, 200, 2100, 300, true, true, true, 2e-4);  // threads, many k blocks
  RunCase(DType::kBF16, 20, 8193, 70, false, true, true, 2e-4);   // long rows: wide tasks
  RunCase(DType::kBF16, 5, 577, 65, true, false, true);           // GEMV rows: plain path
  RunCase(DType::kF16, 40, 577, 65, false, true, true);           // F16 weights: plain path
  RunCase(DType::kF32, 40, 577, 65, true, true, true);            // F32 weights: plain path
}

// LinearParams::f16_products: on a CPU with AVX512-FP16 the GEMM scales each
// row of x and of W by a power of two, rounds both to fp16 and sums the
// products in fp16 over 64 k indices, then in fp32. Against the double
// reference of the bf16 weights and the exact x, every output's error stays
// within 2^-5 of sum_k |x w| (the worst case of 64 fp16 roundings of a block
// sum) plus 2^-20 k max|x| max|w| of its row and column (fp16's subnormal
// spacing after the scaling), and the normalized squared error over the
// outputs of each size class of rows (when it has >= 32) within 2e-5 plus
// fp32's rounding of adding y and bias (~1e-6 when first written). Rows of 1e-6 and
// 1e4 in one call and weights of 1e-5 to 1e4 (the scalings), odd k, k around
// the 64-term flush, the 512-wide k blocks and the 32-wide pair loads, rows
// around the 6-row tile and 144-row block, outputs around the 32-wide
// micro-panel and the panel width. Elsewhere (other ISAs, no AVX512-FP16,
// fewer than 16 rows) the flag changes nothing, bit for bit.
TEST_P(LinearTest, F16Products) {
  SCOPED_TRACE(CpuHasF16Fma() ? "fp16 products run" : "no AVX512-FP16 here: the flag changes nothing");
  auto run = [&](int64_t m, int64_t k, int64_t n, float wmax, bool bias, bool accumulate) {
    SCOPED_TRACE(::testing::Message() << "m=" << m << " k=" << k << " n=" << n << " wmax=" << wmax
                                      << " seed=" << seed_);
    const int64_t ldx = k + 3, ldy = n + 2;
    std::vector<float> x = RandomRows(m, k, ldx);
    for (int64_t i = 0; i < m; ++i) {  // rows of very different sizes
      const float scale = i % 3 == 0 ? 1e-6f : i % 3 == 1 ? 1e4f : 1.f;
      for (int64_t c = 0; c < k; ++c) x[i * ldx + c] *= scale;
    }
    std::vector<float> wf = Random(n * k, -wmax, wmax);
    std::vector<double> wrow(n, 0.0);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c = 0; c < k; ++c) wrow[j] = std::max(wrow[j], std::fabs(double{wf[j * k + c]}));
    }
    const std::vector<uint16_t> wh = ToHalfBits(wf, DType::kBF16);
    std::vector<float> b = Random(n);
    std::vector<float> y0 = accumulate ? RandomRows(m, n, ldy) : std::vector<float>(m * ldy, kPoison);
    LinearParams p;
    p.x = x.data();
    p.m = m;
    p.k = k;
    p.ldx = ldx;
    p.w = wh.data();
    p.w_dtype = DType::kBF16;
    p.n = n;
    p.bias = bias ? b.data() : nullptr;
    p.ldy = ldy;
    p.accumulate = accumulate;
    std::vector<float> y_plain = y0, y_f16 = y0;
    p.y = y_plain.data();
    ASSERT_TRUE(cpu::Linear(p, pool()).ok());
    p.f16_products = true;
    p.y = y_f16.data();
    ASSERT_TRUE(cpu::Linear(p, pool()).ok());
    if (!(CpuHasF16Fma() && m >= 16)) {
      EXPECT_EQ(std::memcmp(y_plain.data(), y_f16.data(), y_f16.size() * 4), 0);
      return;
    }
    int bad = 0;
    // Squared errors, references and fp32 add roundings per size class of x's rows.
    double se[3] = {0, 0, 0}, sr[3] = {0, 0, 0}, sa[3] = {0, 0, 0};
    int64_t outputs[3] = {0, 0, 0};
    for (int64_t i = 0; i < m; ++i) {
      double xrow = 0;
      for (int64_t c = 0; c < k; ++c) xrow = std::max(xrow, std::fabs(double{x[i * ldx + c]}));
      for (int64_t j = 0; j < n; ++j) {
        double ref = 0, mag = 0;
        for (int64_t c = 0; c < k; ++c) {
          const double xv = x[i * ldx + c], wv = BF16ToFloat(wh[j * k + c]);
          ref += xv * wv;
          mag += std::fabs(xv * wv);
        }
        const double add = (bias ? b[j] : 0.0) + (accumulate ? y0[i * ldy + j] : 0.0);
        // fp32 adds y and bias one at a time: its rounding scales with each.
        const double addmag = (bias ? std::fabs(b[j]) : 0.0) +
                              (accumulate ? std::fabs(y0[i * ldy + j]) : 0.0);
        const double err = static_cast<double>(y_f16[i * ldy + j]) - add - ref;
        se[i % 3] += err * err;
        sr[i % 3] += ref * ref;
        sa[i % 3] += std::pow(0x1p-22 * (addmag + std::fabs(ref)), 2);
        ++outputs[i % 3];
        const double bound = 0x1p-5 * mag + 0x1p-20 * k * xrow * wrow[j] + 0x1p-22 * addmag;
        if (!(std::fabs(err) <= bound + 1e-30) && bad++ < 5) {
          ADD_FAILURE() << "row " << i << " col " << j << ": got " << y_f16[i * ldy + j]
                        << " want " << ref + add << " (sum |x w| " << mag << ")";
        }
      }
    }
    for (int c = 0; c < 3; ++c) {
      if (outputs[c] >= 32 && !(se[c] <= 2e-5 * sr[c] + sa[c]) && bad++ < 5) {
        ADD_FAILURE() << "rows of class " << c << ": normalized squared error " << se[c] / sr[c];
      }
    }
    EXPECT_EQ(bad, 0);
  };
  int flags = 0;
  for (int64_t m : {16, 19, 150}) {
    for (int64_t n : {1, 31, 33, 130}) {
      for (int64_t k : {1, 7, 63, 64, 65, 129, 511, 513, 1025}) {
        run(m, k, n, 1.f, flags & 1, flags & 2);
        if (HasFatalFailure()) return;
        ++flags;
      }
    }
  }
  run(40, 577, 70, 1e4f, true, false);      // large weights
  run(40, 577, 70, 1e-5f, false, true);     // weights of fp16's subnormal range
  run(200, 2100, 300, 1.f, true, true);     // threads, many k blocks
  run(20, 8193, 70, 0.05f, false, true);    // long rows (the lm_head's transpose)
  run(5, 577, 65, 1.f, true, false);        // GEMV rows: plain path
}

TEST_P(LinearTest, EmptyK) {
  RunCase(DType::kF32, 3, 0, 5, true, false);
  RunCase(DType::kF16, 3, 0, 5, true, true);
  RunCase(DType::kBF16, 2, 0, 4, false, false);
}

// y[j] = 1 * w[j] with k = 1 must reproduce the scalar decoder bit for bit
// for every finite F16 / BF16 pattern (exercises the SIMD converters and
// their partial-load tails).
TEST_P(LinearTest, WeightDecodeExhaustive) {
  for (DType dt : {DType::kF16, DType::kBF16}) {
    std::vector<uint16_t> w;
    for (uint32_t h = 0; h < 65536; ++h) {
      const bool finite = dt == DType::kF16 ? ((h >> 10) & 0x1f) != 0x1f : ((h >> 7) & 0xff) != 0xff;
      if (finite) w.push_back(static_cast<uint16_t>(h));
    }
    const int64_t n = static_cast<int64_t>(w.size());
    const float one = 1.f;
    std::vector<float> y(n, kPoison);
    LinearParams p;
    p.x = &one;
    p.m = 1;
    p.k = 1;
    p.ldx = 1;
    p.w = w.data();
    p.w_dtype = dt;
    p.n = n;
    p.y = y.data();
    p.ldy = n;
    ASSERT_TRUE(cpu::Linear(p, pool()).ok());
    int bad = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float want = LoadAsFloat(w.data(), dt, j);
      if (std::memcmp(&want, &y[j], 4) != 0 && !(want == 0.f && y[j] == 0.f) && bad++ < 5) {
        ADD_FAILURE() << DTypeName(dt) << " bits 0x" << std::hex << w[j] << std::dec << ": got "
                      << y[j] << " want " << want;
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

// A second k-tile shape: k a multiple of every vector width, so the tail
// path is skipped entirely, with large m for the 4-row tiles.
TEST_P(LinearTest, AlignedPrefill) {
  for (DType dt : {DType::kF32, DType::kF16}) RunCase(dt, 33, 64, 67, true, false);
}

INSTANTIATE_TEST_SUITE_P(Variants, LinearTest, ::testing::ValuesIn(AllVariants()), VariantName);

}  // namespace
}  // namespace spear::kernels::testing
