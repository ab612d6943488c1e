// The small-M W4A16 decode kernel (m <= 16 per launch), operands swapped:
// the WEIGHTS are the m16 (A) operand of mma.sync m16n8k16 and the tokens the
// n8 (B) operand, so one mma covers 16 output columns x 8 tokens x 16 k (the
// x-as-m16 kernel in w4_gemm_kernel.cuh wastes 15/16 of each mma at m = 1).
//
// The GPU layout (kernels/FORMAT.md, "CUDA layout") needs no change: word p
// of a lane's 16-byte code load of (tile, k16 step) holds exactly the A
// fragment of the m16 sub-tile p (columns 64 t + 16 p + {gid, gid + 8}):
//   a0 = lop3(w, 0x000f000f, 0x64006400)       {1024 + q} of (c(2p),   k0, k0+1)
//   a2 = lop3(w, 0x00f000f0, 0x54005400)       {  64 + q} of (c(2p),   k0+8, k0+9)
//   a1, a3 the same on w >> 8                   (c(2p+1), ...)
// Dequantization is one LOP3 + one HSUB2 (subtract 1024 + z or 64 + z,
// exact: small integers) per fragment register; the group scale is applied
// in fp32 to a per-group accumulator ("fold": acc += s * acc_g) instead of
// per weight.
//
// Work split: block (tile of 64 columns, k split q); 8 warps per block split
// the block's k range in units of UK = 4 k16 steps (64 k). Two kernels share
// the math:
//   W4RingKernel (dispatched): each warp owns a cp.async ring of D units in
//     shared memory (weights, the unit's scale/zero words, the x rows; rows
//     >= m and k >= K zero-filled); D - 1 units in flight while one is
//     computed; cp.async.wait_group + __syncwarp, no block barrier in the
//     loop. 98 registers, 108 KB per block, 2 blocks per SM at m <= 8.
//   W4SwapKernel (decode_kernel = 2, the first version): register-direct
//     16-byte loads one unit ahead (ping-pong register sets), 128 registers.
// Reduction, all in fixed order (deterministic): the 8 warps through shared
// memory, then the S blocks of a tile (a thread-block cluster of S along k)
// through distributed shared memory, each rank storing 1/S of the tile. No
// global workspace, no atomics. The EC term B (g ⊙ u) is added by the
// k-split-0 block as rp / 16 more mma k-steps (B as the A operand, v as the
// B operand). PDL as in the other decode kernel: the first weight units are
// requested before griddepcontrol.wait. Measurements: docs/results/gpu.md.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_store.cuh"
#include "kernels/cuda/ec_tile.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {
namespace swapk {

constexpr int kNW = 8;  // warps per block

__device__ __forceinline__ uint4 LdStream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint4 LdNc(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
// x may be written by the previous kernel: a plain (coherent) load, issued
// only after griddepcontrol.wait.
__device__ __forceinline__ uint32_t LdX(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ uint32_t HSub2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// NT8: token n8 tiles (1: m <= 8, 2: m <= 16). UK: k16 steps per unit.
// GPU: scale groups per unit (the group is 16 * UK / GPU wide when smaller
// than a unit; otherwise GPU = 1 and the unit lies in one group).
template <int NT8, int UK, int GPU>
__global__ void __launch_bounds__(kNW * 32, NT8 == 1 ? 2 : 1) W4SwapKernel(const DecodeArgs a) {
  constexpr int SPG = UK / GPU;   // steps per group inside a unit
  constexpr int NE = NT8 * 16;    // accumulator floats per lane
  constexpr int E = NE * 32;      // outputs of a tile (per warp-sized fragment set)
  __shared__ float red[kNW * E];  // [warp][e][lane]
  __shared__ float part[E];       // this block's sum over its warps

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int tile = blockIdx.x, q = blockIdx.y, S = gridDim.y;
  const int nunits = a.ksteps / UK;  // ksteps is a multiple of 8
  const int W = S * kNW, gw = q * kNW + warp;
  const int ub = static_cast<int>(static_cast<long long>(nunits) * gw / W);
  const int ue = static_cast<int>(static_cast<long long>(nunits) * (gw + 1) / W);

  asm volatile("griddepcontrol.launch_dependents;\n" ::);

  const uint4* wp = reinterpret_cast<const uint4*>(a.qw) +
                    static_cast<size_t>(tile) * a.ksteps * 32 + lane;
  const uint4* szp = reinterpret_cast<const uint4*>(a.sz) +
                     static_cast<size_t>(tile) * a.ngroups * 16 + gid * 2;
  const int ng1 = a.ngroups - 1, gshift = a.gshift;

  // x rows of this lane's tokens (B operand column gid of each n8 tile).
  const uint16_t* xr[NT8];
  bool xv[NT8];
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt) {
    const int row = nt * 8 + gid;
    xv[nt] = row < a.m;
    xr[nt] = a.x + (xv[nt] ? static_cast<long long>(row) * a.ldx : 0) + 2 * tig;
  }

  auto load_w = [&](int u, uint4 (&w)[UK], uint4 (&s)[GPU][2]) {
    const uint4* p = wp + static_cast<size_t>(u) * (UK * 32);
#pragma unroll
    for (int i = 0; i < UK; ++i) w[i] = LdStream(p + i * 32);
#pragma unroll
    for (int g = 0; g < GPU; ++g) {
      const int grp = min(((u * UK + g * SPG) * 16) >> gshift, ng1);
      s[g][0] = LdNc(szp + grp * 16);
      s[g][1] = LdNc(szp + grp * 16 + 1);
    }
  };
  // k % 8 == 0 here (else x was padded into the workspace), so an 8-wide
  // chunk is either all inside k or all outside (zero: padded codes meet 0).
  auto load_x = [&](int u, uint32_t (&xb)[UK][NT8][2]) {
#pragma unroll
    for (int i = 0; i < UK; ++i) {
      const int k0 = (u * UK + i) * 16;
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
        xb[i][nt][0] = (xv[nt] && k0 < a.k) ? LdX(xr[nt] + k0) : 0u;
        xb[i][nt][1] = (xv[nt] && k0 + 8 < a.k) ? LdX(xr[nt] + k0 + 8) : 0u;
      }
    }
  };

  float acc[NT8][4][4];
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt)
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[nt][p][c] = 0.f;

  const uint32_t k960 = 0x63806380u;  // half2 {960, 960}

  // One unit: per group, dequantize (LOP3 + HSUB2 per fragment register)
  // into mma with a zero accumulator start, then fold with the scale.
  auto compute = [&](const uint4 (&wq)[UK], const uint4 (&sq)[GPU][2],
                     const uint32_t (&xb)[UK][NT8][2]) {
#pragma unroll
    for (int g = 0; g < GPU; ++g) {
      const uint32_t sw[8] = {sq[g][0].x, sq[g][0].y, sq[g][0].z, sq[g][0].w,
                              sq[g][1].x, sq[g][1].y, sq[g][1].z, sq[g][1].w};
      uint32_t zl[8], zh[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        zl[j] = __byte_perm(sw[j], 0, 0x3232);  // {1024 + z, 1024 + z}
        zh[j] = HSub2(zl[j], k960);             // {64 + z, 64 + z}
      }
      float ag[NT8][4][4];
#pragma unroll
      for (int i = g * SPG; i < (g + 1) * SPG; ++i) {
        const uint32_t wv[4] = {wq[i].x, wq[i].y, wq[i].z, wq[i].w};
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const uint32_t w = wv[p], w8 = wv[p] >> 8;
          const uint32_t a0 = HSub2(AndOr<0x000f000fu, 0x64006400u>(w), zl[2 * p]);
          const uint32_t a2 = HSub2(AndOr<0x00f000f0u, 0x54005400u>(w), zh[2 * p]);
          const uint32_t a1 = HSub2(AndOr<0x000f000fu, 0x64006400u>(w8), zl[2 * p + 1]);
          const uint32_t a3 = HSub2(AndOr<0x00f000f0u, 0x54005400u>(w8), zh[2 * p + 1]);
#pragma unroll
          for (int nt = 0; nt < NT8; ++nt) {
            if (i == g * SPG) {
              MmaZ(ag[nt][p], a0, a1, a2, a3, xb[i][nt][0], xb[i][nt][1]);
            } else {
              Mma(ag[nt][p], a0, a1, a2, a3, xb[i][nt][0], xb[i][nt][1]);
            }
          }
        }
      }
      // Fold: rows gid (column c(2p)) and gid + 8 (column c(2p+1)).
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float s0 = __low2float(*reinterpret_cast<const __half2*>(&sw[2 * p]));
        const float s1 = __low2float(*reinterpret_cast<const __half2*>(&sw[2 * p + 1]));
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
          acc[nt][p][0] = fmaf(s0, ag[nt][p][0], acc[nt][p][0]);
          acc[nt][p][1] = fmaf(s0, ag[nt][p][1], acc[nt][p][1]);
          acc[nt][p][2] = fmaf(s1, ag[nt][p][2], acc[nt][p][2]);
          acc[nt][p][3] = fmaf(s1, ag[nt][p][3], acc[nt][p][3]);
        }
      }
    }
  };

  // Two register sets in ping-pong: unit u + 1 is in flight while unit u is
  // computed (no register copies between iterations).
  uint4 wA[UK], sA[GPU][2], wB[UK], sB[GPU][2];
  uint32_t xA[UK][NT8][2], xB[UK][NT8][2];
  if (ub < ue) load_w(ub, wA, sA);
  // Weights do not depend on the previous kernel; x does (unless an EC
  // prologue was launched normally in between: then x is ready).
  if (!a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  if (ub < ue) load_x(ub, xA);

#pragma unroll 1
  for (int u = ub; u < ue; u += 2) {
    if (u + 1 < ue) {
      load_w(u + 1, wB, sB);
      load_x(u + 1, xB);
    }
    compute(wA, sA, xA);
    if (u + 1 >= ue) break;
    if (u + 2 < ue) {
      load_w(u + 2, wA, sA);
      load_x(u + 2, xA);
    }
    compute(wB, sB, xB);
  }

  // The EC term, once per tile (k split 0): y += B (g ⊙ u), B as the A
  // operand (the tile layout's fragments, ec_tile.cuh), v as the B operand.
  if (a.ec.rec != nullptr && q == 0 && tile < a.ntiles) {
    if (a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
    EcTerm<NT8>(a, tile, warp, kNW, lane, acc);
  }

  // Reduction in fixed order: warps (shared memory), then the cluster's
  // blocks (distributed shared memory), rank r storing outputs [r E/S, ...).
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt)
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[(warp * NE + (nt * 4 + p) * 4 + c) * 32 + lane] = acc[nt][p][c];
  __syncthreads();
  for (int o = tid; o < E; o += kNW * 32) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kNW; ++w) s += red[w * E + o];
    part[o] = s;
  }
  // Cluster barrier: part[] released to / acquired from the cluster (a
  // cluster-scope fence, not the GPU-scope MEMBAR of cg::cluster.sync()).
  asm volatile("fence.acq_rel.cluster;\n" ::: "memory");
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  const int lo = q * E / S, hi = (q + 1) * E / S;
  for (int o = lo + tid; o < hi; o += kNW * 32) {
    float s = 0.f;
    const unsigned local = static_cast<unsigned>(__cvta_generic_to_shared(&part[o]));
    for (int r = 0; r < S; ++r) {
      unsigned remote;
      float v;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(r));
      asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
      s += v;
    }
    StoreTileOutput(a, tile, o, s);
  }
  // Keep this block's shared memory alive until every rank has read it (the
  // remote loads above have returned: their values are consumed).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
}

// The same computation with the loads through a per-warp shared-memory ring
// of D units filled by cp.async (no registers held by loads in flight):
// D - 1 units (weights, the units' scale/zero words and x rows) are in
// flight per warp while one is computed, 2-3x the bytes in flight of the
// register-direct kernel above. Each warp owns its ring: only
// cp.async.wait_group + __syncwarp, no block barrier in the loop.
template <int NT8, int UK, int GPU>
struct Ring {
  static constexpr int kXR = UK * 32 + 16;  // bytes per x row (+16: conflict-free LDS.32)
  static constexpr int kW = UK * 512, kZ = GPU * 256, kX = NT8 * 8 * kXR;
  static constexpr int kStage = kW + kZ + kX;
  static constexpr int kBudget = NT8 == 1 ? 110 * 1024 : 220 * 1024;  // per block
  static constexpr int kD0 = kBudget / (kNW * kStage);
  static constexpr int kD = kD0 > 6 ? 6 : kD0;
  static constexpr int kRed = (kNW + 1) * NT8 * 16 * 32 * 4;
  static constexpr int kSmem = kNW * kD * kStage > kRed ? kNW * kD * kStage : kRed;
  static_assert(kD >= 3, "ring too shallow");
};

__device__ __forceinline__ void CpAsync16(unsigned dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(pred ? 16 : 0));
}

template <int NT8, int UK, int GPU>
__global__ void __launch_bounds__(kNW * 32, NT8 == 1 ? 2 : 1) W4RingKernel(const DecodeArgs a) {
  using R = Ring<NT8, UK, GPU>;
  constexpr int D = R::kD;
  constexpr int SPG = UK / GPU;
  constexpr int NE = NT8 * 16;
  constexpr int E = NE * 32;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int tile = blockIdx.x, q = blockIdx.y, S = gridDim.y;
  const int nunits = a.ksteps / UK;
  const int W = S * kNW, gw = q * kNW + warp;
  const int ub = static_cast<int>(static_cast<long long>(nunits) * gw / W);
  const int ue = static_cast<int>(static_cast<long long>(nunits) * (gw + 1) / W);

  asm volatile("griddepcontrol.launch_dependents;\n" ::);

  unsigned char* ring = smem + warp * D * R::kStage;
  const unsigned ring_s = static_cast<unsigned>(__cvta_generic_to_shared(ring));
  const uint4* wp = reinterpret_cast<const uint4*>(a.qw) + static_cast<size_t>(tile) * a.ksteps * 32 + lane;
  const uint4* sz4 = reinterpret_cast<const uint4*>(a.sz) + static_cast<size_t>(tile) * a.ngroups * 16;
  const int ng1 = a.ngroups - 1, gshift = a.gshift;

  // Weights and scale/zero words of unit u into ring slot `slot`.
  auto issue_w = [&](int u, int slot) {
    if (u >= ue) return;
    const unsigned st = ring_s + slot * R::kStage;
    const uint4* p = wp + static_cast<size_t>(u) * (UK * 32);
#pragma unroll
    for (int i = 0; i < UK; ++i) CpAsync16(st + i * 512 + lane * 16, p + i * 32, true);
#pragma unroll
    for (int c0 = 0; c0 < GPU * 16; c0 += 32) {
      const int c = c0 + lane;
      if (c < GPU * 16) {
        const int g = c >> 4;
        const int grp = min(((u * UK + g * SPG) * 16) >> gshift, ng1);
        CpAsync16(st + R::kW + c * 16, sz4 + grp * 16 + (c & 15), true);
      }
    }
  };
  // x rows (NT8 * 8 of them; rows >= m and k >= K zero-filled) of unit u.
  auto issue_x = [&](int u, int slot) {
    if (u >= ue) return;
    const unsigned st = ring_s + slot * R::kStage + R::kW + R::kZ;
    constexpr int kChunks = NT8 * 8 * UK * 2;
#pragma unroll
    for (int c0 = 0; c0 < kChunks; c0 += 32) {
      const int c = c0 + lane;
      const int r = c / (UK * 2), cc = c % (UK * 2);
      const int kk = u * UK * 16 + cc * 8;
      const bool ok = r < a.m && kk < a.k;
      CpAsync16(st + r * R::kXR + cc * 16, ok ? a.x + static_cast<long long>(r) * a.ldx + kk : a.x, ok);
    }
  };

  float acc[NT8][4][4];
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt)
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[nt][p][c] = 0.f;
  const uint32_t k960 = 0x63806380u;

  auto compute = [&](int slot) {
    const unsigned char* st = ring + slot * R::kStage;
    const unsigned char* xs = st + R::kW + R::kZ;
#pragma unroll
    for (int g = 0; g < GPU; ++g) {
      const uint4 z0 = *reinterpret_cast<const uint4*>(st + R::kW + g * 256 + gid * 32);
      const uint4 z1 = *reinterpret_cast<const uint4*>(st + R::kW + g * 256 + gid * 32 + 16);
      const uint32_t sw[8] = {z0.x, z0.y, z0.z, z0.w, z1.x, z1.y, z1.z, z1.w};
      uint32_t zl[8], zh[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        zl[j] = __byte_perm(sw[j], 0, 0x3232);
        zh[j] = HSub2(zl[j], k960);
      }
      float ag[NT8][4][4];
#pragma unroll
      for (int i = g * SPG; i < (g + 1) * SPG; ++i) {
        const uint4 wq = *reinterpret_cast<const uint4*>(st + i * 512 + lane * 16);
        uint32_t xb[NT8][2];
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
          const unsigned char* xr = xs + (nt * 8 + gid) * R::kXR + (i * 16 + 2 * tig) * 2;
          xb[nt][0] = *reinterpret_cast<const uint32_t*>(xr);
          xb[nt][1] = *reinterpret_cast<const uint32_t*>(xr + 16);
        }
        const uint32_t wv[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const uint32_t w = wv[p], w8 = wv[p] >> 8;
          const uint32_t a0 = HSub2(AndOr<0x000f000fu, 0x64006400u>(w), zl[2 * p]);
          const uint32_t a2 = HSub2(AndOr<0x00f000f0u, 0x54005400u>(w), zh[2 * p]);
          const uint32_t a1 = HSub2(AndOr<0x000f000fu, 0x64006400u>(w8), zl[2 * p + 1]);
          const uint32_t a3 = HSub2(AndOr<0x00f000f0u, 0x54005400u>(w8), zh[2 * p + 1]);
#pragma unroll
          for (int nt = 0; nt < NT8; ++nt) {
            if (i == g * SPG) {
              MmaZ(ag[nt][p], a0, a1, a2, a3, xb[nt][0], xb[nt][1]);
            } else {
              Mma(ag[nt][p], a0, a1, a2, a3, xb[nt][0], xb[nt][1]);
            }
          }
        }
      }
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float s0 = __low2float(*reinterpret_cast<const __half2*>(&sw[2 * p]));
        const float s1 = __low2float(*reinterpret_cast<const __half2*>(&sw[2 * p + 1]));
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
          acc[nt][p][0] = fmaf(s0, ag[nt][p][0], acc[nt][p][0]);
          acc[nt][p][1] = fmaf(s0, ag[nt][p][1], acc[nt][p][1]);
          acc[nt][p][2] = fmaf(s1, ag[nt][p][2], acc[nt][p][2]);
          acc[nt][p][3] = fmaf(s1, ag[nt][p][3], acc[nt][p][3]);
        }
      }
    }
  };

  // Prologue: the weights of the first D - 1 units before the grid
  // dependency wait, their x rows after it; one commit group per unit.
#pragma unroll
  for (int d = 0; d < D - 1; ++d) issue_w(ub + d, d);
  if (!a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#pragma unroll
  for (int d = 0; d < D - 1; ++d) {
    issue_x(ub + d, d);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  int slot = 0, nslot = D - 1;
#pragma unroll 1
  for (int u = ub; u < ue; ++u) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(D - 2));
    __syncwarp();
    issue_w(u + D - 1, nslot);
    issue_x(u + D - 1, nslot);
    asm volatile("cp.async.commit_group;\n" ::);
    compute(slot);
    slot = slot + 1 == D ? 0 : slot + 1;
    nslot = nslot + 1 == D ? 0 : nslot + 1;
  }
  asm volatile("cp.async.wait_group 0;\n" ::);

  if (a.ec.rec != nullptr && q == 0 && tile < a.ntiles) {
    if (a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
    EcTerm<NT8>(a, tile, warp, kNW, lane, acc);
  }

  // Reduction (as in W4SwapKernel), its buffers over the drained ring.
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  float* part = red + kNW * E;
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt)
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[(warp * NE + (nt * 4 + p) * 4 + c) * 32 + lane] = acc[nt][p][c];
  __syncthreads();
  for (int o = tid; o < E; o += kNW * 32) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kNW; ++w) s += red[w * E + o];
    part[o] = s;
  }
  asm volatile("fence.acq_rel.cluster;\n" ::: "memory");
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  const int lo = q * E / S, hi = (q + 1) * E / S;
  for (int o = lo + tid; o < hi; o += kNW * 32) {
    float s = 0.f;
    const unsigned local = static_cast<unsigned>(__cvta_generic_to_shared(&part[o]));
    for (int r = 0; r < S; ++r) {
      unsigned remote;
      float v;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(r));
      asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
      s += v;
    }
    StoreTileOutput(a, tile, o, s);
  }
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
}

template <int NT8, int UK, int GPU>
cudaError_t LaunchOne(const DecodeArgs& a, int splits, cudaStream_t stream, bool pdl) {
  const bool ring = a.variant != 2;
  if (ring) {
    auto* kernel = W4RingKernel<NT8, UK, GPU>;
    const cudaError_t ce = ConfigureOnce(reinterpret_cast<const void*>(kernel), [&] {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Ring<NT8, UK, GPU>::kSmem);
      if (e == cudaSuccess) {
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                 cudaSharedmemCarveoutMaxShared);
      }
      return e;
    });
    if (ce != cudaSuccess) return ce;
  }
  const dim3 grid(static_cast<unsigned>(a.ntiles), static_cast<unsigned>(splits));
  const unsigned cy = static_cast<unsigned>(splits);
  return ring ? LaunchCluster(W4RingKernel<NT8, UK, GPU>, grid, dim3(kNW * 32),
                              Ring<NT8, UK, GPU>::kSmem, stream, 1, cy, pdl, a)
              : LaunchCluster(W4SwapKernel<NT8, UK, GPU>, grid, dim3(kNW * 32), 0, stream, 1,
                              cy, pdl, a);
}

// Group width 16 * UK / GPU inside a unit when narrower than a unit.
template <int NT8, int UK>
cudaError_t LaunchG(const DecodeArgs& a, int splits, cudaStream_t stream, bool pdl) {
  const long long gw = a.gshift >= 30 ? (1LL << 30) : (1LL << a.gshift);
  const long long per_unit = 16 * UK / gw;
  if constexpr (UK >= 8) {
    return LaunchOne<NT8, UK, 1>(a, splits, stream, pdl);  // callers: groups >= 128 only
  } else {
    if (per_unit >= 2) return LaunchOne<NT8, UK, 2>(a, splits, stream, pdl);
    return LaunchOne<NT8, UK, 1>(a, splits, stream, pdl);
  }
}

}  // namespace swapk

// k splits per tile S (a cluster of S blocks along k), S in {1, 2, 4, 8}
// with at least one 8-step unit per warp. Blocks do equal work, so the
// busiest SM gets ceil(B / SMs) of the B = ntiles * S blocks: S is chosen
// for the best balance (B / SMs) / ceil(B / SMs) (within 2%), and among
// those the smallest S that still gives ~2 resident blocks per SM (m <= 8:
// 128 registers, two blocks; m <= 16: one), else the largest (small shapes:
// more blocks in flight). Llama-3-8B at m <= 8: qkv 4, o 4, gate_up 2,
// down 4.
int SwapSplits(const DecodeArgs& a, int num_sms) {
  const int units = a.ksteps / 8;
  const double need = (a.m <= 8 ? 1.9 : 0.95) * num_sms;
  double eff[4] = {0, 0, 0, 0}, best = 0;
  int ncand = 0;
  for (int i = 0; i < 4; ++i) {
    const int s = 1 << i;
    if (s > 1 && s * swapk::kNW > units) break;
    const double b = static_cast<double>(a.ntiles) * s / num_sms;
    eff[i] = b / std::ceil(b);
    best = std::max(best, eff[i]);
    ncand = i + 1;
  }
  int pick = -1;
  for (int i = 0; i < ncand; ++i) {
    if (eff[i] >= best - 0.02 && static_cast<double>(a.ntiles) * (1 << i) >= need) {
      pick = i;
      break;
    }
  }
  if (pick < 0) {
    for (int i = 0; i < ncand; ++i) {
      if (eff[i] >= best - 0.02) pick = i;
    }
  }
  return 1 << pick;
}

absl::Status LaunchDecodeSwap(DecodeArgs a, int num_sms, cudaStream_t stream) {
  if (a.m < 1 || a.m > 16) return absl::InternalError("LaunchDecodeSwap: m > 16");
  const int splits = SwapSplits(a, num_sms);
  // PDL together with a cluster launch: tried once; if the runtime refuses
  // the combination, launch without PDL from then on.
  static int pdl_ok = -1;
  // m <= 8: 4-step units (64 k: double-buffered in 128 registers, two
  // blocks per SM); m <= 16: 8-step units with one block per SM, 4-step
  // units for groups narrower than 128 (no spills).
  auto go = [&](bool pdl) {
    if (a.m <= 8) return swapk::LaunchG<1, 4>(a, splits, stream, pdl);
    return swapk::LaunchG<2, 4>(a, splits, stream, pdl);
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
