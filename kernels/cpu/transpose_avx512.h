// The AVX-512 16 x 16 transpose of 32-bit lanes, shared by the AVX-512
// translation units (ops_avx512.cc, and gemm_bf16 / gemm_f16_avx512.cc through
// gemm_pairs_avx512.h). Include only from
// files compiled with -mavx512f. Internal linkage on purpose: each
// translation unit keeps its own copy, so the linker never merges copies
// built with different -m flags.
#pragma once

#include <immintrin.h>

namespace spear::kernels::cpu::internal {
namespace {

// r[i][j] <- r[j][i] for 16 rows of 16 lanes, in registers.
[[maybe_unused]] inline void Transpose16x16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 per 128-bit lane
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);  // a1 b1 c1 d1
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // u[4g + e], 128-bit lane L: element 4L + e of rows 4g .. 4g+3.
  for (int e = 0; e < 4; ++e) {
    t[e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);       // lanes 0,2 of u[e], u[4+e]
    t[4 + e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);   // lanes 1,3
    t[8 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
    t[12 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
  }
  for (int e = 0; e < 4; ++e) {
    r[e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0x88);
    r[4 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0x88);
    r[8 + e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0xDD);
    r[12 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0xDD);
  }
}

}  // namespace
}  // namespace spear::kernels::cpu::internal
