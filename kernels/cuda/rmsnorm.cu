// RMSNorm on the GPU: one block per row, float accumulation, warp shuffles
// then shared memory for the block reduction.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/norm_rows.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// (256 threads: norm_rows.cuh's order, which the GEMMs that normalize x
// themselves repeat)
__device__ float BlockSum(float v) {
  static_assert(kThreads == nrm::kVThreads, "the sums' order is that of 256 threads");
  __shared__ float red[9];
  v = nrm::WarpSum(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  nrm::FinalSum(red, static_cast<int>(threadIdx.x));
  __syncthreads();
  return red[8];
}

__device__ inline void Store(float* p, float v) { *p = v; }
__device__ inline void Store(uint16_t* p, float v) { *p = __half_as_ushort(__float2half_rn(v)); }

// Out is float (RmsNorm) or uint16_t holding fp16 bits (RmsNormF16).
template <typename Out>
__global__ void RmsNormKernel(const float* __restrict__ x, float* __restrict__ residual,
                              const float* __restrict__ weight, Out* y, int64_t d, int64_t ldx,
                              int64_t ldr, int64_t ldy, float eps, int early) {
  PdlEnter(early);
  const int64_t row = blockIdx.x;
  const float* xr = x + row * ldx;
  float* rr = residual ? residual + row * ldr : nullptr;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float v = xr[j];
    if (rr) {
      v += rr[j];
      rr[j] = v;
    }
    ss += v * v;
  }
  const float inv = rsqrtf(BlockSum(ss) / static_cast<float>(d) + eps);
  const float* src = rr ? rr : xr;
  Out* yr = y + row * ldy;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) Store(yr + j, src[j] * inv * weight[j]);
}

}  // namespace

absl::StatusOr<int> DeviceCount() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    return absl::UnavailableError(absl::StrCat("no usable CUDA device: ", cudaGetErrorString(err)));
  }
  return n;
}

absl::Status RmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr || p.m < 0 || p.d <= 0 ||
      p.ldx < p.d || p.ldy < p.d || (p.residual != nullptr && p.ldr < p.d) || !(p.eps >= 0.f)) {
    return absl::InvalidArgumentError("cuda::RmsNorm: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::RmsNorm: too many rows");
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(RmsNormKernel<float>, dim3(static_cast<unsigned>(p.m)),
                                       dim3(kThreads), 0, stream, p.x, p.residual, p.weight, p.y,
                                       p.d, p.ldx, p.ldr, p.ldy, p.eps, 0));
  return absl::OkStatus();
}

namespace {

// The decode fast path of RmsNormF16 (d % 4 == 0, aligned rows, d <= 8192):
// every thread issues all its float4 loads (x, residual, weight) before any
// arithmetic, so a row costs one memory round trip instead of d / 256
// dependent ones (at batch 1 one block per row is the whole launch, and
// the strided loop above made the norm a latency chain of ~8 us).
template <int kVec>
__global__ void RmsNormF16VecKernel(const float* __restrict__ x, float* __restrict__ residual,
                                    const float* __restrict__ weight, uint16_t* __restrict__ y,
                                    int64_t d, int64_t ldx, int64_t ldr, int64_t ldy, float eps,
                                    int early) {
  PdlEnter(early);
  const int64_t row = blockIdx.x;
  const int n4 = static_cast<int>(d / 4);
  const float4* xr = reinterpret_cast<const float4*>(x + row * ldx);
  float4* rr = residual ? reinterpret_cast<float4*>(residual + row * ldr) : nullptr;
  const float4* w4 = reinterpret_cast<const float4*>(weight);
  float4 v[kVec], w[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int j = threadIdx.x + k * kThreads;
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
    const int j = threadIdx.x + k * kThreads;
    if (j < n4 && rr) rr[j] = v[k];
    ss += nrm::Sq4(v[k]);
  }
  const float inv = nrm::InvRms(BlockSum(ss), static_cast<int>(d), eps);
  uint2* yr = reinterpret_cast<uint2*>(y + row * ldy);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int j = threadIdx.x + k * kThreads;
    if (j < n4) {
      const __half2 a = nrm::NormHalf2(v[k].x, v[k].y, inv, w[k].x, w[k].y);
      const __half2 b = nrm::NormHalf2(v[k].z, v[k].w, inv, w[k].z, w[k].w);
      uint2 o;
      o.x = *reinterpret_cast<const uint32_t*>(&a);
      o.y = *reinterpret_cast<const uint32_t*>(&b);
      yr[j] = o;
    }
  }
}

bool Aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

}  // namespace

absl::Status RmsNormF16(const RmsNormF16Params& p, cudaStream_t stream) {
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr || p.m < 0 || p.d <= 0 ||
      p.ldx < p.d || p.ldy < p.d || (p.residual != nullptr && p.ldr < p.d) || !(p.eps >= 0.f)) {
    return absl::InvalidArgumentError("cuda::RmsNormF16: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::RmsNormF16: too many rows");
  const unsigned grid = static_cast<unsigned>(p.m);
  cudaError_t e = cudaSuccess;
  const bool vec = p.d % 4 == 0 && p.d <= 8 * 4 * kThreads && p.ldx % 4 == 0 && p.ldy % 4 == 0 &&
                   Aligned(p.x, 16) && Aligned(p.weight, 16) && Aligned(p.y, 8) &&
                   (p.residual == nullptr || (p.ldr % 4 == 0 && Aligned(p.residual, 16)));
  if (vec) {
    const int early = p.early_trigger ? 1 : 0;
    const int64_t per_thread = (p.d / 4 + kThreads - 1) / kThreads;
    if (per_thread <= 1) {
      e = LaunchPdl(RmsNormF16VecKernel<1>, dim3(grid), dim3(kThreads), 0, stream, p.x, p.residual,
                    p.weight, p.y, p.d, p.ldx, p.ldr, p.ldy, p.eps, early);
    } else if (per_thread <= 2) {
      e = LaunchPdl(RmsNormF16VecKernel<2>, dim3(grid), dim3(kThreads), 0, stream, p.x, p.residual,
                    p.weight, p.y, p.d, p.ldx, p.ldr, p.ldy, p.eps, early);
    } else if (per_thread <= 4) {
      e = LaunchPdl(RmsNormF16VecKernel<4>, dim3(grid), dim3(kThreads), 0, stream, p.x, p.residual,
                    p.weight, p.y, p.d, p.ldx, p.ldr, p.ldy, p.eps, early);
    } else {
      e = LaunchPdl(RmsNormF16VecKernel<8>, dim3(grid), dim3(kThreads), 0, stream, p.x, p.residual,
                    p.weight, p.y, p.d, p.ldx, p.ldr, p.ldy, p.eps, early);
    }
  } else {
    e = LaunchPdl(RmsNormKernel<uint16_t>, dim3(grid), dim3(kThreads), 0, stream, p.x, p.residual,
                  p.weight, p.y, p.d, p.ldx, p.ldr, p.ldy, p.eps, p.early_trigger ? 1 : 0);
  }
  SPEAR_CUDA_RETURN_IF_ERROR(e);
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
