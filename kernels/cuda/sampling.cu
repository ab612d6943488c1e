// Sampling on the device (issue 5, build item 2): one thread block per
// logits row does what the host Sampler (worker/engine/sampler.h) does for
// that row with a given uniform draw u: the repetition penalty over the
// row's history, then greedy, or top-k / top-p / temperature and the pick.
//
// No sort. The host orders candidates "higher logit first, equal logits
// lower id first"; here that order is a 32-bit order-preserving key of the
// logit plus the id, and every selection (the k-th candidate, the end of
// the nucleus, the token under u) is "the first element, in that order,
// where a running sum crosses a threshold": a binary search over the key
// (32 block sums, integer: no atomics) and, among equal keys, a scan in
// id order. Masses are exp((l - max) / T) in fp32 scaled to 2^-40
// fixed point and summed as 64-bit integers: every sum is exact and
// independent of the order threads add in, so the kernel is deterministic;
// it differs from the host (double sums) only when u lands within ~1e-7
// (fp32 exp) of a boundary between two tokens. Elements whose mass is 0 in
// that fixed point (p < 2^-40 of the best token's) can never be picked and
// are dropped first (a compaction in id order), so the selections run over
// the tokens that matter, not the whole vocabulary.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr float kFix = 1099511627776.f;  // 2^40
using u64 = unsigned long long;

__device__ __forceinline__ uint32_t Key(float v) {
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) != 0 ? ~b : (b | 0x80000000u);
}

struct Shared {
  u64 warp[kWarps];
  float wv[kWarps];
  int wi[kWarps];
  u64 res_cum;
  int res_id;
  float fmax;
  int imax;
};

// Exclusive prefix sum of v over the block (thread order); *total = the sum.
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
  *total = s.warp[kWarps - 1];
  __syncthreads();
  return before + inc - v;
}

// Warp w of the block owns the items [lo, hi) of a row of n (consecutive
// ranges in warp order, multiples of 32 long): scans in id order read them
// 32 consecutive items at a time (coalesced; one contiguous range per
// thread was an uncoalesced load per item, ~50 us a pass at 49152 items).
__device__ __forceinline__ void WarpRange(int n, int* lo, int* hi) {
  const int per = (n + kWarps * 32 - 1) / (kWarps * 32) * 32;
  const int warp = threadIdx.x >> 5;
  *lo = min(n, warp * per);
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
// Returns its index (-1 if none) and the running sum there.
template <class Pred, class W>
__device__ int ScanCross(int n, Pred pred, W w, u64 thresh, bool strict, Shared& s, u64* cum) {
  const int lane = threadIdx.x & 31;
  int lo, hi;
  WarpRange(n, &lo, &hi);
  if (threadIdx.x == 0) s.res_id = -1;
  u64 part = 0;
  for (int base = lo; base < hi; base += 32) {
    const int j = base + lane;
    if (j < hi && pred(j)) part += w(j);
  }
  const u64 wsum = WarpSum(part);
  // the warps' sums, scanned (lane 0 of each warp contributes, in warp order)
  u64 total;
  const u64 ex = ExclusiveScan(lane == 0 ? wsum : 0, s, &total);
  const u64 wex = __shfl_sync(0xffffffffu, ex, 0);
  const bool mine = strict ? (wex <= thresh && thresh < wex + wsum)
                           : (wex < thresh && thresh <= wex + wsum);
  if (mine) {  // warp-uniform
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
  __syncthreads();
  const int id = s.res_id;
  *cum = s.res_cum;
  __syncthreads();
  return id;
}

// In the order (key descending, index ascending) over the items with pred:
// the first item where the running sum of w crosses thresh (as ScanCross).
// Its key T is the largest with S(key >= T) crossing thresh (S is
// non-increasing in T): a binary search over the 32-bit keys, one block
// sum per step (integer sums: no atomics, deterministic); then ScanCross
// among the items of key T with what the larger keys left of thresh.
// Returns the item (-1 if none); *cum = the running sum including it.
template <class Pred, class K, class W>
__device__ int OrderCross(int n, Pred pred, K key, W w, u64 thresh, bool strict, Shared& s, u64* cum) {
  const int tid = threadIdx.x;
  auto crosses = [&](u64 v) { return strict ? v > thresh : v >= thresh; };
  uint32_t lo = 0;             // S(key >= lo) crosses (the callers' thresh < total)
  uint64_t hi = 1ull << 32;    // S(key >= hi) does not
  u64 s_hi = 0;                // S(key >= hi)
  while (hi - lo > 1) {
    const uint32_t mid = static_cast<uint32_t>(lo + (hi - lo) / 2);
    u64 part = 0;
    constexpr int kU = 4;
    for (int base = tid; base < n; base += kThreads * kU) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int j = base + u * kThreads;
        if (j < n && key(j) >= mid && pred(j)) part += w(j);
      }
    }
    u64 sum;
    (void)ExclusiveScan(part, s, &sum);
    if (crosses(sum)) {
      lo = mid;
    } else {
      hi = mid;
      s_hi = sum;
    }
  }
  const u64 above = s_hi;  // S(key > lo)
  const uint32_t T = lo;
  u64 c = 0;
  const int j = ScanCross(n, [&](int i) { return key(i) == T && pred(i); }, w, thresh - above,
                          strict, s, &c);
  *cum = above + c;
  return j;
}

__global__ void __launch_bounds__(kThreads) SampleKernel(SampleRowsArgs a) {
  __shared__ Shared s;
  const int b = blockIdx.x, tid = threadIdx.x;
  float* l = a.logits + static_cast<int64_t>(b) * a.ld;
  const SampleRowParams P = a.params[b];
  const int n = static_cast<int>(a.n);

  // 1. Repetition penalty, each distinct history token once: read every
  // history token's logit first, then write, so duplicates write the same.
  if (P.repetition_penalty != 1.f && P.hist_len > 0) {
    const int32_t* h = a.hist + P.hist_begin;
    float* hv = a.hist_vals + P.hist_begin;
    for (int64_t i = tid; i < P.hist_len; i += kThreads) {
      const int32_t t = h[i];
      hv[i] = t >= 0 && t < n ? l[t] : 0.f;
    }
    __syncthreads();
    for (int64_t i = tid; i < P.hist_len; i += kThreads) {
      const int32_t t = h[i];
      if (t < 0 || t >= n) continue;
      const float o = hv[i];
      l[t] = o > 0.f ? o / P.repetition_penalty : o * P.repetition_penalty;
    }
    __syncthreads();
  }

  // 2. The best token (ties: the lower id). Greedy stops here.
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int i = tid; i < n; i += kThreads) {
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
    s.fmax = v;
    s.imax = i0 == INT_MAX ? 0 : i0;  // all NaN: token 0, as the host
  }
  __syncthreads();
  const float mx = s.fmax;
  const int best = s.imax;
  if (P.temperature == 0.f || !isfinite(mx)) {
    if (tid == 0) a.out[b] = best;
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
  {
    const int lane = tid & 31;
    int lo, hi;
    WarpRange(n, &lo, &hi);
    u64 cnt = 0;
    for (int base = lo; base < hi; base += 32) {
      const int i = base + lane;
      cnt += i < hi && mass(l[i]) != 0;
    }
    cnt = WarpSum(cnt);
    u64 total;
    const u64 ex = ExclusiveScan(lane == 0 ? cnt : 0, s, &total);
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
    if (tid == 0) s.res_id = static_cast<int>(total);
    __syncthreads();
  }
  const int c = s.res_id;
  __syncthreads();
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
    kpos = OrderCross(c, all, key, one, static_cast<u64>(P.top_k), false, s, &unused);
    kkey = key(kpos);
  }
  auto cand = [&](int j) {
    if (!topk) return true;
    const uint32_t k = key(j);
    return k > kkey || (k == kkey && j <= kpos);
  };
  u64 total = 0;
  {
    u64 part = 0;
    for (int j = tid; j < c; j += kThreads) {
      if (cand(j)) part += w(j);
    }
    (void)ExclusiveScan(part, s, &total);
  }

  int pick = -1;
  if (P.top_p < 1.f) {
    // The nucleus: the shortest best-first prefix with mass >= top_p x total;
    // then u x its mass, walked best-first.
    const u64 target = static_cast<u64>(ceil(static_cast<double>(P.top_p) * static_cast<double>(total)));
    u64 nsum = 0;
    const int end = OrderCross(c, cand, key, w, target, false, s, &nsum);
    if (end < 0) nsum = total;  // rounding: keep every candidate
    const u64 r = static_cast<u64>(P.uniform * static_cast<double>(nsum));
    u64 unused;
    pick = OrderCross(c, cand, key, w, r, true, s, &unused);
  } else {
    // All candidates, walked in id order.
    const u64 r = static_cast<u64>(P.uniform * static_cast<double>(total));
    u64 unused;
    pick = ScanCross(c, cand, w, r, true, s, &unused);
  }
  if (tid == 0) a.out[b] = pick >= 0 ? C[pick] : best;
}

}  // namespace

absl::Status SampleRows(const SampleRowsArgs& a, cudaStream_t stream) {
  if (a.logits == nullptr || a.params == nullptr || a.out == nullptr || a.cand == nullptr ||
      a.m < 0 || a.n <= 0 || a.ld < a.n || a.n > INT_MAX / 2) {
    return absl::InvalidArgumentError("cuda::SampleRows: invalid parameters");
  }
  if (a.m == 0) return absl::OkStatus();
  if (a.m > 0x7fffffff) return absl::InvalidArgumentError("cuda::SampleRows: too many rows");
  SampleKernel<<<static_cast<unsigned>(a.m), kThreads, 0, stream>>>(a);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
