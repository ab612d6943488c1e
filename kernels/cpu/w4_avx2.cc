// W4 kernels for AVX2 + FMA + F16C (Isa::kAvx2), compiled with those -m
// flags; w4_cpu.cc calls into them only after ActiveIsa() confirmed the CPU
// has them. Nothing here runs at static initialisation: the only global is
// the constant kernel table.
#include <immintrin.h>

#include <cstdint>

#include "cpu/w4_isa.h"

namespace spear::kernels::cpu::internal {
namespace {

struct W4Avx2 {
  static constexpr int kW = 8;
  using F = __m256;

  static __m256i LaneMask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // Keeps v in a register: the compiler may not re-load it per use.
  static void Pin(F& v) { asm("" : "+v"(v)); }
  static F Zero() { return _mm256_setzero_ps(); }
  static F Set1(float v) { return _mm256_set1_ps(v); }
  static F Load(const float* p) { return _mm256_loadu_ps(p); }
  static F LoadPartial(const float* p, int n) { return _mm256_maskload_ps(p, LaneMask(n)); }
  static void Store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F Add(F a, F b) { return _mm256_add_ps(a, b); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F LoadI8(const int8_t* p) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // Reads exactly n bytes (through a zeroed copy).
  static F LoadI8Partial(const int8_t* p, int n) {
    alignas(8) int8_t b[8] = {};
    for (int i = 0; i < n; ++i) b[i] = p[i];
    return LoadI8(b);
  }
  static float ReduceAdd(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float H2F(uint16_t h) { return _cvtsh_ss(h); }
  static F LoadH(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // 8 bytes -> 8 low nibbles (even k) and 8 high nibbles (odd k).
  static void Codes(const uint8_t* p, F* lo, F* hi) {
    const __m256i v =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0f)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  }
};

#include "cpu/w4_simd.inc"

}  // namespace

constinit const W4IsaKernels kW4Avx2Kernels = MakeW4Kernels<W4Avx2>();

}  // namespace spear::kernels::cpu::internal
