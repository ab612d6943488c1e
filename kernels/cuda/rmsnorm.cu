// RMSNorm on the GPU: one block per row, float accumulation, warp shuffles
// then shared memory for the block reduction.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float BlockSum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kThreads / 32) ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  __shared__ float total;
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  return total;
}

__device__ inline void Store(float* p, float v) { *p = v; }
__device__ inline void Store(uint16_t* p, float v) { *p = __half_as_ushort(__float2half_rn(v)); }

// Out is float (RmsNorm) or uint16_t holding fp16 bits (RmsNormF16).
template <typename Out>
__global__ void RmsNormKernel(const float* __restrict__ x, float* __restrict__ residual,
                              const float* __restrict__ weight, Out* y, int64_t d, int64_t ldx,
                              int64_t ldr, int64_t ldy, float eps) {
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
  RmsNormKernel<float><<<static_cast<unsigned>(p.m), kThreads, 0, stream>>>(
      p.x, p.residual, p.weight, p.y, p.d, p.ldx, p.ldr, p.ldy, p.eps);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status RmsNormF16(const RmsNormF16Params& p, cudaStream_t stream) {
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr || p.m < 0 || p.d <= 0 ||
      p.ldx < p.d || p.ldy < p.d || (p.residual != nullptr && p.ldr < p.d) || !(p.eps >= 0.f)) {
    return absl::InvalidArgumentError("cuda::RmsNormF16: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::RmsNormF16: too many rows");
  RmsNormKernel<uint16_t><<<static_cast<unsigned>(p.m), kThreads, 0, stream>>>(
      p.x, p.residual, p.weight, p.y, p.d, p.ldx, p.ldr, p.ldy, p.eps);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
