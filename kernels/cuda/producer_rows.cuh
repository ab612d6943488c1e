// The bodies of two producers of a W4 GEMM's x in a decode step, RMSNorm to
// fp16 (the vector path, one block per row) and SwiGLU, shared by their own
// kernels (rmsnorm.cu, elementwise.cu) and by the launch that also runs the
// next GEMM's EC prologue (w4_ec.cu, v31), so that both write bitwise the
// same x.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace spear::kernels::cuda {

inline constexpr int kRowThreads = 256;  // block size of the row kernels

// Sum of v over the 256 threads of the block (every thread gets it).
__device__ inline float BlockSum256(float v) {
  __shared__ float warp_sums[kRowThreads / 32];
  __shared__ float total;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kRowThreads / 32) ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  return total;
}

// RMSNorm of one row to fp16 (d % 4 == 0, 16-byte aligned x / residual /
// weight, 8-byte aligned y, d <= kVec * 4 * 256), 256 threads: every thread
// issues all its float4 loads (x, residual, weight) before any arithmetic,
// so a row costs one memory round trip instead of d / 256 dependent ones
// (at batch 1 one block per row is the whole launch, and a strided loop
// made the norm a latency chain of ~8 us).
template <int kVec>
__device__ __forceinline__ void RmsNormF16Row(const float* __restrict__ x,
                                              float* __restrict__ residual,
                                              const float* __restrict__ weight,
                                              uint16_t* __restrict__ y, int64_t d, int64_t ldx,
                                              int64_t ldr, int64_t ldy, float eps, int64_t row) {
  const int n4 = static_cast<int>(d / 4);
  const float4* xr = reinterpret_cast<const float4*>(x + row * ldx);
  float4* rr = residual ? reinterpret_cast<float4*>(residual + row * ldr) : nullptr;
  const float4* w4 = reinterpret_cast<const float4*>(weight);
  float4 v[kVec], w[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int j = threadIdx.x + k * kRowThreads;
    if (j < n4) {
      v[k] = xr[j];
      w[k] = w4[j];
      if (rr) {
        const float4 r = rr[j];
        v[k].x += r.x;
        v[k].y += r.y;
        v[k].z += r.z;
        v[k].w += r.w;
      }
    } else {
      v[k] = w[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int j = threadIdx.x + k * kRowThreads;
    if (j < n4 && rr) rr[j] = v[k];
    ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
  }
  const float inv = rsqrtf(BlockSum256(ss) / static_cast<float>(d) + eps);
  uint2* yr = reinterpret_cast<uint2*>(y + row * ldy);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int j = threadIdx.x + k * kRowThreads;
    if (j < n4) {
      const __half2 a = __floats2half2_rn(v[k].x * inv * w[k].x, v[k].y * inv * w[k].y);
      const __half2 b = __floats2half2_rn(v[k].z * inv * w[k].z, v[k].w * inv * w[k].w);
      uint2 o;
      o.x = *reinterpret_cast<const uint32_t*>(&a);
      o.y = *reinterpret_cast<const uint32_t*>(&b);
      yr[j] = o;
    }
  }
}

// silu(gate) * up of one element in fp32, rounded to fp16: a / (1 + e^-a);
// expf saturates to inf for a << 0, so silu -> 0.
__device__ __forceinline__ __half SiluMulValue(__half gate, __half up) {
  const float a = __half2float(gate);
  return __float2half_rn(a / (1.f + expf(-a)) * __half2float(up));
}

}  // namespace spear::kernels::cuda
