// cpu:: kernels for AVX-512 F/BW/VL/DQ (Isa::kAvx512). Compiled with the
// AVX-512 flags; ops_cpu.cc calls into it only after ActiveIsa() confirmed
// the CPU has them. Same kernel bodies as the AVX2 and scalar variants
// (ops_simd.inc), so only the traits below are AVX-512 specific.
#include <immintrin.h>

#include <cstdint>

#include "cpu/ops_isa.h"
#include "cpu/transpose_avx512.h"

namespace spear::kernels::cpu::internal {
namespace {

struct Avx512 {
  static constexpr int kW = 16;
  // 32 zmm registers: 4 x 4 accumulators leave room for loads and converts.
  static constexpr int kMr = 4, kNr = 4, kGemvNr = 4;
  // GEMM: 6 x rows * 32 outputs = 12 accumulators (of 32 zmm).
  static constexpr int kGemmMr = 6, kGemmNv = 2;
  using F = __m512;

  static __mmask16 Mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static F Bf16Bits(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }

  static F Zero() { return _mm512_setzero_ps(); }
  static F Set1(float v) { return _mm512_set1_ps(v); }
  static F Load(const float* p) { return _mm512_loadu_ps(p); }
  // Masked-off lanes are not accessed (no fault past the end).
  static F LoadPartial(const float* p, int n) { return _mm512_maskz_loadu_ps(Mask(n), p); }
  static void Store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void StorePartial(float* p, F v, int n) { _mm512_mask_storeu_ps(p, Mask(n), v); }
  static F LoadF16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F LoadF16Partial(const uint16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(Mask(n), p));
  }
  static F LoadBF16(const uint16_t* p) {
    return Bf16Bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F LoadBF16Partial(const uint16_t* p, int n) {
    return Bf16Bits(_mm256_maskz_loadu_epi16(Mask(n), p));
  }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static F Sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F Div(F a, F b) { return _mm512_div_ps(a, b); }
  static F Max(F a, F b) { return _mm512_max_ps(a, b); }
  static float ReduceAdd(F v) { return _mm512_reduce_add_ps(v); }
  static float ReduceMax(F v) { return _mm512_reduce_max_ps(v); }
  // 16 x 16 transpose in registers: r[i][j] <- r[j][i].
  static void Transpose(F* r) { Transpose16x16(r); }
  // Same polynomial as the AVX2 Exp; scalef applies 2^n without integer
  // exponent tricks.
  static F Exp(F x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.0f));
    const F fx = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    F y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, fx);
  }
};

#include "cpu/ops_simd.inc"

}  // namespace

constinit const IsaKernels kAvx512Kernels = MakeKernels<Avx512>();

}  // namespace spear::kernels::cpu::internal
