// RMSNorm on the GPU: one block per row, float accumulation, warp shuffles
// then shared memory for the block reduction.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/producer_rows.cuh"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {

constexpr int kThreads = kRowThreads;

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
  const float inv = rsqrtf(BlockSum256(ss) / static_cast<float>(d) + eps);
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
// RmsNormF16Row (producer_rows.cuh), one block per row.
template <int kVec>
__global__ void RmsNormF16VecKernel(const float* __restrict__ x, float* __restrict__ residual,
                                    const float* __restrict__ weight, uint16_t* __restrict__ y,
                                    int64_t d, int64_t ldx, int64_t ldr, int64_t ldy, float eps,
                                    int early) {
  PdlEnter(early);
  RmsNormF16Row<kVec>(x, residual, weight, y, d, ldx, ldr, ldy, eps, blockIdx.x);
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
