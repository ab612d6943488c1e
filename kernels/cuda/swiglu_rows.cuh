// The SwiGLU arithmetic of SiluMul (elementwise.cu), shared with the kernels
// that compute a down GEMM's x = silu(gate) * up themselves (v51: the fold
// kernel and the one-cluster EC prologue at one row, instead of a separate
// SiluMul launch): the same fp32 operations in the same order, so that
// every path gives the same fp16 bits.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace spear::kernels::cuda {
namespace swg {

// silu(a) * u in fp32: a / (1 + e^-a) * u; expf saturates to inf for
// a << 0, which gives 0.
__device__ __forceinline__ float SiluMulF(float a, float u) { return a / (1.f + expf(-a)) * u; }

// x[kk .. kk + 8) of a gate_up row (gate = gu[0, k), up = gu[k, 2k)), both
// 16-byte aligned pieces, as 8 fp16.
__device__ __forceinline__ uint4 Swiglu8(const uint16_t* gu, int k, int kk) {
  const uint4 g = *reinterpret_cast<const uint4*>(gu + kk);
  const uint4 u = *reinterpret_cast<const uint4*>(gu + k + kk);
  const __half2* gh = reinterpret_cast<const __half2*>(&g);
  const __half2* uh = reinterpret_cast<const __half2*>(&u);
  uint4 out;
  __half2* oh = reinterpret_cast<__half2*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __half22float2(gh[i]), b = __half22float2(uh[i]);
    oh[i] = __halves2half2(__float2half_rn(SiluMulF(a.x, b.x)), __float2half_rn(SiluMulF(a.y, b.y)));
  }
  return out;
}

}  // namespace swg
}  // namespace spear::kernels::cuda
