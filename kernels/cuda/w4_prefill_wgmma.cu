// The prefill GEMM on Hopper's warpgroup MMA (wgmma), straight from the W4
// GPU layout: no fp16 scratch of the dequantized weight (the dequantizing
// prefill path, w4_prefill.cu, writes and re-reads 2 bytes per weight
// around cuBLAS: ~75 us of the 8B gate_up's 237 us at M = 512). Two forms:
// W4WgmmaKernel (v19 / v20, W4CudaParams::prefill_kernel 2 / 3: a block
// barrier per stage) and W4WgmmaWsKernel (v34, + 128: warp-specialized),
// both with an optional deterministic split-K over the grid's z (v33,
// prefill_splits) and the epilogue staged through shared memory. Which
// one runs (or dequantize + cuBLAS) is measured per weight shape and m at
// load (TunePrefill, w4_tune.cc; docs/results/gpu.md, v34): the
// warp-specialized kernel wins on most 8B shapes, dequantize + cuBLAS on
// most 1B shapes (k = 2048), the plain 128-token kernel on 8B gate_up at
// M = 128.
//
// Roles: the weights are wgmma's A operand (M = 64 rows = one 64-column
// layout tile per warpgroup and wgmma), taken from registers; the tokens are
// the B operand (N = NT = 128 or 256 tokens per block), in shared memory.
// The layout's per-lane words are exactly the m16n8k16 A fragments
// (w4_layout.h: word p of lane l holds rows 16 p + gid and 16 p + 8 + gid),
// and a wgmma A fragment in registers is four such m16 fragments, warp w of
// the warpgroup holding rows 16 w .. 16 w + 15: warp w reads word w. The
// dequantization is w4_prefill.cu's DequantKernel arithmetic, in registers,
// so both prefill paths multiply by bit-identical fp16 weights.
//
// Block: two warpgroups (256 threads), one 64-row tile each (128 weight
// rows per block), x NT tokens (NT = 128: two blocks per SM; 256: one).
// Pipeline: 5 stages of 64 k (four k16 steps): the tokens' x rows by one
// TMA copy per stage (thread 0; box 64 k x NT tokens, zero-filled past m
// and k) into a 128-byte-swizzled K-major tile (the wgmma B layout: row
// t's 16-byte chunk c at t * 128 + (c ^ (t % 8)) * 16), completion counted
// on the slot's mbarrier; the tiles' code words and the stage's scale/zero
// words (at most two groups of 32) by cp.async; 3 stages in flight. A stage dequantizes its four k16 steps into one of two register
// sets, issues its four wgmmas as one group and retires the previous
// stage's group, so one group computes while the next is prepared; a
// stage's slot is refilled two stages after it was read (a block barrier
// per stage).
// Grid: (token tiles, weight-row tiles) with the token tiles fastest, so the
// blocks sharing a weight tile run in the same wave and its codes come from
// DRAM once.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {
namespace wgk {

constexpr int TPW = 1;  // 64-row layout tiles per warpgroup

// NT: tokens per block (the wgmma N): 128 or 256; v44: 16, 32 or 64 (the
// warp-specialized kernel only: decode-sized m, two blocks per SM, 8 stages).
template <int NT>
struct Cfg {
  static constexpr int kXBytes = NT * 128;             // x tile per stage: NT tokens x 64 k
  static constexpr int kTiles = 2 * TPW;               // 64-row layout tiles per block
  static constexpr int kWBytes = kTiles * 4 * 512;     // their codes for 4 k16 steps
  static constexpr int kSzBytes = kTiles * 2 * 256;    // scale/zero words, <= 2 groups
  static constexpr int kStageBytes = kXBytes + kWBytes + kSzBytes;  // a multiple of 1024
  static constexpr int kStages = NT <= 64 ? 8 : 5;
  static constexpr int kSmem = kStages * kStageBytes + 1024;  // + alignment of the base
  static_assert(kStageBytes % 1024 == 0, "x tiles must stay 1024-byte aligned");
};

// The epilogue tile's row stride in floats (StoreTile below).
constexpr int kEpiLd = 132;

struct Args {
  const uint4* qw;
  const uint32_t* sz;
  int ntiles, ksteps, ngroups;
  int gshift;  // group of k index kk = kk >> gshift (30 for per-channel: one group)
  const __half* x;
  long long ldx;
  int m, k, n;
  const float* bias;
  float* y32;
  __half* y16;
  long long ldy;
  int accumulate;
  // benchmarks only (flags 32 / 64; the output is wrong): 1 the code words
  // loaded but not dequantized (A = the raw words), 2 no A loads either
  // (constant A): timing splits of the per-stage work.
  int split;
  // v33, split-K: the grid's z index takes k stages [z per, (z + 1) per)
  // (per even); with ksplits > 1 every split writes its fp32 tile to
  // part[z][m][n], and the last split of a tile to arrive (a ticket in
  // tickets[], zero between calls) adds the ksplits tiles in order z = 0,
  // 1, ... (deterministic) and runs the epilogue.
  int ksplits, per;
  float* part;
  int* tickets;
  // v35: n % 4 == 0 (a thread's four columns one 16-byte partial row
  // piece), and y (fp32: 16-byte, fp16: 8-byte aligned rows, ldy % 4 == 0)
  // takes a thread's four columns in one store; else element by element.
  int vec_part, vec_out;
  // v36, benchmarks only (prefill_kernel + 512 / + 1024 on the stream-K
  // kernel): 1 whole tiles only (ceil(T / G) rounds, no stream-K part), 2
  // no output stores (the output is wrong): timing splits.
  int sk_flags;
  // v38: the stream-K kernel's most pieces per stream-K tile (2..4;
  // prefill_splits 2..4, else 4).
  int sk_cap;
};

__device__ __forceinline__ void CpAsync16(unsigned dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(pred ? 16 : 0));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor of a K-major, 128-byte-swizzled tile whose
// 8-row groups are 1024 bytes apart (SBO); LBO is unused for this layout.
__device__ __forceinline__ uint64_t DescB(unsigned addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

template <int N>
__device__ __forceinline__ void FenceAcc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void FenceA(uint32_t (&a)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

// D[64 x 16] += A[64 x 16] (registers) * B[16 x 16] (shared, K-major).
__device__ __forceinline__ void Wgmma(float (&d)[8], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "
      "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
// D[64 x 32] += A[64 x 16] (registers) * B[16 x 32] (shared, K-major).
__device__ __forceinline__ void Wgmma(float (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
      "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
// D[64 x 64] += A[64 x 16] (registers) * B[16 x 64] (shared, K-major).
__device__ __forceinline__ void Wgmma(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
// D[64 x 128] += A[64 x 16] (registers) * B[16 x 128] (shared, K-major).
__device__ __forceinline__ void Wgmma(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
// D[64 x 256] += A[64 x 16] (registers) * B[16 x 256] (shared, K-major).
__device__ __forceinline__ void Wgmma(float (&d)[128], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
#endif

// v44: Dequant with its per-group constants computed once per group and
// stage instead of once per k16 step (the same operations on the same
// values: bit-identical fragments): for rows gid and gid + 8 (h = 0 / 1)
// the scale s, the offset zero zz = 1024 + z and k960 - zz.
struct SzConst {
  __half2 s2[2], zz[2], c[2];
};
__device__ __forceinline__ SzConst MakeSzConst(uint2 szw) {
  uint32_t c960 = 0x63806380u;
  const __half2 k960 = *reinterpret_cast<__half2*>(&c960);
  const uint32_t sw[2] = {szw.x, szw.y};
  SzConst k;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t v = sw[h];
    const __half2 sz2 = *reinterpret_cast<__half2*>(&v);
    k.s2[h] = __low2half2(sz2);
    k.zz[h] = __high2half2(sz2);
    k.c[h] = __hsub2(k960, k.zz[h]);
  }
  return k;
}
__device__ __forceinline__ void DequantK(uint32_t w, const SzConst& k, uint32_t (&a)[4]) {
  uint32_t c16th = 0x2C002C00u;
  const __half2 k16th = *reinterpret_cast<__half2*>(&c16th);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t lo = (w & 0x000f000fu) | 0x64006400u, hi = (w & 0x00f000f0u) | 0x64006400u;
    const __half2 b0 = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&lo), k.zz[h]), k.s2[h]);
    const __half2 b1 = __hmul2(__hfma2(*reinterpret_cast<__half2*>(&hi), k16th, k.c[h]), k.s2[h]);
    a[h] = *reinterpret_cast<const uint32_t*>(&b0);
    a[2 + h] = *reinterpret_cast<const uint32_t*>(&b1);
    w >>= 8;
  }
}
// Four fp16 A registers of one m16 k16 fragment from the lane's code word
// and its two scale/zero words (rows gid, gid + 8): DequantKernel's math
// (w4_prefill.cu; hi / 16 - (zz - 960) = 64 + q - (64 + z), exact, as its
// hfma2(hi, 1/16, -(zz - 960))).
__device__ __forceinline__ void Dequant(uint32_t w, uint2 szw, uint32_t (&a)[4]) {
  DequantK(w, MakeSzConst(szw), a);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Spins until the mbarrier at shared address `bar` completes the phase of
// parity `parity`.
__device__ __forceinline__ void WaitParity(unsigned bar, unsigned parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// The epilogue's store of a block's tile (staged in shared memory, [NT
// tokens][128 columns] in rows of kEpiLd floats, columns from c0), by 256
// threads (tid 0..255; sync() a barrier over them, is_last a shared int):
// with a k split, every split's tile to part[z] ([m][n] per split), then a
// ticket per tile (threadFenceReduction's pattern), and the last split to
// arrive adds the splits' tiles in the order z = 0, 1, ... (deterministic);
// then bias, accumulate and the fp32 / fp16 output, four columns per
// thread, coalesced.
template <int NT, class Sync>
__device__ __forceinline__ void StoreTile(const Args& a, const float* tile, int m0, int c0, int tid,
                                          int* is_last, Sync sync) {
  constexpr int kLd = kEpiLd;
  const size_t plane = static_cast<size_t>(a.m) * a.n;
  if (a.ksplits > 1) {
    float* pz = a.part + blockIdx.z * plane;
    for (int q = tid; q < NT * 32; q += 256) {
      const int r = q >> 5, c = (q & 31) * 4;
      if (m0 + r >= a.m) continue;
      float* dst = pz + static_cast<size_t>(m0 + r) * a.n + c0 + c;
      if (a.vec_part && c0 + c + 4 <= a.n) {
        // v35: one 16-byte store per thread, a warp's 512 bytes whole
        // sectors (four 4-byte stores 16 bytes apart wrote each 32-byte
        // sector in pieces)
        __stcg(reinterpret_cast<float4*>(dst),
               make_float4(tile[r * kLd + c], tile[r * kLd + c + 1], tile[r * kLd + c + 2],
                           tile[r * kLd + c + 3]));
        continue;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (c0 + c + u < a.n) __stcg(dst + u, tile[r * kLd + c + u]);
      }
    }
    __threadfence();
    sync();
    int* ticket = a.tickets + (blockIdx.y * gridDim.x + blockIdx.x);
    if (tid == 0) *is_last = atomicAdd(ticket, 1) == a.ksplits - 1;
    sync();
    if (!*is_last) return;
    __threadfence();
    if (tid == 0) *ticket = 0;  // zero again for the next call
  }
  const int own = static_cast<int>(blockIdx.z);
#pragma unroll 2
  for (int q = tid; q < NT * 32; q += 256) {
    const int r = q >> 5, c = (q & 31) * 4, tok = m0 + r;
    if (tok >= a.m) continue;
    const bool full = c0 + c + 4 <= a.n;  // all four columns inside n
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = tile[r * kLd + c + u];
    if (a.ksplits > 1) {
      // sum over z in order; this block's own split from shared memory
      // (the same bits it stored)
      float w[4][4];
#pragma unroll
      for (int z = 0; z < 4; ++z) {
        const float* src = a.part + z * plane + static_cast<size_t>(tok) * a.n + c0 + c;
        if (z < a.ksplits && z != own && a.vec_part && full) {
          const float4 t = __ldcg(reinterpret_cast<const float4*>(src));
          w[z][0] = t.x;
          w[z][1] = t.y;
          w[z][2] = t.z;
          w[z][3] = t.w;
          continue;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          w[z][u] = z < a.ksplits && z != own && c0 + c + u < a.n ? __ldcg(src + u) : v[u];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float t = w[0][u];
#pragma unroll
        for (int z = 1; z < 4; ++z) {
          if (z < a.ksplits) t += w[z][u];
        }
        v[u] = t;
      }
    }
    if (a.bias != nullptr) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (c0 + c + u < a.n) v[u] += a.bias[c0 + c + u];
      }
    }
    const long long idx = tok * a.ldy + c0 + c;
    if (a.vec_out && full) {
      if (a.y32 != nullptr) {
        float4* y = reinterpret_cast<float4*>(a.y32 + idx);
        float4 o = make_float4(v[0], v[1], v[2], v[3]);
        if (a.accumulate) {
          const float4 p = *y;
          o.x += p.x;
          o.y += p.y;
          o.z += p.z;
          o.w += p.w;
        }
        *y = o;
      } else {
        uint2* y = reinterpret_cast<uint2*>(a.y16 + idx);
        if (a.accumulate) {
          const uint2 p = *y;
          const __half2 p01 = *reinterpret_cast<const __half2*>(&p.x);
          const __half2 p23 = *reinterpret_cast<const __half2*>(&p.y);
          v[0] += __low2float(p01);
          v[1] += __high2float(p01);
          v[2] += __low2float(p23);
          v[3] += __high2float(p23);
        }
        const __half2 o01 = __floats2half2_rn(v[0], v[1]), o23 = __floats2half2_rn(v[2], v[3]);
        *y = make_uint2(*reinterpret_cast<const uint32_t*>(&o01),
                        *reinterpret_cast<const uint32_t*>(&o23));
      }
      continue;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (c0 + c + u >= a.n) continue;
      const float x = v[u];
      if (a.y32 != nullptr) {
        a.y32[idx + u] = a.accumulate ? a.y32[idx + u] + x : x;
      } else {
        a.y16[idx + u] = __float2half_rn(a.accumulate ? __half2float(a.y16[idx + u]) + x : x);
      }
    }
  }
}

#endif

template <int NT>
__global__ void __launch_bounds__(256, NT == 128 ? 2 : 1)
    W4WgmmaKernel(Args a, const __grid_constant__ CUtensorMap xmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<NT>;
  constexpr int kXBytes = C::kXBytes;
  extern __shared__ unsigned char smem_raw[];
  // v20: the x tile of a stage by one TMA copy (box 64 k x NT tokens,
  // 128-byte swizzle, rows past m and columns past k zero-filled), its
  // arrival counted on the slot's mbarrier.
  __shared__ __align__(8) uint64_t xbar[C::kStages];
  const unsigned base0 = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw));
  const unsigned base = (base0 + 1023u) & ~1023u;
  unsigned char* sbase = smem_raw + (base - base0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wl = warp & 3, gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.x * NT;
  const int tile0 = blockIdx.y * C::kTiles;
  const int nst = a.ksteps / 4;  // even: ksteps is a multiple of 8 (kp = roundup(k, 128))
  // This split's stages [kbeg, kbeg + cnt): cnt even and > 0 (the host
  // picks per even with (ksplits - 1) per < nst).
  const int kbeg = static_cast<int>(blockIdx.z) * a.per;
  const int cnt = min(nst, kbeg + a.per) - kbeg;

  auto stage_addr = [&](int slot) { return base + slot * C::kStageBytes; };
  auto bar_addr = [&](int slot) {
    return static_cast<unsigned>(__cvta_generic_to_shared(&xbar[slot]));
  };
  if (tid == 0) {
    for (int i = 0; i < C::kStages; ++i) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar_addr(i)));
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int ks, int slot) {
    const unsigned xs = stage_addr(slot), wsm = xs + kXBytes, szs = wsm + C::kWBytes;
    const int kb = ks * 64;
    if (tid == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar_addr(slot)),
                   "r"(kXBytes)
                   : "memory");
      asm volatile(
          "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
          "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(xs),
          "l"(reinterpret_cast<uint64_t>(&xmap)), "r"(kb), "r"(m0), "r"(bar_addr(slot))
          : "memory");
    }
#pragma unroll
    for (int i = 0; i < C::kTiles / 2; ++i) {
      const int idx = tid + 256 * i, ti = idx >> 7, j = (idx >> 5) & 3, l = idx & 31;
      const int t = tile0 + ti;
      const bool ok = t < a.ntiles;
      const uint4* src = ok ? a.qw + ((static_cast<size_t>(t) * a.ksteps + 4 * ks + j) * 32 + l) : a.qw;
      CpAsync16(wsm + idx * 16, src, ok);
    }
    if (tid < C::kTiles * 32) {
      const int ti = tid >> 5, gl = (tid >> 4) & 1, c = tid & 15;
      const int t = tile0 + ti;
      const int g = min((kb >> a.gshift) + gl, a.ngroups - 1);
      const bool ok = t < a.ntiles;
      const uint32_t* src = ok ? a.sz + (static_cast<size_t>(t) * a.ngroups + g) * 64 + c * 4 : a.sz;
      CpAsync16(szs + tid * 16, src, ok);
    }
  };

  float acc[TPW][NT / 2];
#pragma unroll
  for (int i = 0; i < TPW; ++i)
#pragma unroll
    for (int e = 0; e < NT / 2; ++e) acc[i][e] = 0.f;
  // A fragments of a whole stage (4 k16 steps), two stages' worth: stage
  // ks dequantizes into one set while stage ks - 1's wgmma group may still
  // read the other.
  uint32_t af0[4][TPW][4] = {}, af1[4][TPW][4] = {};

  // Stages 0 .. kStages - 3 in flight before the loop.
#pragma unroll 1
  for (int s = 0; s < C::kStages - 2; ++s) {
    if (s < cnt) issue(kbeg + s, s);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  // j: the stage's index within this split (slot and barrier parity);
  // ks = kbeg + j: its k stage.
  auto stage = [&](int j, uint32_t (&cur)[4][TPW][4], uint32_t (&prev)[4][TPW][4]) {
    const int ks = kbeg + j;
    const int slot = j % C::kStages;
    // Committed so far: stages 0 .. ks + kStages - 3; stage ks must be in.
    asm volatile("cp.async.wait_group %0;\n" ::"n"(C::kStages - 3));
    // The x tile (written by the async proxy, read by wgmma through it):
    // the slot's barrier completes once per use, parity = use % 2.
    WaitParity(bar_addr(slot), static_cast<unsigned>((j / C::kStages) & 1));
    __syncthreads();
    // Every warp passed its wgmma wait at the end of stage ks - 1, which
    // retired stage ks - 2's group: slot (ks - 2) is free, and so are the
    // A registers `cur` (last read by that group).
    {
      const int nx = j + C::kStages - 2;
      if (nx < cnt) issue(kbeg + nx, nx % C::kStages);
      asm volatile("cp.async.commit_group;\n" ::);
    }
    const unsigned xs = stage_addr(slot);
    const unsigned char* wsm = sbase + slot * C::kStageBytes + kXBytes;
    const unsigned char* szs = wsm + C::kWBytes;
    const int kb = ks * 64, g0 = min(kb >> a.gshift, a.ngroups - 1);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int gl = min((kb + 16 * j) >> a.gshift, a.ngroups - 1) - g0;
#pragma unroll
      for (int i = 0; i < TPW; ++i) {
        const int ti = wg * TPW + i;
        if (a.split == 2) {
          cur[j][i][0] = cur[j][i][1] = cur[j][i][2] = cur[j][i][3] = 0x3C003C00u;
          continue;
        }
        const uint32_t w =
            *reinterpret_cast<const uint32_t*>(wsm + (ti * 4 + j) * 512 + lane * 16 + wl * 4);
        if (a.split == 1) {
          cur[j][i][0] = w;
          cur[j][i][1] = w >> 1;
          cur[j][i][2] = w >> 2;
          cur[j][i][3] = w >> 3;
          continue;
        }
        const uint2 szw =
            *reinterpret_cast<const uint2*>(szs + ((ti * 2 + gl) * 64 + gid * 8 + 2 * wl) * 4);
        Dequant(w, szw, cur[j][i]);
      }
    }
    // Every wgmma input (A registers, descriptors, accumulators) defined
    // before the fence: nothing between the fence and the wait may write
    // one, or ptxas serializes the wgmmas.
    uint64_t desc[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      desc[j] = DescB(xs + 32 * j);
      asm volatile("" : "+l"(desc[j])::"memory");
#pragma unroll
      for (int i = 0; i < TPW; ++i) FenceA(cur[j][i]);
    }
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < TPW; ++i) Wgmma(acc[i], cur[j][i], desc[j]);
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    // Retire stage ks - 1's group (this stage's stays in flight): its A
    // registers `prev` may be rewritten from here on.
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
#pragma unroll
    for (int i = 0; i < TPW; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) FenceA(prev[j][i]);
  };
  // nst is even (kp is a multiple of 128): no path skips the second stage
  // (one that could would rewrite af0 under a wgmma reading it, and ptxas
  // would serialize every wgmma of the loop).
#pragma unroll 1
  for (int j = 0; j < cnt; j += 2) {
    stage(j, af0, af1);
    stage(j + 1, af1, af0);
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    FenceAcc(acc[i]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      FenceA(af0[j][i]);
      FenceA(af1[j][i]);
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::);

  // Epilogue (v33), staged through the idle pipeline shared memory: the
  // block's tile, [NT tokens][128 columns] in rows of kLd = 132 floats,
  // written from acc (acc[i][4 jn + e] is column 64 (wg TPW + i) + 16 wl +
  // gid + 8 (e >> 1), token 8 jn + 2 tig + (e & 1); with kLd = 132 a warp's
  // 32 stores fall in 32 banks), then read back four columns per thread by
  // a rolled loop whose stores are coalesced. The fully unrolled per-element
  // epilogue before (bias, accumulate, fp32 / fp16 branches for each of 128
  // elements: ~10 K instructions, each fetched once) stalled on instruction
  // fetch for about as long as the main loop ran (ncu, call 5).
  constexpr int kLd = kEpiLd;
  static_assert(NT * kLd * 4 <= C::kStages * C::kStageBytes, "the epilogue tile must fit");
  __syncthreads();  // every warp is past its last wgmma: the stages are free
  float* tile = reinterpret_cast<float*>(sbase);
#pragma unroll
  for (int i = 0; i < TPW; ++i) {
    const int cb = (wg * TPW + i) * 64 + 16 * wl + gid;
#pragma unroll
    for (int jn = 0; jn < NT / 8; ++jn) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        tile[(8 * jn + 2 * tig + (e & 1)) * kLd + cb + 8 * (e >> 1)] = acc[i][4 * jn + e];
      }
    }
  }
  __syncthreads();
  __shared__ int is_last;
  StoreTile<NT>(a, tile, m0, tile0 * 64, tid, &is_last, [] { __syncthreads(); });
#else
  __trap();  // host code launches this only where the sm_90a binary was picked
#endif
}


// v34: the same tile (NT tokens x
// 128 rows) with warp specialization: warpgroup 0 is the producer (one
// thread issues, per stage, the x tile by TMA and the two tiles' code words
// and scale/zero words by 1-D bulk copies, all completing on the slot's
// `full` mbarrier), warpgroups 1 and 2 the consumers (one 64-row layout tile
// each: wait `full`, dequantize, four wgmmas, retire the previous stage's
// group, release its slot on the `empty` mbarrier, one arrival per warp).
// No block barrier per stage (v20's kernel waits on one per stage); the
// producer keeps 40 registers and the consumers take 232 (setmaxnreg).
// The k split and the epilogue's store are W4WgmmaKernel's (StoreTile).
// Measured (gpu.md, v34): the fastest main GEMM on most 8B prefill shapes
// (8B gate_up at M = 512: 211-217 us against 237-243 for dequantize +
// cuBLAS), picked per shape and m by TunePrefill. Clusters of two sharing the x
// tile by multicast were tried and were slower on every shape (removed).
__device__ __forceinline__ void BulkG2S(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The producer's copies of k stage ks (64 k) for the block tile at tokens
// m0.. and layout tiles tile0, tile0 + 1 into the stage buffer at shared
// address xs: the x tile by TMA, the code words and the stage's scale/zero
// words (at most two groups) by 1-D bulk copies, all completing on the
// mbarrier fb (one arrival with the byte count). One thread.
template <int NT>
__device__ __forceinline__ void ProduceStage(const Args& a, const CUtensorMap* xmap, unsigned xs,
                                             unsigned fb, int ks, int m0, int tile0) {
  using C = Cfg<NT>;
  const unsigned wsm = xs + C::kXBytes, szs = wsm + C::kWBytes;
  const int kb = ks * 64;
  const int g0 = min(kb >> a.gshift, a.ngroups - 1), g1 = min((kb + 63) >> a.gshift, a.ngroups - 1);
  unsigned bytes = C::kXBytes;
  for (int ti = 0; ti < C::kTiles; ++ti) {
    if (tile0 + ti < a.ntiles) bytes += 2048 + (g1 != g0 ? 512 : 256);
  }
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(fb), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(xs),
      "l"(reinterpret_cast<uint64_t>(xmap)), "r"(kb), "r"(m0), "r"(fb)
      : "memory");
  for (int ti = 0; ti < C::kTiles; ++ti) {
    const int t = tile0 + ti;
    if (t >= a.ntiles) continue;
    BulkG2S(wsm + ti * 2048, a.qw + (static_cast<size_t>(t) * a.ksteps + 4 * ks) * 32, 2048, fb);
    BulkG2S(szs + ti * 512, a.sz + (static_cast<size_t>(t) * a.ngroups + g0) * 64, 256, fb);
    if (g1 != g0) {
      BulkG2S(szs + ti * 512 + 256, a.sz + (static_cast<size_t>(t) * a.ngroups + g1) * 64, 256, fb);
    }
  }
}

// A consumer warpgroup's k stage ks from the stage buffer (shared address
// xs, generic pointer st): wait for the slot's `full` phase, dequantize its
// 64-row tile ci's four k16 steps into cur, issue four wgmmas as one group
// and retire the previous group (whose A registers are prev); the caller
// then releases the previous stage's slot. (v44 call 2: k16 steps into 2 / 4
// separate accumulators measured no faster at small NT: one accumulator.)
template <int NT>
__device__ __forceinline__ void ConsumeStage(const Args& a, unsigned xs, const unsigned char* st,
                                             unsigned fullbar, unsigned parity, int ks, int ci,
                                             int lane, int wl, int gid, float (&acc)[NT / 2],
                                             uint32_t (&cur)[4][4], uint32_t (&prev)[4][4]) {
  using C = Cfg<NT>;
  WaitParity(fullbar, parity);
  if (a.split == 2) return;  // timing only (small tiles + 64): the producer's stream alone
  const unsigned char* wsm = st + C::kXBytes;
  const unsigned char* szs = wsm + C::kWBytes;
  const int kb = ks * 64, g0 = min(kb >> a.gshift, a.ngroups - 1);
  // v44: the scale/zero constants once per group in the stage (one group,
  // or two with groups of 32: k16 steps 0-1 and 2-3), not per k16 step.
  const bool two = min((kb + 48) >> a.gshift, a.ngroups - 1) != g0;
  const SzConst k0 =
      MakeSzConst(*reinterpret_cast<const uint2*>(szs + ((ci * 2) * 64 + gid * 8 + 2 * wl) * 4));
  const SzConst k1 =
      two ? MakeSzConst(
                *reinterpret_cast<const uint2*>(szs + ((ci * 2 + 1) * 64 + gid * 8 + 2 * wl) * 4))
          : k0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t w =
        *reinterpret_cast<const uint32_t*>(wsm + (ci * 4 + q) * 512 + lane * 16 + wl * 4);
    if (a.split == 1) {  // timing only (prefill_kernel + 32): no dequantization, wrong output
#pragma unroll
      for (int i = 0; i < 4; ++i) cur[q][i] = w;
      continue;
    }
    DequantK(w, q < 2 ? k0 : k1, cur[q]);
  }
  uint64_t desc[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    desc[q] = DescB(xs + 32 * q);
    asm volatile("" : "+l"(desc[q])::"memory");
    FenceA(cur[q]);
  }
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int q = 0; q < 4; ++q) Wgmma(acc, cur[q], desc[q]);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
#pragma unroll
  for (int q = 0; q < 4; ++q) FenceA(prev[q]);
}

__device__ __forceinline__ unsigned SmemAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// The warp-specialized kernels' S stage slots: `full` completes once the
// producer's copies land (one arrival + the bytes), `empty` once the 8
// consumer warps released the slot. Thread 0; the caller syncs the block.
template <int S>
__device__ __forceinline__ void InitStageBarriers(uint64_t* full, uint64_t* empty) {
  for (int i = 0; i < S; ++i) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(SmemAddr(&full[i])));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 8;\n" ::"r"(SmemAddr(&empty[i])));
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The producer thread's stages g0 .. g0 + cnt - 1 of the block (slot g % S,
// phase g / S), k stages ks0 .. for the tile at tokens m0, layout tiles
// tile0 ..: each slot's reuse waits for its release.
template <int NT, int S>
__device__ __forceinline__ void ProduceRange(const Args& a, const CUtensorMap* xmap, unsigned base,
                                             uint64_t* full, uint64_t* empty, int g0, int ks0,
                                             int cnt, int m0, int tile0) {
  for (int j = 0; j < cnt; ++j) {
    const int g = g0 + j, slot = g % S;
    if (g >= S) WaitParity(SmemAddr(&empty[slot]), static_cast<unsigned>(((g / S) + 1) & 1));
    ProduceStage<NT>(a, xmap, base + slot * Cfg<NT>::kStageBytes, SmemAddr(&full[slot]), ks0 + j,
                     m0, tile0);
  }
}

// A consumer warpgroup's stages g0 .. g0 + cnt - 1 (cnt even; k stages ks0
// ..) into acc: two register sets of A fragments in turn, each stage's slot
// released once the next stage's wait retired its group (one arrival per
// warp), then every group retired and the last slot released too.
template <int NT, int S>
__device__ __forceinline__ void ConsumeRange(const Args& a, unsigned base, const unsigned char* sbase,
                                             uint64_t* full, uint64_t* empty, int g0, int ks0,
                                             int cnt, int ci, int lane, int wl, int gid,
                                             float (&acc)[NT / 2], uint32_t (&af0)[4][4],
                                             uint32_t (&af1)[4][4]) {
  using C = Cfg<NT>;
  auto stage = [&](int j, uint32_t (&cur)[4][4], uint32_t (&prev)[4][4]) {
    const int g = g0 + j, slot = g % S;
    ConsumeStage<NT>(a, base + slot * C::kStageBytes, sbase + slot * C::kStageBytes,
                     SmemAddr(&full[slot]), static_cast<unsigned>((g / S) & 1), ks0 + j, ci, lane,
                     wl, gid, acc, cur, prev);
    // Stage g - 1's group is retired: its slot goes back to the producer.
    if (j > 0 && lane == 0) {
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SmemAddr(&empty[(g - 1) % S]))
                   : "memory");
    }
  };
#pragma unroll 1
  for (int j = 0; j < cnt; j += 2) {
    stage(j, af0, af1);
    stage(j + 1, af1, af0);
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  FenceAcc(acc);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    FenceA(af0[q]);
    FenceA(af1[q]);
  }
  if (lane == 0) {  // the last stage's slot back to the producer
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SmemAddr(&empty[(g0 + cnt - 1) % S]))
                 : "memory");
  }
}
#endif

// v44: NT = 16 / 32 / 64 for decode-sized m (17..64 rows): two blocks per
// SM (80 registers a thread at launch; the producer gives back to 40, the
// consumers take 96), so that a GEMM's 128-row tiles (x k splits) fill one
// wave; the consumers' accumulators are NT / 2 floats.
template <int NT>
__global__ void __launch_bounds__(384, NT <= 64 ? 2 : 1)
    W4WgmmaWsKernel(Args a, const __grid_constant__ CUtensorMap xmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<NT>;
  constexpr int S = C::kStages;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full[S], empty[S];
  const unsigned base0 = SmemAddr(smem_raw);
  const unsigned base = (base0 + 1023u) & ~1023u;
  unsigned char* sbase = smem_raw + (base - base0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wl = warp & 3, gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.x * NT;
  const int tile0 = blockIdx.y * C::kTiles;
  // This split's stages [kbeg, kbeg + cnt), cnt even and > 0 (as
  // W4WgmmaKernel's; one split: all of k).
  const int nst = a.ksteps / 4;  // even (kp is a multiple of 128)
  const int kbeg = static_cast<int>(blockIdx.z) * a.per;
  const int cnt = min(nst, kbeg + a.per) - kbeg;
  if (tid == 0) InitStageBarriers<S>(full, empty);
  __syncthreads();
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    // (v44 call 6: the stage's copies issued by the producer warp's lanes
    // in one instruction made the small tiles 20-45 % slower: one thread.)
    if (tid == 0) ProduceRange<NT, S>(a, &xmap, base, full, empty, 0, kbeg, cnt, m0, tile0);
    return;
  }
  if constexpr (NT <= 64) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 96;\n" ::: "memory");
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  }
  const int ci = wg - 1;  // this consumer's 64-row layout tile within the block
  float acc[NT / 2];
#pragma unroll
  for (int e = 0; e < NT / 2; ++e) acc[e] = 0.f;
  uint32_t af0[4][4] = {}, af1[4][4] = {};
  ConsumeRange<NT, S>(a, base, sbase, full, empty, 0, kbeg, cnt, ci, lane, wl, gid, acc, af0, af1);
  // Epilogue: as W4WgmmaKernel's, by the 256 consumer threads (named
  // barrier 1; the producer warps have left).
  constexpr int kLd = kEpiLd;
  static_assert(NT * kLd * 4 <= C::kStages * C::kStageBytes, "the epilogue tile must fit");
  const int ct = tid - 128;
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  float* tile = reinterpret_cast<float*>(sbase);
  const int cb = ci * 64 + 16 * wl + gid;
#pragma unroll
  for (int jn = 0; jn < NT / 8; ++jn) {
#pragma unroll
    for (int e = 0; e < 4; ++e) tile[(8 * jn + 2 * tig + (e & 1)) * kLd + cb + 8 * (e >> 1)] = acc[4 * jn + e];
  }
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  __shared__ int is_last;
  StoreTile<NT>(a, tile, m0, tile0 * 64, ct, &is_last,
                [] { asm volatile("bar.sync 1, 256;\n" ::: "memory"); });
#else
  __trap();
#endif
}

// v36: the warp-specialized kernel in a stream-K form (prefill_kernel
// 2 / 3 + 128 + 256): persistent blocks (<= one per SM), so that no wave is
// left part-empty (call 1 of v35: 8B gate_up at M = 512 ran 3.4 waves of
// 256-token tiles in 4; 8B qkv and o at M = 512 filled 96 and 64 of the
// 132 SMs). Tiles (token tile fastest, then 128-row tile) of T = full * G
// + rem: the rem tiles first, as a line of (tile, k-stage pair) units cut
// into equal ranges, one per block (stream-K; at most 4 blocks per tile
// (sk_cap: 2..4),
// and where rem < G / 4 one of the full rounds joins them, so that no tile
// is cut into more than ~3 pieces); then `full` rounds of whole tiles,
// block b taking tile rem + b + r G in round r (data-parallel, neighbouring
// blocks on neighbouring tiles: a weight tile is read from DRAM once). A
// block walks its work segment by segment (one tile each); the producer
// runs on into the next segment while the consumers store the last
// (through an epilogue tile of their own, see SkSmem). A piece of a tile
// goes to the block's partial slot (2 per block: its first and last
// stream-K segment; in the accumulators' register order, 16 bytes per
// thread and store), then a ticket per tile, and the last piece to arrive
// adds the tile's pieces from the slots in block order (deterministic)
// and stores y.
struct SkWork {
  int tiles, npairs, rem, full, usk, gs;  // stream-K units (rem tiles x npairs) over gs blocks
  __device__ __forceinline__ SkWork(const Args& a, int nt, int nblk) {
    tiles = ((a.m + nt - 1) / nt) * ((a.ntiles + 1) / 2);
    npairs = a.ksteps / 8;
    full = tiles / nblk;
    rem = tiles % nblk;
    if ((a.sk_flags & 1) != 0) {  // benchmarks: whole tiles only
      full = (tiles + nblk - 1) / nblk;
      rem = 0;
    } else if (rem > 0 && full >= 1 && 4 * rem < nblk) {
      rem += nblk;
      --full;
    }
    // rem < 2 nblk tiles: usk * gs < 2 nblk^2 npairs < 2^31 (the
    // launcher's check; 32-bit divisions, no calls)
    usk = rem * npairs;
    gs = min(nblk, min(usk, a.sk_cap * rem));
  }
  __device__ __forceinline__ int Beg(int b) const { return b < gs ? b * usk / gs : usk; }
  // the block whose stream-K range [Beg(b), Beg(b + 1)) holds unit u
  __device__ __forceinline__ int Owner(int u) const { return ((u + 1) * gs - 1) / usk; }
};

// A block's next segment after unit u of its stream-K range and r of its
// whole-tile rounds (both advanced): tile t, k-stage pairs [p0, p0 + cnt /
// 2); sk: a stream-K segment, first: the range's first. False when done.
// The plan is recomputed from the kernel's arguments on every call (no
// registers held across the main loop).
struct SkSeg {
  int t, p0, cnt;
  bool sk, first;
};
template <int NT>
__device__ __forceinline__ bool SkNext(const Args& a, int blk, int& u, int& r, SkSeg& sg) {
  const int nblk = static_cast<int>(gridDim.x);
  const SkWork w(a, NT, nblk);
  const int ubeg = w.Beg(blk), uend = w.Beg(blk + 1);
  if (u < ubeg) u = ubeg;
  if (u < uend) {
    sg.t = u / w.npairs;
    sg.p0 = u % w.npairs;
    const int send = min(uend, (sg.t + 1) * w.npairs);
    sg.cnt = 2 * (send - u);
    sg.sk = true;
    sg.first = u == ubeg;
    u = send;
    return true;
  }
  if (r < w.full && w.rem + blk + r * nblk < w.tiles) {
    sg.t = w.rem + blk + r * nblk;
    sg.p0 = 0;
    sg.cnt = 2 * w.npairs;
    sg.sk = false;
    sg.first = false;
    ++r;
    return true;
  }
  return false;
}

// Its shared memory: 4 stages (one fewer than the other kernels) and the
// epilogue's own fp32 tile of 128 tokens x 128 columns (rows of kEpiLd),
// which the producer never touches (it fills the next segment's stages
// meanwhile).
constexpr int kSkStages = 4;
template <int NT>
constexpr int SkSmem() {
  return kSkStages * Cfg<NT>::kStageBytes + 128 * kEpiLd * 4 + 1024;
}
static_assert(SkSmem<256>() <= 227 * 1024, "the stream-K kernel's shared memory");

template <int NT>
__global__ void __launch_bounds__(384, 1)
    W4WgmmaSkKernel(Args a, const __grid_constant__ CUtensorMap xmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<NT>;
  constexpr int S = kSkStages;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full[S], empty[S];
  __shared__ int is_last;
  const unsigned base0 = SmemAddr(smem_raw);
  const unsigned base = (base0 + 1023u) & ~1023u;
  unsigned char* sbase = smem_raw + (base - base0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wl = warp & 3, gid = lane >> 2, tig = lane & 3;
  const int gx = (a.m + NT - 1) / NT, blk = static_cast<int>(blockIdx.x);
  if (tid == 0) InitStageBarriers<S>(full, empty);
  __syncthreads();
  // Producer and consumers walk the same segments (SkNext); g counts the
  // stages so far (slot g % S, phase g / S) across them.
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid != 0) return;
    int g = 0, u = 0, r = 0;
    SkSeg sg;
    while (SkNext<NT>(a, blk, u, r, sg)) {
      ProduceRange<NT, S>(a, &xmap, base, full, empty, g, 2 * sg.p0, sg.cnt, (sg.t % gx) * NT,
                          (sg.t / gx) * C::kTiles);
      g += sg.cnt;
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int ci = wg - 1, ct = tid - 128;
  float acc[NT / 2];
  uint32_t af0[4][4] = {}, af1[4][4] = {};
  const size_t slot_floats = static_cast<size_t>(NT) * 128;
  int g = 0, u = 0, r = 0;
  SkSeg sg;
  while (SkNext<NT>(a, blk, u, r, sg)) {
    const int m0 = (sg.t % gx) * NT, tile0 = (sg.t / gx) * C::kTiles;
#pragma unroll
    for (int e = 0; e < NT / 2; ++e) acc[e] = 0.f;
    ConsumeRange<NT, S>(a, base, sbase, full, empty, g, 2 * sg.p0, sg.cnt, ci, lane, wl, gid, acc,
                        af0, af1);
    g += sg.cnt;
    if (sg.sk) {
      // Pieces of tile t: the blocks cf..cl (one: the whole tile here).
      const SkWork w(a, NT, static_cast<int>(gridDim.x));
      const int tbeg = sg.t * w.npairs;
      const int cf = w.Owner(tbeg), cl = w.Owner(tbeg + w.npairs - 1);
      if (cl > cf) {
        float* mine = a.part + static_cast<size_t>(2 * blk + (sg.first ? 0 : 1)) * slot_floats;
#pragma unroll
        for (int jn = 0; jn < NT / 8; ++jn) {
          __stcg(reinterpret_cast<float4*>(mine + (static_cast<size_t>(jn) * 256 + ct) * 4),
                 make_float4(acc[4 * jn], acc[4 * jn + 1], acc[4 * jn + 2], acc[4 * jn + 3]));
        }
        __threadfence();
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        if (ct == 0) is_last = atomicAdd(a.tickets + sg.t, 1) == cl - cf;
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        if (!is_last) continue;
        __threadfence();
        if (ct == 0) a.tickets[sg.t] = 0;  // zero again for the next call
        // The sum in block order, every piece from its slot (this block's
        // too: the same bits as its registers), kJ rows of 4 at a time:
        // per piece, kJ independent 16-byte loads per thread.
        constexpr int kJ = 8;
#pragma unroll
        for (int j0 = 0; j0 < NT / 8; j0 += kJ) {
          for (int b = cf; b <= cl; ++b) {
            const bool bfirst = w.Beg(b) / w.npairs == sg.t;
            const float* src = a.part + static_cast<size_t>(2 * b + (bfirst ? 0 : 1)) * slot_floats;
            float4 p[kJ];
#pragma unroll
            for (int jj = 0; jj < kJ; ++jj) {
              p[jj] = __ldcg(reinterpret_cast<const float4*>(src + (static_cast<size_t>(j0 + jj) * 256 + ct) * 4));
            }
#pragma unroll
            for (int jj = 0; jj < kJ; ++jj) {
              float* d = acc + 4 * (j0 + jj);
              if (b == cf) {
                d[0] = p[jj].x, d[1] = p[jj].y, d[2] = p[jj].z, d[3] = p[jj].w;
              } else {
                d[0] += p[jj].x, d[1] += p[jj].y, d[2] += p[jj].z, d[3] += p[jj].w;
              }
            }
          }
        }
      }
    }
    // y through the epilogue tile, 128 tokens at a time: the accumulators
    // in (element 4 jn + e: token 8 jn + 2 tig + (e & 1), column 64 ci + 16
    // wl + gid + 8 (e >> 1)), then StoreTile's coalesced rows (bias,
    // accumulate, fp32 / fp16, four columns per thread and store; call 3
    // of v36: storing straight from the accumulators, 2-byte stores
    // scattered over 4 tokens per warp, cost ~12 us per tile).
    if ((a.sk_flags & 2) != 0) continue;  // benchmarks: no output stores
    float* tile = reinterpret_cast<float*>(sbase + S * C::kStageBytes);
    const int cb = ci * 64 + 16 * wl + gid;
#pragma unroll
    for (int h = 0; h < NT / 128; ++h) {
      asm volatile("bar.sync 1, 256;\n" ::: "memory");  // the last pass's reads are done
#pragma unroll
      for (int jn = 16 * h; jn < 16 * h + 16; ++jn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          tile[(8 * (jn - 16 * h) + 2 * tig + (e & 1)) * kEpiLd + cb + 8 * (e >> 1)] = acc[4 * jn + e];
        }
      }
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      StoreTile<128>(a, tile, m0 + 128 * h, tile0 * 64, ct, &is_last,
                     [] { asm volatile("bar.sync 1, 256;\n" ::: "memory"); });
    }
  }
#else
  __trap();
#endif
}

// The kernel's dynamic shared memory limit raised to Smem bytes, once per
// kernel and device (ConfigureOnce).
template <auto Kernel, int Smem>
cudaError_t Prepare() {
  return ConfigureOnce(reinterpret_cast<const void*>(Kernel), [] {
    return cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem);
  });
}

}  // namespace wgk

bool PrefillWgmmaAvailable() {
  static const bool ok = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      return false;
    }
    cudaFuncAttributes fa{};
    if (major != 9 || cudaFuncGetAttributes(&fa, wgk::W4WgmmaKernel<128>) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    // The sm_90a cubin was picked (a build without it would run the trap).
    return fa.binaryVersion == 90;
  }();
  return ok;
}

namespace {

// The 64-k stages of each of sp splits of nst stages: even (the kernel's
// loop runs stages in pairs).
int64_t SplitStages(int64_t nst, int sp) { return ((nst + sp - 1) / sp + 1) / 2 * 2; }

// The wgmma kernel's k splits for an m x n x kp GEMM with `tokens`-token
// tiles and part_floats floats of partials: `forced` (1..4) if it fits (no
// split empty, the partials within part_floats, a ticket per tile), else 0;
// forced 0: 1. Automatic is no split: measured on the H200
// (docs/results/gpu.md, v33), a split block costs ~25-35 us more than its
// share of the main loop, cause not found, so splitting paid only where the
// grid fills half the SMs or less over a long k (8B down at M = 512: 132
// against 194 us) and lost elsewhere (8B gate_up at M = 512: 373 against
// 237 us).
int PrefillWgmmaSplits(int64_t m, int64_t n, int64_t kp, int tokens, size_t part_floats,
                       int forced) {
  if (forced == 0 || forced == 1) return 1;
  if (forced < 0 || forced > 4) return 0;
  const int64_t gx = (m + tokens - 1) / tokens, gy = (n + 127) / 128, nst = kp / 64;
  const bool fits = (forced - 1) * SplitStages(nst, forced) < nst &&
                    static_cast<size_t>(forced) * m * n <= part_floats &&
                    gx * gy <= (int64_t{1} << 18);
  return fits ? forced : 0;
}

}  // namespace

absl::Status LaunchPrefillWgmma(const W4DeviceWeight::Impl& w, const uint16_t* x, int64_t m,
                                int64_t ldx, const float* bias, float* y32, uint16_t* y16,
                                int64_t ldy, bool accumulate, int tokens, cudaStream_t stream,
                                int flags, W4Workspace::Impl& ws, int ksplits) {
  if (!PrefillWgmmaAvailable()) {
    return absl::FailedPreconditionError(
        "W4 prefill: the wgmma kernel needs an sm_90 device and a build with sm_90a");
  }
  if (w.k % 8 != 0 || ldx % 8 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "W4 prefill: the wgmma kernel needs k and ldx multiples of 8 and x 16-byte aligned (k=",
        w.k, " ldx=", ldx, ")"));
  }
  if (tokens != 16 && tokens != 32 && tokens != 64 && tokens != 128 && tokens != 256) {
    return absl::InvalidArgumentError(
        "W4 prefill: the wgmma kernel's token tile is 16, 32, 64, 128 or 256");
  }
  if (tokens < 128 && ((flags & (128 | 256)) != 128 || (flags & 96) == 96)) {
    return absl::InvalidArgumentError(
        "W4 prefill: the 16- / 32- / 64-token tiles are the warp-specialized kernel's only "
        "(+ 128; no stream-K; timing flags + 32 or + 64)");
  }
  wgk::Args a{};
  a.qw = reinterpret_cast<const uint4*>(w.qw);
  a.sz = w.sz;
  a.ntiles = static_cast<int>(w.ntiles);
  a.ksteps = static_cast<int>(w.ksteps);
  a.ngroups = static_cast<int>(w.ngroups);
  // Groups are powers of two >= 32, or one group (per-channel).
  a.gshift = 30;
  if (w.ngroups > 1) {
    a.gshift = 0;
    while ((int64_t{1} << a.gshift) < w.group) ++a.gshift;
  }
  a.x = reinterpret_cast<const __half*>(x);
  a.ldx = ldx;
  a.m = static_cast<int>(m);
  a.k = static_cast<int>(w.k);
  a.n = static_cast<int>(w.n);
  a.bias = bias;
  a.y32 = y32;
  a.y16 = reinterpret_cast<__half*>(y16);
  a.ldy = ldy;
  a.accumulate = accumulate ? 1 : 0;
  a.split = (flags & 64) != 0 ? 2 : (flags & 32) != 0 ? 1 : 0;
  // v33: split-K over the grid's z (PrefillWgmmaSplits), the tiles'
  // partials in the workspace's fp16 weight scratch (unused on this path),
  // the tickets in its counters.
  const bool sk = (flags & 256) != 0;  // v36: stream-K
  int64_t sk_blocks = 0;
  if (sk) {  // (W4Linear checked the flags: + 128, no forced k split)
    const int64_t gx = (m + tokens - 1) / tokens, gy = (w.ntiles + 1) / 2;
    const int64_t units = gx * gy * (w.ksteps / 8);
    sk_blocks = std::min<int64_t>(ws.num_sms, units);
    if (gx * gy > ws.ncounters || ws.wh_elems < SkPartialHalves(ws.num_sms) || units < 1 ||
        2 * sk_blocks * sk_blocks * (w.ksteps / 8) >= (int64_t{1} << 31)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "W4 prefill: the stream-K kernel's tiles or partial slots do not fit the workspace (m=",
          m, " n=", w.n, "; reserve it for the prefill's m)"));
    }
    a.sk_cap = ksplits >= 2 ? ksplits : 4;  // (W4Linear checked <= 4; tuned: -1)
    ksplits = 1;
    a.sk_flags = ((flags & 512) != 0 ? 1 : 0) | ((flags & 1024) != 0 ? 2 : 0);
  }
  // ksplits < 0: -ksplits preferred, unsplit where they do not fit.
  int sp = PrefillWgmmaSplits(m, w.n, w.kp, tokens, ws.wh_elems / 2, ksplits < 0 ? -ksplits : ksplits);
  if (ksplits < 0 && sp == 0) sp = 1;
  if (sp == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "W4 prefill: ", ksplits, " k splits do not fit this shape or the workspace (m=", m,
        " n=", w.n, " k=", w.k, ")"));
  }
  a.ksplits = sp;
  a.per = static_cast<int>(SplitStages(w.ksteps / 4, sp));
  a.vec_part = w.n % 4 == 0 ? 1 : 0;
  const uintptr_t yp = y32 != nullptr ? reinterpret_cast<uintptr_t>(y32) : reinterpret_cast<uintptr_t>(y16);
  a.vec_out = w.n % 4 == 0 && ldy % 4 == 0 && yp % (y32 != nullptr ? 16 : 8) == 0 ? 1 : 0;
  if (sp > 1 || sk) {
    a.part = reinterpret_cast<float*>(ws.wh);
    a.tickets = ws.counters;
  }
  // The x tensor map: dims {k, m} (innermost first), row stride ldx * 2
  // bytes, box {64, tokens}, 128-byte swizzle (the wgmma B layout).
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) {
    return absl::FailedPreconditionError("W4 prefill: cuTensorMapEncodeTiled not available");
  }
  CUtensorMap xmap;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(w.k), static_cast<cuuint64_t>(m)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ldx) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(tokens)};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult cr = encode(&xmap, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<uint16_t*>(x),
                             dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (cr != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat("W4 prefill: cuTensorMapEncodeTiled failed: ", cr));
  }
  const unsigned gy = static_cast<unsigned>((w.ntiles + 1) / 2);
  if (sk) {  // one persistent block per SM at most
    const unsigned nb = static_cast<unsigned>(sk_blocks);
    if (tokens == 128) {
      SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaSkKernel<128>, wgk::SkSmem<128>()>()));
      wgk::W4WgmmaSkKernel<128><<<nb, 384, wgk::SkSmem<128>(), stream>>>(a, xmap);
    } else {
      SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaSkKernel<256>, wgk::SkSmem<256>()>()));
      wgk::W4WgmmaSkKernel<256><<<nb, 384, wgk::SkSmem<256>(), stream>>>(a, xmap);
    }
  } else if ((flags & 128) != 0) {  // v34: the warp-specialized kernel
    const dim3 grid(static_cast<unsigned>((m + tokens - 1) / tokens), gy,
                    static_cast<unsigned>(a.ksplits));
    if (tokens == 16) {
      SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaWsKernel<16>, wgk::Cfg<16>::kSmem>()));
      wgk::W4WgmmaWsKernel<16><<<grid, 384, wgk::Cfg<16>::kSmem, stream>>>(a, xmap);
    } else if (tokens == 32) {
      SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaWsKernel<32>, wgk::Cfg<32>::kSmem>()));
      wgk::W4WgmmaWsKernel<32><<<grid, 384, wgk::Cfg<32>::kSmem, stream>>>(a, xmap);
    } else if (tokens == 64) {
      SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaWsKernel<64>, wgk::Cfg<64>::kSmem>()));
      wgk::W4WgmmaWsKernel<64><<<grid, 384, wgk::Cfg<64>::kSmem, stream>>>(a, xmap);
    } else if (tokens == 128) {
      SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaWsKernel<128>, wgk::Cfg<128>::kSmem>()));
      wgk::W4WgmmaWsKernel<128><<<grid, 384, wgk::Cfg<128>::kSmem, stream>>>(a, xmap);
    } else {
      SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaWsKernel<256>, wgk::Cfg<256>::kSmem>()));
      wgk::W4WgmmaWsKernel<256><<<grid, 384, wgk::Cfg<256>::kSmem, stream>>>(a, xmap);
    }
  } else if (tokens == 128) {
    SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaKernel<128>, wgk::Cfg<128>::kSmem>()));
    const dim3 grid(static_cast<unsigned>((m + 127) / 128), gy, static_cast<unsigned>(a.ksplits));
    wgk::W4WgmmaKernel<128><<<grid, 256, wgk::Cfg<128>::kSmem, stream>>>(a, xmap);
  } else {
    SPEAR_CUDA_RETURN_IF_ERROR((wgk::Prepare<wgk::W4WgmmaKernel<256>, wgk::Cfg<256>::kSmem>()));
    const dim3 grid(static_cast<unsigned>((m + 255) / 256), gy, static_cast<unsigned>(a.ksplits));
    wgk::W4WgmmaKernel<256><<<grid, 256, wgk::Cfg<256>::kSmem, stream>>>(a, xmap);
  }
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
