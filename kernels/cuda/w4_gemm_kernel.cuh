// The W4A16 decode GEMM (m <= 64 per launch): y[m, n] = x[m, k] W^T
// (+ EC, bias). Included by one small .cu per m16-tile count
// (w4_gemm_m*.cu) so that nvcc compiles the instantiations in parallel.
//
// Block: NW warps (8 in every shipped config) arranged WN (along n, 64
// columns each) x WK (along k). A work unit is (tile group of WN x 64
// columns, one pipeline stage of KSUB x 128 k); the units, ordered
// tile-group-major, are split evenly over a grid of at most one block per
// SM (stream-K). Each stage's codes, scale/zero words and x rows travel by
// cp.async into a STAGES-deep ring. Per k16 step a warp dequantizes its
// 16-byte code load straight into the 8 B fragments of mma.sync m16n8k16
// (lop3 to {1024 + q}, then (v - (1024 + z)) * s in half2: exact up to the
// final rounding of s * (q - z)) and runs MT x 8 mma. At the end of a tile
// segment the WK warps reduce through shared memory; the block that starts
// the tile (k = 0) adds B (g ⊙ u) as rp / 16 more mma k-steps; a segment
// that covers the whole k stores y directly, otherwise it writes its
// partial and the LAST block to finish the tile (atomic ticket) sums all
// partials in block order (deterministic) and stores y. Launched with PDL:
// the first weight stages are fetched before griddepcontrol.wait.
// Measurements and the profile that shaped this: docs/results/gpu.md.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/ec_tile.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {
namespace decode {

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void CpAsync16Stream(void* smem, const void* gmem, bool pred,
                                                uint64_t policy) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(s),
               "l"(gmem), "r"(n), "l"(policy));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// (w & A) | B in one LOP3.
template <uint32_t A, uint32_t B>
__device__ __forceinline__ uint32_t AndOr(uint32_t w) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(w), "n"(A), "n"(B));
  return d;
}

__device__ __forceinline__ uint32_t AsU32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 AsH2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// First unit of block b when `total` units are split over `grid` blocks.
__device__ __forceinline__ int UnitBegin(int b, int total, int grid) {
  return static_cast<int>(static_cast<long long>(b) * total / grid);
}
// The block that owns unit u.
__device__ __forceinline__ int UnitBlock(int u, int total, int grid) {
  return static_cast<int>((static_cast<long long>(u + 1) * grid + total - 1) / total) - 1;
}

// A pipeline stage covers KSUB layout chunks of 128 k (8 k16 steps each).
template <int MT, int WN, int KSUB, int NW = 8>
struct Geometry {
  static constexpr int kWK = NW / WN;
  static constexpr int kSteps = 8 * KSUB;  // k16 steps per stage
  static constexpr int kStepsPerWarp = kSteps / kWK;
  static constexpr int kNB = 64 * WN;
  static constexpr int kXRow = KSUB * kStageK + 8;  // halfs per smem x row (+16 B: no ldmatrix conflicts)
  static constexpr int kWBytes = WN * kSteps * 512;
  static constexpr int kSBytes = WN * KSUB * 4 * 256;  // up to 4 groups per 128 k (g >= 32)
  static constexpr int kXBytes = MT * 16 * kXRow * 2;
  static constexpr int kStage = kWBytes + kSBytes + kXBytes;
  static constexpr int kAccFloats = MT * 8 * 4;  // per lane
  static constexpr int kSlotFloats = WN * MT * 8 * 32 * 4;
  static constexpr int kRedBytes = (kWK - 1) * WN * MT * 8 * 32 * 4 * 4;
};

template <int MT, int WN, int KSUB, int STAGES, int NW>
constexpr int SmemBytes() {
  return STAGES * Geometry<MT, WN, KSUB, NW>::kStage + Geometry<MT, WN, KSUB, NW>::kRedBytes;
}

template <int MT, int WN, int KSUB, int STAGES, int NW>
__global__ void __launch_bounds__(NW * 32, 1) W4DecodeKernel(const DecodeArgs a) {
  using Geo = Geometry<MT, WN, KSUB, NW>;
  constexpr int NT = NW * 32;
  constexpr int WK = Geo::kWK;
  constexpr int SPW = Geo::kStepsPerWarp;
  extern __shared__ __align__(16) unsigned char smem[];
  float* red = reinterpret_cast<float*>(smem + STAGES * Geo::kStage);
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % WN, wk = warp / WN;
  const int gid = lane >> 2, tig = lane & 3;
  const int b = blockIdx.x, grid = gridDim.x, total = a.total_units;
  const int u0 = UnitBegin(b, total, grid), u1 = UnitBegin(b + 1, total, grid);
  const int nun = u1 - u0;
  const int nks = a.nks, ng = a.ngroups, gshift = a.gshift;
  const int nst = (nks + KSUB - 1) / KSUB;  // stages per tile group


  // Let the next kernel in the stream start its prologue (PDL); it waits
  // for this grid with griddepcontrol.wait before touching our outputs.
  asm volatile("griddepcontrol.launch_dependents;\n" ::);


  // Per-thread load plan, fixed for the whole kernel: which 16-byte chunks
  // of a stage this thread copies (codes, scale/zero words), so that a
  // stage costs a handful of integer ops per cp.async.
  constexpr int kWChunks = WN * KSUB * 256;  // code chunks per stage
  constexpr int kWPer = (kWChunks + NT - 1) / NT;
  constexpr int kSChunks = WN * KSUB * 64;   // scale/zero chunks per stage (<= NT)
  const uint4* qw4 = reinterpret_cast<const uint4*>(a.qw);
  const uint4* sz4 = reinterpret_cast<const uint4*>(a.sz);
  const int tile_stride = a.ksteps * 32;  // uint4 per tile (< 2^31: k < 2^24)
  int w_w[kWPer], w_sub[kWPer], w_off[kWPer];
#pragma unroll
  for (int j = 0; j < kWPer; ++j) {
    const int i = tid + j * NT;
    const int within = i % (KSUB * 256);
    w_w[j] = i < kWChunks ? i / (KSUB * 256) : WN;  // WN: no chunk
    w_sub[j] = within / 256;
    w_off[j] = within % 256;
  }

  auto group_first = [&](int st) { return min((st * KSUB * kStageK) >> gshift, ng - 1); };

  // Weights and scale/zero words of stage (tg, st): they depend on nothing
  // another kernel writes, so the first stages are issued before the grid
  // dependency wait.
  auto load_w = [&](int tg, int st, int slot) {
    unsigned char* sp = smem + slot * Geo::kStage;
    const int tile0 = tg * WN;
#pragma unroll
    for (int j = 0; j < kWPer; ++j) {
      if (w_w[j] < WN) {
        const int c = st * KSUB + w_sub[j];
        const bool ok = tile0 + w_w[j] < a.ntiles && c < nks;
        const uint4* src = qw4 + (static_cast<size_t>(tile0 + w_w[j]) * tile_stride + c * 256 + w_off[j]);
        // (Not the L2::cache_hint form: with it ptxas 13.0 gave this
        // LDGSTS an odd uniform register pair as its descriptor here, an
        // illegal instruction on the H200.)
        CpAsync16(sp + (tid + j * NT) * 16, ok ? src : qw4, ok);
      }
    }
    const int gA = group_first(st);
    const int ngs = min((st * KSUB * kStageK + KSUB * kStageK - 1) >> gshift, ng - 1) - gA + 1;
#pragma unroll
    for (int j = 0; j < (kSChunks + NT - 1) / NT; ++j) {
      const int i = tid + j * NT;
      const int s_w = i / (KSUB * 64), s_c = i % (KSUB * 64);
      if (i < kSChunks && s_c < ngs * 16) {
        const int tile = tile0 + s_w;
        const bool ok = tile < a.ntiles;
        const uint4* src = sz4 + (static_cast<size_t>(ok ? tile : 0) * ng + gA) * 16 + s_c;
        CpAsync16(sp + Geo::kWBytes + s_w * KSUB * 1024 + s_c * 16, src, ok);
      }
    }
  };
  // rows = MT * 16 on a slot's first use (rows >= m zero-filled, and never
  // written again), m afterwards.
  const int ldx = static_cast<int>(a.ldx);
  auto load_x = [&](int st, int slot, int rows) {
    unsigned char* xs = smem + slot * Geo::kStage + Geo::kWBytes + Geo::kSBytes;
    const int k0 = st * KSUB * kStageK;
    for (int i = tid; i < rows * KSUB * 16; i += NT) {
      const int row = i / (KSUB * 16), c = i % (KSUB * 16);
      const int kk = k0 + c * 8;
      const bool ok = kk < a.k && row < a.m;
      CpAsync16(xs + (row * Geo::kXRow + c * 8) * 2, a.x + (ok ? row * ldx + kk : 0), ok);
    }
  };

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.f;

  const __half2 k960 = __float2half2_rn(960.f);
  const __half2 k16th = __float2half2_rn(1.f / 16.f);

  // Per k16 step: one 16-byte code load, two 16-byte scale/zero loads and
  // MT ldmatrix; for MT <= 2 all of a warp's steps of the stage are loaded
  // first so that the dequantize + mma chains of different steps overlap.
  // Steps past k (padded tail of the last stage) hold zero codes and zero x:
  // they add 0, no branch needed.
  constexpr int kPre = MT <= 2 ? SPW : 1;
  auto compute = [&](int stg, int slot) {
    const unsigned char* sp = smem + slot * Geo::kStage;
    const int gA = group_first(stg);
    const unsigned char* xs = sp + Geo::kWBytes + Geo::kSBytes;
    // A warp's SPW steps lie in one group when the group is >= 16 * SPW
    // wide (g128 and per-channel): then the scale/zero half2s are expanded
    // once per stage.
    const bool one_group = (16 * SPW) <= (1 << min(gshift, 20));
    __half2 s2c[8], zzc[8], zhc[8];
    auto expand = [&](int sg) {
      const int gl = min((sg * 16) >> gshift, ng - 1) - gA;
      const uint4* scp = reinterpret_cast<const uint4*>(sp + Geo::kWBytes + wn * KSUB * 1024 +
                                                        gl * 256 + gid * 32);
      const uint4 q0 = scp[0], q1 = scp[1];
      const uint32_t scv[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const __half2 sz2 = AsH2(scv[j]);
        s2c[j] = __low2half2(sz2);
        zzc[j] = __high2half2(sz2);
        zhc[j] = __hneg2(__hsub2(zzc[j], k960));
      }
    };
    if (one_group) expand(stg * Geo::kSteps + wk * SPW);
#pragma unroll
    for (int i0 = 0; i0 < SPW; i0 += kPre) {
      uint4 wq[kPre];
      uint32_t af[kPre][MT][4];
#pragma unroll
      for (int i = 0; i < kPre; ++i) {
        const int s = wk * SPW + i0 + i;
        wq[i] = *reinterpret_cast<const uint4*>(sp + ((wn * Geo::kSteps + s) * 32 + lane) * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          LdMatrixX4(af[i][mt],
                     xs + ((mt * 16 + (lane & 15)) * Geo::kXRow + s * 16 + (lane >> 4) * 8) * 2);
        }
      }
#pragma unroll
      for (int i = 0; i < kPre; ++i) {
        if (!one_group) expand(stg * Geo::kSteps + wk * SPW + i0 + i);
        const uint32_t wv[4] = {wq[i].x, wq[i].y, wq[i].z, wq[i].w};
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          uint32_t w = wv[p];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int j = 2 * p + h;
            const uint32_t lo = AndOr<0x000f000fu, 0x64006400u>(w);
            const uint32_t hi = AndOr<0x00f000f0u, 0x64006400u>(w);
            const __half2 b0 = __hmul2(__hsub2(AsH2(lo), zzc[j]), s2c[j]);
            const __half2 b1 = __hmul2(__hfma2(AsH2(hi), k16th, zhc[j]), s2c[j]);
            w >>= 8;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) Mma(acc[mt][j], af[i][mt], AsU32(b0), AsU32(b1));
          }
        }
      }
    }
  };

  // Stores acc (the complete sum of a tile group's columns) to y.
  auto store = [&](int tg) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = mt * 16 + gid + 8 * hh;
        if (row >= a.m) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int col0 = tg * Geo::kNB + wn * 64 + j * 8 + 2 * tig;
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int col = col0 + c;
            if (col >= a.n) continue;
            float v = acc[mt][j][2 * hh + c];
            if (a.bias != nullptr) v += a.bias[col];
            const long long idx = row * a.ldy + col;
            if (a.y32 != nullptr) {
              a.y32[idx] = a.accumulate ? a.y32[idx] + v : v;
            } else {
              __half* y = reinterpret_cast<__half*>(a.y16);
              y[idx] = __float2half_rn(a.accumulate ? __half2float(y[idx]) + v : v);
            }
          }
        }
      }
    }
  };

  auto end_segment = [&](int tg, int ka, int kb) {
    // 1. Reduce the WK warps of each column group into the wk == 0 warp.
    if constexpr (WK > 1) {
      if (wk > 0) {
        float4* dst = reinterpret_cast<float4*>(red) + ((wk - 1) * WN + wn) * MT * 8 * 32 + lane;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < 8; ++j)
            dst[(mt * 8 + j) * 32] =
                make_float4(acc[mt][j][0], acc[mt][j][1], acc[mt][j][2], acc[mt][j][3]);
      }
      __syncthreads();
      if (wk == 0) {
#pragma unroll
        for (int w = 1; w < WK; ++w) {
          const float4* srcp = reinterpret_cast<const float4*>(red) + ((w - 1) * WN + wn) * MT * 8 * 32 + lane;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const float4 v = srcp[(mt * 8 + j) * 32];
              acc[mt][j][0] += v.x;
              acc[mt][j][1] += v.y;
              acc[mt][j][2] += v.z;
              acc[mt][j][3] += v.w;
            }
        }
      }
    }
    const int tile = tg * WN + wn;
    // 2. The EC term, once per tile: B (g ⊙ u) as extra mma k-steps.
    // (the tile layout's fragments as the B operand, ec_tile.cuh; v the A one)
    if (wk == 0 && ka == 0 && a.ec.rec != nullptr && tile < a.ntiles) {
      asm volatile("griddepcontrol.wait;\n" ::: "memory");
      const EcTileSeg es = EcSegOf(a.ec, tile);
#pragma unroll 1
      for (int h = 0; h < EcPairs(es); ++h) {  // k16 steps: k8 steps 2 h, 2 h + 1
        uint32_t b0[8], b1[8];
        int q0, q1;
        const bool on0 = EcLoadFrags(a.ec, es, tile, 2 * h, lane, b0, &q0);
        const bool on1 = EcLoadFrags(a.ec, es, tile, 2 * h + 1, lane, b1, &q1);
        uint32_t av[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint16_t* v0 = a.v + (mt * 16 + gid) * a.ldv;
          av[mt][0] = on0 ? *reinterpret_cast<const uint32_t*>(v0 + q0) : 0u;
          av[mt][1] = on0 ? *reinterpret_cast<const uint32_t*>(v0 + 8 * a.ldv + q0) : 0u;
          av[mt][2] = on1 ? *reinterpret_cast<const uint32_t*>(v0 + q1) : 0u;
          av[mt][3] = on1 ? *reinterpret_cast<const uint32_t*>(v0 + 8 * a.ldv + q1) : 0u;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) Mma(acc[mt][j], av[mt], b0[j], b1[j]);
      }
    }
    // 3. Store, or hand the partial to the tile's last block.
    if (ka == 0 && kb == nst) {
      if (wk == 0) store(tg);
    } else {
      const int slot = (tg == u0 / nst) ? 0 : 1;
      if (wk == 0) {
        float4* dst = reinterpret_cast<float4*>(a.partials) +
                      (static_cast<size_t>(b) * 2 + slot) * (Geo::kSlotFloats / 4) +
                      wn * MT * 8 * 32 + lane;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < 8; ++j)
            __stcg(dst + (mt * 8 + j) * 32,
                   make_float4(acc[mt][j][0], acc[mt][j][1], acc[mt][j][2], acc[mt][j][3]));
      }
      // One fence by one thread after the barrier (the cooperative-groups
      // grid-sync pattern), then the ticket; the last block fences once more
      // before all its threads read the partials.
      __syncthreads();
      const int bf = UnitBlock(tg * nst, total, grid);
      const int bl = UnitBlock(tg * nst + nst - 1, total, grid);
      if (tid == 0) {
        __threadfence();
        const int old = atomicAdd(a.counters + tg, 1);
        s_last = (old == bl - bf);
        if (s_last) __threadfence();
      }
      __syncthreads();
      if (s_last) {
        if (wk == 0) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
              for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.f;
          // FB contributors' loads in flight at once; summed in block order.
          constexpr int FB = 1;
#pragma unroll 1
          for (int cb0 = bf; cb0 <= bl; cb0 += FB) {
            float4 v[FB][MT * 8];
#pragma unroll
            for (int f = 0; f < FB; ++f) {
              const int cb = cb0 + f;
              if (cb > bl) break;
              const int cslot = (tg == UnitBegin(cb, total, grid) / nst) ? 0 : 1;
              const float4* srcp = reinterpret_cast<const float4*>(a.partials) +
                                   (static_cast<size_t>(cb) * 2 + cslot) * (Geo::kSlotFloats / 4) +
                                   wn * MT * 8 * 32 + lane;
#pragma unroll
              for (int q = 0; q < MT * 8; ++q) v[f][q] = __ldcg(srcp + q * 32);
            }
#pragma unroll
            for (int f = 0; f < FB; ++f) {
              if (cb0 + f > bl) break;
#pragma unroll
              for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                  const float4 t = v[f][mt * 8 + j];
                  acc[mt][j][0] += t.x;
                  acc[mt][j][1] += t.y;
                  acc[mt][j][2] += t.z;
                  acc[mt][j][3] += t.w;
                }
            }
          }
          store(tg);
        }
        if (tid == 0) a.counters[tg] = 0;
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.f;
  };

  // The pipeline. (ltg, lst): the next stage to load; (ctg, cst): the
  // stage being computed.
  int ltg = u0 / nst, lst = u0 - ltg * nst;
  int ctg = ltg, cst = lst;
  const int pro = nun < STAGES - 1 ? nun : STAGES - 1;
  {
    int tg = ltg, st = lst;
    for (int s = 0; s < pro; ++s) {
      load_w(tg, st, s);
      if (++st == nst) { st = 0; ++tg; }
    }
  }
  // Everything below may read what the previous kernel wrote. Without an
  // EC prologue that is x (and the partials/counters of the previous GEMM
  // on this workspace): wait here. With one (a.ec_late), the prologue was
  // launched normally, so it started only after everything before it had
  // completed: x is ready; only v (written by the prologue) needs the wait,
  // just before the EC term. The prologue thus runs under our main loop.
  if (!a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < pro) {
      load_x(lst, s, MT * 16);
      if (++lst == nst) { lst = 0; ++ltg; }
    }
    CpAsyncCommit();
  }
  int seg_start = cst;
#pragma unroll 1
  for (int it = 0; it < nun; ++it) {
    CpAsyncWait<STAGES - 2>();
    __syncthreads();
    const int nx = it + STAGES - 1;
    if (nx < nun) {
      if (a.debug != 2) load_w(ltg, lst, nx % STAGES);
      load_x(lst, nx % STAGES, nx < STAGES ? MT * 16 : a.m);
      if (++lst == nst) { lst = 0; ++ltg; }
    }
    CpAsyncCommit();
    if (a.debug != 1) compute(cst, it % STAGES);
    if (cst == nst - 1 || it == nun - 1) {
      end_segment(ctg, seg_start, cst + 1);
      seg_start = 0;
    }
    if (++cst == nst) { cst = 0; ++ctg; }
  }
  CpAsyncWait<0>();
}

// Launched with programmatic stream serialization (PDL): the kernel may
// start while the previous one in the stream finishes; it prefetches its
// first weight stages, then waits (griddepcontrol.wait) before reading x,
// v, the partials or the counters.
template <int MT, int WN, int KSUB, int STAGES, int NW>
absl::Status Launch(DecodeArgs a, int num_sms, cudaStream_t stream) {
  constexpr int kSmem = SmemBytes<MT, WN, KSUB, STAGES, NW>();
  static_assert(kSmem <= 227 * 1024, "shared memory");
  auto* kernel = W4DecodeKernel<MT, WN, KSUB, STAGES, NW>;
  SPEAR_CUDA_RETURN_IF_ERROR(ConfigureOnce(reinterpret_cast<const void*>(kernel), [&] {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }));
  const int ntg = (a.ntiles + WN - 1) / WN;
  a.total_units = ntg * ((a.nks + KSUB - 1) / KSUB);
  const int grid = a.total_units < num_sms ? a.total_units : num_sms;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(NW * 32);
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&cfg, kernel, a));
  return absl::OkStatus();
}

}  // namespace decode
}  // namespace spear::kernels::cuda
