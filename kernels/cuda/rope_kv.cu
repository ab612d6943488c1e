// RoPE on fp16 activations and the KV-cache append of a decode/prefill step,
// separately and fused (RopeKvAppend: one graph node per layer instead of
// two). Memory-trivial (a few KB per token); one short launch each.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {

constexpr int kThreads = 128;

// Rotates pair j of one head row hx in place (hx[j] with hx[j + half]) by
// the angle pos * inv_freq_j, computed in fp32 as HF and ref::Rope form it
// (sincosf does the full range reduction: positions reach 1e5+, __sinf
// would drift); *ra / *rb get the rotated values.
__device__ __forceinline__ void RotatePair(__half* hx, int j, int half, float pos, float inv_freq_j,
                                           float scaling, __half* ra, __half* rb) {
  float s, c;
  sincosf(pos * inv_freq_j, &s, &c);
  c *= scaling;
  s *= scaling;
  const float a = __half2float(hx[j]), b = __half2float(hx[j + half]);
  *ra = __float2half_rn(a * c - b * s);
  *rb = __float2half_rn(b * c + a * s);
  hx[j] = *ra;
  hx[j + half] = *rb;
}

// Block (i, c) rotates pairs c * blockDim + t of token i, one pair per
// thread (a strided loop here was a chain of dependent load/stores: x is
// read and written in place, so the compiler cannot batch the loads); pair
// (h, j) rotates x[h*D + j] with x[h*D + j + D/2].
__global__ void RopeKernel(uint16_t* __restrict__ x, int64_t ldx, int n_heads, int head_dim,
                           const int32_t* __restrict__ positions,
                           const float* __restrict__ inv_freq, float scaling) {
  PdlEnter();
  const int64_t i = blockIdx.x;
  const int half = head_dim / 2;
  const float pos = static_cast<float>(positions[i]);
  __half* row = reinterpret_cast<__half*>(x + i * ldx);
  const int pr = blockIdx.y * blockDim.x + threadIdx.x;
  if (pr < n_heads * half) {
    const int h = pr / half, j = pr - h * half;
    __half ra, rb;
    RotatePair(row + h * head_dim, j, half, pos, inv_freq[j], scaling, &ra, &rb);
  }
}

// One block per token; copies the k and v rows in 16-byte pieces when the
// rows allow it (aligned pointers and strides), else in 2-byte elements.
template <bool kVec>
__global__ void KvAppendKernel(const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                               int64_t ldk, int64_t ldv, int64_t row_elems,
                               const int32_t* __restrict__ slots, uint16_t* __restrict__ k_cache,
                               uint16_t* __restrict__ v_cache, int64_t num_slots) {
  PdlEnter();
  const int64_t i = blockIdx.x;
  const int64_t slot = slots[i];
  if (slot < 0 || slot >= num_slots) return;
  const uint16_t* kr = k + i * ldk;
  const uint16_t* vr = v + i * ldv;
  uint16_t* kc = k_cache + slot * row_elems;
  uint16_t* vc = v_cache + slot * row_elems;
  if constexpr (kVec) {
    const int64_t n = row_elems / 8;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      reinterpret_cast<uint4*>(kc)[j] = reinterpret_cast<const uint4*>(kr)[j];
      reinterpret_cast<uint4*>(vc)[j] = reinterpret_cast<const uint4*>(vr)[j];
    }
  } else {
    for (int64_t j = threadIdx.x; j < row_elems; j += blockDim.x) {
      kc[j] = kr[j];
      vc[j] = vr[j];
    }
  }
}

// RoPE + KV append in one launch (RopeKvAppend). Block (i, c) of token i:
// thread u < (n_q + n_kv) * D/2 rotates pair u as RopeKernel and, for a k
// head, also stores the two rotated values into the cache row; the threads
// after them copy the token's v row into the cache (16-byte pieces when
// kVec, else 2-byte elements). One memory round trip per thread; no thread
// reads what another writes.
template <bool kVec>
__global__ void RopeKvKernel(uint16_t* __restrict__ x, int64_t ldx, int n_q, int n_kv,
                             int head_dim, const int32_t* __restrict__ positions,
                             const float* __restrict__ inv_freq, float scaling,
                             const int32_t* __restrict__ slots, uint16_t* __restrict__ k_cache,
                             uint16_t* __restrict__ v_cache, int64_t num_slots) {
  PdlEnter();
  const int64_t i = blockIdx.x;
  const int half = head_dim / 2;
  const int64_t slot = slots[i];
  const bool valid = slot >= 0 && slot < num_slots;
  const int64_t kv_row = int64_t{n_kv} * head_dim;
  __half* row = reinterpret_cast<__half*>(x + i * ldx);
  const int u = blockIdx.y * blockDim.x + threadIdx.x;
  const int pairs = (n_q + n_kv) * half;
  if (u < pairs) {
    const float pos = static_cast<float>(positions[i]);
    const int h = u / half, j = u - h * half;
    __half ra, rb;
    RotatePair(row + h * head_dim, j, half, pos, inv_freq[j], scaling, &ra, &rb);
    if (h >= n_q && valid) {
      __half* kc = reinterpret_cast<__half*>(k_cache + slot * kv_row) + (h - n_q) * head_dim;
      kc[j] = ra;
      kc[j + half] = rb;
    }
  } else if (valid) {
    const int64_t vi = u - pairs;
    const uint16_t* vr = x + i * ldx + int64_t{n_q + n_kv} * head_dim;
    uint16_t* vc = v_cache + slot * kv_row;
    if constexpr (kVec) {
      if (vi < kv_row / 8) reinterpret_cast<uint4*>(vc)[vi] = reinterpret_cast<const uint4*>(vr)[vi];
    } else {
      if (vi < kv_row) vc[vi] = vr[vi];
    }
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

absl::Status Rope(const RopeF16Params& p, cudaStream_t stream) {
  if (p.x == nullptr || p.positions == nullptr || p.inv_freq == nullptr || p.m < 0 ||
      p.n_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 ||
      p.ldx < int64_t{p.n_heads} * p.head_dim) {
    return absl::InvalidArgumentError("cuda::Rope: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::Rope: too many rows");
  const int64_t chunks = (int64_t{p.n_heads} * (p.head_dim / 2) + kThreads - 1) / kThreads;
  if (chunks > 65535) return absl::InvalidArgumentError("cuda::Rope: rows too wide");
  const dim3 grid(static_cast<unsigned>(p.m), static_cast<unsigned>(chunks));
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(RopeKernel, grid, dim3(kThreads), 0, stream, p.x, p.ldx,
                                       p.n_heads, p.head_dim, p.positions, p.inv_freq,
                                       p.attention_scaling));
  return absl::OkStatus();
}

absl::Status KvAppend(const KvAppendParams& p, cudaStream_t stream) {
  const int64_t row = int64_t{p.n_kv_heads} * p.head_dim;
  if (p.k == nullptr || p.v == nullptr || p.slots == nullptr || p.k_cache == nullptr ||
      p.v_cache == nullptr || p.m < 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 || p.ldk < row ||
      p.ldv < row || p.block_size <= 0 || p.num_cache_blocks <= 0) {
    return absl::InvalidArgumentError("cuda::KvAppend: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::KvAppend: too many rows");
  const int64_t num_slots = p.num_cache_blocks * p.block_size;
  const bool vec = row % 8 == 0 && p.ldk % 8 == 0 && p.ldv % 8 == 0 && Aligned16(p.k) &&
                   Aligned16(p.v) && Aligned16(p.k_cache) && Aligned16(p.v_cache);
  const unsigned grid = static_cast<unsigned>(p.m);
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(vec ? KvAppendKernel<true> : KvAppendKernel<false>,
                                       dim3(grid), dim3(128), 0, stream, p.k, p.v, p.ldk, p.ldv,
                                       row, p.slots, p.k_cache, p.v_cache, num_slots));
  return absl::OkStatus();
}

absl::Status RopeKvAppend(const RopeKvAppendParams& p, cudaStream_t stream) {
  const int64_t kv_row = int64_t{p.n_kv_heads} * p.head_dim;
  if (p.qkv == nullptr || p.positions == nullptr || p.inv_freq == nullptr || p.slots == nullptr ||
      p.k_cache == nullptr || p.v_cache == nullptr || p.m < 0 || p.n_q_heads <= 0 ||
      p.n_kv_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 ||
      p.ldqkv < int64_t{p.n_q_heads} * p.head_dim + 2 * kv_row || p.block_size <= 0 ||
      p.num_cache_blocks <= 0) {
    return absl::InvalidArgumentError("cuda::RopeKvAppend: invalid parameters");
  }
  if (p.m == 0) return absl::OkStatus();
  if (p.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::RopeKvAppend: too many rows");
  const int64_t v_off = int64_t{p.n_q_heads + p.n_kv_heads} * p.head_dim;
  const bool vec = kv_row % 8 == 0 && p.ldqkv % 8 == 0 && v_off % 8 == 0 && Aligned16(p.qkv) &&
                   Aligned16(p.v_cache);
  const int64_t units =
      int64_t{p.n_q_heads + p.n_kv_heads} * (p.head_dim / 2) + (vec ? kv_row / 8 : kv_row);
  const int64_t chunks = (units + kThreads - 1) / kThreads;
  if (chunks > 65535) return absl::InvalidArgumentError("cuda::RopeKvAppend: rows too wide");
  const dim3 grid(static_cast<unsigned>(p.m), static_cast<unsigned>(chunks));
  const int64_t num_slots = p.num_cache_blocks * p.block_size;
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(vec ? RopeKvKernel<true> : RopeKvKernel<false>, grid,
                                       dim3(kThreads), 0, stream, p.qkv, p.ldqkv, p.n_q_heads,
                                       p.n_kv_heads, p.head_dim, p.positions, p.inv_freq,
                                       p.attention_scaling, p.slots, p.k_cache, p.v_cache,
                                       num_slots));
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
