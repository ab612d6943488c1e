// Sampling on the device (issue 5, build item 2): one thread block per
// logits row does what the host Sampler (worker/engine/sampler.h) does for
// that row with a given uniform draw u: the repetition penalty over the
// row's history, then greedy, or top-k / top-p / temperature and the pick.
//
// No sort. The host orders candidates "higher logit first, equal logits
// lower id first"; here that order is a 32-bit order-preserving key of the
// logit plus the id, and every selection (the k-th candidate, the end of
// the nucleus, the token under u) is "the first element, in that order,
// where a running sum crosses a threshold": a radix select over the key (4
// passes of 8 bits, histograms in shared memory) and, among equal keys, a
// scan in id order. Masses are exp((l - max) / T) in fp32 scaled to 2^-40
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
  u64 hist[256];
  u64 warp[kWarps];
  float wv[kWarps];
  int wi[kWarps];
  u64 res_cum, b_above;
  int res_id, b_digit;
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

// Over items [0, n) in index order (thread t owns a contiguous segment):
// the first item with pred whose running sum of w crosses thresh (strict:
// sum > thresh, else sum >= thresh). Returns its index (-1 if none) and
// the running sum there.
template <class Pred, class W>
__device__ int ScanCross(int n, Pred pred, W w, u64 thresh, bool strict, Shared& s, u64* cum) {
  const int seg = (n + kThreads - 1) / kThreads;
  const int lo = min(n, static_cast<int>(threadIdx.x) * seg), hi = min(n, lo + seg);
  if (threadIdx.x == 0) s.res_id = -1;
  u64 sum = 0;
  for (int j = lo; j < hi; ++j) {
    if (pred(j)) sum += w(j);
  }
  u64 total;
  const u64 ex = ExclusiveScan(sum, s, &total);
  const bool mine = strict ? (ex <= thresh && thresh < ex + sum) : (ex < thresh && thresh <= ex + sum);
  if (mine) {
    u64 c = ex;
    for (int j = lo; j < hi; ++j) {
      if (!pred(j)) continue;
      c += w(j);
      if (strict ? c > thresh : c >= thresh) {
        s.res_id = j;
        s.res_cum = c;
        break;
      }
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
// Radix select of its key, then ScanCross among the items of that key.
// Returns the item (-1 if none); *cum = the running sum including it.
template <class Pred, class K, class W>
__device__ int OrderCross(int n, Pred pred, K key, W w, u64 thresh, bool strict, Shared& s, u64* cum) {
  uint32_t prefix = 0, mask = 0;
  u64 above = 0;
  const int tid = threadIdx.x;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) s.hist[i] = 0;
    __syncthreads();
    // Warp-aggregated: the lanes of one digit add their sum once (the top
    // digits of a row's keys take few values: per-lane atomics on them
    // serialised the whole block, 1.4 ms for a 49152-token row).
    const int lane_id = tid & 31;
    for (int base = tid - lane_id; base < n; base += kThreads) {
      const int j = base + lane_id;
      uint32_t digit = 256;
      u64 wj = 0;
      if (j < n && pred(j)) {
        const uint32_t k = key(j);
        if ((k & mask) == prefix) {
          digit = (k >> shift) & 255u;
          wj = w(j);
        }
      }
      const unsigned grp = __match_any_sync(0xffffffffu, digit);
      // w <= 2^40: 20-bit halves sum over <= 32 lanes without overflow
      const unsigned hi = __reduce_add_sync(grp, static_cast<unsigned>(wj >> 20));
      const unsigned lo = __reduce_add_sync(grp, static_cast<unsigned>(wj & 0xfffffu));
      if (digit < 256 && lane_id == __ffs(grp) - 1) {
        atomicAdd(&s.hist[digit], (static_cast<u64>(hi) << 20) + lo);
      }
    }
    __syncthreads();
    if (tid < 32) {
      // lane l sums digits 255 - 8 l ... 248 - 8 l (descending keys first)
      const int lane = tid;
      u64 ls = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) ls += s.hist[255 - 8 * lane - i];
      u64 inc = ls;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += t;
      }
      const bool hit = strict ? above + inc > thresh : above + inc >= thresh;
      const unsigned ball = __ballot_sync(0xffffffffu, hit);
      const int first = ball != 0 ? __ffs(ball) - 1 : 31;
      if (lane == first) {
        u64 acc = above + inc - ls;
        for (int i = 0; i < 8; ++i) {
          const int d = 255 - 8 * lane - i;
          const u64 nxt = acc + s.hist[d];
          if ((strict ? nxt > thresh : nxt >= thresh) || i == 7) {
            s.b_digit = d;
            s.b_above = acc;
            break;
          }
          acc = nxt;
        }
      }
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(s.b_digit) << shift;
    mask |= 255u << shift;
    above = s.b_above;
    __syncthreads();
  }
  u64 c = 0;
  const int j = ScanCross(n, [&](int i) { return pred(i) && key(i) == prefix; }, w,
                          thresh - above, strict, s, &c);
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
  int32_t* C = a.cand + static_cast<int64_t>(b) * a.n;
  {
    const int seg = (n + kThreads - 1) / kThreads;
    const int lo = min(n, tid * seg), hi = min(n, lo + seg);
    u64 cnt = 0;
    for (int i = lo; i < hi; ++i) cnt += mass(l[i]) != 0;
    u64 total;
    u64 at = ExclusiveScan(cnt, s, &total);
    for (int i = lo; i < hi; ++i) {
      if (mass(l[i]) != 0) C[at++] = i;
    }
    if (tid == 0) s.res_id = static_cast<int>(total);
    __syncthreads();
  }
  const int c = s.res_id;
  __syncthreads();
  auto key = [&](int j) { return Key(l[C[j]]); };
  auto w = [&](int j) { return mass(l[C[j]]); };
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
