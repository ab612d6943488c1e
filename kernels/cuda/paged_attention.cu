// Paged decode attention with GQA and split-K over the context
// (flash-decoding). One thread block per (partition, kv head x group chunk,
// sequence): the block serves up to kMaxG query heads that share one kv
// head, so each K/V row is read once for the whole group.
//
// Per block: (1) scores: one thread per token computes the dot products of
// its K row with all group queries (q in shared memory, read as broadcasts;
// no shuffles: at batch 32 a warp-per-token layout spent more time in
// reductions than in loads); (2) a per-head softmax over the partition in
// shared memory; (3) P V: each thread owns 8 dims of the head (one 16-byte
// load per V row) and a stride of tokens, 4 tokens' loads in flight, partial
// sums reduced by shuffles and shared memory. Every loop issues its loads
// before its math: at batch 1 these blocks are latency-bound, and a first
// version with 4-byte V loads in a dependent loop cost ~100 us per layer at
// batch 32. With one
// partition the block writes the normalised fp16 output; otherwise it
// writes an unnormalised fp32 partial + its max and sum, and the partitions
// are merged (log-sum-exp rescaling) by the last block of the head group to
// finish (CombineInBlock: no second launch) when the caller passes tickets,
// else by CombineKernel.
//
// v50 (cluster_combine, the default where it applies): the partitions of a
// (sequence, head group) form ONE thread-block cluster (2..16 blocks, one
// launch, no workspace): each block keeps its partial output, max and sum in
// its own shared memory, a cluster barrier publishes them, and block r
// combines the r-th slice of the group's outputs reading the others' partials
// through distributed shared memory, in partition order (deterministic). It
// applies where <= cluster_max (8; up to 16) partitions cover
// max_context_len without lengthening them past 64 tokens or the split's own
// partition length (MakeClusterPlan; e.g. batch 1 up to 512 tokens).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <mutex>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda_ops.h"
#include "kernels/w4_cuda.h"

namespace spear::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxG = 8;      // query heads per block
constexpr int kMinPart = 32;  // tokens per partition, bounds
constexpr int kMaxPart = 512;

constexpr int kMaxCluster = 16;  // blocks per cluster (16: non-portable, where the GPU takes it)

struct Plan {
  int gchunks = 1, part = kMinPart, parts = 1;
  int64_t want = 1;  // the partitions asked for (two waves of blocks)
};

Plan MakePlan(const PagedDecodeAttentionParams& p) {
  Plan pl;
  const int group = p.n_heads / p.n_kv_heads;
  pl.gchunks = (group + kMaxG - 1) / kMaxG;
  const int64_t base = p.num_seqs * p.n_kv_heads * pl.gchunks;
  // Enough blocks for two waves' worth of SMs; longer partitions once the
  // batch alone fills the GPU (fewer partials to combine).
  const int64_t target = 2 * int64_t{NumSms() > 0 ? NumSms() : 132};
  const int64_t want = base >= target ? 1 : (target + base - 1) / base;
  pl.want = want;
  const int64_t ctx = p.max_context_len > 0 ? p.max_context_len : 1;
  int64_t part = (ctx + want - 1) / want;
  part = (part + 31) / 32 * 32;
  if (part < kMinPart) part = kMinPart;
  if (part > kMaxPart) part = kMaxPart;
  pl.part = static_cast<int>(part);
  pl.parts = static_cast<int>((ctx + part - 1) / part);
  return pl;
}

// v50: the cluster form of `base` (MakePlan's), where p asks for the
// cluster combine: as many partitions as MakePlan wants, at most the cap
// (cluster_max and the device's), each no longer than kClusterPart tokens or
// MakePlan's own partition, whichever is longer. Returns false where it does
// not apply (one partition suffices, or the cap would lengthen the
// partitions past that). Measured on the H200 (docs/results/gpu.md, v50): at
// batch 1 a block's chain grows with its partition (8B context 512: 8 x 64
// tokens in clusters -0.025 ms a step against the combine kernel, 4 x 128
// +0.05; context 2048 / 4096 with 8 partitions of 256 / 512: +0.20 / +0.51
// ms), while with MakePlan's own partitions (batch 8) the cluster only saves
// the combine.
constexpr int kClusterPart = 64;
int ClusterCap(int head_dim);

bool MakeClusterPlan(const PagedDecodeAttentionParams& p, const Plan& base, Plan* out) {
  if (!p.cluster_combine || base.parts <= 1) return false;
  const int cmax = std::min(p.cluster_max, ClusterCap(p.head_dim));
  if (cmax < 2) return false;
  const int64_t ctx = p.max_context_len;
  const int64_t want = std::min<int64_t>(std::max<int64_t>(base.want, 2), cmax);
  int64_t part = (ctx + want - 1) / want;
  part = std::max<int64_t>((part + 31) / 32 * 32, kMinPart);
  if (part > kMaxPart || part > std::max(kClusterPart, base.part)) return false;
  const int64_t parts = (ctx + part - 1) / part;
  if (parts < 2 || parts > cmax) return false;
  *out = base;
  out->part = static_cast<int>(part);
  out->parts = static_cast<int>(parts);
  return true;
}

// The in-launch combine (tickets != null, 1 < nparts <= kMaxPart), run by
// every block after it stored its partials: the block takes a ticket for its
// (sequence, head group); the block that takes the last one combines the
// group's partitions, in partition order 0, 1, ... (fixed-order shuffles for
// the max and the denominator), so the output bits do not depend on which
// block finished last, and sets the ticket back to zero for the next call.
// The partials of other blocks are read through L2 (ld.cg) after a fence.
// Block-uniform: every thread of the block calls it.
template <int D>
__device__ __forceinline__ void CombineInBlock(int nparts, int ng, int h0, int n_heads,
                                               int64_t seq, int32_t* __restrict__ tickets,
                                               const float* po, const float* pm, const float* pl,
                                               uint16_t* __restrict__ out, int64_t ldo,
                                               float (*w_s)[kMaxPart], float* den_s,
                                               int* last_s) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __threadfence();  // this thread's partials are visible before the ticket
  __syncthreads();
  if (tid == 0) {
    int32_t* t = tickets + seq * gridDim.y + blockIdx.y;
    const int prev = atomicAdd(t, 1);
    *last_s = prev == nparts - 1;
    if (prev == nparts - 1) *t = 0;  // every other block has taken its ticket
  }
  __syncthreads();
  if (!*last_s) return;
  __threadfence();
  for (int g = warp; g < ng; g += kThreads / 32) {
    const int64_t hh = seq * n_heads + h0 + g;
    float mx = -INFINITY;
    for (int j = lane; j < nparts; j += 32) {
      if (__ldcg(pl + hh * nparts + j) > 0.f) mx = fmaxf(mx, __ldcg(pm + hh * nparts + j));
    }
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float den = 0.f;
    for (int j = lane; j < nparts; j += 32) {
      const float lj = __ldcg(pl + hh * nparts + j);
      const float w = lj > 0.f ? expf(__ldcg(pm + hh * nparts + j) - mx) : 0.f;
      w_s[g][j] = w;
      den += w * lj;
    }
    for (int off = 16; off > 0; off >>= 1) den += __shfl_xor_sync(0xffffffffu, den, off);
    if (lane == 0) den_s[g] = den;
  }
  __syncthreads();
  // Each thread owns kOut outputs (g, d) = tid + k kThreads and sums them
  // over the partitions in order, kU partitions x kOut outputs of loads in
  // flight per round (v13 call 1: one output at a time, 4 loads deep, made
  // this tail a chain of ~16 L2 round trips and the step slower at batch 1).
  constexpr int kOut = kMaxG * D / kThreads, kU = 4;
  float num[kOut];
  const float* src = po + (seq * n_heads + h0) * nparts * D;  // the group's partials
#pragma unroll
  for (int k = 0; k < kOut; ++k) num[k] = 0.f;
  for (int j0 = 0; j0 < nparts; j0 += kU) {
    float v[kU][kOut];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int k = 0; k < kOut; ++k) {
        const int i = tid + k * kThreads, g = min(i / D, ng - 1), d = i % D;
        v[u][k] = j0 + u < nparts ? __ldcg(src + (g * nparts + j0 + u) * D + d) : 0.f;
      }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (j0 + u < nparts) {
#pragma unroll
        for (int k = 0; k < kOut; ++k) {
          const int g = min((tid + k * kThreads) / D, ng - 1);
          num[k] += w_s[g][j0 + u] * v[u][k];
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kOut; ++k) {
    const int i = tid + k * kThreads, g = i / D, d = i % D;
    if (g < ng) {
      const float den = den_s[g];
      reinterpret_cast<__half*>(out + seq * ldo)[(h0 + g) * D + d] =
          __float2half_rn(den > 0.f ? num[k] / den : 0.f);
    }
  }
}

// v50: the cluster's combine, run by every block of the cluster (block-
// uniform) once its partial sits in its own shared memory: o_s[g][d]
// (unnormalised), m_s[g], l_s[g] for g < ng. A cluster barrier (release /
// acquire) publishes them; each block reads every partition's maxima and
// sums (ng x C values) and computes the weights exp(m_j - M) and the
// denominator per head exactly as CombineKernel does; block r then writes
// outputs i = r, r + C, ... of the group's ng x D, each summed over the
// partitions in order 0..C-1 from the other blocks' o_s (ld.shared::cluster).
// A second barrier keeps every block's shared memory alive until all reads
// are done. mj_s / lj_s: scratch [kMaxG][kMaxCluster] floats each.
template <int D>
__device__ __forceinline__ void ClusterCombine(int C, int ng, int h0, int64_t seq,
                                               uint16_t* __restrict__ out, int64_t ldo,
                                               const float (*o_s)[D], const float* m_s,
                                               const float* l_s, float (*mj_s)[kMaxCluster],
                                               float (*lj_s)[kMaxCluster], float* den_s) {
  const int tid = threadIdx.x;
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
  auto remote = [](const float* local, int rank) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(local));
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(a), "r"(rank));
    return r;
  };
  auto load = [](unsigned addr) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
    return v;
  };
  for (int t = tid; t < ng * C; t += kThreads) {
    const int g = t / C, j = t - g * C;
    mj_s[g][j] = load(remote(m_s + g, j));
    lj_s[g][j] = load(remote(l_s + g, j));
  }
  __syncthreads();
  if (tid < ng) {  // CombineKernel's weights and denominator, partition order
    const int g = tid;
    float mx = -INFINITY;
    for (int j = 0; j < C; ++j) {
      if (lj_s[g][j] > 0.f) mx = fmaxf(mx, mj_s[g][j]);
    }
    float den = 0.f;
    for (int j = 0; j < C; ++j) {
      const float lj = lj_s[g][j];
      const float w = lj > 0.f ? expf(mj_s[g][j] - mx) : 0.f;
      mj_s[g][j] = w;  // the weight, in place of the max
      den += w * lj;
    }
    den_s[g] = den;
  }
  __syncthreads();
  unsigned rank;
  asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  for (int i = static_cast<int>(rank) + tid * C; i < ng * D; i += kThreads * C) {
    const int g = i / D, d = i - g * D;
    float v[kMaxCluster];
#pragma unroll
    for (int j = 0; j < kMaxCluster; ++j) v[j] = j < C ? load(remote(&o_s[g][d], j)) : 0.f;
    float num = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxCluster; ++j) {
      if (j < C) num += mj_s[g][j] * v[j];
    }
    const float den = den_s[g];
    reinterpret_cast<__half*>(out + seq * ldo)[(h0 + g) * D + d] =
        __float2half_rn(den > 0.f ? num / den : 0.f);
  }
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
}

// CL (v50): the launch is in clusters of gridDim.x blocks (one per partition)
// and combines through ClusterCombine; po / pm / pl / tickets are unused.
template <int D, bool CL>
__global__ void __launch_bounds__(kThreads)
    SplitKernel(const uint16_t* __restrict__ q, int64_t ldq, int n_heads, int n_kv_heads,
                const uint16_t* __restrict__ k_cache, const uint16_t* __restrict__ v_cache,
                int block_size, int64_t num_cache_blocks, const int32_t* __restrict__ tables,
                int64_t max_blocks, const int32_t* __restrict__ context_lens, int64_t max_ctx,
                float scale, int part, int gchunks, uint16_t* __restrict__ out, int64_t ldo,
                float* __restrict__ po, float* __restrict__ pm, float* __restrict__ pl,
                int32_t* __restrict__ tickets, int early, int prefetch) {
  __shared__ __align__(16) float q_s[kMaxG][D];
  // Scores, then probabilities; after (3)'s loop the same memory holds the
  // per-warp partial outputs [kWarps][kMaxG][D] (at most 16 KB, = s_s).
  __shared__ __align__(16) float s_s[kMaxG][kMaxPart];
  __shared__ int32_t row_s[kMaxPart];  // cache row (slot) of each token, -1 = masked
  __shared__ float m_s[kMaxG], l_s[kMaxG];
  __shared__ float den_s[kMaxG];
  __shared__ int last_s;
  __shared__ float mj_s[CL ? kMaxG : 1][kMaxCluster], lj_s[CL ? kMaxG : 1][kMaxCluster];
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps * kMaxG * D <= kMaxG * kMaxPart, "partials must fit in s_s");
  float(*red_s)[kMaxG][D] = reinterpret_cast<float(*)[kMaxG][D]>(&s_s[0][0]);
  const int tid = threadIdx.x;
  const int64_t seq = blockIdx.z;
  const int kvh = blockIdx.y / gchunks;
  const int group = n_heads / n_kv_heads;
  const int g0 = (blockIdx.y % gchunks) * kMaxG;
  const int ng = min(kMaxG, group - g0);
  const int h0 = kvh * group + g0;
  const int nparts = gridDim.x;
  const int64_t t0 = int64_t{blockIdx.x} * part;
  const int64_t kv_row = int64_t{n_kv_heads} * D;  // elements per cache slot

  // v52, before the dependency wait (PagedDecodeAttentionParams::
  // prefetch_rows): the partition's K and V rows are requested into L2, so
  // their DRAM latency overlaps the tail of the launch before. Prefetches
  // are hints: the length and page-table entries read for them (ld.cg, kept
  // out of L1) may be stale without harm; every value used is read again
  // after the wait.
  if (prefetch) {
    int64_t c = __ldcg(context_lens + seq);
    c = c < 0 ? 0 : (c > max_ctx ? max_ctx : c);
    const int n = static_cast<int>(c - t0 < part ? (c - t0 > 0 ? c - t0 : 0) : part);
    for (int t = tid; t < n; t += kThreads) {
      const int64_t pos = t0 + t;
      const int64_t blk = __ldcg(tables + seq * max_blocks + pos / block_size);
      if (blk < 0 || blk >= num_cache_blocks) continue;
      const int64_t slot = blk * block_size + pos % block_size;
      const uint16_t* kr = k_cache + slot * kv_row + int64_t{kvh} * D;
      const uint16_t* vr = v_cache + slot * kv_row + int64_t{kvh} * D;
#pragma unroll
      for (int b = 0; b < D / 64; ++b) {  // 128-byte lines
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(kr + b * 64));
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(vr + b * 64));
      }
    }
  }
  PdlEnter(early);

  int64_t ctx = context_lens[seq];
  ctx = ctx < 0 ? 0 : (ctx > max_ctx ? max_ctx : ctx);
  const int nt = static_cast<int>(ctx - t0 < part ? (ctx - t0 > 0 ? ctx - t0 : 0) : part);

  if (CL && nt == 0) {  // an empty partial: weight 0 in the combine
    if (tid < ng) {
      m_s[tid] = -INFINITY;
      l_s[tid] = 0.f;
    }
    for (int i = tid; i < ng * D; i += kThreads) q_s[i / D][i % D] = 0.f;
    ClusterCombine<D>(nparts, ng, h0, seq, out, ldo, q_s, m_s, l_s, mj_s, lj_s, den_s);
    return;
  }
  if (nt == 0) {  // nothing here: an empty partial (or a zero row)
    for (int i = tid; i < ng * D; i += kThreads) {
      const int g = i / D, d = i - g * D;
      const int64_t hh = seq * n_heads + h0 + g;
      if (nparts == 1) {
        reinterpret_cast<__half*>(out + seq * ldo)[(h0 + g) * D + d] = __float2half(0.f);
      } else {
        po[(hh * nparts + blockIdx.x) * D + d] = 0.f;
        if (d == 0) {
          pm[hh * nparts + blockIdx.x] = -INFINITY;
          pl[hh * nparts + blockIdx.x] = 0.f;
        }
      }
    }
    if (nparts > 1 && tickets != nullptr) {  // nt == 0 is uniform over the block
      CombineInBlock<D>(nparts, ng, h0, n_heads, seq, tickets, po, pm, pl, out, ldo, s_s, den_s,
                        &last_s);
    }
    return;
  }

  const __half* qh = reinterpret_cast<const __half*>(q + seq * ldq);
  for (int i = tid; i < ng * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    q_s[g][d] = __half2float(qh[(h0 + g) * D + d]) * scale;
  }
  for (int t = tid; t < nt; t += kThreads) {
    const int64_t pos = t0 + t;
    const int64_t blk = tables[seq * max_blocks + pos / block_size];
    row_s[t] = (blk >= 0 && blk < num_cache_blocks)
                   ? static_cast<int32_t>(blk * block_size + pos % block_size)
                   : -1;
  }
  __syncthreads();

  // (1) scores, one thread per token: the row's D / 8 16-byte loads first
  // (one memory round trip per token), then one head at a time (a loop
  // over heads outside the unrolled dims keeps ptxas from hoisting every q
  // load of every head: that version spilled 3.4 KB).
  for (int t = tid; t < nt; t += kThreads) {
    const int32_t slot = row_s[t];
    if (slot < 0) {
      for (int g = 0; g < ng; ++g) s_s[g][t] = -INFINITY;
      continue;
    }
    const uint4* kr = reinterpret_cast<const uint4*>(k_cache + slot * kv_row + int64_t{kvh} * D);
    uint4 raw_k[D / 8];
#pragma unroll
    for (int c = 0; c < D / 8; ++c) raw_k[c] = kr[c];
#pragma unroll 1
    for (int g = 0; g < ng; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw_k[c]);
        const float4 a = *reinterpret_cast<const float4*>(&q_s[g][c * 8]);
        const float4 b = *reinterpret_cast<const float4*>(&q_s[g][c * 8 + 4]);
        const float2 k0 = __half22float2(h2[0]), k1 = __half22float2(h2[1]),
                     k2 = __half22float2(h2[2]), k3 = __half22float2(h2[3]);
        acc += a.x * k0.x + a.y * k0.y + a.z * k1.x + a.w * k1.y + b.x * k2.x + b.y * k2.y +
               b.z * k3.x + b.w * k3.y;
      }
      s_s[g][t] = acc;
    }
  }
  __syncthreads();

  // (2) softmax over the partition, one warp per head.
  const int lane = tid & 31, warp = tid >> 5;
  for (int g = warp; g < ng; g += kThreads / 32) {
    float mx = -INFINITY;
    for (int t = lane; t < nt; t += 32) mx = fmaxf(mx, s_s[g][t]);
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int t = lane; t < nt; t += 32) {
      const float e = mx == -INFINITY ? 0.f : expf(s_s[g][t] - mx);
      s_s[g][t] = e;
      sum += e;
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      m_s[g] = mx;
      l_s[g] = sum;
    }
  }
  __syncthreads();

  // (3) P V: a token's V row is split over kTpt threads of 8 dims each (one
  // 16-byte load); the kTg token groups stride the partition, 4 tokens per
  // step with the loads issued first. Partials: summed over the lanes of a
  // warp that share dims (shuffles), then over warps through shared memory.
  constexpr int kTpt = D / 8, kTg = kThreads / kTpt, kUnroll = 4;
  const int c8 = tid % kTpt, tg = tid / kTpt;
  float acc[kMaxG][8];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  for (int tb = tg; tb < nt; tb += kTg * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = tb + u * kTg;
      const int32_t slot = t < nt ? row_s[t] : -1;
      raw[u] = slot >= 0
                   ? reinterpret_cast<const uint4*>(v_cache + slot * kv_row + int64_t{kvh} * D)[c8]
                   : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = tb + u * kTg;
      if (t < nt) {
        const __half2* h2 = reinterpret_cast<const __half2*>(&raw[u]);
        float v[8];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 f = __half22float2(h2[e]);
          v[2 * e] = f.x;
          v[2 * e + 1] = f.y;
        }
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) {
          if (g < ng) {
            const float pr = s_s[g][t];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] += pr * v[e];
          }
        }
      }
    }
  }
  // Lanes l and l + kTpt, l + 2 kTpt, ... of a warp hold the same dims.
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    if (g < ng) {  // uniform over the block
#pragma unroll
      for (int e = 0; e < 8; ++e) {
#pragma unroll
        for (int off = kTpt; off < 32; off <<= 1) {
          acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        }
      }
    }
  }
  __syncthreads();  // every thread is done with s_s: red_s reuses it
  if (lane < kTpt) {
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g < ng) {
#pragma unroll
        for (int e = 0; e < 8; ++e) red_s[warp][g][c8 * 8 + e] = acc[g][e];
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < ng * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    float o = 0.f;
#pragma unroll
    for (int j = 0; j < kWarps; ++j) o += red_s[j][g][d];
    const int64_t hh = seq * n_heads + h0 + g;
    if (CL) {
      q_s[g][d] = o;  // q is no longer read: its buffer holds the partial
    } else if (nparts == 1) {
      const float l = l_s[g];
      reinterpret_cast<__half*>(out + seq * ldo)[(h0 + g) * D + d] =
          __float2half_rn(l > 0.f ? o / l : 0.f);
    } else {
      po[(hh * nparts + blockIdx.x) * D + d] = o;
      if (d == 0) {
        pm[hh * nparts + blockIdx.x] = m_s[g];
        pl[hh * nparts + blockIdx.x] = l_s[g];
      }
    }
  }
  if (CL) {
    ClusterCombine<D>(nparts, ng, h0, seq, out, ldo, q_s, m_s, l_s, mj_s, lj_s, den_s);
    return;
  }
  if (nparts > 1 && tickets != nullptr) {
    __syncthreads();  // red_s (= s_s) is read above; the combine reuses s_s
    CombineInBlock<D>(nparts, ng, h0, n_heads, seq, tickets, po, pm, pl, out, ldo, s_s, den_s,
                      &last_s);
  }
}

constexpr int kCombineThreads = 128;

__host__ __device__ constexpr int CombinePadded(int nparts) { return (nparts + 7) / 8 * 8; }

__device__ float BlockReduce(float v, bool is_max, float* scratch) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kCombineThreads / 32; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();
  return r;
}

// One block per (head, sequence): the partition weights exp(m_j - M) go to
// shared memory once (dynamic, nparts floats), then each thread sums its
// dims over the partitions with independent loads.
__global__ void __launch_bounds__(kCombineThreads)
    CombineKernel(int head_dim, int n_heads, int nparts, const float* __restrict__ po,
                  const float* __restrict__ pm, const float* __restrict__ pl,
                  uint16_t* __restrict__ out, int64_t ldo, int early) {
  extern __shared__ float w_s[];  // [CombinePadded(nparts)]
  __shared__ float scratch[kCombineThreads / 32];
  PdlEnter(early);
  const int h = blockIdx.x;
  const int64_t seq = blockIdx.y;
  const int64_t hh = seq * n_heads + h;
  const float* m = pm + hh * nparts;
  const float* l = pl + hh * nparts;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < nparts; j += kCombineThreads) {
    if (l[j] > 0.f) mx = fmaxf(mx, m[j]);
  }
  mx = BlockReduce(mx, true, scratch);
  // w_s is padded to a multiple of 8 with zeros: ptxas merges the unrolled
  // loop's remainder reads into 16-byte loads past nparts (compute-sanitizer
  // memcheck flagged them), which must stay inside the allocation.
  float den = 0.f;
  for (int j = threadIdx.x; j < CombinePadded(nparts); j += kCombineThreads) {
    const float lj = j < nparts ? l[j] : 0.f;
    const float w = lj > 0.f ? expf(m[j] - mx) : 0.f;
    w_s[j] = w;
    den += w * lj;
  }
  den = BlockReduce(den, false, scratch);  // its barrier also publishes w_s
  const float* o = po + hh * nparts * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kCombineThreads) {
    float num = 0.f;
#pragma unroll 8
    for (int j = 0; j < nparts; ++j) num += w_s[j] * o[int64_t{j} * head_dim + d];
    reinterpret_cast<__half*>(out + seq * ldo)[h * head_dim + d] =
        __float2half_rn(den > 0.f ? num / den : 0.f);
  }
}

absl::Status Validate(const PagedDecodeAttentionParams& p) {
  if (p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr || p.block_tables == nullptr ||
      p.context_lens == nullptr || p.out == nullptr || p.num_seqs < 0 || p.n_heads <= 0 ||
      p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      (p.head_dim != 64 && p.head_dim != 128) || p.block_size <= 0 || p.num_cache_blocks <= 0 ||
      p.max_blocks_per_seq <= 0 || p.max_context_len < 0 ||
      p.max_context_len > p.max_blocks_per_seq * p.block_size ||
      p.ldq < int64_t{p.n_heads} * p.head_dim || p.ldo < int64_t{p.n_heads} * p.head_dim ||
      !(p.scale > 0.f) || p.num_cache_blocks * p.block_size > 0x7fffffff ||
      (reinterpret_cast<uintptr_t>(p.k_cache) & 15) != 0 ||
      (reinterpret_cast<uintptr_t>(p.v_cache) & 15) != 0) {
    return absl::InvalidArgumentError("cuda::PagedDecodeAttention: invalid parameters");
  }
  if (p.num_seqs > 65535) {
    return absl::InvalidArgumentError("cuda::PagedDecodeAttention: more than 65535 sequences");
  }
  if (p.cluster_max < 2 || p.cluster_max > kMaxCluster) {
    return absl::InvalidArgumentError("cuda::PagedDecodeAttention: cluster_max outside 2..16");
  }
  if (p.prefetch_rows < 0 || p.prefetch_rows > 2) {
    return absl::InvalidArgumentError("cuda::PagedDecodeAttention: prefetch_rows outside 0..2");
  }
  return absl::OkStatus();
}

// v52: prefetch_rows resolved (PagedDecodeAttentionParams).
bool PrefetchesRows(const PagedDecodeAttentionParams& p) {
  if (p.prefetch_rows != 0) return p.prefetch_rows == 1;
  return int64_t{p.num_seqs} * p.n_kv_heads * p.head_dim * 4 <=
         PagedDecodeAttentionParams::kPrefetchRowBytes;
}

// v50: the largest cluster the split kernel (head_dim D) runs in on this
// device: 16 where the GPU schedules non-portable clusters of 16 of it, else
// 8 (portable), 0 if it takes none (then the combine kernel runs). Measured
// once per device and head_dim, under a lock (thread-safe).
template <int D>
int ClusterCapOf(int dev) {
  static std::mutex mu;
  static std::array<int, 64> cap = [] {
    std::array<int, 64> a;
    a.fill(-1);
    return a;
  }();
  if (dev < 0 || dev >= static_cast<int>(cap.size())) return 8;
  std::lock_guard<std::mutex> lock(mu);
  if (cap[dev] >= 0) return cap[dev];
  auto kernel = SplitKernel<D, true>;
  int c = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
      cudaSuccess) {
    (void)cudaGetLastError();
  }
  for (int want : {kMaxCluster, 8}) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(want), 1, 1);
    cfg.blockDim = dim3(kThreads);
    cudaLaunchAttribute attr[1];
    attr[0] = {};
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(want);
    attr[0].val.clusterDim.y = attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess && n > 0) {
      c = want;
      break;
    }
    (void)cudaGetLastError();
  }
  cap[dev] = c;
  return c;
}

// The split + combine kernels' scratch for plan pl: partial outputs, maxima
// and sums of every partition (0 with one partition).
size_t WorkspaceBytes(const PagedDecodeAttentionParams& p, const Plan& pl) {
  if (pl.parts <= 1) return 0;
  return static_cast<size_t>(p.num_seqs) * p.n_heads * pl.parts * (p.head_dim + 2) * sizeof(float);
}

int ClusterCap(int head_dim) {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return head_dim == 64 ? ClusterCapOf<64>(dev) : ClusterCapOf<128>(dev);
}

}  // namespace

size_t PagedDecodeAttentionWorkspaceBytes(const PagedDecodeAttentionParams& p) {
  return Validate(p).ok() ? WorkspaceBytes(p, MakePlan(p)) : 0;
}

int64_t PagedDecodeAttentionTickets(const PagedDecodeAttentionParams& p) {
  if (!Validate(p).ok()) return 0;
  return p.num_seqs * p.n_kv_heads * MakePlan(p).gchunks;
}

absl::Status PagedDecodeAttention(const PagedDecodeAttentionParams& p, cudaStream_t stream) {
  if (absl::Status s = Validate(p); !s.ok()) return s;
  if (p.num_seqs == 0) return absl::OkStatus();
  const Plan pl = MakePlan(p);
  if (pl.gchunks * int64_t{p.n_kv_heads} > 65535) {
    return absl::InvalidArgumentError("cuda::PagedDecodeAttention: too many heads");
  }
  const int early = p.early_trigger ? 1 : 0;  // v30
  const int prefetch = PrefetchesRows(p) ? 1 : 0;  // v52
  if (Plan cp; MakeClusterPlan(p, pl, &cp)) {
    const dim3 grid(static_cast<unsigned>(cp.parts),
                    static_cast<unsigned>(cp.gchunks * p.n_kv_heads),
                    static_cast<unsigned>(p.num_seqs));
    float* none = nullptr;
    int32_t* no_tickets = nullptr;
    SPEAR_CUDA_RETURN_IF_ERROR(
        LaunchCluster(p.head_dim == 64 ? SplitKernel<64, true> : SplitKernel<128, true>, grid,
                      dim3(kThreads), 0, stream, static_cast<unsigned>(cp.parts), 1u,
                      ProgrammaticLaunchEnabled(), p.q, p.ldq, p.n_heads, p.n_kv_heads,
                      p.k_cache, p.v_cache, p.block_size, p.num_cache_blocks, p.block_tables,
                      p.max_blocks_per_seq, p.context_lens, p.max_context_len, p.scale, cp.part,
                      cp.gchunks, p.out, p.ldo, none, none, none, no_tickets, early, prefetch));
    return absl::OkStatus();
  }
  const size_t need = WorkspaceBytes(p, pl);
  if (need > 0 && (p.workspace == nullptr || p.workspace_bytes < need)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda::PagedDecodeAttention: workspace of ", need, " bytes needed"));
  }
  if (pl.parts > 12288) {  // the combine kernel's weights must fit in shared memory
    return absl::InvalidArgumentError("cuda::PagedDecodeAttention: context too long");
  }
  float* po = static_cast<float*>(p.workspace);
  const size_t nh = static_cast<size_t>(p.num_seqs) * p.n_heads * pl.parts;
  float* pm = po ? po + nh * p.head_dim : nullptr;
  float* plsum = pm ? pm + nh : nullptr;
  const dim3 grid(static_cast<unsigned>(pl.parts), static_cast<unsigned>(pl.gchunks * p.n_kv_heads),
                  static_cast<unsigned>(p.num_seqs));
  // The combine in the split launch when the caller gave tickets and the
  // partition weights of a head group fit the block's score buffer.
  int32_t* tickets = pl.parts > 1 && pl.parts <= kMaxPart ? p.tickets : nullptr;
  SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(
      p.head_dim == 64 ? SplitKernel<64, false> : SplitKernel<128, false>, grid, dim3(kThreads),
      0, stream, p.q, p.ldq, p.n_heads, p.n_kv_heads, p.k_cache, p.v_cache, p.block_size,
      p.num_cache_blocks, p.block_tables, p.max_blocks_per_seq, p.context_lens,
      p.max_context_len, p.scale, pl.part, pl.gchunks, p.out, p.ldo, po, pm, plsum, tickets,
      early, prefetch));
  if (pl.parts > 1 && tickets == nullptr) {
    SPEAR_CUDA_RETURN_IF_ERROR(LaunchPdl(
        CombineKernel, dim3(static_cast<unsigned>(p.n_heads), static_cast<unsigned>(p.num_seqs)),
        dim3(kCombineThreads), CombinePadded(pl.parts) * sizeof(float), stream, p.head_dim,
        p.n_heads, pl.parts, po, pm, plsum, p.out, p.ldo, early));
  }
  return absl::OkStatus();
}

bool PagedDecodeAttentionCombinesInCluster(const PagedDecodeAttentionParams& p) {
  Plan cp;
  return Validate(p).ok() && p.num_seqs > 0 && MakeClusterPlan(p, MakePlan(p), &cp);
}

bool PagedDecodeAttentionPrefetchesRows(const PagedDecodeAttentionParams& p) {
  return Validate(p).ok() && PrefetchesRows(p);
}

}  // namespace spear::kernels::cuda
