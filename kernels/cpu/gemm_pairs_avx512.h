// What the two 16-bit-product GEMMs share (gemm_bf16_avx512.cc: VDPBF16PS,
// gemm_f16_avx512.cc: VFMADDPH): k taken in pairs, one 32-bit word per pair
// of 16-bit halves (the even k in the low half), W packed into micro-panels
// of kNr outputs, and the blocking: column blocks of kNc outputs > k blocks
// of <= kKc (the W block packed once) > row blocks of kMc (the x block
// converted once) > micro-panels > row tiles of kMr. Unlike the F32 GEMM
// (whose panels hold all of k in ~192 KiB), a range reads x once per kNc
// outputs whatever k is, which matters for the lm_head's transpose
// (k = 49,152). Include only from files compiled with -mavx512f -mavx512bw;
// internal linkage on purpose (see transpose_avx512.h).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/ops_isa.h"
#include "cpu/transpose_avx512.h"

namespace spear::kernels::cpu::internal {
namespace {
namespace pairs {

constexpr int kW = 16;                // pair words (fp32 lanes) of a zmm
constexpr int kNv = 2;                // accumulator vectors per row of a tile
constexpr int kMr = 6;                // rows per tile
constexpr int kNr = kNv * kW;         // outputs per micro-panel
constexpr int64_t kKc = 512;          // k per block (256 pairs: 32 KiB micro-panel)
constexpr int64_t kMc = 144;          // rows per block (x block: 144 KiB)
constexpr int64_t kNc = 128;          // outputs per packed W block (128 KiB)
constexpr int64_t kWBlockWords = kNc * (kKc / 2);
constexpr int64_t kXBlockWords = kMc * (kKc / 2);

[[maybe_unused]] inline int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

[[maybe_unused]] inline __mmask32 Mask32(int n) {
  return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
}
[[maybe_unused]] inline __mmask16 Mask16(int n) {
  return n >= 16 ? ~__mmask16{0} : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 x 16 transpose of 32-bit words in registers: r[i][j] <- r[j][i].
[[maybe_unused]] inline void Transpose16(__m512i* ri) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(ri[i]);
  Transpose16x16(r);
  for (int i = 0; i < 16; ++i) ri[i] = _mm512_castps_si512(r[i]);
}

// Packs W[j0 : j0+nj, c0 : c0+kc] (16-bit halves, row stride k; c0 even)
// into pair micro-panels at buf: strip s at buf + s * kNr * kc2, word (t, j)
// at [t * kNr + j]. conv(q, v) maps the 32 halves v of block row q (loaded in
// place, zero past kc) to the stored halves. Rows past nj and the pad half of
// an odd kc are zero.
template <class Conv>
void PackW(const uint16_t* w, int64_t k, int64_t j0, int64_t nj, int64_t c0, int64_t kc,
           uint32_t* buf, Conv conv) {
  const int64_t kc2 = (kc + 1) / 2;
  for (int64_t s = 0; s * kNr < nj; ++s) {
    uint32_t* dst = buf + s * kNr * kc2;
    const int64_t row0 = j0 + s * kNr;
    const int64_t rows = Min64(kNr, nj - s * kNr);
    for (int64_t t0 = 0; t0 < kc2; t0 += 16) {
      const int words = static_cast<int>(Min64(16, kc2 - t0));
      const int halves = static_cast<int>(Min64(32, kc - 2 * t0));
      for (int v = 0; v < kNv; ++v) {
        __m512i r[16];
        for (int l = 0; l < 16; ++l) {
          const int64_t q = v * kW + l;
          r[l] = q < rows ? conv(s * kNr + q, _mm512_maskz_loadu_epi16(
                                                  Mask32(halves), w + (row0 + q) * k + c0 + 2 * t0))
                          : _mm512_setzero_si512();
        }
        Transpose16(r);
        for (int t = 0; t < words; ++t) {
          _mm512_storeu_si512(dst + (t0 + t) * kNr + v * kW, r[t]);
        }
      }
    }
  }
}

// The blocking of a range y[m0:m1, n0:n1]. Per block it calls
//   pack(jc, nj, pc, kc)          the W block (outputs jc.., k from pc),
//   convert(ic, ie, pc, kc)       the x block (rows ic..ie),
//   tile(s, i, rows, kc2, y, cols, bias, load_y)
// for each row tile (rows <= kMr, the tile's first row i - ic in the x block,
// micro-panel s, y at its top-left; bias non-null only in the first k block;
// load_y: add to y).
template <class Pack, class Convert, class Tile>
void Blocking(const LinearParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, Pack pack,
              Convert convert, Tile tile) {
  const int64_t k = p.k;
  // k blocks start at multiples of 32 (whole 16-word loads of pairs).
  const int64_t kblocks = (k + kKc - 1) / kKc;
  int64_t kcb = (k + kblocks - 1) / kblocks;
  kcb = (kcb + 31) / 32 * 32;  // <= kKc
  for (int64_t jc = n0; jc < n1; jc += kNc) {
    const int64_t nj = Min64(kNc, n1 - jc);
    const int64_t strips = (nj + kNr - 1) / kNr;
    for (int64_t pc = 0; pc < k; pc += kcb) {
      const int64_t kc = Min64(kcb, k - pc);
      const int64_t kc2 = (kc + 1) / 2;
      pack(jc, nj, pc, kc);
      const bool load_y = pc > 0 || p.accumulate;
      const float* bias = pc == 0 && p.bias != nullptr ? p.bias + jc : nullptr;
      for (int64_t ic = m0; ic < m1; ic += kMc) {
        const int64_t ie = Min64(m1, ic + kMc);
        convert(ic, ie, pc, kc);
        for (int64_t s = 0; s < strips; ++s) {
          const int cols = static_cast<int>(Min64(kNr, nj - s * kNr));
          const float* bs = bias != nullptr ? bias + s * kNr : nullptr;
          for (int64_t i = ic; i < ie; i += kMr) {
            tile(s, i - ic, static_cast<int>(Min64(kMr, ie - i)), kc2,
                 p.y + i * p.ldy + jc + s * kNr, cols, bs, load_y);
          }
        }
      }
    }
  }
}

// Calls f.template operator()<R>() for R = rows (1..kMr): a tile's row count
// as a template argument.
template <int R = kMr, class F>
void WithRows(int rows, F&& f) {
  if constexpr (R >= 1) {
    if (rows == R) {
      f.template operator()<R>();
    } else {
      WithRows<R - 1>(rows, f);
    }
  }
}

}  // namespace pairs
}  // namespace
}  // namespace spear::kernels::cpu::internal
