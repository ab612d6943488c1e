// Small fp16 ops of a decode step: SwiGLU (silu(gate) * up), the embedding
// lookup and greedy argmax over the vocab. Each is one launch, bandwidth
// trivial next to the GEMMs; they exist so the whole step stays on device.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/swiglu_rows.cuh"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {

__global__ void SiluMulKernel(const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n,
                              int64_t ld_gate, int64_t ld_up, int64_t ldy, int early) {
  PdlEnter(early);
  const int64_t i = blockIdx.y;
  const __half* g = reinterpret_cast<const __half*>(gate + i * ld_gate);
  const __half* u = reinterpret_cast<const __half*>(up + i * ld_up);
  __half* out = reinterpret_cast<__half*>(y + i * ldy);
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < n;
       j += int64_t{gridDim.x} * blockDim.x) {
    // silu in fp32 (swiglu_rows.cuh: the fold kernel's and EC prologue's too).
    out[j] = __float2half_rn(swg::SiluMulF(__half2float(g[j]), __half2float(u[j])));
  }
}

__global__ void EmbeddingKernel(const uint16_t* __restrict__ table, int64_t vocab, int64_t d,
                                const int32_t* __restrict__ ids, float* y_f32, uint16_t* y_f16,
                                int64_t ldy) {
  PdlEnter();
  const int64_t i = blockIdx.x;
  const int64_t id = ids[i];
  const bool ok = id >= 0 && id < vocab;
  const __half* src = reinterpret_cast<const __half*>(table + (ok ? id : 0) * d);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const __half v = ok ? src[j] : __float2half(0.f);
    if (y_f32) {
      y_f32[i * ldy + j] = __half2float(v);
    } else {
      reinterpret_cast<__half*>(y_f16 + i * ldy)[j] = v;
    }
  }
}

constexpr int kArgmaxThreads = 1024;

// (v, i) beats (bv, bi) when larger, or equal with a lower index; NaN never
// compares larger, so it never wins.
__device__ inline void Better(float v, int i, float& bv, int& bi) {
  if (v > bv || (v == bv && i < bi)) {
    bv = v;
    bi = i;
  }
}

// kVec: rows 16-byte aligned; each thread issues 8 float4 loads before it
// compares (a plain strided loop is a chain of ~125 dependent loads per
// thread for a 128k vocab: tens of microseconds for one block).
template <bool kVec>
__global__ void ArgmaxKernel(const float* __restrict__ logits, int64_t n, int64_t ld,
                             int32_t* __restrict__ out) {
  PdlEnter();
  const float* row = logits + blockIdx.x * ld;
  float bv = -INFINITY;
  int bi = INT_MAX;
  int64_t tail = 0;
  if constexpr (kVec) {
    constexpr int kUnroll = 8;
    const float4* r4 = reinterpret_cast<const float4*>(row);
    const int64_t n4 = n / 4;
    for (int64_t base = threadIdx.x; base < n4; base += int64_t{kArgmaxThreads} * kUnroll) {
      float4 v[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t j = base + int64_t{k} * kArgmaxThreads;
        v[k] = j < n4 ? r4[j] : make_float4(NAN, NAN, NAN, NAN);
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int j = static_cast<int>(4 * (base + int64_t{k} * kArgmaxThreads));
        Better(v[k].x, j, bv, bi);
        Better(v[k].y, j + 1, bv, bi);
        Better(v[k].z, j + 2, bv, bi);
        Better(v[k].w, j + 3, bv, bi);
      }
    }
    tail = 4 * n4;
  }
  for (int64_t j = tail + threadIdx.x; j < n; j += kArgmaxThreads) {
    Better(row[j], static_cast<int>(j), bv, bi);
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
    Better(ov, oi, bv, bi);
  }
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = sv[lane];
    bi = si[lane];
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      Better(ov, oi, bv, bi);
    }
    if (lane == 0) out[blockIdx.x] = bi == INT_MAX ? 0 : bi;
  }
}

}  // namespace

absl::Status SiluMul(const SiluMulF16Params& p, cudaStream_t stream) {
  if (p.gate == nullptr || p.up == nullptr || p.y == nullptr || p.m < 0 || p.n <= 0 ||
      p.ld_gate < p.n || p.ld_up < p.n || p.ldy < p.n) {
    return absl::InvalidArgumentError("cuda::SiluMul: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 65535) return absl::InvalidArgumentError("cuda::SiluMul: more than 65535 rows");
  const int64_t chunks = (p.n + 255) / 256;
  const dim3 grid(static_cast<unsigned>(chunks < 64 ? chunks : 64), static_cast<unsigned>(p.m));
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(SiluMulKernel, grid, dim3(256), 0, stream, p.gate, p.up, p.y,
                                       p.n, p.ld_gate, p.ld_up, p.ldy,
                                       p.early_trigger ? 1 : 0));
  return absl::OkStatus();
}

absl::Status Embedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.table == nullptr || p.ids == nullptr || p.vocab <= 0 || p.d <= 0 || p.m < 0 ||
      (p.y_f32 == nullptr) == (p.y_f16 == nullptr) || p.ldy < p.d) {
    return absl::InvalidArgumentError("cuda::Embedding: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::Embedding: too many rows");
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(EmbeddingKernel, dim3(static_cast<unsigned>(p.m)),
                                       dim3(1024), 0, stream, p.table, p.vocab, p.d, p.ids,
                                       p.y_f32, p.y_f16, p.ldy));
  return absl::OkStatus();
}

absl::Status Argmax(const float* logits, int64_t m, int64_t n, int64_t ld, int32_t* out,
                    cudaStream_t stream) {
  if (logits == nullptr || out == nullptr || m < 0 || n <= 0 || ld < n || n > INT_MAX - 1) {
    return absl::InvalidArgumentError("cuda::Argmax: invalid parameters");
  }
  if (m == 0) return absl::OkStatus();
  if (m > 0x7fffffff) return absl::InvalidArgumentError("cuda::Argmax: too many rows");
  const unsigned grid = static_cast<unsigned>(m);
  const bool vec = ld % 4 == 0 && (reinterpret_cast<uintptr_t>(logits) & 15) == 0;
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(vec ? ArgmaxKernel<true> : ArgmaxKernel<false>, dim3(grid),
                                       dim3(kArgmaxThreads), 0, stream, logits, n, ld, out));
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
