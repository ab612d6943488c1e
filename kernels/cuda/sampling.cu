// Sampling on the device (issue 5, build item 2): one thread-block cluster
// per logits row does what the host Sampler (worker/engine/sampler.h) does for
// that row with a given uniform draw u: the repetition penalty over the
// row's history, then greedy, or top-k / top-p / temperature and the pick.
//
// No sort. The host orders candidates "higher logit first, equal logits
// lower id first"; here that order is a 32-bit order-preserving key of the
// logit plus the id, and every selection (the k-th candidate, the end of
// the nucleus, the token under u) is "the first element, in that order,
// where a running sum crosses a threshold": a 16-ary search over the key
// (8 passes of 16 bucket sums, integer: no atomics) and, among equal keys, a scan in
// id order. Masses are exp((l - max) / T) in fp32 scaled to 2^-40
// fixed point and summed as 64-bit integers: every sum is exact and
// independent of the order threads add in, so the kernel is deterministic;
// it differs from the host (double sums) only when u lands within ~1e-7
// (fp32 exp) of a boundary between two tokens. Elements whose mass is 0 in
// that fixed point (p < 2^-40 of the best token's) can never be picked and
// are dropped first (a compaction in id order), so the selections run over
// the tokens that matter, not the whole vocabulary.
//
// A row is one thread-block cluster of CL blocks (CL = 8 while rows x 8
// fit the SMs, fewer for larger batches): every pass splits the row over
// the cluster's CL x 1024 threads and combines the blocks' partial sums
// through distributed shared memory, in rank order (deterministic).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr float kFix = 1099511627776.f;  // 2^40
using u64 = unsigned long long;

// Order-preserving key of a logit. -0 and +0 get the same key: they are
// equal logits, so (as on the host, whose comparisons see them equal) they
// form one tie group walked in id order. Separate keys put every +0 before
// every -0, and the pick inside a large tie group differed from the host's
// (CudaSampling.MatchesHostSampler, seed 1395440349: coarse logits).
__device__ __forceinline__ uint32_t Key(float v) {
  const uint32_t b = v == 0.f ? 0u : __float_as_uint(v);
  return (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
}

struct Shared {
  u64 warp[kWarps];
  float wv[kWarps];
  int wi[kWarps];
  u64 res_cum;
  int res_id;
  // OrderCross's 16 bucket sums: per warp, then the block's, then the cluster's
  u64 hist[kWarps][16];
  u64 res16[16];
  // read by the other blocks of the cluster (distributed shared memory)
  u64 slot16[16];
  u64 slot;
  float slot_v;
  int slot_i;
};

// Where this thread sits in its row's cluster.
template <int CL>
struct Row {
  int rank;  // block rank in the cluster
  int g;     // thread index over the cluster
  int gw;    // warp index over the cluster
  static constexpr int kT = CL * kThreads;
  static constexpr int kW = CL * kWarps;
};

template <int CL>
__device__ __forceinline__ void ClusterSync() {
  if constexpr (CL > 1) {
    cg::this_cluster().sync();
  } else {
    __syncthreads();
  }
}

// Exclusive prefix sum of v over the cluster's threads (rank, then thread
// order); *total = the sum, the same in every block.
template <int CL>
__device__ u64 ExclusiveScan(u64 v, Shared& s, u64* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  u64 inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  if (lane == 31) s.warp[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    u64 w = s.warp[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 t = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += t;
    }
    s.warp[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const u64 before = warp > 0 ? s.warp[warp - 1] : 0;
  const u64 btotal = s.warp[kWarps - 1];
  if constexpr (CL == 1) {
    *total = btotal;
    __syncthreads();
    return before + inc - v;
  } else {
    cg::cluster_group cl = cg::this_cluster();
    if (threadIdx.x == 0) s.slot = btotal;
    cl.sync();
    const unsigned r = cl.block_rank();
    u64 lower = 0, all = 0;
#pragma unroll
    for (unsigned q = 0; q < CL; ++q) {
      const u64 t = *cl.map_shared_rank(&s.slot, q);
      lower += q < r ? t : 0;
      all += t;
    }
    cl.sync();
    *total = all;
    return lower + before + inc - v;
  }
}

// Warp gw of the cluster owns the items [lo, hi) of a row of n
// (consecutive ranges in warp order, multiples of 32 long): scans in id
// order read them 32 consecutive items at a time (coalesced; one
// contiguous range per thread was an uncoalesced load per item, ~50 us a
// pass at 49152 items).
template <int CL>
__device__ __forceinline__ void WarpRange(const Row<CL>& R, int n, int* lo, int* hi) {
  const int per = (n + Row<CL>::kW * 32 - 1) / (Row<CL>::kW * 32) * 32;
  *lo = min(n, R.gw * per);
  *hi = min(n, *lo + per);
}

__device__ __forceinline__ u64 WarpSum(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ u64 WarpInclusive(u64 v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// Over items [0, n) in index order: the first item with pred whose running
// sum of w crosses thresh (strict: sum > thresh, else sum >= thresh).
// Returns its index (-1 if none) and the running sum there; the same in
// every block.
template <int CL, class Pred, class W>
__device__ int ScanCross(const Row<CL>& R, int n, Pred pred, W w, u64 thresh, bool strict,
                         Shared& s, u64* cum) {
  const int lane = threadIdx.x & 31;
  int lo, hi;
  WarpRange(R, n, &lo, &hi);
  if (threadIdx.x == 0) s.res_id = -1;
  u64 part = 0;
  for (int base = lo; base < hi; base += 32) {
    const int j = base + lane;
    if (j < hi && pred(j)) part += w(j);
  }
  const u64 wsum = WarpSum(part);
  u64 total;
  const u64 ex = ExclusiveScan<CL>(lane == 0 ? wsum : 0, s, &total);
  const u64 wex = __shfl_sync(0xffffffffu, ex, 0);
  const bool mine = strict ? (wex <= thresh && thresh < wex + wsum)
                           : (wex < thresh && thresh <= wex + wsum);
  if (mine) {  // warp-uniform; one warp of the cluster at most
    u64 c = wex;
    for (int base = lo; base < hi; base += 32) {
      const int j = base + lane;
      const u64 v = j < hi && pred(j) ? w(j) : 0;
      const u64 inc = c + WarpInclusive(v, lane);
      const bool hit = v != 0 && (strict ? inc > thresh : inc >= thresh);
      const unsigned ball = __ballot_sync(0xffffffffu, hit);
      if (ball != 0) {
        if (lane == __ffs(ball) - 1) {
          s.res_id = j;
          s.res_cum = inc;
        }
        break;
      }
      c = __shfl_sync(0xffffffffu, inc, 31);
    }
  }
  if constexpr (CL == 1) {
    __syncthreads();
    const int id = s.res_id;
    *cum = s.res_cum;
    __syncthreads();
    return id;
  } else {
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    int id = -1;
    u64 cm = 0;
#pragma unroll
    for (unsigned q = 0; q < CL; ++q) {
      const int r = *cl.map_shared_rank(&s.res_id, q);
      if (r >= 0) {
        id = r;
        cm = *cl.map_shared_rank(&s.res_cum, q);
      }
    }
    cl.sync();
    *cum = cm;
    return id;
  }
}

// v[i] summed over the cluster's threads (integer: the same in every block,
// independent of the order of the adds); v is overwritten with the sums.
template <int CL>
__device__ void ClusterSum16(u64 (&v)[16], Shared& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = WarpSum(v[i]);
  if (lane < 16) {
    u64 mine = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) mine = lane == i ? v[i] : mine;
    s.hist[warp][lane] = mine;
  }
  __syncthreads();
  if (threadIdx.x < 16) {
    u64 t = 0;
    for (int w = 0; w < kWarps; ++w) t += s.hist[w][threadIdx.x];
    s.slot16[threadIdx.x] = t;
  }
  if constexpr (CL == 1) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = s.slot16[i];
    __syncthreads();
  } else {
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    if (threadIdx.x < 16) {
      u64 t = 0;
#pragma unroll
      for (unsigned q = 0; q < CL; ++q) t += *cl.map_shared_rank(&s.slot16[threadIdx.x], q);
      s.res16[threadIdx.x] = t;
    }
    cl.sync();  // every block has read the others' slot16 (reused next pass)
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = s.res16[i];
  }
}

// In the order (key descending, index ascending) over the items with pred:
// the first item where the running sum of w crosses thresh (as ScanCross).
// Its key T is the largest with S(key >= T) crossing thresh (S is
// non-increasing in T): a 16-ary search over the 32-bit keys, 4 bits per
// pass (8 passes): each pass sums w into 16 buckets of the current key
// range (integer cluster sums: no atomics, deterministic) and keeps the
// highest bucket whose suffix still crosses (a binary search, one cluster
// sum per bit, took 32 passes: ~0.1 ms per selection at a 128k vocabulary,
// docs/results/gpu.md); then ScanCross among the items of key T with what
// the larger keys left of thresh. Returns the item (-1 if none); *cum = the
// running sum including it.
template <int CL, class Pred, class K, class W>
__device__ int OrderCross(const Row<CL>& R, int n, Pred pred, K key, W w, u64 thresh, bool strict,
                          Shared& s, u64* cum) {
  auto crosses = [&](u64 v) { return strict ? v > thresh : v >= thresh; };
  uint32_t lo = 0;  // S(key >= lo) crosses (the callers' thresh < total)
  u64 s_hi = 0;     // S(key >= lo + 16 << shift), the range's upper end
#pragma unroll 1
  for (int shift = 28; shift >= 0; shift -= 4) {
    u64 b[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) b[i] = 0;
    constexpr int kU = 4;
    for (int base = R.g; base < n; base += Row<CL>::kT * kU) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int j = base + u * Row<CL>::kT;
        if (j < n) {
          const uint32_t k = key(j);
          const uint64_t d = k >= lo ? (static_cast<uint64_t>(k - lo) >> shift) : 16;
          if (d < 16 && pred(j)) {
            const u64 wj = w(j);
#pragma unroll
            for (int i = 0; i < 16; ++i) b[i] += d == static_cast<uint64_t>(i) ? wj : 0;
          }
        }
      }
    }
    ClusterSum16<CL>(b, s);
    // S_i = S(key >= lo + i << shift) = s_hi + b[i] + ... + b[15]; the
    // largest i whose S_i crosses (S_0 does).
    u64 suffix = s_hi;
    int pick = 0;
    u64 next_hi = s_hi;
#pragma unroll
    for (int i = 15; i >= 0; --i) {
      const u64 si = suffix + b[i];
      if (pick == 0 && i > 0 && crosses(si)) {
        pick = i;
        next_hi = suffix;
      }
      if (pick == 0 && i == 0) next_hi = suffix;
      suffix = si;
    }
    lo += static_cast<uint32_t>(pick) << shift;
    s_hi = next_hi;
  }
  const u64 above = s_hi;  // S(key > lo)
  const uint32_t T = lo;
  u64 c = 0;
  const int j = ScanCross(R, n, [&](int i) { return key(i) == T && pred(i); }, w, thresh - above,
                          strict, s, &c);
  *cum = above + c;
  return j;
}

template <int CL>
__global__ void __launch_bounds__(kThreads) SampleKernel(SampleRowsArgs a) {
  __shared__ Shared s;
  const int tid = threadIdx.x;
  Row<CL> R;
  if constexpr (CL > 1) {
    R.rank = static_cast<int>(cg::this_cluster().block_rank());
  } else {
    R.rank = 0;
  }
  R.g = R.rank * kThreads + tid;
  R.gw = R.g >> 5;
  const int b = blockIdx.x / CL;
  float* l = a.logits + static_cast<int64_t>(b) * a.ld;
  const SampleRowParams P = a.params[b];
  const int n = static_cast<int>(a.n);
  constexpr int kT = Row<CL>::kT;

  // 1. Repetition penalty, each distinct history token once: read every
  // history token's logit first, then write, so duplicates write the same.
  if (P.repetition_penalty != 1.f && P.hist_len > 0) {
    const int32_t* h = a.hist + P.hist_begin;
    float* hv = a.hist_vals + P.hist_begin;
    for (int64_t i = R.g; i < P.hist_len; i += kT) {
      const int32_t t = h[i];
      hv[i] = t >= 0 && t < n ? l[t] : 0.f;
    }
    ClusterSync<CL>();
    for (int64_t i = R.g; i < P.hist_len; i += kT) {
      const int32_t t = h[i];
      if (t < 0 || t >= n) continue;
      const float o = hv[i];
      l[t] = o > 0.f ? o / P.repetition_penalty : o * P.repetition_penalty;
    }
    ClusterSync<CL>();
  }

  // 2. The best token (ties: the lower id). Greedy stops here.
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int i = R.g; i < n; i += kT) {
    const float v = l[i];
    if (v > bv || (v == bv && i < bi)) {
      bv = v;
      bi = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if ((tid & 31) == 0) {
    s.wv[tid >> 5] = bv;
    s.wi[tid >> 5] = bi;
  }
  __syncthreads();
  if (tid == 0) {
    float v = s.wv[0];
    int i0 = s.wi[0];
    for (int w = 1; w < kWarps; ++w) {
      if (s.wv[w] > v || (s.wv[w] == v && s.wi[w] < i0)) {
        v = s.wv[w];
        i0 = s.wi[w];
      }
    }
    s.slot_v = v;
    s.slot_i = i0;
  }
  float mx;
  int best;
  if constexpr (CL == 1) {
    __syncthreads();
    mx = s.slot_v;
    best = s.slot_i;
  } else {
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();
    mx = -INFINITY;
    best = INT_MAX;
#pragma unroll
    for (unsigned q = 0; q < CL; ++q) {
      const float v = *cl.map_shared_rank(&s.slot_v, q);
      const int i0 = *cl.map_shared_rank(&s.slot_i, q);
      if (v > mx || (v == mx && i0 < best)) {
        mx = v;
        best = i0;
      }
    }
    cl.sync();
  }
  if (best == INT_MAX) best = 0;  // all NaN: token 0, as the host
  if (P.temperature == 0.f || !isfinite(mx)) {
    if (R.g == 0) a.out[b] = best;
    return;
  }

  // 3. Compaction, in id order, of the tokens with a non-zero fixed-point
  // mass (the best one always: exp(0) = 1).
  const float inv_t = 1.f / P.temperature;
  auto mass = [&](float v) -> u64 { return __float2ull_rn(expf((v - mx) * inv_t) * kFix); };
  // The row's scratch: ids, keys and masses of the kept tokens (16 bytes a
  // token), so the selections below stream them instead of gathering the
  // logits and recomputing exp in every pass.
  int32_t* C = a.cand + static_cast<int64_t>(b) * a.n * 4;
  u64* CW = reinterpret_cast<u64*>(C + 2 * static_cast<int64_t>(a.n));
  uint32_t* CK = reinterpret_cast<uint32_t*>(C + a.n);
  int c = 0;
  {
    const int lane = tid & 31;
    int lo, hi;
    WarpRange(R, n, &lo, &hi);
    u64 cnt = 0;
    for (int base = lo; base < hi; base += 32) {
      const int i = base + lane;
      cnt += i < hi && mass(l[i]) != 0;
    }
    cnt = WarpSum(cnt);
    u64 total;
    const u64 ex = ExclusiveScan<CL>(lane == 0 ? cnt : 0, s, &total);
    u64 at = __shfl_sync(0xffffffffu, ex, 0);
    for (int base = lo; base < hi; base += 32) {
      const int i = base + lane;
      const float v = i < hi ? l[i] : 0.f;
      const u64 m = i < hi ? mass(v) : 0;
      const unsigned keep = __ballot_sync(0xffffffffu, m != 0);
      if (m != 0) {
        const u64 p = at + __popc(keep & ((1u << lane) - 1u));
        C[p] = i;
        CK[p] = Key(v);
        CW[p] = m;
      }
      at += __popc(keep);
    }
    c = static_cast<int>(total);
    ClusterSync<CL>();  // the lists, written by every block, read by all
  }
  auto key = [&](int j) { return CK[j]; };
  auto w = [&](int j) { return CW[j]; };
  auto one = [](int) -> u64 { return 1; };
  auto all = [](int) { return true; };

  // 4. top-k: the k-th item in (key desc, id asc) order and everything
  // before it. Items beyond the compacted ones have zero mass and come
  // after them in that order, so k >= c keeps all.
  bool topk = P.top_k > 0 && P.top_k < c;
  uint32_t kkey = 0;
  int kpos = c;
  if (topk) {
    u64 unused;
    kpos = OrderCross(R, c, all, key, one, static_cast<u64>(P.top_k), false, s, &unused);
    if (kpos < 0) {
      topk = false;  // not reached: k < c
    } else {
      kkey = key(kpos);
    }
  }
  auto cand = [&](int j) {
    if (!topk) return true;
    const uint32_t k = key(j);
    return k > kkey || (k == kkey && j <= kpos);
  };
  u64 total = 0;
  {
    u64 part = 0;
    for (int j = R.g; j < c; j += kT) {
      if (cand(j)) part += w(j);
    }
    (void)ExclusiveScan<CL>(part, s, &total);
  }

  int pick = -1;
  if (P.top_p < 1.f) {
    // The nucleus: the shortest best-first prefix with mass >= top_p x total;
    // then u x its mass, walked best-first.
    const u64 target = static_cast<u64>(ceil(static_cast<double>(P.top_p) * static_cast<double>(total)));
    u64 nsum = 0;
    const int end = OrderCross(R, c, cand, key, w, target, false, s, &nsum);
    if (end < 0) nsum = total;  // rounding: keep every candidate
    const u64 r = static_cast<u64>(P.uniform * static_cast<double>(nsum));
    u64 unused;
    pick = OrderCross(R, c, cand, key, w, r, true, s, &unused);
  } else {
    // All candidates, walked in id order.
    const u64 r = static_cast<u64>(P.uniform * static_cast<double>(total));
    u64 unused;
    pick = ScanCross(R, c, cand, w, r, true, s, &unused);
  }
  if (R.g == 0) a.out[b] = pick >= 0 ? C[pick] : best;
}

template <int CL>
cudaError_t Launch(const SampleRowsArgs& a, cudaStream_t stream) {
  return LaunchCluster(SampleKernel<CL>, dim3(static_cast<unsigned>(a.m * CL)), dim3(kThreads), 0,
                       stream, CL, 1, /*pdl=*/false, a);
}

}  // namespace

absl::Status SampleRows(const SampleRowsArgs& a, cudaStream_t stream) {
  if (a.logits == nullptr || a.params == nullptr || a.out == nullptr || a.cand == nullptr ||
      a.m < 0 || a.n <= 0 || a.ld < a.n || a.n > INT_MAX / 2) {
    return absl::InvalidArgumentError("cuda::SampleRows: invalid parameters");
  }
  if (a.m == 0) return absl::OkStatus();
  if (a.m > 0x7fffffff / 8) return absl::InvalidArgumentError("cuda::SampleRows: too many rows");
  // Blocks per row: 8 while the rows x 8 blocks fit the SMs in one wave,
  // halved until they do (1 from rows >= SMs).
  static const int num_sms = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      return 1;
    }
    return v;
  }();
  int cl = 8;
  while (cl > 1 && a.m * cl > num_sms) cl /= 2;
  if (a.cluster > 0) cl = a.cluster;
  cudaError_t e;
  switch (cl) {
    case 1: e = Launch<1>(a, stream); break;
    case 2: e = Launch<2>(a, stream); break;
    case 4: e = Launch<4>(a, stream); break;
    case 8: e = Launch<8>(a, stream); break;
    default:
      return absl::InvalidArgumentError("cuda::SampleRows: cluster must be 0, 1, 2, 4 or 8");
  }
  SPEAR_CUDA_RETURN_IF_ERROR(e);
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
