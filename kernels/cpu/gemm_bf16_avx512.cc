// Linear's packed GEMM with bf16 products (AVX-512 BF16): y = x W^T + bias
// for BF16 weights when LinearParams::bf16_products allows x to be rounded
// to bf16. Compiled with -mavx512bf16; ops_cpu.cc calls it only after
// CpuHasBf16Dot() (kernels/cpu_features.h) confirmed the instructions.
//
// Blocking: column blocks of kNc outputs > k blocks of kKc (the W block
// packed once) > row blocks of kMc (the x block converted once) >
// micro-panels > row tiles; y accumulates over the k blocks. Unlike the F32
// GEMM (whose panels hold all of k in ~192 KiB), a range reads x once per
// kNc outputs whatever k is, which matters for the lm_head's transpose
// (k = 49,152). k is taken in pairs: a packed micro-panel holds, per pair of
// k indices, one 32-bit word (w[j][c], w[j][c+1]) for each of its kNr
// outputs j, and the x block
// of the current rows and k block is converted to the same pair words
// (round to nearest even). VDPBF16PS then adds x[c] w[j][c] + x[c+1]
// w[j][c+1] into 16 fp32 lanes per instruction: the bf16 products are exact
// in fp32 and accumulate in fp32 (denormal inputs count as zero), so the
// result differs from the F32 path by the rounding of x to bf16 (relative
// 2^-9 per element) and the order of the sums. An odd k is padded with a
// zero pair half on both sides.
#include <immintrin.h>

#include <cstdint>

#include "cpu/ops_isa.h"
#include "cpu/transpose_avx512.h"

namespace spear::kernels::cpu::internal {
namespace {

constexpr int kW = 16;                // fp32 lanes of a zmm
constexpr int kNv = 2;                // accumulator vectors per row of a tile
constexpr int kMr = 6;                // rows per tile: 6 x 2 accumulators
constexpr int kNr = kNv * kW;         // outputs per micro-panel
constexpr int64_t kKc = 512;          // k per block (256 pairs: 32 KiB micro-panel)
constexpr int64_t kMc = 144;          // rows per block (x block: 144 KiB)
constexpr int64_t kNc = 128;          // outputs per packed W block (128 KiB)

int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

__mmask32 Mask32(int n) { return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u); }
__mmask16 Mask16(int n) { return n >= 16 ? ~__mmask16{0} : static_cast<__mmask16>((1u << n) - 1u); }

// 16 x 16 transpose of 32-bit words in registers: r[i][j] <- r[j][i].
void Transpose16(__m512i* ri) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(ri[i]);
  Transpose16x16(r);
  for (int i = 0; i < 16; ++i) ri[i] = _mm512_castps_si512(r[i]);
}

// Packs W[j0 : j0+nj, c0 : c0+kc] (bf16, row stride k; c0 even) into pair
// micro-panels at buf: strip s at buf + s * kNr * kc2, word (t, j) at
// [t * kNr + j]. Rows past nj and the pad half of an odd kc are zero.
void PackW(const uint16_t* w, int64_t k, int64_t j0, int64_t nj, int64_t c0, int64_t kc,
           uint32_t* buf) {
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
          r[l] = q < rows ? _mm512_maskz_loadu_epi16(Mask32(halves), w + (row0 + q) * k + c0 + 2 * t0)
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
      const __m512i pairs = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
      _mm512_mask_storeu_epi32(dst + c / 2, Mask16((n + 1) / 2), pairs);
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

template <int MR>
void MicroTail(int rows, const uint32_t* wp, const uint32_t* xb, int64_t ldxb, int64_t kc2,
               float* y, int64_t ldy, int cols, const float* bias, bool load_y) {
  if constexpr (MR >= 1) {
    if (rows == MR) {
      Micro<MR>(wp, xb, ldxb, kc2, y, ldy, cols, bias, load_y);
    } else {
      MicroTail<MR - 1>(rows, wp, xb, ldxb, kc2, y, ldy, cols, bias, load_y);
    }
  }
}

// Pair words of one W block (kNc outputs x kKc) and of one x block (kMc
// rows x kKc).
constexpr int64_t kWBlockWords = kNc * (kKc / 2);
constexpr int64_t kXBlockWords = kMc * (kKc / 2);

// The W block and the x block, each 64-byte aligned.
int64_t ScratchFloats(int64_t) { return kWBlockWords + kXBlockWords + 32; }

void Range(const LinearParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* scratch) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  const int64_t k = p.k;
  uint32_t* wb = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(scratch) + 63) &
                                             ~static_cast<uintptr_t>(63));
  uint32_t* xb = wb + kWBlockWords;
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
      PackW(w, k, jc, nj, pc, kc, wb);
      const bool load_y = pc > 0 || p.accumulate;
      const float* bias = pc == 0 && p.bias != nullptr ? p.bias + jc : nullptr;
      for (int64_t ic = m0; ic < m1; ic += kMc) {
        const int64_t ie = Min64(m1, ic + kMc);
        ConvertX(p.x + ic * p.ldx + pc, p.ldx, ie - ic, kc, xb);
        for (int64_t s = 0; s < strips; ++s) {
          const int cols = static_cast<int>(Min64(kNr, nj - s * kNr));
          const uint32_t* wp = wb + s * kNr * kc2;
          const float* bs = bias != nullptr ? bias + s * kNr : nullptr;
          const uint32_t* x = xb;
          float* y = p.y + ic * p.ldy + jc + s * kNr;
          int64_t i = ic;
          for (; i + kMr <= ie; i += kMr) {
            Micro<kMr>(wp, x, kc2, kc2, y, p.ldy, cols, bs, load_y);
            x += kMr * kc2;
            y += kMr * p.ldy;
          }
          if (i < ie) {
            MicroTail<kMr - 1>(static_cast<int>(ie - i), wp, x, kc2, kc2, y, p.ldy, cols, bs,
                               load_y);
          }
        }
      }
    }
  }
}

}  // namespace

constinit const GemmKernel kAvx512Bf16Gemm = {&Range, &ScratchFloats, kMr, kNr, true};

}  // namespace spear::kernels::cpu::internal
