// mma.sync m16n8k16 (fp16 in, fp32 accumulate) for the decode kernels: the
// fold and swapped-operand kernels, the EC epilogue (ec_tile.cuh) and the
// one-cluster EC prologue (w4_ec.cu).
#pragma once

#include <cstdint>

namespace spear::kernels::cuda {

// c += A B (a0..a3: the A fragment, b0, b1: the B fragment).
__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// d = A B (a zero accumulator in: the first k-step of a group).
__device__ __forceinline__ void MmaZ(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                     uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%10,%10,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
}

// (w & A) | B in one lop3: a W4 word's nibbles as fp16 mantissa bits (the
// fold and swapped-operand kernels' dequantization into fragments).
template <uint32_t A, uint32_t B>
__device__ __forceinline__ uint32_t AndOr(uint32_t w) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(w), "n"(A), "n"(B));
  return d;
}

}  // namespace spear::kernels::cuda
