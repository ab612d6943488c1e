// W4 kernels for AVX-512 F/BW/VL/DQ (Isa::kAvx512), compiled with those -m
// flags; w4_cpu.cc calls into them only after ActiveIsa() confirmed the CPU
// has them. Same bodies as the AVX2 and scalar variants (w4_simd.inc).
#include <immintrin.h>

#include <cstdint>

#include "cpu/w4_isa.h"

namespace spear::kernels::cpu::internal {
namespace {

struct W4Avx512 {
  static constexpr int kW = 16;
  using F = __m512;

  static __mmask16 Mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  // Keeps v in a register: the compiler may not re-load it per use.
  static void Pin(F& v) { asm("" : "+v"(v)); }
  static F Zero() { return _mm512_setzero_ps(); }
  static F Set1(float v) { return _mm512_set1_ps(v); }
  static F Load(const float* p) { return _mm512_loadu_ps(p); }
  // Masked-off lanes are not accessed (no fault past the end).
  static F LoadPartial(const float* p, int n) { return _mm512_maskz_loadu_ps(Mask(n), p); }
  static void Store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F LoadI8(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // Masked-off bytes are not accessed (AVX-512 BW + VL).
  static F LoadI8Partial(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(Mask(n), p)));
  }
  static float ReduceAdd(F v) { return _mm512_reduce_add_ps(v); }
  static float H2F(uint16_t h) { return _cvtsh_ss(h); }
  static F LoadH(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // 16 bytes -> 16 low nibbles (even k) and 16 high nibbles (odd k).
  static void Codes(const uint8_t* p, F* lo, F* hi) {
    const __m512i v =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
};

#include "cpu/w4_simd.inc"

}  // namespace

constinit const W4IsaKernels kW4Avx512Kernels = MakeW4Kernels<W4Avx512>();

}  // namespace spear::kernels::cpu::internal
