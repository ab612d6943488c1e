// The M <= 32 W4A16 decode kernel (v9, "fold"; M 9..16 since v17, as two n8
// token tiles that share each dequantized weight fragment; M 17..32 since
// v43, as four, one block of 8 warps per SM): the
// swapped-operand mma of w4_gemv_swap.cu (weights = the m16 A operand,
// tokens = n8) with the
// per-k16-step instruction count cut from ~79 to ~33 (docs/results/gpu.md,
// "Optimization log": v8 was limited by instruction issue, not bytes):
//
//  1. No zero subtraction per weight. A fragment register is LOP3 alone:
//     a0/a1 = {1024 + q} (k % 16 < 8), a2/a3 = {64 + q} (k % 16 >= 8), so
//     the mma over one chunk (CH k16 steps, inside one scale group) gives
//       D = sum q x + 1024 X_lo + 64 X_hi,
//     X_lo / X_hi the sums of the chunk's x over k % 16 < 8 / >= 8. One more
//     mma per step with a constant A (rows 0-7 all ones, rows 8-15 ones on
//     k % 16 >= 8) gives every lane X = X_lo + X_hi and X_hi of its two
//     tokens, and the chunk is folded in fp32 once:
//       y += s * (D - (1024 + z) X + 960 X_hi)     (= s * sum (q - z) x).
//     {1024 + z} is the stored half of the scale/zero word: exact. fp32
//     keeps the cancellation harmless (D ~ 1e4 |x|, ~2^-23 relative).
//  2. x is staged once per warp (its whole k range, the m real rows only)
//     into shared memory; the B fragments of two k16 steps come from one
//     ldmatrix.x4, the rows >= m aliasing row m - 1 (those tokens' outputs
//     are never stored). No zero-filled x rows, no per-unit x copies.
//  3. The weights (+ the chunk's scale/zero words) stream through a per-warp
//     cp.async ring of D chunks (D - 1 in flight); one LDS.128 per step.
//     (A variant that filled the ring with cp.async.bulk + one mbarrier per
//     slot, decode_kernel 6, measured no faster on the H200 and raced: its
//     barriers lay under the reduction buffers. Removed; docs/results/gpu.md,
//     "Final GPU verification", calls 5-6.)
//
// Block = one 64-column tile x one k split (NW = 4 or 8 warps splitting the
// split's chunks; v40: or G groups of NW / G warps, each group on its own
// tile, the default at 9..16 rows with G = NW: one warp per tile, see
// ChooseGrouped); the S splits of a tile form a cluster and reduce through
// distributed shared memory in fixed order (deterministic), as in
// w4_gemv_swap.cu, whose EC epilogue (B (g ⊙ u) as rp / 16 more mma steps
// by split 0) and PDL habits this kernel keeps. NW, S and the ring depth
// come from a cost model (ChooseFold; numbers in docs/results/gpu.md).
// v12: when the tiles need more than one wave of blocks (8B gate_up at
// m = 1: 448 tiles, 264 block slots) one wave of blocks loops over the
// tiles (tile0, tile0 + gridDim.x, ...) and each warp's ring runs on from
// one tile into the next (-1.1 us on gate_up); an L2 prefetch of a warp's
// whole weight range before griddepcontrol.wait was measured slower (+2.4
// us on gate_up) and is off unless a testing flag asks for it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/decode_store.cuh"
#include "kernels/cuda/ec_tile.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/norm_rows.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/swiglu_rows.cuh"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {
namespace foldk {

// Reduction buffers (over the drained ring): NW + 1 fragment sets per n8
// token tile (nt = 1: m <= 8, 2: m <= 16, 4: m <= 32).
constexpr int RedBytes(int nw, int nt) { return (nw + 1) * nt * 16 * 32 * 4; }

struct Geom {
  int depth;   // ring chunks per warp (2..4)
  int stage;   // bytes per ring chunk: CH * 512 codes + 256 scale/zero
  int xrow;    // bytes per staged x row (a warp's k range + 16 pad)
  int warp_bytes;
  int pf_tiles;  // blocks of tiles < pf_tiles prefetch their weights into L2 (v12)
  int red_off;   // reduction buffers: 0 = over the drained ring; after the
                 // warps' rings for the persistent loop (v12), whose ring runs
                 // on into the next tile
  int ecb_off;   // v14: > 0: the EC's B records of a tile are fetched with
                 // the tile's first ring chunk into shared memory at ecb_off
                 // (two buffers of max_steps x 1 KB, by tile parity: 32 bytes
                 // per lane and k8 step), so the epilogue reads them from
                 // shared memory, not DRAM
  int groups;    // v40: the block's warps form `groups` groups of NW / groups
                 // warps, each group on its own tile (1: all warps on one tile)
  int x_off;     // v40 (groups > 1): the x slices, shared by the groups, at
                 // x_off (slice i = the k range of a group's warp i); 0: each
                 // warp's own slice after its ring (groups == 1)
  int red_gstride;  // v40: bytes between two groups' reduction buffers (at
                    // red_off + g red_gstride; over the group's own drained
                    // rings when a block runs one iteration)
};

// 16 bytes into shared memory at a shared-window address.
__device__ __forceinline__ void StShared16(unsigned dst, const uint4& v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void CpAsync16(unsigned dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void WaitGroups(int allowed) {
  // allowed = depth - 2 in 0..2 (immediate operand)
  if (allowed <= 0) {
    asm volatile("cp.async.wait_group 0;\n" ::);
  } else if (allowed == 1) {
    asm volatile("cp.async.wait_group 1;\n" ::);
  } else {
    asm volatile("cp.async.wait_group 2;\n" ::);
  }
}
// DRAM -> L2 only (no shared memory, no registers, no completion to wait
// for): the bulk-copy engine's prefetch; bytes a multiple of 16.
__device__ __forceinline__ void PrefetchL2(const void* p, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}
// bar.sync of `n` threads on barrier `id` in 1..8 (immediate ids: a register
// id would make ptxas reserve all 16 barriers of the block).
__device__ __forceinline__ void NamedSync(int id, int n) {
  switch (id) {
    case 1: asm volatile("bar.sync 1, %0;\n" ::"r"(n) : "memory"); break;
    case 2: asm volatile("bar.sync 2, %0;\n" ::"r"(n) : "memory"); break;
    case 3: asm volatile("bar.sync 3, %0;\n" ::"r"(n) : "memory"); break;
    case 4: asm volatile("bar.sync 4, %0;\n" ::"r"(n) : "memory"); break;
    case 5: asm volatile("bar.sync 5, %0;\n" ::"r"(n) : "memory"); break;
    case 6: asm volatile("bar.sync 6, %0;\n" ::"r"(n) : "memory"); break;
    case 7: asm volatile("bar.sync 7, %0;\n" ::"r"(n) : "memory"); break;
    default: asm volatile("bar.sync 8, %0;\n" ::"r"(n) : "memory"); break;
  }
}
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// CH: k16 steps per chunk = per fold (min(8, group / 16)); ONE: m == 1 (the
// fold skips the second token of each accumulator pair); NT: n8 token tiles
// (1: m <= 8; 2: m <= 16, v17: each dequantized weight fragment feeds two
// mma, tokens 0-7 and 8-15; 4: m <= 32, v43: four mma per fragment, the
// chunk's partials d and the sums acc 64 registers each, so the launch
// bounds let a thread hold up to 255 registers: one 8-warp block per SM).
// GRP (v40): the warps in geo.groups groups (the instantiations without it
// keep the one-group code's constants: a runtime group count cost 5 us on
// 8B gate_up at m = 16).
template <int NW, int CH, bool ONE, int NT, bool GRP>
__global__ void __launch_bounds__(NW * 32, NT == 4 ? (NW == 8 ? 1 : 2) : (NW == 8 ? 2 : 4))
    W4FoldKernel(const DecodeArgs a, const Geom geo) {
  static_assert(NT == 1 || NT == 2 || NT == 4, "NT: one, two or four n8 token tiles");
  static_assert(!ONE || NT == 1, "ONE: m == 1");
  constexpr int kNW = NW;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2;
  // v12: a block may loop over tiles tile0, tile0 + gridDim.x, ... (the
  // persistent launch of a GEMM wider than one wave); the ring then runs on
  // across tiles: the last chunks of one tile prefetch the next one's first.
  // v40: with geo.groups = G > 1 the warps form G groups of NWG = NW / G;
  // group g takes the block's tiles g, G + g, 2 G + g, ... (of tile0,
  // tile0 + gridDim.x, ...), its warps splitting each tile's chunks, so a
  // tile's cross-warp reduction spans NWG warps (none when NWG = 1) and the
  // block's barriers come once per G tiles.
  const int G = GRP ? geo.groups : 1;
  const int NWG = GRP ? kNW / G : kNW;
  const int g = GRP ? warp / NWG : 0;
  const int wi = GRP ? warp - g * NWG : warp;
  const int tile0 = blockIdx.x, tstride = gridDim.x, q = blockIdx.y, S = gridDim.y;
  const int ntile_it = ((a.ntiles - tile0 + tstride - 1) / tstride + G - 1) / G;  // iterations
  const int nch = a.ksteps / CH;
  const int W = S * NWG, gw = q * NWG + wi;
  const int cb = static_cast<int>(static_cast<long long>(nch) * gw / W);
  const int ce = static_cast<int>(static_cast<long long>(nch) * (gw + 1) / W);
  const int nc = ce - cb;  // chunks of this warp per tile
  const int D = geo.depth;

  asm volatile("griddepcontrol.launch_dependents;\n" ::);

  unsigned char* wbase = smem + warp * geo.warp_bytes;
  const unsigned ring_s = static_cast<unsigned>(__cvta_generic_to_shared(wbase));
  const unsigned x_s =
      !GRP ? ring_s + D * geo.stage
                     : static_cast<unsigned>(__cvta_generic_to_shared(smem)) + geo.x_off +
                           static_cast<unsigned>(wi * a.m * geo.xrow);
  const uint4* qw4 = reinterpret_cast<const uint4*>(a.qw);
  const uint4* sz4a = reinterpret_cast<const uint4*>(a.sz);
  const int ng1 = a.ngroups - 1, gshift = a.gshift;

  // v14: B fragments of the EC through shared memory (split 0 only, and only
  // for warps that stream chunks: the prefetch rides on a tile's first one).
  const bool ecb_pf = geo.ecb_off > 0 && G == 1 && a.ec.rec != nullptr && q == 0 && nc > 0;
  const unsigned ecb_s =
      static_cast<unsigned>(__cvta_generic_to_shared(smem)) + static_cast<unsigned>(geo.ecb_off);

  // Chunk j of the warp's stream = chunk cb + j % nc of its (j / nc)-th tile.
  auto issue_w = [&](int j, int slot) {
    if (nc <= 0) return;
    const int it = j / nc;
    const int t = tile0 + (it * G + g) * tstride;
    if (t >= a.ntiles) return;
    const int c = cb + (j - it * nc);
    const uint4* wt = qw4 + (static_cast<size_t>(t) * a.ksteps + static_cast<size_t>(c) * CH) * 32;
    const int grp = min((c * CH * 16) >> gshift, ng1);
    const uint4* zt = sz4a + (static_cast<size_t>(t) * a.ngroups + grp) * 16;
    const unsigned st = ring_s + slot * geo.stage;
#pragma unroll
    for (int i = 0; i < CH; ++i) CpAsync16(st + i * 512 + lane * 16, wt + i * 32 + lane, true);
    if (lane < 16) CpAsync16(st + CH * 512 + lane * 16, zt + lane, true);
    // v14: with the tile's first chunk, the B records of the EC steps this
    // warp adds in the tile's epilogue (the k8 steps 2 h, 2 h + 1 of its k16
    // steps h = warp, warp + NW, ...; each lane its own record, read back by
    // the same lane).
    if (ecb_pf && j == it * nc) {
      const unsigned eb = ecb_s + (it & 1) * a.ec.max_steps * 1024;
      const EcTileSeg es = EcSegOf(a.ec, t);
      for (int e = 2 * warp; e < EcSteps(es); e += 2 * kNW) {  // k8 steps e, e + 1
        for (int ee = e; ee < min(e + 2, EcSteps(es)); ++ee) {
          const long long ri = EcRecIndex(a.ec, es, ee, lane);
          if (ri >= 0) {
            const uint4* bp = reinterpret_cast<const uint4*>(a.ec.rec) + ri;
            CpAsync16(eb + (ee * 32 + lane) * 32, bp, true);
            if (a.ec.scales == nullptr) CpAsync16(eb + (ee * 32 + lane) * 32 + 16, bp + 1, true);
          }
        }
      }
    }
  };

  // Prologue: the first D - 1 chunks' weights (one group each) before the
  // grid dependency wait, then the warp's x rows (one more group).
  for (int d = 0; d < D - 1; ++d) {
    issue_w(d, d);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  // v12: the rest of the warp's weight range (and its scale/zero words)
  // into L2 before the dependency wait, so that a launch's first wave
  // streams its weights while the previous kernel drains (the weights do
  // not depend on it; only x does). Blocks of later waves skip it by
  // default (pf_tiles): for them the ring's own loads are not late.
  if (tile0 + g * tstride < min(geo.pf_tiles, a.ntiles)) {
    const int ft = tile0 + g * tstride;  // the group's first tile
    const uint4* w0 = qw4 + static_cast<size_t>(ft) * a.ksteps * 32;
    const uint4* z0 = sz4a + static_cast<size_t>(ft) * a.ngroups * 16;
    for (int c = cb + D - 1 + lane; c < ce; c += 32) {
      PrefetchL2(w0 + static_cast<size_t>(c) * (CH * 32), CH * 512);
      if (gshift < 30) PrefetchL2(z0 + min((c * CH * 16) >> gshift, ng1) * 16, 256);
    }
  }
  // v49: the norm's weights of this warp's x slice (up to 4 pieces of 8 a
  // lane) loaded before the wait: they do not depend on the kernels before.
  constexpr int kWPre = 4;
  float4 wpre[kWPre][2];
  const int nppr = a.norm.h != nullptr ? (ce - cb) * CH * 2 : 0;  // 16-byte pieces of x
  const int nk0 = cb * CH * 16;
  if (a.norm.h != nullptr && g == 0) {
#pragma unroll
    for (int t = 0; t < kWPre; ++t) {
      const int kk = nk0 + (lane + 32 * t) * 8;
      if (lane + 32 * t < nppr && kk < a.k) {
        wpre[t][0] = *reinterpret_cast<const float4*>(a.norm.w + kk);
        wpre[t][1] = *reinterpret_cast<const float4*>(a.norm.w + kk + 4);
      }
    }
  }
  if (!a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
  if (a.norm.h != nullptr) {
    // v49 (m = 1): x = RMSNorm(h) here, not in a launch of its own: the
    // block sums the row's squares in RmsNormF16's order (norm_rows.cuh;
    // the scratch is warp 0's last ring slot, which no copy fills before
    // the main loop), then each warp normalizes its own slice (zeros past
    // k, as the copies' zero fill). (groups > 1: group 0 holds the row.)
    const float inv = nrm::BlockInvRms<NW * 32, 4>(
        a.norm.h, a.k, a.norm.eps, reinterpret_cast<float*>(smem + (D - 1) * geo.stage));
    if (g == 0) {
      auto put = [&](int i, const uint4& v) { StShared16(x_s + i * 16, v); };
#pragma unroll
      for (int t = 0; t < kWPre; ++t) {
        const int i = lane + 32 * t, kk = nk0 + i * 8;
        if (i < nppr) {
          put(i, kk < a.k ? nrm::Norm8W(a.norm.h, wpre[t][0], wpre[t][1], kk, inv)
                          : make_uint4(0, 0, 0, 0));
        }
      }
      for (int i = lane + 32 * kWPre; i < nppr; i += 32) {  // (slices over 4 pieces a lane)
        const int kk = nk0 + i * 8;
        put(i, kk < a.k ? nrm::Norm8(a.norm.h, a.norm.w, kk, inv) : make_uint4(0, 0, 0, 0));
      }
    }
    if (G > 1) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  } else if (a.swiglu.gu != nullptr) {
    // v51 (m = 1): x = SiluMul of the gate_up row, each warp its own slice
    // (SiluMul's arithmetic: swiglu_rows.cuh; zeros past k, as the copies'
    // zero fill). (groups > 1: group 0 holds the row.)
    if (g == 0) {
      const int np = (ce - cb) * CH * 2;  // 16-byte pieces of the slice
      const int k0 = cb * CH * 16;
      for (int i = lane; i < np; i += 32) {
        const int kk = k0 + i * 8;
        const uint4 v = kk < a.k ? swg::Swiglu8(a.swiglu.gu, a.k, kk) : make_uint4(0, 0, 0, 0);
        StShared16(x_s + i * 16, v);
      }
    }
    if (G > 1) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  } else {
    // k % 8 == 0 or x was padded with zeros into the workspace, so an 8-wide
    // piece is all inside k or all outside (zero-filled: the codes' 1024 / 64
    // offsets and the X sums must meet exact zeros there).
    // (groups > 1: the slice is shared; group g copies its rows g, g + G, ...)
    const int ppr = (ce - cb) * CH * 2;  // 16-byte pieces per row
    const int k0 = cb * CH * 16;
    const int rows = (a.m - g + G - 1) / G;
    for (int i = lane; i < rows * ppr; i += 32) {
      const int r = g + (i / ppr) * G, c = i - (i / ppr) * ppr;
      const int kk = k0 + c * 8;
      const bool ok = kk < a.k;
      CpAsync16(x_s + r * geo.xrow + c * 16, ok ? a.x + static_cast<long long>(r) * a.ldx + kk : a.x,
                ok);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    if (G > 1) {  // every group's part of the shared x slices, visible to all
      asm volatile("cp.async.wait_group 0;\n" ::);
      __syncthreads();
    }
  }

  // ldmatrix.x4 address of this lane: matrix lane / 8 = (step parity, k half),
  // row lane % 8 = token (rows >= m alias row m - 1); token tile t adds 8 t.
  unsigned xl[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int trow = min(8 * t + (lane & 7), a.m - 1);
    xl[t] = x_s + trow * geo.xrow + (lane >> 3) * 16;
  }
  const uint32_t kOne = 0x3c003c00u;  // half2 {1, 1}

  int slot = 0;
#pragma unroll 1
  for (int it = 0; it < ntile_it; ++it) {
    const int tile = tile0 + (it * G + g) * tstride;  // >= ntiles: an idle group (last iteration)
    const int cend = tile < a.ntiles ? ce : cb;
    float acc[NT][4][4];
  #pragma unroll
    for (int t = 0; t < NT; ++t)
  #pragma unroll
      for (int p = 0; p < 4; ++p)
  #pragma unroll
        for (int c = 0; c < 4; ++c) acc[t][p][c] = 0.f;
  #pragma unroll 1
    for (int c = cb; c < cend; ++c) {
      if (it == 0 && c == cb) {
        asm volatile("cp.async.wait_group 0;\n" ::);
      } else {
        WaitGroups(D - 2);
      }
      __syncwarp();
      {
        int ns = slot + D - 1;
        if (ns >= D) ns -= D;
        issue_w(it * nc + (c - cb) + D - 1, ns);
        asm volatile("cp.async.commit_group;\n" ::);
      }
      const unsigned char* st = wbase + slot * geo.stage;
      const unsigned xoff = (c - cb) * CH * 32;
      float d[NT][4][4], xs[NT][4];
  #pragma unroll
      for (int s2 = 0; s2 < CH; s2 += 2) {
        uint32_t b[NT][4];
  #pragma unroll
        for (int t = 0; t < NT; ++t) LdMatrixX4(b[t], xl[t] + xoff + s2 * 32);
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
  #pragma unroll
            for (int t = 0; t < NT; ++t) {
              if (s == 0) {
                MmaZ(d[t][p], a0, a1, a2, a3, b[t][2 * h], b[t][2 * h + 1]);
              } else {
                Mma(d[t][p], a0, a1, a2, a3, b[t][2 * h], b[t][2 * h + 1]);
              }
            }
          }
  #pragma unroll
          for (int t = 0; t < NT; ++t) {
            if (s == 0) {
              MmaZ(xs[t], kOne, 0u, kOne, kOne, b[t][2 * h], b[t][2 * h + 1]);
            } else {
              Mma(xs[t], kOne, 0u, kOne, kOne, b[t][2 * h], b[t][2 * h + 1]);
            }
          }
        }
      }
      // Fold: column c(2p) (rows gid) takes d[p][0..1], c(2p+1) d[p][2..3];
      // tokens 2 tig and 2 tig + 1.
      const uint4 z0 = *reinterpret_cast<const uint4*>(st + CH * 512 + gid * 32);
      const uint4 z1 = *reinterpret_cast<const uint4*>(st + CH * 512 + gid * 32 + 16);
      const uint32_t sw[8] = {z0.x, z0.y, z0.z, z0.w, z1.x, z1.y, z1.z, z1.w};
  #pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float h0 = 960.f * xs[t][2], h1 = 960.f * xs[t][3];
  #pragma unroll
        for (int p = 0; p < 4; ++p) {
          const float2 f0 = __half22float2(*reinterpret_cast<const __half2*>(&sw[2 * p]));
          const float2 f1 = __half22float2(*reinterpret_cast<const __half2*>(&sw[2 * p + 1]));
          acc[t][p][0] = fmaf(f0.x, fmaf(-f0.y, xs[t][0], d[t][p][0] + h0), acc[t][p][0]);
          acc[t][p][2] = fmaf(f1.x, fmaf(-f1.y, xs[t][0], d[t][p][2] + h0), acc[t][p][2]);
          if (!ONE) {
            acc[t][p][1] = fmaf(f0.x, fmaf(-f0.y, xs[t][1], d[t][p][1] + h1), acc[t][p][1]);
            acc[t][p][3] = fmaf(f1.x, fmaf(-f1.y, xs[t][1], d[t][p][3] + h1), acc[t][p][3]);
          }
        }
      }
      slot = slot + 1 == D ? 0 : slot + 1;
    }
    if (it + 1 == ntile_it) asm volatile("cp.async.wait_group 0;\n" ::);

    // The EC term, once per tile (k split 0): y += B (g ⊙ u), B as the A
    // operand (the tile layout's fragments, ec_tile.cuh), v as the B operand.
    if (a.ec.rec != nullptr && q == 0 && tile < a.ntiles) {
      if (a.ec_late) asm volatile("griddepcontrol.wait;\n" ::: "memory");
      const EcTileSeg es = EcSegOf(a.ec, tile);
      // k16 steps h: the k8 steps 2 h, 2 h + 1 (ec_tile.cuh)
      auto frags = [&](int e, uint32_t(&af)[8], int* qr) -> bool {
        if (!ecb_pf) return EcLoadFrags(a.ec, es, tile, e, lane, af, qr);
        // fetched with the tile's first chunk (complete: waited for then)
        *qr = EcRank(es, e, lane);
        if (e >= EcSteps(es) || EcRecIndex(a.ec, es, e, lane) < 0) {
  #pragma unroll
          for (int i = 0; i < 8; ++i) af[i] = 0u;
          return false;
        }
        const uint4* bs = reinterpret_cast<const uint4*>(
            smem + geo.ecb_off + (it & 1) * a.ec.max_steps * 1024 + (e * 32 + lane) * 32);
        // (r1 by value: a conditional of the two lvalues took r0's address,
        // a local-memory store and a generic load on the epilogue's path)
        const uint4 r0 = bs[0];
        uint4 r1 = r0;
        if (a.ec.scales == nullptr) r1 = bs[1];
        EcFrags(a.ec, tile, *qr, r0, r1, af);
        return true;
      };
  #pragma unroll 1
      for (int h = wi; h < EcPairs(es); h += NWG) {
        uint32_t f0[8], f1[8];
        int q0, q1;
        const bool on0 = frags(2 * h, f0, &q0);
        const bool on1 = frags(2 * h + 1, f1, &q1);
        EcMmaSwapped<NT>(a, on0, q0, on1, q1, gid, f0, f1, acc);
      }
    }

    // Reduction in fixed order: the warps through shared memory (over the
    // drained ring), then the cluster's blocks through distributed shared
    // memory, rank r storing outputs [r E / S, (r + 1) E / S).
    constexpr int E = NT * 16 * 32;  // outputs of a warp's fragments (NT token tiles)
    auto store = [&](int o, float s) { StoreTileOutput(a, tile, o, s); };
    if (G > 1 && NWG == 1 && S == 1) {
      // v40: one warp per tile, one block per tile: the warp's sums are the
      // outputs (no shared memory, no barrier).
  #pragma unroll
      for (int t = 0; t < NT; ++t)
  #pragma unroll
        for (int p = 0; p < 4; ++p)
  #pragma unroll
          for (int c = 0; c < 4; ++c) store(((t * 16 + p * 4 + c) << 5) + lane, acc[t][p][c]);
      continue;
    }
    // v40: group g's buffers (G == 1: the block's, as before); with one warp
    // per group its sums are the group's partial directly.
    float* red = reinterpret_cast<float*>(smem + geo.red_off + g * geo.red_gstride);
    float* part = NWG == 1 ? red : red + NWG * E;
    // barrier of the group's warps (the block's when G == 1)
    auto group_sync = [&]() {
      if (G == 1) {
        __syncthreads();
      } else if (NWG == 1) {
        __syncwarp();
      } else {
        NamedSync(1 + g, NWG * 32);
      }
    };
    group_sync();
  #pragma unroll
    for (int t = 0; t < NT; ++t)
  #pragma unroll
      for (int p = 0; p < 4; ++p)
  #pragma unroll
        for (int c = 0; c < 4; ++c) red[(wi * NT * 16 + t * 16 + p * 4 + c) * 32 + lane] = acc[t][p][c];
    group_sync();
    const int lt = wi * 32 + lane;  // thread within the group
    if (NWG > 1) {
      for (int o = lt; o < E; o += NWG * 32) {
        float s = 0.f;
  #pragma unroll
        for (int w = 0; w < NWG; ++w) s += red[w * E + o];
        part[o] = s;
      }
    }
    if (S == 1 && G > 1) {
      group_sync();
      for (int o = lt; o < E; o += NWG * 32) store(o, part[o]);
      continue;  // the next iteration's first group_sync protects part
    }
    asm volatile("fence.acq_rel.cluster;\n" ::: "memory");
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
    const int lo = q * E / S, hi = (q + 1) * E / S;
    for (int o = lo + lt; o < hi; o += NWG * 32) {
      float s = 0.f;
      const unsigned local = static_cast<unsigned>(__cvta_generic_to_shared(&part[o]));
      for (int r = 0; r < S; ++r) {
        unsigned remote;
        float v;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(r));
        asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
        s += v;
      }
      store(o, s);
    }
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  }  // tiles of this block
}

template <int NW, int CH, bool ONE, int NT, bool GRP>
cudaError_t LaunchOne(const DecodeArgs& a, int grid_x, int splits, const Geom& g, int smem,
                      cudaStream_t stream, bool pdl) {
  auto* kernel = W4FoldKernel<NW, CH, ONE, NT, GRP>;
  const cudaError_t ce = ConfigureOnce(reinterpret_cast<const void*>(kernel), [&] {
    int dev = 0, optin = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) {
      e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    }
    if (e == cudaSuccess) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    }
    if (e == cudaSuccess) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
    }
    return e;
  });
  if (ce != cudaSuccess) return ce;
  return LaunchCluster(W4FoldKernel<NW, CH, ONE, NT, GRP>,
                       dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(splits)),
                       dim3(NW * 32), static_cast<size_t>(smem), stream, 1,
                       static_cast<unsigned>(splits), pdl, a, g);
}

template <int NW, bool ONE, int NT, bool GRP>
cudaError_t LaunchCh(int ch, const DecodeArgs& a, int grid_x, int splits, const Geom& g, int smem,
                     cudaStream_t stream, bool pdl) {
  switch (ch) {
    case 2: return LaunchOne<NW, 2, ONE, NT, GRP>(a, grid_x, splits, g, smem, stream, pdl);
    case 4: return LaunchOne<NW, 4, ONE, NT, GRP>(a, grid_x, splits, g, smem, stream, pdl);
    default: return LaunchOne<NW, 8, ONE, NT, GRP>(a, grid_x, splits, g, smem, stream, pdl);
  }
}
// The kernel for m (one row, <= 8: one token tile, <= 16: two, else four),
// grouped or not.
template <int NW, bool GRP>
cudaError_t LaunchM(int ch, const DecodeArgs& a, int grid_x, int splits, const Geom& g, int smem,
                    cudaStream_t stream, bool pdl) {
  return a.m == 1   ? LaunchCh<NW, true, 1, GRP>(ch, a, grid_x, splits, g, smem, stream, pdl)
         : a.m <= 8  ? LaunchCh<NW, false, 1, GRP>(ch, a, grid_x, splits, g, smem, stream, pdl)
         : a.m <= 16 ? LaunchCh<NW, false, 2, GRP>(ch, a, grid_x, splits, g, smem, stream, pdl)
                     : LaunchCh<NW, false, 4, GRP>(ch, a, grid_x, splits, g, smem, stream, pdl);
}

}  // namespace foldk

namespace {

// Chunk = fold width in k16 steps: one scale group (or 8 steps: 128 k).
int FoldChunk(const DecodeArgs& a) {
  if (a.gshift >= 30) return 8;
  const int steps = (1 << a.gshift) / 16;
  return steps >= 8 ? 8 : steps;
}

struct FoldConfig {
  int nw = 8, splits = 1, depth = 2, smem = 0;
  int nt = 1;      // n8 token tiles: 1 (m <= 8), 2 (m <= 16) or 4 (m <= 32)
  int grid_x = 0;  // blocks along the tiles: ntiles, or fewer (persistent loop)
  foldk::Geom geo{};
};

// Shared memory of one block of `nw` warps for `splits` and ring `depth`
// (v40: in `groups` groups of warps, each group on its own tile).
FoldConfig MakeConfig(const DecodeArgs& a, int nw, int splits, int depth, int groups = 1,
                      bool overlay = false) {
  FoldConfig c;
  c.nw = nw;
  c.nt = a.m > 16 ? 4 : a.m > 8 ? 2 : 1;
  c.splits = splits;
  c.depth = depth;
  const int ch = FoldChunk(a);
  const int nch = a.ksteps / ch;
  const int nwg = nw / groups;
  const int w = splits * nwg;
  const int maxc = (nch + w - 1) / w;
  c.geo.depth = depth;
  c.geo.stage = ch * 512 + 256;
  c.geo.xrow = maxc * ch * 32 + 16;
  c.geo.groups = groups;
  if (groups == 1) {
    // + 8 depth: unused since the bulk-copy ring (its mbarriers) was removed;
    // kept so that every footprint, hence the measured dispatch, stays as it was.
    c.geo.warp_bytes = (depth * c.geo.stage + a.m * c.geo.xrow + 8 * depth + 15) / 16 * 16;
    c.smem = std::max(nw * c.geo.warp_bytes, foldk::RedBytes(nw, c.nt));
    return c;
  }
  // v40: the warps' rings, then the x slices (one per warp of a group,
  // shared by the groups), then the groups' reduction buffers, never over
  // another group's rings (the groups finish their tiles at different
  // times): with `overlay` (a block that runs one iteration) each group's
  // buffer lies over its own warps' drained rings, else after x. None with
  // one warp per group and no k split (the warp stores its own sums).
  const int e_bytes = c.nt * 16 * 32 * 4;
  const int red_group = (nwg == 1 ? 1 : nwg + 1) * e_bytes;
  c.geo.warp_bytes = (depth * c.geo.stage + 8 * depth + 15) / 16 * 16;
  c.geo.x_off = nw * c.geo.warp_bytes;
  const int x_end = c.geo.x_off + nwg * a.m * c.geo.xrow;
  if (overlay && nwg * c.geo.warp_bytes >= red_group) {
    c.geo.red_off = 0;
    c.geo.red_gstride = nwg * c.geo.warp_bytes;
    c.smem = x_end;
  } else {
    c.geo.red_off = x_end;
    c.geo.red_gstride = red_group;
    c.smem = x_end + (nwg == 1 && splits == 1 ? 0 : groups * red_group);
  }
  return c;
}

constexpr int kSmemPerSm = 228 * 1024, kSmemReserved = 1024, kSmemMaxBlock = 227 * 1024;

// Resident blocks per SM (shared memory, registers <= 96 with one token
// tile, <= 128 with two (the launch bounds' cap), <= 256 with four (v43:
// ptxas of CUDA 13 gives the four-tile kernels 245-247 registers: one
// 8-warp or two 4-warp blocks), 64 warps).
int BlocksPerSm(const FoldConfig& c) {
  if (c.smem > kSmemMaxBlock) return 0;
  const int by_smem = kSmemPerSm / (c.smem + kSmemReserved);
  const int by_regs = 65536 / ((c.nt == 4 ? 256 : c.nt == 2 ? 128 : 96) * 32 * c.nw);
  return std::min({by_smem, by_regs, 64 / c.nw});
}

// The cost model, fitted to the v10 sweep (docs/results/gpu.md; 8B shapes,
// M in {1, 4, 8}: its pick is within 7% of the best measured configuration
// in all 12 cases): rounds of resident blocks x (chunks of the busiest warp
// + 0.5) / sqrt(GPU fill, 8 warps per SM = 1) x 2 for clusters of 4 or 8
// (their launches were ~1.4-2x slower than S = 2 at equal bytes) x 1.1 for
// 4-warp blocks. The ring depth is min(3, chunks per warp), 2 at least.
double FoldCost(const DecodeArgs& a, const FoldConfig& c, int num_sms) {
  const int r = BlocksPerSm(c);
  if (r == 0) return 1e30;
  const int nch = a.ksteps / FoldChunk(a);
  const int groups = c.geo.groups, nwg = c.nw / groups;  // v40: warps on one tile
  const long long blocks = static_cast<long long>((a.ntiles + groups - 1) / groups) * c.splits;
  const long long slots = static_cast<long long>(r) * num_sms;
  const long long waves = (blocks + slots - 1) / slots;
  const int cpw = (nch + c.splits * nwg - 1) / (c.splits * nwg);
  const double fill = std::min(1.0, static_cast<double>(std::min(blocks, slots)) * c.nw / (8.0 * num_sms));
  const double pen = (c.splits >= 4 ? 2.0 : 1.0) * (c.nw == 4 ? 1.1 : 1.0);
  return static_cast<double>(waves) * (cpw + 0.5) * pen / std::sqrt(fill);
}

// The fold kernel's launch configuration: warps per block (4 or 8), k
// splits S (a cluster of S blocks along k; 1, 2, 4, 8) and ring depth
// (2..4) by FoldCost; forced_* > 0 (benchmarks, tests) pin a value.
absl::StatusOr<FoldConfig> ChooseFold(const DecodeArgs& a, int num_sms, int forced_warps,
                                      int forced_splits, int forced_depth, int groups = 1) {
  const int nch = a.ksteps / FoldChunk(a);
  FoldConfig best;
  double best_cost = 1e30;
  for (int nw : {8, 4}) {
    if (forced_warps > 0 && nw != forced_warps) continue;
    if (groups > nw) continue;
    const int nwg = nw / groups;
    for (int s = 1; s <= 8; s *= 2) {
      if (forced_splits > 0 && s != forced_splits) continue;
      if (forced_splits <= 0 && s > 1 && s * nwg > nch) continue;
      const int cpw = (nch + s * nwg - 1) / (s * nwg);
      // v12: depth 2 unless a warp streams >= 6 chunks (calls 2 and 3: d2 as
      // fast or faster at 2-4 chunks per warp, gate_up 21.5 vs 23.4 us).
      const int want = forced_depth > 0 ? forced_depth : cpw >= 6 ? 3 : 2;
      FoldConfig c = MakeConfig(a, nw, s, want, groups);
      if (BlocksPerSm(c) == 0 && forced_depth <= 0) c = MakeConfig(a, nw, s, 2, groups);
      const double cost = FoldCost(a, c, num_sms);
      if (cost < best_cost - 1e-9) {
        best_cost = cost;
        best = c;
      }
    }
  }
  if (best_cost >= 1e29) {
    return absl::InvalidArgumentError("fold kernel: no configuration fits shared memory");
  }
  return best;
}

// v40 (docs/results/gpu.md, "v40"): at 9..16 rows, where the one-group
// kernel needs more than one wave, the default is 8 warps in 8 groups (one
// warp per tile: no cross-warp reduction, the cluster's once per 8 tiles)
// with the largest k split that keeps one wave of blocks, ring depth 3
// where it fits (each group's reduction buffer over its drained ring, so
// two blocks fit per SM at depth 2). Measured against the one-group kernel
// on the 8B shapes at m = 16: gate_up 28.5 vs 37.5 us (S = 4, depth 2, two
// blocks per SM), qkv 11.4 vs 12.4 (S = 8). None fits: NotFound.
absl::StatusOr<FoldConfig> ChooseGrouped(const DecodeArgs& a, int num_sms) {
  const int nch = a.ksteps / FoldChunk(a);
  const long long tgroups = (a.ntiles + 7) / 8;
  for (int s = 8; s >= 1; s /= 2) {
    if (s > nch) continue;
    for (int d : {3, 2}) {
      const FoldConfig c = MakeConfig(a, 8, s, d, 8, /*overlay=*/true);
      const int r = BlocksPerSm(c);
      if (r > 0 && tgroups * s <= static_cast<long long>(r) * num_sms) return c;
    }
  }
  return absl::NotFoundError("no grouped configuration fits one wave");
}

}  // namespace

bool FoldSupported(const DecodeArgs& a) {
  if (a.m < 1 || a.m > 32) return false;
  return MakeConfig(a, 4, 8, 2).smem <= kSmemMaxBlock;  // the smallest footprint
}

// v17 (docs/results/gpu.md, "v17"): with two token tiles (m 9..16) the
// fold kernel stages m x K / S of x per block, which caps residency and
// forces k splits on long k; against the v8 ring kernel in the same run
// (M = 16) it won only on the wide, k = 4096 GEMMs (8B qkv 12.3 vs 17.0 us,
// gate_up 37.7 vs 44.7) and lost on every GEMM of < 96 tiles (8B o 8.2 vs
// 7.3, down 31.2 vs 14.9 at S >= 4; 1B qkv 6.9 vs 4.7) and on k = 2048 (1B
// gate_up 16.4 vs 14.7: 2 chunks per warp).
// v43: at 17..32 rows the alternative is the x-as-m16 kernel (v6), slower
// than cuBLAS FP16 on every 8B and 1B shape at M = 32 (docs/results/gpu.md,
// "v43"), so the fold kernel's four token tiles run wherever they fit.
bool FoldPreferred(const DecodeArgs& a, int num_sms) {
  if (a.m <= 8) return true;
  if (a.m > 16) return ChooseFold(a, num_sms, 0, 0, 0).ok();
  if (a.ntiles < 96 || a.k < 4096) return false;
  absl::StatusOr<FoldConfig> c = ChooseFold(a, num_sms, 0, 0, 0);
  return c.ok() && c->splits <= 2;
}

// a.variant (W4CudaParams::decode_kernel) & 15: 4 / 5 forces 4 / 8 warps per
// block (6, the removed bulk-copy ring, is rejected by W4Linear); flags
// (W4CudaParams::decode_kernel): 16 the L2 prefetch before the dependency
// wait in the blocks of the first wave, 32 in every block (default: none),
// 64 one tile per block (default: a persistent loop when the tiles need more
// than one wave).
absl::Status LaunchDecodeFold(DecodeArgs a, int num_sms, int forced_splits, int forced_depth,
                              cudaStream_t stream) {
  if (a.m < 1 || a.m > 32) return absl::InternalError("LaunchDecodeFold: m outside 1..32");
  const int kind = a.variant & 15;
  const int forced_warps = kind == 4 ? 4 : kind == 5 ? 8 : 0;
  const int forced_groups = 1 << ((a.variant >> 8) & 3);  // v40: flags 256 / 512 / 768
  absl::StatusOr<FoldConfig> c =
      ChooseFold(a, num_sms, forced_warps, forced_splits, forced_depth, forced_groups);
  if (!c.ok()) return c.status();
  // v40: grouped where the one-group choice needs more than one wave of
  // blocks (8B gate_up at 9..16 rows, qkv at >= 12: 16-row x fills a block's
  // shared memory); in one wave it stays (8B qkv at 9 rows: 9.8 us against
  // 11.1-14.1 grouped).
  if (a.m > 8 && kind == 0 && forced_groups == 1 && forced_splits <= 0 && forced_depth <= 0 &&
      static_cast<long long>(a.ntiles) * c->splits >
          static_cast<long long>(BlocksPerSm(*c)) * num_sms) {
    if (absl::StatusOr<FoldConfig> gc = ChooseGrouped(a, num_sms); gc.ok()) c = *gc;
  }
  const int groups = c->geo.groups;
  // Tiles the first wave holds (x-major dispatch of the clusters).
  const int wave_tiles = std::max(1, BlocksPerSm(*c) * num_sms / c->splits);
  c->grid_x = a.ntiles;
  if (groups > 1) {
    // v40: a block takes `groups` tiles per iteration. One iteration per
    // block (all tile groups in one wave, or flag 64): the reduction
    // buffers over the groups' drained rings (fewer bytes, maybe more
    // blocks per SM); else a wave of blocks looping, the buffers after x.
    const int tgroups = (a.ntiles + groups - 1) / groups;
    const FoldConfig o = MakeConfig(a, c->nw, c->splits, c->depth, groups, /*overlay=*/true);
    const int wave_o = BlocksPerSm(o) * num_sms / c->splits;
    if ((a.variant & 64) != 0 || tgroups <= wave_o) {
      *c = o;
      c->grid_x = tgroups;
    } else {
      c->grid_x = std::min(tgroups, wave_tiles);
    }
  } else if ((a.variant & 64) == 0 && a.ntiles > wave_tiles) {
    // Persistent (v12): more tiles than one wave holds -> one wave of blocks
    // looping over tiles, the reduction buffers after the ring (the ring
    // runs on into the next tile), if that still fits as many blocks.
    FoldConfig p = *c;
    p.geo.red_off = p.nw * p.geo.warp_bytes;
    p.smem = p.geo.red_off + foldk::RedBytes(p.nw, p.nt);
    if (BlocksPerSm(p) == BlocksPerSm(*c)) {
      *c = p;
      c->grid_x = wave_tiles;
    }
  }
  if ((a.variant & 32) != 0) {
    c->geo.pf_tiles = a.ntiles;
  } else if ((a.variant & 16) != 0) {
    c->geo.pf_tiles = wave_tiles;
  } else {  // default: no L2 prefetch (v12 call 1: it cost 2.4 us on gate_up, 1.8 on down)
    c->geo.pf_tiles = 0;
  }
  // v14: the EC's B fragments through shared memory, when the two buffers
  // fit without costing a resident block (decode_kernel flag 128: off).
  if (a.ec.rec != nullptr && (a.variant & 128) == 0 && groups == 1) {
    FoldConfig e = *c;
    e.geo.ecb_off = e.smem;
    e.smem += 2 * a.ec.max_steps * 1024;
    if (BlocksPerSm(e) == BlocksPerSm(*c)) *c = e;
  }
  const int ch = FoldChunk(a);
  static int pdl_ok = -1;
  auto go = [&](bool pdl) {
    const int gx = c->grid_x, s = c->splits, sm = c->smem;
    const bool grp = groups > 1;
    if (c->nw == 4) {
      return grp ? foldk::LaunchM<4, true>(ch, a, gx, s, c->geo, sm, stream, pdl)
                 : foldk::LaunchM<4, false>(ch, a, gx, s, c->geo, sm, stream, pdl);
    }
    return grp ? foldk::LaunchM<8, true>(ch, a, gx, s, c->geo, sm, stream, pdl)
               : foldk::LaunchM<8, false>(ch, a, gx, s, c->geo, sm, stream, pdl);
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
