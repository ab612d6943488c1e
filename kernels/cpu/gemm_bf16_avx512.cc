// Linear's packed GEMM with bf16 products (AVX-512 BF16): y = x W^T + bias
// for BF16 weights when LinearParams::bf16_products allows x to be rounded
// to bf16. Compiled with -mavx512bf16; ops_cpu.cc calls it only after
// CpuHasBf16Dot() (kernels/cpu_features.h) confirmed the instructions.
//
// Blocking and the pair layout: gemm_pairs_avx512.h (y accumulates over the k
// blocks). A packed micro-panel holds, per pair of k indices, one 32-bit
// word (w[j][c], w[j][c+1]) for each of its kNr outputs j, and the x block
// of the current rows and k block is converted to the same pair words
// (round to nearest even). VDPBF16PS then adds x[c] w[j][c] + x[c+1]
// w[j][c+1] into 16 fp32 lanes per instruction: the bf16 products are exact
// in fp32 and accumulate in fp32 (denormal inputs count as zero), so the
// result differs from the F32 path by the rounding of x to bf16 (relative
// 2^-9 per element) and the order of the sums. An odd k is padded with a
// zero pair half on both sides.
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm_pairs_avx512.h"
#include "cpu/ops_isa.h"

namespace spear::kernels::cpu::internal {
namespace {

using namespace pairs;  // NOLINT: the shared layout's constants and helpers

// x[r, c0 : c0+kc] of rows [0, rows) (row stride ldx) as pair words at
// xb[r * kc2 + t]; the pad half of an odd kc is zero.
void ConvertX(const float* x, int64_t ldx, int64_t rows, int64_t kc, uint32_t* xb) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * ldx;
    uint32_t* dst = xb + r * kc2;
    for (int64_t c = 0; c < kc; c += 32) {
      const int n = static_cast<int>(Min64(32, kc - c));
      const __m512 lo = _mm512_maskz_loadu_ps(Mask16(n), src + c);
      const __m512 hi = n > 16 ? _mm512_maskz_loadu_ps(Mask16(n - 16), src + c + 16)
                               : _mm512_setzero_ps();
      const __m512i words = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
      _mm512_mask_storeu_epi32(dst + c / 2, Mask16((n + 1) / 2), words);
    }
  }
}

// y[0:MR, 0:cols] (row stride ldy) = the pair words of x rows (stride ldxb
// words) times the micro-panel wp over kc2 pairs, plus y when load_y, plus
// bias when non-null.
template <int MR>
void Micro(const uint32_t* wp, const uint32_t* xb, int64_t ldxb, int64_t kc2, float* y,
           int64_t ldy, int cols, const float* bias, bool load_y) {
  __m512 acc[MR][kNv];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < kc2; ++t) {
    __m512bh w[kNv];
    for (int v = 0; v < kNv; ++v) {
      w[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wp + t * kNr + v * kW));
    }
    for (int r = 0; r < MR; ++r) {
      const __m512bh xv =
          reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xb[r * ldxb + t])));
      for (int v = 0; v < kNv; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, w[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldy;
    for (int v = 0; v < kNv; ++v) {
      const int cnt = cols - v * kW;
      if (cnt <= 0) break;
      const __mmask16 m = Mask16(cnt);
      __m512 a = acc[r][v];
      if (load_y) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, yr + v * kW));
      if (bias != nullptr) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, bias + v * kW));
      _mm512_mask_storeu_ps(yr + v * kW, m, a);
    }
  }
}

// The W block and the x block, each 64-byte aligned.
int64_t ScratchFloats(int64_t) { return kWBlockWords + kXBlockWords + 32; }

void Range(const LinearParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* scratch) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  uint32_t* wb = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(scratch) + 63) &
                                             ~static_cast<uintptr_t>(63));
  uint32_t* xb = wb + kWBlockWords;
  Blocking(
      p, m0, m1, n0, n1,
      [&](int64_t jc, int64_t nj, int64_t pc, int64_t kc) {
        PackW(w, p.k, jc, nj, pc, kc, wb, [](int64_t, __m512i v) { return v; });
      },
      [&](int64_t ic, int64_t ie, int64_t pc, int64_t kc) {
        ConvertX(p.x + ic * p.ldx + pc, p.ldx, ie - ic, kc, xb);
      },
      [&](int64_t s, int64_t i, int rows, int64_t kc2, float* y, int cols, const float* bias,
          bool load_y) {
        const uint32_t* wp = wb + s * kNr * kc2;
        WithRows(rows, [&]<int R>() {
          Micro<R>(wp, xb + i * kc2, kc2, kc2, y, p.ldy, cols, bias, load_y);
        });
      });
}

}  // namespace

constinit const GemmKernel kAvx512Bf16Gemm = {&Range, &ScratchFloats, kMr, kNr, true};

}  // namespace spear::kernels::cpu::internal
