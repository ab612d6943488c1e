// The fold kernel, stream-K over warps (v21; launches of <= 8 rows): the
// arithmetic of w4_gemv_fold.cu (weights = the m16 A operand as LOP3 alone,
// one more mma with a constant A for the chunk's x sums, one fp32 fold per
// chunk), but the work is cut evenly over the warps of ONE wave instead of
// into tiles x k splits:
//
//   the stream = every (tile, chunk) pair, tile-major (ntiles x nch units;
//   a chunk = CH k16 steps inside one scale group); warp w of the W = grid
//   x NW warps takes units [T w / W, T (w + 1) / W).
//
// Why: with one tile (or one tile x k split) per block, the SMs of a wave
// do unequal work whenever the blocks do not divide into the SMs (8B
// gate_up at m = 1: 448 tiles over 264 block slots, the busiest SM streams
// 4 tiles, the average 3.4; 8B qkv: 192 blocks over 132 SMs, 60 SMs hold two);
// here every warp streams T / W units, +-1.
//
// A warp's range crosses tile boundaries: at each one it flushes the tile's
// accumulators. A tile whose units all lie in one warp is stored directly;
// otherwise each contributing warp stores its partial tile (m x 64 fp32)
// in the workspace (slot 0: the warp's first tile, 1: its last), fences and
// takes a ticket on the tile's counter; the last of the tile's contributors
// sums the partials in warp order (deterministic: the same order whoever
// finishes last), adds the bias, stores y and resets the counter to zero
// for the next launch. The EC term B (g ⊙ u) is added by the warp that owns
// the tile's chunk 0, to its own accumulators. No block barrier, no shared
// reduction buffers, no clusters: shared memory = the warps' rings + their
// staged x (the units' k ranges, at most all of k).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/w4_fold_common.cuh"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {
namespace foldk {

struct SkGeom {
  int depth;       // ring chunks per warp (2..4)
  int stage;       // bytes per ring chunk: CH * 512 codes + 256 scale/zero
  int xrow;        // bytes per staged x row (min(units, nch) chunks + 16 pad)
  int warp_bytes;  // ring + staged x of one warp
};

// The warp whose range holds unit u (ranges [T w / W, T (w + 1) / W), W <= T).
__device__ __forceinline__ int SkWarpOf(long long u, long long T, int W) {
  return static_cast<int>(((u + 1) * W + T - 1) / T - 1);
}

template <int NW, int CH, bool ONE>
__global__ void __launch_bounds__(NW * 32, NW == 8 ? 2 : 4)
    W4FoldSkKernel(const DecodeArgs a, const SkGeom geo) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int nch = a.ksteps / CH;
  const long long T = static_cast<long long>(a.ntiles) * nch;
  const int W = static_cast<int>(gridDim.x) * NW;
  const int gw = static_cast<int>(blockIdx.x) * NW + warp;
  const long long u0 = T * gw / W;
  const int np = static_cast<int>(T * (gw + 1) / W - u0);  // >= 1 (W <= T)
  const int D = geo.depth;

  asm volatile("griddepcontrol.launch_dependents;\n" ::);

  unsigned char* wbase = smem + warp * geo.warp_bytes;
  const unsigned ring_s = static_cast<unsigned>(__cvta_generic_to_shared(wbase));
  const unsigned x_s = ring_s + D * geo.stage;
  const uint4* qw4 = reinterpret_cast<const uint4*>(a.qw);
  const uint4* sz4a = reinterpret_cast<const uint4*>(a.sz);
  const int ng1 = a.ngroups - 1, gshift = a.gshift;

  // Unit j of the warp's stream: tile (u0 + j) / nch, chunk (u0 + j) % nch;
  // issue_w is called for j = 0, 1, 2, ... in order (it_t / it_c follow).
  const int t0 = static_cast<int>(u0 / nch);
  const int c0 = static_cast<int>(u0 - static_cast<long long>(t0) * nch);
  int it_t = t0, it_c = c0;
  auto issue_w = [&](int j, int slot) {
    if (j >= np) return;
    const int t = it_t, c = it_c;
    if (++it_c == nch) {
      it_c = 0;
      ++it_t;
    }
    const uint4* wt = qw4 + (static_cast<size_t>(t) * a.ksteps + static_cast<size_t>(c) * CH) * 32;
    const int grp = min((c * CH * 16) >> gshift, ng1);
    const uint4* zt = sz4a + (static_cast<size_t>(t) * a.ngroups + grp) * 16;
    const unsigned st = ring_s + slot * geo.stage;
#pragma unroll
    for (int i = 0; i < CH; ++i) CpAsync16(st + i * 512 + lane * 16, wt + i * 32 + lane, true);
    if (lane < 16) CpAsync16(st + CH * 512 + lane * 16, zt + lane, true);
  };

  // Prologue: the first D - 1 units' weights before the grid dependency
  // wait, then the x of the warp's units (positions j < min(np, nch): unit
  // j and unit j + nch share their k range).
  for (int d = 0; d < D - 1; ++d) {
    issue_w(d, d);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  if (!a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  {
    const int npos = min(np, nch);
    const int ppr = npos * CH * 2;  // 16-byte pieces per row
    for (int i = lane; i < a.m * ppr; i += 32) {
      const int r = i / ppr, cc = i - r * ppr;
      const int j = cc / (CH * 2), w8 = cc - j * (CH * 2);
      const int c = c0 + j < nch ? c0 + j : c0 + j - nch;
      const int kk = c * CH * 16 + w8 * 8;
      const bool ok = kk < a.k;
      CpAsync16(x_s + r * geo.xrow + cc * 16, ok ? a.x + static_cast<long long>(r) * a.ldx + kk : a.x,
                ok);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  const int trow = min(lane & 7, a.m - 1);
  const unsigned xl = x_s + trow * geo.xrow + (lane >> 3) * 16;
  const uint32_t kOne = 0x3c003c00u;  // half2 {1, 1}

  // The tile's accumulators -> y (the warp owns the whole tile) or a partial
  // + ticket (the last contributor sums the partials in warp order).
  auto flush = [&](int t, bool has_c0, float (&acc)[4][4]) {
    if (has_c0 && a.ecb != nullptr) {
      if (a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  #pragma unroll 1
      for (int e = 0; e < a.esteps; ++e) {
        const uint4* bp = reinterpret_cast<const uint4*>(a.ecb) +
                          ((static_cast<size_t>(t) * a.esteps + e) * 32 + lane) * 4;
        const uint4 q0 = bp[0], q1 = bp[1], q2 = bp[2], q3 = bp[3];
        const uint32_t bv[16] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w,
                                 q2.x, q2.y, q2.z, q2.w, q3.x, q3.y, q3.z, q3.w};
        const uint16_t* v0 = a.v + static_cast<long long>(gid < a.m ? gid : 0) * a.ldv + e * 16 + 2 * tig;
        const uint32_t vb0 = gid < a.m ? *reinterpret_cast<const uint32_t*>(v0) : 0u;
        const uint32_t vb1 = gid < a.m ? *reinterpret_cast<const uint32_t*>(v0 + 8) : 0u;
  #pragma unroll
        for (int p = 0; p < 4; ++p) {
          Mma(acc[p], bv[4 * p], bv[4 * p + 2], bv[4 * p + 1], bv[4 * p + 3], vb0, vb1);
        }
      }
    }
    const long long tu = static_cast<long long>(t) * nch;
    const int lo = SkWarpOf(tu, T, W), hi = SkWarpOf(tu + nch - 1, T, W);
    auto store = [&](int row, int col, float s) {
      if (a.bias != nullptr) s += a.bias[col];
      const long long idx = row * a.ldy + col;
      if (a.y32 != nullptr) {
        a.y32[idx] = a.accumulate ? a.y32[idx] + s : s;
      } else {
        __half* y = reinterpret_cast<__half*>(a.y16);
        y[idx] = __float2half_rn(a.accumulate ? __half2float(y[idx]) + s : s);
      }
    };
    if (lo == hi) {
  #pragma unroll
      for (int p = 0; p < 4; ++p)
  #pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (ONE && (c & 1)) continue;
          const int row = 2 * tig + (c & 1), col = t * 64 + 16 * p + gid + 8 * (c >> 1);
          if (row < a.m && col < a.n) store(row, col, acc[p][c]);
        }
      return;
    }
    // (griddepcontrol.wait above, or before the x staging: the workspace
    // and counters are free, the previous kernel that used them is done)
    if (a.ec_late && !(has_c0 && a.ecb != nullptr)) asm volatile("griddepcontrol.wait;\n" ::: "memory");
    const int mm = a.m * 64;
    const int sid = 2 * gw + (t == t0 ? 0 : 1);  // slot 0: the warp's first tile
    float* part = a.partials + static_cast<size_t>(sid) * mm;
  #pragma unroll
    for (int p = 0; p < 4; ++p)
  #pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (ONE && (c & 1)) continue;
        const int row = 2 * tig + (c & 1), colt = 16 * p + gid + 8 * (c >> 1);
        if (row < a.m) __stcg(part + row * 64 + colt, acc[p][c]);
      }
    __threadfence();
    __syncwarp();
    int old = 0;
    if (lane == 0) old = atomicAdd(a.counters + t, 1);
    old = __shfl_sync(0xffffffffu, old, 0);
    if (old != hi - lo) return;
    __threadfence();
    if (lane == 0) a.counters[t] = 0;  // every contributor has counted: reset for the next launch
    // Contributor lo's partial is in its slot 1 unless its range starts at
    // the tile's chunk 0; every later contributor starts inside the tile
    // (slot 0). Loads in batches of 8 (independent, in flight together),
    // summed in warp order.
    const float* p_lo = a.partials + static_cast<size_t>(2 * lo + (T * lo / W == tu ? 0 : 1)) * mm;
    const float* p_1 = a.partials + static_cast<size_t>(2 * (lo + 1)) * mm;  // + 2 mm per warp
    const int nrest = hi - lo;
    for (int o = lane; o < mm; o += 32) {
      const int col = t * 64 + (o & 63);
      if (col >= a.n) continue;
      float s = __ldcg(p_lo + o);
      int i = 0;
      for (; i + 8 <= nrest; i += 8) {
        float v[8];
  #pragma unroll
        for (int q = 0; q < 8; ++q) v[q] = __ldcg(p_1 + static_cast<size_t>(i + q) * 2 * mm + o);
  #pragma unroll
        for (int q = 0; q < 8; ++q) s += v[q];
      }
      for (; i < nrest; ++i) s += __ldcg(p_1 + static_cast<size_t>(i) * 2 * mm + o);
      store(o >> 6, col, s);
    }
  };

  float acc[4][4];
  #pragma unroll
  for (int p = 0; p < 4; ++p)
  #pragma unroll
    for (int c = 0; c < 4; ++c) acc[p][c] = 0.f;
  int tcur = t0, c = c0;
  bool has_c0 = c0 == 0;
  int slot = 0;
  #pragma unroll 1
  for (int j = 0; j < np; ++j) {
    if (j == 0) {
      asm volatile("cp.async.wait_group 0;\n" ::);
    } else {
      WaitGroups(D - 2);
    }
    __syncwarp();
    {
      int ns = slot + D - 1;
      if (ns >= D) ns -= D;
      issue_w(j + D - 1, ns);
      asm volatile("cp.async.commit_group;\n" ::);
    }
    if (j > 0 && c == 0) {  // a tile boundary inside the warp's range
      flush(tcur, has_c0, acc);
      ++tcur;
      has_c0 = true;
  #pragma unroll
      for (int p = 0; p < 4; ++p)
  #pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = 0.f;
    }
    const unsigned char* st = wbase + slot * geo.stage;
    const unsigned xoff = (j < nch ? j : j % nch) * CH * 32;
    float d[4][4], xs[4];
  #pragma unroll
    for (int s2 = 0; s2 < CH; s2 += 2) {
      uint32_t b[4];
      LdMatrixX4(b, xl + xoff + s2 * 32);
  #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int s = s2 + h;
        const uint4 wq = *reinterpret_cast<const uint4*>(st + s * 512 + lane * 16);
        const uint32_t wv[4] = {wq.x, wq.y, wq.z, wq.w};
  #pragma unroll
        for (int p = 0; p < 4; ++p) {
          const uint32_t w = wv[p], w8 = wv[p] >> 8;
          const uint32_t a0 = AndOr<0x000f000fu, 0x64006400u>(w);
          const uint32_t a2 = AndOr<0x00f000f0u, 0x54005400u>(w);
          const uint32_t a1 = AndOr<0x000f000fu, 0x64006400u>(w8);
          const uint32_t a3 = AndOr<0x00f000f0u, 0x54005400u>(w8);
          if (s == 0) {
            MmaZ(d[p], a0, a1, a2, a3, b[2 * h], b[2 * h + 1]);
          } else {
            Mma(d[p], a0, a1, a2, a3, b[2 * h], b[2 * h + 1]);
          }
        }
        if (s == 0) {
          MmaZ(xs, kOne, 0u, kOne, kOne, b[2 * h], b[2 * h + 1]);
        } else {
          Mma(xs, kOne, 0u, kOne, kOne, b[2 * h], b[2 * h + 1]);
        }
      }
    }
    // Fold (as w4_gemv_fold.cu): column c(2p) takes d[p][0..1], c(2p+1) d[p][2..3].
    const uint4 z0 = *reinterpret_cast<const uint4*>(st + CH * 512 + gid * 32);
    const uint4 z1 = *reinterpret_cast<const uint4*>(st + CH * 512 + gid * 32 + 16);
    const uint32_t sw[8] = {z0.x, z0.y, z0.z, z0.w, z1.x, z1.y, z1.z, z1.w};
    const float h0 = 960.f * xs[2], h1 = 960.f * xs[3];
  #pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float2 f0 = __half22float2(*reinterpret_cast<const __half2*>(&sw[2 * p]));
      const float2 f1 = __half22float2(*reinterpret_cast<const __half2*>(&sw[2 * p + 1]));
      acc[p][0] = fmaf(f0.x, fmaf(-f0.y, xs[0], d[p][0] + h0), acc[p][0]);
      acc[p][2] = fmaf(f1.x, fmaf(-f1.y, xs[0], d[p][2] + h0), acc[p][2]);
      if (!ONE) {
        acc[p][1] = fmaf(f0.x, fmaf(-f0.y, xs[1], d[p][1] + h1), acc[p][1]);
        acc[p][3] = fmaf(f1.x, fmaf(-f1.y, xs[1], d[p][3] + h1), acc[p][3]);
      }
    }
    slot = slot + 1 == D ? 0 : slot + 1;
    if (++c == nch) c = 0;
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  flush(tcur, has_c0, acc);
}

template <int NW, int CH, bool ONE>
cudaError_t LaunchSkOne(const DecodeArgs& a, int grid, const SkGeom& g, int smem,
                        cudaStream_t stream, bool pdl) {
  static bool configured = false;  // per instantiation; idempotent
  if (!configured) {
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e == cudaSuccess) {
      e = cudaFuncSetAttribute(W4FoldSkKernel<NW, CH, ONE>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    }
    if (e == cudaSuccess) {
      e = cudaFuncSetAttribute(W4FoldSkKernel<NW, CH, ONE>, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
    }
    if (e != cudaSuccess) return e;
    configured = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(NW * 32);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, W4FoldSkKernel<NW, CH, ONE>, a, g);
}

// Registers per thread of an instantiation (its compiled code), once.
template <int NW, int CH, bool ONE>
int SkRegsOne() {
  static const int regs = [] {
    cudaFuncAttributes fa{};
    if (cudaFuncGetAttributes(&fa, W4FoldSkKernel<NW, CH, ONE>) != cudaSuccess) {
      (void)cudaGetLastError();
      return 128;  // the launch bounds' cap: a safe under-estimate of residency
    }
    return fa.numRegs;
  }();
  return regs;
}
template <int NW, bool ONE>
int SkRegs(int ch) {
  return ch == 2 ? SkRegsOne<NW, 2, ONE>() : ch == 4 ? SkRegsOne<NW, 4, ONE>() : SkRegsOne<NW, 8, ONE>();
}

template <int NW, bool ONE>
cudaError_t LaunchSkCh(int ch, const DecodeArgs& a, int grid, const SkGeom& g, int smem,
                       cudaStream_t stream, bool pdl) {
  switch (ch) {
    case 2: return LaunchSkOne<NW, 2, ONE>(a, grid, g, smem, stream, pdl);
    case 4: return LaunchSkOne<NW, 4, ONE>(a, grid, g, smem, stream, pdl);
    default: return LaunchSkOne<NW, 8, ONE>(a, grid, g, smem, stream, pdl);
  }
}

}  // namespace foldk

namespace {

constexpr int kSmemPerSm = 228 * 1024, kSmemReserved = 1024, kSmemMaxBlock = 227 * 1024;

int SkChunk(const DecodeArgs& a) {
  if (a.gshift >= 30) return 8;
  const int steps = (1 << a.gshift) / 16;
  return steps >= 8 ? 8 : steps;
}

struct SkConfig {
  int nw = 8, grid = 0, smem = 0;
  foldk::SkGeom geo{};
};

// Blocks of nw warps per SM by the instantiation's registers (allocated
// per warp in units of 256) and warps (64 per SM).
int SkBlocksByRegs(int nw, int ch, bool one) {
  const int regs = nw == 8 ? (one ? foldk::SkRegs<8, true>(ch) : foldk::SkRegs<8, false>(ch))
                           : (one ? foldk::SkRegs<4, true>(ch) : foldk::SkRegs<4, false>(ch));
  const int per_warp = (regs * 32 + 255) / 256 * 256;
  return std::min(65536 / (per_warp * nw), 64 / nw);
}

}  // namespace

absl::Status LaunchDecodeFoldSk(DecodeArgs a, int num_sms, int forced_warps, int forced_depth,
                                cudaStream_t stream) {
  if (a.m < 1 || a.m > 8) {
    return absl::InvalidArgumentError(absl::StrCat("stream-K fold kernel: m = ", a.m, " (1..8)"));
  }
  const int ch = SkChunk(a);
  const int nch = a.ksteps / ch;
  const long long T = static_cast<long long>(a.ntiles) * nch;
  SkConfig best;
  bool found = false;
  for (int nw : {8, 4}) {
    if (forced_warps > 0 && nw != forced_warps) continue;
    if (found) break;  // 8 warps when they fit (fewer, larger blocks)
    // The most blocks per SM whose footprint (ring + the x of the warp's
    // units, which grows as the warps get fewer) still fits that many.
    for (int bps = SkBlocksByRegs(nw, ch, a.m == 1); bps >= 1 && !found; --bps) {
      const long long grid = std::min<long long>(static_cast<long long>(bps) * num_sms, T / nw);
      if (grid < 1) break;
      const long long W = grid * nw;
      const int units = static_cast<int>((T + W - 1) / W);  // the busiest warp's
      const int depth = forced_depth > 0 ? forced_depth : units >= 6 ? 3 : 2;
      SkConfig c;
      c.nw = nw;
      c.grid = static_cast<int>(grid);
      c.geo.depth = depth;
      c.geo.stage = ch * 512 + 256;
      c.geo.xrow = std::min(units, nch) * ch * 32 + 16;
      c.geo.warp_bytes = (depth * c.geo.stage + a.m * c.geo.xrow + 15) / 16 * 16;
      c.smem = nw * c.geo.warp_bytes;
      if (c.smem > kSmemMaxBlock) continue;
      if (kSmemPerSm / (c.smem + kSmemReserved) < std::min<long long>(bps, (grid + num_sms - 1) / num_sms)) {
        continue;
      }
      if (W * 2 * a.m * 64 > a.partial_floats) continue;
      best = c;
      found = true;
    }
  }
  if (!found) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream-K fold kernel: no configuration fits (m = ", a.m, ", k = ", a.k,
                     ", n = ", a.n, forced_warps > 0 ? absl::StrCat(", ", forced_warps, " warps") : "",
                     forced_depth > 0 ? absl::StrCat(", depth ", forced_depth) : "", ")"));
  }
  static int pdl_ok = -1;
  auto go = [&](bool pdl) {
    if (best.nw == 4) {
      return a.m == 1 ? foldk::LaunchSkCh<4, true>(ch, a, best.grid, best.geo, best.smem, stream, pdl)
                      : foldk::LaunchSkCh<4, false>(ch, a, best.grid, best.geo, best.smem, stream, pdl);
    }
    return a.m == 1 ? foldk::LaunchSkCh<8, true>(ch, a, best.grid, best.geo, best.smem, stream, pdl)
                    : foldk::LaunchSkCh<8, false>(ch, a, best.grid, best.geo, best.smem, stream, pdl);
  };
  cudaError_t e = go(pdl_ok != 0);
  if (e != cudaSuccess && pdl_ok == -1) {
    (void)cudaGetLastError();
    pdl_ok = 0;
    e = go(false);
  } else if (e == cudaSuccess && pdl_ok == -1) {
    pdl_ok = 1;
  }
  SPEAR_CUDA_RETURN_IF_ERROR(e);
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
