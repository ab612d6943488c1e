// The EC term B (g ⊙ u) of one 64-column tile in the decode kernels' epilogues,
// from the device copy of B in the tile layout (kernels/ec_tile_layout.h;
// EcTileArgs in w4_layout.h): per tile a range of rank pairs, in record steps
// of 4 pairs (8 ranks). Lane (gid = lane / 4, tig = lane % 4) of step e holds
// rank pair pi = 4 e + tig; its record gives the fragment words af[2 p] =
// (column 16 p + gid, ranks q, q + 1) and af[2 p + 1] = (column 16 p + 8 +
// gid, ranks q, q + 1), q = q0 + 2 pi: the A operand of the swapped-operand
// kernels (the columns as m16 rows) and the B operand of the tokens-as-m16
// kernel (subtile j: af[j]). Steps 2 h and 2 h + 1 make one mma.sync
// m16n8k16 step (k 0..7 and 8..15). int8 records become fp16(code x scale)
// here, the value an fp16 copy of the decoded B would hold.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {

struct EcTileSeg {
  int q0, npairs;
  long long base;  // the tile's first record
};

__device__ __forceinline__ EcTileSeg EcSegOf(const EcTileArgs& e, int tile) {
  int s = 0;
#pragma unroll
  for (int i = 1; i < kEcMaxSegs; ++i) {
    if (i < e.nseg && tile >= e.tile0[i]) s = i;
  }
  return {e.q0[s], e.npairs[s],
          e.rec0[s] + static_cast<long long>(tile - e.tile0[s]) * e.npairs[s] * 8};
}
__device__ __forceinline__ int EcSteps(const EcTileSeg& s) { return (s.npairs + 3) >> 2; }

// Bytes of one record (int8 16, fp16 32) as 16-byte units.
__device__ __forceinline__ int EcRecUnits(const EcTileArgs& e) { return e.scales ? 1 : 2; }

// The record lane `lane` reads at step `step` of the tile (16-byte units
// into e.rec), or -1 where its rank pair is past the tile's range.
__device__ __forceinline__ long long EcRecIndex(const EcTileArgs& e, const EcTileSeg& s, int step,
                                                int lane) {
  const int pi = 4 * step + (lane & 3);
  if (pi >= s.npairs) return -1;
  return (s.base + static_cast<long long>(pi) * 8 + (lane >> 2)) * EcRecUnits(e);
}

// The first rank of the lane's pair at `step`.
__device__ __forceinline__ int EcRank(const EcTileSeg& s, int step, int lane) {
  return s.q0 + 2 * (4 * step + (lane & 3));
}

// Four int8 codes (one word) -> the codes as fp16 integers (exact) in two
// half2: *lo of bytes 0, 1, *hi of bytes 2, 3 (code + 128 per byte as the
// low mantissa bits of 1024 = 0x6400, minus 1152).
__device__ __forceinline__ void I8x4ToHalf2Int(uint32_t w, uint32_t* lo, uint32_t* hi) {
  const uint32_t x = w ^ 0x80808080u;
  const uint32_t bias = 0x64806480u;  // half2 {1152, 1152}: 1024 + 128
  uint32_t l = __byte_perm(x, 0x64646464u, 0x4140);
  uint32_t h = __byte_perm(x, 0x64646464u, 0x4342);
  __half2 hl = __hsub2(*reinterpret_cast<__half2*>(&l), *reinterpret_cast<const __half2*>(&bias));
  __half2 hh = __hsub2(*reinterpret_cast<__half2*>(&h), *reinterpret_cast<const __half2*>(&bias));
  *lo = *reinterpret_cast<uint32_t*>(&hl);
  *hi = *reinterpret_cast<uint32_t*>(&hh);
}
// The same -> fp16(code x scale), times the scale pair s2 (exact but for the
// product's one rounding).
__device__ __forceinline__ void I8x4ToHalf2(uint32_t w, __half2 s2, uint32_t* lo, uint32_t* hi) {
  I8x4ToHalf2Int(w, lo, hi);
  __half2 hl = __hmul2(*reinterpret_cast<__half2*>(lo), s2);
  __half2 hh = __hmul2(*reinterpret_cast<__half2*>(hi), s2);
  *lo = *reinterpret_cast<uint32_t*>(&hl);
  *hi = *reinterpret_cast<uint32_t*>(&hh);
}

// The fragment words from a record (r1 unused for int8); tile and q give the
// int8 scales.
__device__ __forceinline__ void EcFrags(const EcTileArgs& e, int tile, int q, const uint4& r0,
                                        const uint4& r1, uint32_t (&af)[8]) {
  if (e.scales != nullptr) {
    const __half2 s2 =
        *reinterpret_cast<const __half2*>(e.scales + static_cast<long long>(tile) * e.rs + q);
    const uint32_t w[4] = {r0.x, r0.y, r0.z, r0.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) I8x4ToHalf2(w[p], s2, &af[2 * p], &af[2 * p + 1]);
  } else {
    af[0] = r0.x, af[1] = r0.y, af[2] = r0.z, af[3] = r0.w;
    af[4] = r1.x, af[5] = r1.y, af[6] = r1.z, af[7] = r1.w;
  }
}

// The lane's fragment words of `step` straight from global memory (zeros
// past the range); returns its first rank (meaningful where active).
__device__ __forceinline__ bool EcLoadFrags(const EcTileArgs& e, const EcTileSeg& s, int tile,
                                            int step, int lane, uint32_t (&af)[8], int* q) {
  const long long ri = EcRecIndex(e, s, step, lane);
  *q = EcRank(s, step, lane);
  if (ri < 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) af[i] = 0u;
    return false;
  }
  const uint4* rp = reinterpret_cast<const uint4*>(e.rec) + ri;
  const uint4 r0 = rp[0];
  const uint4 r1 = e.scales ? r0 : rp[1];
  EcFrags(e, tile, *q, r0, r1, af);
  return true;
}

// B[col][q] as the epilogues multiply by it (0 outside the stored ranges):
// one element, for the unpacking and naive kernels.
__device__ __forceinline__ float EcBValue(const EcTileArgs& e, int col, int q) {
  const int tile = col >> 6, c = col & 63;
  const EcTileSeg s = EcSegOf(e, tile);
  const int pi = (q - s.q0) >> 1;
  if (q < s.q0 || pi >= s.npairs) return 0.f;
  const int p = c >> 4, hi = (c >> 3) & 1, gid = c & 7, h = (q - s.q0) & 1;
  const long long rec = s.base + static_cast<long long>(pi) * 8 + gid;
  if (e.scales != nullptr) {
    const uint32_t w = e.rec[rec * 4 + p];
    const int code = static_cast<int8_t>((w >> (8 * (2 * hi + h))) & 0xffu);
    return static_cast<float>(code) *
           __half2float(reinterpret_cast<const __half*>(e.scales)[static_cast<long long>(tile) * e.rs + q]);
  }
  const uint32_t w = e.rec[rec * 8 + 2 * p + hi];
  const unsigned short bits = static_cast<unsigned short>(w >> (16 * h));
  return __half2float(__ushort_as_half(bits));
}

// k8 steps are taken two at a time, as one m16n8k16 step: step 2 h's
// ranks are the k16 fragments' k 0..7, step 2 h + 1's k 8..15 (zeros past
// the tile's steps). EcPairs: the tile's k16 steps.
__device__ __forceinline__ int EcPairs(const EcTileSeg& s) { return (EcSteps(s) + 1) >> 1; }

// The swapped-operand kernels' k16 step (columns as m16 rows, tokens as
// n8): acc[nt][p] += B[16 p .. 16 p + 15][ranks of f0, f1] v[8 nt + gid][..].
template <int NT>
__device__ __forceinline__ void EcMmaSwapped(const DecodeArgs& a, bool on0, int q0, bool on1,
                                             int q1, int gid, const uint32_t (&f0)[8],
                                             const uint32_t (&f1)[8], float (&acc)[NT][4][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int row = nt * 8 + gid;
    const uint16_t* vr = a.v + static_cast<long long>(row) * a.ldv;
    const uint32_t vb0 = on0 && row < a.m ? *reinterpret_cast<const uint32_t*>(vr + q0) : 0u;
    const uint32_t vb1 = on1 && row < a.m ? *reinterpret_cast<const uint32_t*>(vr + q1) : 0u;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      Mma(acc[nt][p], f0[2 * p], f0[2 * p + 1], f1[2 * p], f1[2 * p + 1], vb0, vb1);
    }
  }
}

// The whole EC term of a tile in those kernels, its k16 steps spread over
// the warps w0, w0 + wstride, ... (records read from global memory).
template <int NT>
__device__ __forceinline__ void EcTerm(const DecodeArgs& a, int tile, int w0, int wstride,
                                       int lane, float (&acc)[NT][4][4]) {
  const EcTileSeg s = EcSegOf(a.ec, tile);
#pragma unroll 1
  for (int h = w0; h < EcPairs(s); h += wstride) {
    uint32_t f0[8], f1[8];
    int q0, q1;
    const bool on0 = EcLoadFrags(a.ec, s, tile, 2 * h, lane, f0, &q0);
    const bool on1 = EcLoadFrags(a.ec, s, tile, 2 * h + 1, lane, f1, &q1);
    EcMmaSwapped<NT>(a, on0, q0, on1, q1, lane >> 2, f0, f1, acc);
  }
}

}  // namespace spear::kernels::cuda
