// Linear's packed GEMM with fp16 products (AVX512-FP16): y = x W^T + bias for
// BF16 weights when LinearParams::f16_products allows x and W to be rounded to
// fp16. Compiled with -mavx512fp16; ops_cpu.cc calls it only after
// CpuHasF16Fma() (kernels/cpu_features.h) confirmed the instructions.
//
// Why: on Intel cores with AVX512-FP16 (Sapphire / Emerald / Granite Rapids)
// VFMADDPH does 32 multiply-adds per instruction at over four times the rate
// VDPBF16PS does its 32 (an asm probe on an Emerald Rapids vCPU, one thread:
// 374 against 86 GFLOP/s; the fp32 FMA 172), but it also accumulates in fp16.
// So the products accumulate in fp16 over blocks of 64 k indices only
// (kFlushPairs), and each block's sums are added to fp32 accumulators.
//
// Range: per k block, every row of x is scaled by a power of two that brings
// its largest |x| into [8, 16), and every row of W (one output) by one that
// brings its largest |w| into [1, 2) (exact; both undone in fp32 at the end),
// so a block's partial sums stay below 64 * 16 * 2 = 2048, far inside fp16's
// range, whatever the magnitudes of x and W. Elements below 2^-14 of their
// row's largest fall into fp16's subnormals (absolute spacing 2^-24 of the
// row's scale); bf16 values convert exactly otherwise. A row with a
// non-finite element is not scaled (its inf / NaN reach y as in fp32).
//
// Error against the fp32 path: x rounded to fp16 (relative 2^-11 per
// element; bf16 weights convert exactly) and the fp16 sums of each 64-term
// block (one rounding of 2^-11 of the running block sum per term), then fp32
// accumulation.
//
// Layout and blocking: gemm_pairs_avx512.h, as gemm_bf16_avx512.cc. k is
// taken in pairs: a micro-panel holds, per pair of k indices, one 32-bit word
// (w[j][c], w[j][c+1]) of fp16 halves per output j; x is converted to the
// same pair words and a 32-bit broadcast of x's pair times the panel's vector
// puts x[c] w[j][c] in lane 2j and x[c+1] w[j][c+1] in lane 2j+1; the two
// lanes of an output are summed in fp32 at the end of the tile. An odd k is
// padded with a zero half on both sides.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu/gemm_pairs_avx512.h"
#include "cpu/ops_isa.h"

namespace spear::kernels::cpu::internal {
namespace {

using namespace pairs;  // NOLINT: the shared layout's constants and helpers

constexpr int64_t kFlushPairs = 32;  // pairs summed in fp16 before the fp32 add

// 16 fp32 lanes to 16 fp16 halves, round to nearest even.
__m256i ToHalf(__m512 f) { return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// The power of two e with m 2^e in [2^(top-1), 2^top) for the largest |v| m
// of a row; 0 when m is 0 or not finite. Its inverse 2^-e is a float.
int RowExponent(float m, int top) {
  if (!(m > 0.f) || !std::isfinite(m)) return 0;
  int ex = 0;
  std::frexp(m, &ex);  // m = f 2^ex, f in [0.5, 1)
  const int e = top - ex;
  return e > 126 ? 126 : e < -126 ? -126 : e;
}

__m512 Bf16ToFloat(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// The largest |v| of row[0, n): fp32, or bf16 bits.
float RowMaxAbs(const float* row, int64_t n) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = Mask16(static_cast<int>(Min64(16, n - c)));
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, row + c)));
  }
  return _mm512_reduce_max_ps(mx);
}
float RowMaxAbs(const uint16_t* row, int64_t n) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = Mask16(static_cast<int>(Min64(16, n - c)));
    mx = _mm512_max_ps(mx, _mm512_abs_ps(Bf16ToFloat(_mm256_maskz_loadu_epi16(m, row + c))));
  }
  return _mm512_reduce_max_ps(mx);
}

// 32 bf16 halves times 2^e to 32 fp16 halves in the same positions.
__m512i Bf16ToHalf(__m512i v, __m512 scale) {
  auto half = [&](__m256i b) { return ToHalf(_mm512_mul_ps(Bf16ToFloat(b), scale)); };
  return _mm512_inserti64x4(_mm512_castsi256_si512(half(_mm512_castsi512_si256(v))),
                            half(_mm512_extracti64x4_epi64(v, 1)), 1);
}

// Packs W[j0 : j0+nj, c0 : c0+kc] (bf16, row stride k; c0 even) as fp16 pair
// micro-panels at buf (PackW's layout), row j scaled by 2^e_j (largest |w| in
// [1, 2)); winv[j] = 2^-e_j, 1 for the rows past nj up to the last panel's end.
void PackWHalf(const uint16_t* w, int64_t k, int64_t j0, int64_t nj, int64_t c0, int64_t kc,
               uint32_t* buf, float* winv) {
  float wscale[kNc];
  for (int64_t q = 0; q < (nj + kNr - 1) / kNr * kNr; ++q) {
    const int e = q < nj ? RowExponent(RowMaxAbs(w + (j0 + q) * k + c0, kc), 1) : 0;
    winv[q] = std::ldexp(1.f, -e);
    wscale[q] = std::ldexp(1.f, e);
  }
  PackW(w, k, j0, nj, c0, kc, buf,
        [&](int64_t q, __m512i v) { return Bf16ToHalf(v, _mm512_set1_ps(wscale[q])); });
}

// x[r, c0 : c0+kc] of rows [0, rows) (row stride ldx), each row times its
// power of two 1 / inv[r], as fp16 pair words at xb[r * kc2 + t]; the pad
// half of an odd kc is zero.
void ConvertX(const float* x, int64_t ldx, int64_t rows, int64_t kc, uint32_t* xb, float* inv) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * ldx;
    const int e = RowExponent(RowMaxAbs(src, kc), 4);  // [8, 16)
    inv[r] = std::ldexp(1.f, -e);
    const __m512 scale = _mm512_set1_ps(std::ldexp(1.f, e));
    uint32_t* dst = xb + r * kc2;
    for (int64_t c = 0; c < kc; c += 32) {
      const int n = static_cast<int>(Min64(32, kc - c));
      const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(Mask16(n), src + c), scale);
      const __m512 hi = n > 16
                            ? _mm512_mul_ps(_mm512_maskz_loadu_ps(Mask16(n - 16), src + c + 16), scale)
                            : _mm512_setzero_ps();
      const __m512i halves =
          _mm512_inserti64x4(_mm512_castsi256_si512(ToHalf(lo)), ToHalf(hi), 1);
      _mm512_mask_storeu_epi32(dst + c / 2, Mask16((n + 1) / 2), halves);
    }
  }
}

// y[0:MR, 0:cols] (row stride ldy) = inv[r] winv[j] x (the fp16 pair words
// of x rows (stride ldxb words) times the micro-panel wp over kc2 pairs),
// plus y when load_y, plus bias when non-null.
template <int MR>
void Micro(const uint32_t* wp, const float* winv, const uint32_t* xb, int64_t ldxb,
           const float* inv, int64_t kc2, float* y, int64_t ldy, int cols, const float* bias,
           bool load_y) {
  // sum[r][v][h]: fp32 lanes of the halves 16h .. 16h+15 of accumulator (r, v),
  // in memory (L1): MR x kNv fp16 accumulators take the registers.
  alignas(64) float sum[MR][kNv][2][kW];
  for (int64_t t0 = 0; t0 < kc2; t0 += kFlushPairs) {
    const int64_t te = Min64(kc2, t0 + kFlushPairs);
    __m512h acc[MR][kNv];
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_setzero_ph();
    }
    for (int64_t t = t0; t < te; ++t) {
      __m512h w[kNv];
      for (int v = 0; v < kNv; ++v) w[v] = _mm512_castsi512_ph(_mm512_loadu_si512(wp + t * kNr + v * kW));
      for (int r = 0; r < MR; ++r) {
        const __m512h xv =
            _mm512_castsi512_ph(_mm512_set1_epi32(static_cast<int>(xb[r * ldxb + t])));
        for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_fmadd_ph(xv, w[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < kNv; ++v) {
        const __m512i a = _mm512_castph_si512(acc[r][v]);
        const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(a));
        const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(a, 1));
        _mm512_store_ps(sum[r][v][0], t0 == 0 ? lo : _mm512_add_ps(_mm512_load_ps(sum[r][v][0]), lo));
        _mm512_store_ps(sum[r][v][1], t0 == 0 ? hi : _mm512_add_ps(_mm512_load_ps(sum[r][v][1]), hi));
      }
    }
  }
  // Lane 2j + (0|1) of the 32 halves holds output j's even | odd k.
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  __m512 wsc[kNv];
  for (int v = 0; v < kNv; ++v) wsc[v] = _mm512_loadu_ps(winv + v * kW);
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldy;
    const __m512 sc = _mm512_set1_ps(inv[r]);
    for (int v = 0; v < kNv; ++v) {
      const int cnt = cols - v * kW;
      if (cnt <= 0) break;
      const __mmask16 m = Mask16(cnt);
      const __m512 lo = _mm512_load_ps(sum[r][v][0]), hi = _mm512_load_ps(sum[r][v][1]);
      __m512 a = _mm512_mul_ps(_mm512_add_ps(_mm512_permutex2var_ps(lo, even, hi),
                                             _mm512_permutex2var_ps(lo, odd, hi)),
                               _mm512_mul_ps(sc, wsc[v]));
      if (load_y) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, yr + v * kW));
      if (bias != nullptr) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, bias + v * kW));
      _mm512_mask_storeu_ps(yr + v * kW, m, a);
    }
  }
}

// The W block, the x block (each 64-byte aligned), the x block's row scales
// and the W block's.
int64_t ScratchFloats(int64_t) { return kWBlockWords + kXBlockWords + kMc + kNc + 32; }

void Range(const LinearParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* scratch) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  uint32_t* wb = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(scratch) + 63) &
                                             ~static_cast<uintptr_t>(63));
  uint32_t* xb = wb + kWBlockWords;
  float* inv = reinterpret_cast<float*>(xb + kXBlockWords);
  float* winv = inv + kMc;
  Blocking(
      p, m0, m1, n0, n1,
      [&](int64_t jc, int64_t nj, int64_t pc, int64_t kc) {
        PackWHalf(w, p.k, jc, nj, pc, kc, wb, winv);
      },
      [&](int64_t ic, int64_t ie, int64_t pc, int64_t kc) {
        ConvertX(p.x + ic * p.ldx + pc, p.ldx, ie - ic, kc, xb, inv);
      },
      [&](int64_t s, int64_t i, int rows, int64_t kc2, float* y, int cols, const float* bias,
          bool load_y) {
        const uint32_t* wp = wb + s * kNr * kc2;
        WithRows(rows, [&]<int R>() {
          Micro<R>(wp, winv + s * kNr, xb + i * kc2, kc2, inv + i, kc2, y, p.ldy, cols, bias,
                   load_y);
        });
      });
}

}  // namespace

constinit const GemmKernel kAvx512F16Gemm = {&Range, &ScratchFloats, kMr, kNr, true};

}  // namespace spear::kernels::cpu::internal
