// The RMSNorm arithmetic of a row, shared by RmsNormF16's vector kernel
// (rmsnorm.cu) and the kernels that compute a GEMM's x = RMSNorm(h)
// themselves (v49: the fold kernel and the one-cluster EC prologue at one
// row, instead of a separate RMSNorm launch): the same partial sums added in
// the same order, so that every path gives the same fp16 bits.
//
// A row of d floats (d % 4 == 0) is summed as by 256 threads: thread t adds
// the squares of the float4 pieces t, t + 256, ... in order (each piece's
// four squares by one fixed fma chain), then each warp's 32 sums by an xor
// shuffle tree, then the 8 warp sums by the same tree in one warp. A block
// of 128 threads plays the 256 (thread t is threads t and t + 128).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace spear::kernels::cuda {
namespace nrm {

constexpr int kVThreads = 256;  // the threads the sums are ordered for

__device__ __forceinline__ float Sq4(const float4& v) {
  return fmaf(v.w, v.w, fmaf(v.z, v.z, fmaf(v.y, v.y, v.x * v.x)));
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The 8 warp sums (red[0..7], written by the caller, then a barrier) added
// by warp 0 into red[8]; the caller's next barrier publishes it.
__device__ __forceinline__ void FinalSum(float* red, int tid) {
  if (tid < 32) {
    float v = tid < kVThreads / 32 ? red[tid] : 0.f;
    v = WarpSum(v);
    if (tid == 0) red[8] = v;
  }
}

__device__ __forceinline__ float InvRms(float total, int d, float eps) {
  return rsqrtf(total / static_cast<float>(d) + eps);
}

// fp16 of (h inv) w for two neighbours.
__device__ __forceinline__ __half2 NormHalf2(float h0, float h1, float inv, float w0, float w1) {
  return __floats2half2_rn(h0 * inv * w0, h1 * inv * w1);
}

// 1 / rms of one row h (d floats, 16-byte aligned, d % 4 == 0, d <= 1024 x
// kPer4, kPer4 = float4 pieces per virtual thread) for every thread of a
// block of NT = 128 or 256 threads; every thread must call it. red: >= 9
// floats of shared memory, free at entry and again at return.
template <int NT, int kPer4>
__device__ __forceinline__ float BlockInvRms(const float* __restrict__ h, int d, float eps,
                                             float* red) {
  static_assert(NT == 128 || NT == 256, "128 or 256 threads");
  constexpr int kV = kVThreads / NT;  // virtual threads per thread
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float4* h4 = reinterpret_cast<const float4*>(h);
  const int n4 = d / 4;
  float4 v[kV][kPer4];
#pragma unroll
  for (int p = 0; p < kV; ++p) {
#pragma unroll
    for (int k = 0; k < kPer4; ++k) {
      const int j = tid + p * NT + k * kVThreads;
      v[p][k] = j < n4 ? h4[j] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int p = 0; p < kV; ++p) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kPer4; ++k) s += Sq4(v[p][k]);
    s = WarpSum(s);
    if (lane == 0) red[warp + p * (NT / 32)] = s;
  }
  __syncthreads();
  FinalSum(red, tid);
  __syncthreads();
  const float inv = InvRms(red[8], d, eps);
  __syncthreads();  // red is the caller's again
  return inv;
}

// x[i .. i + 8) = fp16 RMSNorm of h's 8 floats from i (16-byte aligned) as
// one 16-byte value, the weight's 8 floats given (wa, wb: w[i .. i + 8)).
__device__ __forceinline__ uint4 Norm8W(const float* __restrict__ h, const float4& wa,
                                        const float4& wb, int i, float inv) {
  const float4 a = *reinterpret_cast<const float4*>(h + i);
  const float4 b = *reinterpret_cast<const float4*>(h + i + 4);
  const __half2 x0 = NormHalf2(a.x, a.y, inv, wa.x, wa.y);
  const __half2 x1 = NormHalf2(a.z, a.w, inv, wa.z, wa.w);
  const __half2 x2 = NormHalf2(b.x, b.y, inv, wb.x, wb.y);
  const __half2 x3 = NormHalf2(b.z, b.w, inv, wb.z, wb.w);
  uint4 o;
  o.x = *reinterpret_cast<const uint32_t*>(&x0);
  o.y = *reinterpret_cast<const uint32_t*>(&x1);
  o.z = *reinterpret_cast<const uint32_t*>(&x2);
  o.w = *reinterpret_cast<const uint32_t*>(&x3);
  return o;
}

__device__ __forceinline__ uint4 Norm8(const float* __restrict__ h, const float* __restrict__ w,
                                       int i, float inv) {
  return Norm8W(h, *reinterpret_cast<const float4*>(w + i),
                *reinterpret_cast<const float4*>(w + i + 4), i, inv);
}

}  // namespace nrm
}  // namespace spear::kernels::cuda
