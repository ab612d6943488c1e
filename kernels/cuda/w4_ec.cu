// The EC pieces on CUDA: the decode prologue (u = A x for up to 64 tokens,
// then the gate, in one launch: r x P blocks compute u in P k ranges, the
// last block to finish sums them in order and computes
// g = 1 + tanh(W2 silu(W1 u + b1) + b2) and v = g ⊙ u; v47: for one token
// before the fold kernel, one cluster of 8 blocks whose partial sums meet in
// block 0's shared memory), the row-wise gate of the prefill path, and
// EcApply (y += B v, the naive baseline's extra pass).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/ec_gate.cuh"
#include "kernels/cuda/ec_tile.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/norm_rows.cuh"
#include "kernels/cuda/pdl.cuh"
#include "kernels/cuda/swiglu_rows.cuh"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {
namespace {

struct GateArgs {
  int r, rp, h, gated;
  const float* w1;
  const float* b1;
  const float* w2;
  const float* b2;
  __half* v_half;
  int ldv;
  float* v_f32;
  float* gate_out;
  int ldg;  // gate_out row stride
};

// GateBlock's store of token t's rank c (c < rp): v as fp32 and the gate
// value for c < r, v as fp16 for every c (the padded ranks too); both
// prologue forms use it.
__device__ __forceinline__ void StoreGateOutputs(const GateArgs& g, int t, int c, float gate,
                                                 float v) {
  if (c < g.r) {
    if (g.v_f32 != nullptr) g.v_f32[t * g.r + c] = v;
    if (g.gate_out != nullptr) g.gate_out[t * g.ldg + c] = gate;
  }
  if (g.v_half != nullptr) g.v_half[t * g.ldv + c] = __float2half_rn(v);
}

// One warp computes the gate of one token from u (r floats in `us`).
__device__ void GateWarp(const GateArgs& g, long long token, float* us, float* hs) {
  const int lane = threadIdx.x & 31;
  if (g.gated) {
    for (int t = lane; t < g.h; t += 32) {
      float a = g.b1[t];
      for (int q = 0; q < g.r; ++q) a += g.w1[t * g.r + q] * us[q];
      hs[t] = a / (1.f + expf(-a));
    }
    __syncwarp();
  }
  for (int q = lane; q < g.rp; q += 32) {
    float v = 0.f, gate = 1.f;
    if (q < g.r) {
      if (g.gated) {
        float z = g.b2[q];
        for (int t = 0; t < g.h; ++t) z += g.w2[q * g.h + t] * hs[t];
        gate = 1.f + tanhf(z);
      }
      v = gate * us[q];
      if (g.v_f32 != nullptr) g.v_f32[token * g.r + q] = v;
      if (g.gate_out != nullptr) g.gate_out[token * g.ldg + q] = gate;
    }
    if (g.v_half != nullptr) g.v_half[token * g.ldv + q] = __float2half_rn(v);
  }
}

// A as the prologue reads it (EcAArgs, w4_layout.h): 8 values k = 8 c ..
// 8 c + 7 of row `row` as fp16 (fp16(code x scale) for int8 codes: the
// value an fp16 copy of the decoded A holds). Needs k % 8 == 0.
__device__ __forceinline__ uint4 A8Halves(uint2 codes, __half s) {
  const __half2 s2 = __half2half2(s);
  uint4 o;
  I8x4ToHalf2(codes.x, s2, &o.x, &o.y);
  I8x4ToHalf2(codes.y, s2, &o.z, &o.w);
  return o;
}
template <bool A8>
__device__ __forceinline__ uint4 APiece(const EcAArgs& A, int row, int k, int c) {
  if constexpr (!A8) {
    return reinterpret_cast<const uint4*>(A.h + static_cast<long long>(row) * k)[c];
  }
  const uint2 codes = *reinterpret_cast<const uint2*>(A.c + static_cast<long long>(row) * k + 8 * c);
  return A8Halves(codes, A.s[static_cast<long long>(row) * A.ng + ((8 * c) >> 6)]);
}
// One element of A as a float (the scalar path).
template <bool A8>
__device__ __forceinline__ float AElem(const EcAArgs& A, int row, int k, int j) {
  if constexpr (!A8) return __half2float(A.h[static_cast<long long>(row) * k + j]);
  const float v = static_cast<float>(A.c[static_cast<long long>(row) * k + j]) *
                  __half2float(A.s[static_cast<long long>(row) * A.ng + (j >> 6)]);
  return __half2float(__float2half_rn(v));
}

// ecg::StageOddRows by 4-byte asynchronous copies (cp.async; waited for
// with CpAsyncWaitAll): every copy issued at once instead of a
// load-then-store round trip per element (v59: 8B at the int8 recipe's
// ranks on an H100, batch 2 3.388 -> 3.272 ms, batch 8 4.342 -> 4.209;
// docs/results/gpu.md, v60).
__device__ __forceinline__ void StageOddRowsAsync(float* dst, const float* src, int rows, int cols,
                                                  int tid, int nthreads) {
  const int ld = cols | 1;
  for (int i = tid; i < rows * cols; i += nthreads) {
    const int j = i / cols, c = i - j * cols;
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst + j * ld + c));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src + i));
  }
}
__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// The prologue's gate forms, and its timing-only cut-offs (the output is
// then wrong).
constexpr int kStageWarp = 0;        // one warp per token (v12's; large r x h or m)
constexpr int kStageGroups = 1;      // v27: dot products over lane groups
constexpr int kStageGroupsTwoPhase = 2; // the same, W1 then W2 staged in one region (v58)
constexpr int kStageLaunchOnly = -1; // ec_prologue 64: return after the wait
constexpr int kStageUOnly = -2;      // ec_prologue 128: u's partials only

// The last block's parallel gate (u, hidden, the MLP's weights) in shared
// memory when it fits (floats; 40 KB, with the static 2 KB under 48 KB).
constexpr int kGateStageFloats = 10240;

// Grid (r, P): block (q, p) computes the partial u[t][q] over k range p of P
// (kchunk elements, a multiple of 8) for every token, into upart[p][t][q];
// the last block to finish sums the P partials in order (deterministic),
// then computes the gates: kStageGroups (v27, default) each dot product of the
// MLP split over a lane group, from shared memory (u, hidden and the MLP's
// weights as stored; v14d's one output per thread with transposed weights
// was slower: docs/results/gpu.md, "v27-v29"); kStageWarp one warp per
// token (dynamic shared memory us[8][r], hs[8][h]).
// (256, 4): at most 64 registers, as v14d's form had: with more (80 at
// v27's first cut) the prologue's blocks no longer fit beside two fold
// kernel blocks on an SM and the decode step got slower (2026-12-03, call 1).
// (128-thread blocks, 8 K registers, were slower: the u phase takes two
// passes per range; docs/results/gpu.md, "v27-v29".)
template <bool A8>  // A as int8 codes + scales (else fp16)
__global__ void __launch_bounds__(256, 4) EcPrologueKernel(const __half* __restrict__ x, int m,
                                                        long long ldx, int k, int kchunk,
                                                        const EcAArgs A, float* upart,
                                                        unsigned* counter, GateArgs g,
                                                        int stage) {
  constexpr int kT = 256;  // threads per block
  const int q = blockIdx.x, part = blockIdx.y, P = gridDim.y;
  const int k0 = part * kchunk, k1 = min(k, k0 + kchunk);
  const bool vec = (k % 8 == 0) && (ldx % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);
  const int cb = k0 / 8, ce = (k1 + 7) / 8;
  // v27 (kStageGroups): what does not depend on x is requested before the wait:
  // the block's first A pieces (registers) and, by block (0, 0), the gate
  // MLP's weights into L2 for the last block (so its loads hit L2, not DRAM).
  uint4 apre = {};
  const bool pre = (stage == kStageGroups || stage == kStageGroupsTwoPhase) && vec;
  if (pre) {
    const int c = cb + static_cast<int>(threadIdx.x);
    if (c < ce) apre = APiece<A8>(A, q, k, c);
    if (q == 0 && part == 0 && g.gated) {
      const int wl = (g.h * g.r * 4 + 127) / 128;  // 128-byte lines of W1 (and of W2)
      for (int i = threadIdx.x; i < 2 * wl + 2; i += kT) {
        const char* base = i < wl ? reinterpret_cast<const char*>(g.w1) + i * 128
                           : i < 2 * wl ? reinterpret_cast<const char*>(g.w2) + (i - wl) * 128
                           : i == 2 * wl ? reinterpret_cast<const char*>(g.b1)
                                         : reinterpret_cast<const char*>(g.b2);
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(base));
      }
    }
  }
  // Launched under PDL (LaunchPdl): wait for x's producer. After a plain
  // launch there is nothing to wait for and this returns at once (as the
  // small kernels' PdlEnter does with SetProgrammaticLaunch(false)).
  // The GEMM that follows (launched with PDL) may start after the wait: it
  // reads only x (complete: this kernel waited for it, or was launched after
  // it) and the weights until it needs v (see w4_gemm_kernel.cuh).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
  if (stage == kStageLaunchOnly) return;  // measurement only (ec_prologue 64): v left stale
  extern __shared__ float dyn[];
  constexpr int kNW = kT / 32;
  __shared__ float ut[kNW][kDecodeMaxM];
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // u[t][q] over [k0, k1) = A[q] . x[t]: the block's kT threads split the
  // range (8 elements per load), then a warp shuffle reduction and a
  // fixed-order sum over the kT / 32 warps: deterministic.
  // Four tokens at a time: each A chunk is loaded once for the four.
  for (int t0 = 0; t0 < m; t0 += 4) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (vec) {
      // One 16-byte piece per thread per pass (v27: two per pass held 16 more
      // registers for nothing at ranges of 2048, one pass; same sums in the
      // same order).
      for (int c = cb + static_cast<int>(threadIdx.x); c < ce; c += kT) {
        const uint4 av = pre && c - cb < kT ? apre : APiece<A8>(A, q, k, c);
        uint4 xv[4];
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
          if (t0 + tt < m) xv[tt] = reinterpret_cast<const uint4*>(x + (t0 + tt) * ldx)[c];
        }
        const __half2* ah = reinterpret_cast<const __half2*>(&av);
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
          if (t0 + tt >= m) continue;
          const __half2* xh = reinterpret_cast<const __half2*>(&xv[tt]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 af = __half22float2(ah[i]), xf = __half22float2(xh[i]);
            acc[tt] += af.x * xf.x + af.y * xf.y;
          }
        }
      }
    } else {
      for (int c = k0 + threadIdx.x; c < k1; c += kT) {
        const float av = AElem<A8>(A, q, k, c);
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
          if (t0 + tt < m) acc[tt] += av * __half2float(x[(t0 + tt) * ldx + c]);
        }
      }
    }
#pragma unroll
    for (int tt = 0; tt < 4; ++tt) {
      float v = acc[tt];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && t0 + tt < m) ut[warp][t0 + tt] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x < m) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kNW; ++w) v += ut[w][threadIdx.x];
    __stcg(upart + (static_cast<long long>(part) * m + threadIdx.x) * g.r + q, v);
  }
  if (stage == kStageUOnly) return;  // measurement only (ec_prologue 128): no ticket or gate
  // The ticket (v27): one acquire-release atomic by thread 0 after the block
  // barrier (the barrier orders the block's partial stores before it; the
  // release makes them visible with it, the acquire of the last block sees
  // every block's), instead of a fence in every thread.
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned prev;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                 : "=r"(prev)
                 : "l"(counter)
                 : "memory");
    last = prev == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!last) return;
  const int r = g.r, h = g.h;
  if (stage == kStageGroups) {
    // v27: the gate with every thread, from shared memory: u [m][r] (the
    // partials summed in order), W1 [h][r], b1, W2 [r][h], b2 as stored
    // (loaded in the same pass as the partials: one round of L2 loads), the
    // hidden [m][h]. Each hidden unit and each gate is one dot product split
    // over a group of G lanes (a power of two, so that the m h or m rp dot
    // products fill the block) and summed by shuffles: ~r / G then ~h / G
    // steps instead of r then h in one thread.
    // W1's rows stored with an odd stride r | 1 and W2's with h | 1, so the
    // rows that neighbouring lane groups read fall in different banks (with
    // the stride r = 56 a warp's 32 rows hit 4 banks: 8-way conflicts).
    const int tid = static_cast<int>(threadIdx.x);
    // v59: the weights' copies issued first (cp.async), in flight while the
    // partials are summed.
    const ecg::Staged st = ecg::StagedAt(dyn, m, r, h);
    if (g.gated) {
      StageOddRowsAsync(st.w1s, g.w1, h, r, tid, kT);  // w1 [h][r]
      StageOddRowsAsync(st.w2s, g.w2, r, h, tid, kT);  // w2 [r][h]
      StageOddRowsAsync(st.b1s, g.b1, 1, h, tid, kT);
      StageOddRowsAsync(st.b2s, g.b2, 1, r, tid, kT);
    }
    ecg::StageU(st.us, upart, P, m, r, tid, kT);
    CpAsyncWaitAll();
    __syncthreads();
    const ecg::GateWeights sw = ecg::StagedWeights(st, r, h);
    ecg::GateBlock(m, r, g.rp, h, g.gated != 0, st.us, st.hs, sw, tid, kT,
                   [] { __syncthreads(); }, [&] { return sw; },
                   [&](int t, int c, float gate, float v) { StoreGateOutputs(g, t, c, gate, v); });
  } else if (stage == kStageGroupsTwoPhase) {
    // v58: where the staged copy does not fit 40 KB (the int8 recipe's
    // ranks at m >= 2: a merged q / k / v EC of rank 104 with 48 hidden
    // units at m = 8), W1 is staged for the hidden units, then W2 over it
    // for the gates (one more barrier); the same sums as the staged form.
    // (Before v58 one warp per token ran such a gate from global memory:
    // 8B batch 8 at the int8 recipe's ranks 4.88 -> 4.47 ms on an H100;
    // W1 / W2 read in place by the lane groups was slower still, 5.03 ms:
    // docs/results/gpu.md, v58.)
    const ecg::TwoPhase tp = ecg::TwoPhaseAt(dyn, m, r, h);
    const int tid = static_cast<int>(threadIdx.x);
    if (g.gated) {  // (v59: copies in flight while the partials are summed)
      StageOddRowsAsync(tp.wr, g.w1, h, r, tid, kT);  // w1 [h][r]
      StageOddRowsAsync(tp.b1s, g.b1, 1, h, tid, kT);
      StageOddRowsAsync(tp.b2s, g.b2, 1, r, tid, kT);
    }
    ecg::StageU(tp.us, upart, P, m, r, tid, kT);
    CpAsyncWaitAll();
    __syncthreads();
    ecg::GateBlock(
        m, r, g.rp, h, g.gated != 0, tp.us, tp.hs,
        ecg::GateWeights{tp.wr, tp.b1s, nullptr, tp.b2s, r | 1, 0}, tid, kT,
        [] { __syncthreads(); },
        [&] {
          // (after the hidden units' barrier: W1's reads are done)
          StageOddRowsAsync(tp.wr, g.w2, r, h, tid, kT);  // w2 [r][h]
          CpAsyncWaitAll();
          __syncthreads();
          return ecg::GateWeights{nullptr, tp.b1s, tp.wr, tp.b2s, 0, h | 1};
        },
        [&](int t, int c, float gate, float v) { StoreGateOutputs(g, t, c, gate, v); });
  } else {
    // One warp per token (v12; also where the parallel layout does not fit).
    float* us = dyn + warp * r;
    float* hs = dyn + kNW * r + warp * h;
    for (int t = warp; t < m; t += kNW) {
      for (int i = lane; i < r; i += 32) us[i] = ecg::SumParts(upart, P, m, r, t, i);
      __syncwarp();
      GateWarp(g, t, us, hs);
      __syncwarp();
    }
  }
  if (threadIdx.x == 0) *counter = 0;
}

// v47: the prologue of one token (m = 1) as ONE cluster of C blocks (C =
// gridDim.x, 8), so that u's partial sums meet in distributed shared memory
// and a cluster barrier instead of the v27 form's global ticket and a round
// of L2 loads by its last block. Block b takes k range b (kchunk, a
// multiple of 64) for every rank: its slice of A (r x kchunk) and, in block
// 0, the gate MLP's weights are requested before the dependency wait
// (cp.async into shared memory); after it, x's slice, u's partial sums by
// tensor cores (v60; before, one warp per four ranks with the lanes over
// 16-byte pieces), the partial u[t][q] stored into block 0's
// shared memory (parts [C][m][r]); block 0 sums them in order b = 0, 1, ...
// (deterministic) and runs the gate (ec_gate.cuh, as the v27 form's last
// block). Shared memory per block (16-byte units, the same layout in every
// block): A [r][kchunk / 8], x [m][kchunk / 8], then floats: parts, the
// staged gate.
constexpr int kClusterBlocks = 8;
// EcPrologueClusterKernel's mode bits: the lanes' u (ec_prologue 1024), and
// for measurements only (the output is then wrong) no loads of A's slices
// (2048) or the launch alone (4096: the dependency wait, then exit).
constexpr int kClusterLanesU = 1, kClusterNoA = 2, kClusterLaunchOnly = 4;
constexpr int kClusterMaxM = 1;  // v47 call 4: at m = 2 the v27 form was faster
static_assert(kClusterMaxM == 1, "v60: the tensor-core u takes x as one row");

// Shared memory per block of the one-cluster form: A's slice (16 bytes a
// piece of 8 values, 8 for int8 codes), x's slice, the partial sums, the
// staged gate; with int8 A (a8) then its scales, r rows of
// ClusterScaleStride halves (16-byte aligned).
__host__ __device__ inline int ClusterScaleStride(int kc) { return (kc / 64 + 4 + 1) & ~1; }
__host__ __device__ inline size_t ClusterABytes(int64_t r, int kc, bool a8) {
  return (static_cast<size_t>(r) * (kc / 8) * (a8 ? 8 : 16) + 15) / 16 * 16;
}
__host__ __device__ inline size_t ClusterSmemBase(int64_t m, int64_t r, int kc,
                                                  int64_t staged_floats, bool a8) {
  return ClusterABytes(r, kc, a8) + static_cast<size_t>(m) * (kc / 8) * 16 +
         (static_cast<size_t>(kClusterBlocks) * m * r + static_cast<size_t>(staged_floats)) * 4;
}
inline size_t ClusterSmem(int64_t m, int64_t r, int kc, int64_t staged_floats, bool a8) {
  const size_t base = ClusterSmemBase(m, r, kc, staged_floats, a8);
  return a8 ? (base + 15) / 16 * 16 + static_cast<size_t>(r) * ClusterScaleStride(kc) * 2 : base;
}

__device__ __forceinline__ float Dot8(const uint4& av, const uint4& xv) {
  const __half2* ah = reinterpret_cast<const __half2*>(&av);
  const __half2* xh = reinterpret_cast<const __half2*>(&xv);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 af = __half22float2(ah[i]), xf = __half22float2(xh[i]);
    s += af.x * xf.x + af.y * xf.y;
  }
  return s;
}

template <bool A8>  // A as int8 codes + scales (else fp16)
__global__ void __launch_bounds__(256, 1)
    EcPrologueClusterKernel(const __half* __restrict__ x, int m, long long ldx, int k, int kchunk,
                            const EcAArgs A, GateArgs g, RowNorm norm, RowSwiglu sw,
                            int mode) {
  constexpr int kT = 256, kNW = kT / 32;
  extern __shared__ __align__(16) unsigned char dsm[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x, C = gridDim.x, r = g.r, h = g.h;
  const int lanes_u = mode & kClusterLanesU;
  const int k0 = b * kchunk;
  const int np = max(0, min(k, k0 + kchunk) - k0) / 8;  // this block's 16-byte pieces per row
  const int npm = kchunk / 8;
  uint4* as = reinterpret_cast<uint4*>(dsm);
  uint4* xs = reinterpret_cast<uint4*>(dsm + ClusterABytes(r, kchunk, A8));
  float* parts = reinterpret_cast<float*>(xs + m * npm);  // [C][m][r] (block 0's)
  float* stg = parts + C * m * r;                         // the staged gate (block 0)
  // int8 A: the slice's codes in `as` as 8-byte pieces, its scales (pairs
  // of groups from the even group g0e) after the staged gate.
  uint2* as8 = reinterpret_cast<uint2*>(as);
  const int g0e = (k0 >> 6) & ~1, nsp = ClusterScaleStride(kchunk);
  __half* ss = reinterpret_cast<__half*>(
      dsm + (ClusterSmemBase(m, r, kchunk, ecg::StagedFloats(m, r, h, g.gated), A8) + 15) / 16 *
                16);
  auto sa = [](const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); };
  auto cp16 = [](unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
  };
  auto cp4 = [](unsigned dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
  };
  // Every block of the cluster must have started before another writes into
  // its shared memory: arrive now, wait just before the first remote store.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  if ((mode & kClusterLaunchOnly) != 0) {  // measurement only: v left stale
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::);
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
    return;
  }
  // What does not depend on x: A's slice, and (block 0) the MLP's weights
  // (mode kClusterNoA, measurement only: not A's slice).
  if ((mode & kClusterNoA) != 0) {
  } else if constexpr (!A8) {
    for (int i = tid; i < r * np; i += kT) {
      const int q = i / np, c = i - q * np;
      cp16(sa(as + q * npm + c), A.h + static_cast<long long>(q) * k + k0 + c * 8);
    }
  } else {
    auto cp8 = [](unsigned dst, const void* src) {
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
    };
    for (int i = tid; i < r * np; i += kT) {
      const int q = i / np, c = i - q * np;
      cp8(sa(as8 + q * npm + c), A.c + static_cast<long long>(q) * k + k0 + c * 8);
    }
    // the scale pairs of the groups this block's pieces touch
    const int npairs = np > 0 ? (((k0 + 8 * np - 1) >> 6) - g0e) / 2 + 1 : 0;
    for (int i = tid; i < r * npairs; i += kT) {
      const int q = i / npairs, j = i - q * npairs;
      cp4(sa(ss + q * nsp + 2 * j), A.s + static_cast<long long>(q) * A.ng + g0e + 2 * j);
    }
  }
  const ecg::Staged st = ecg::StagedAt(stg, m, r, h);
  if (b == 0 && g.gated) {
    for (int i = tid; i < h * r; i += kT) {
      const int j = i / r, c = i - j * r;  // w1 [h][r]
      cp4(sa(st.w1s + j * (r | 1) + c), g.w1 + i);
      const int c2 = i / h, j2 = i - c2 * h;  // w2 [r][h]
      cp4(sa(st.w2s + c2 * (h | 1) + j2), g.w2 + i);
    }
    for (int i = tid; i < h; i += kT) cp4(sa(st.b1s + i), g.b1 + i);
    for (int i = tid; i < r; i += kT) cp4(sa(st.b2s + i), g.b2 + i);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  // v60: zeros past this block's pieces up to its last group of 8 (the
  // tensor-core form reads them): in x, and in fp16 A's rows (an int8 code
  // is finite whatever the bytes; times x's zero it adds nothing).
  const int npz = min(npm, (np + 7) / 8 * 8) - np;
  for (int i = tid; i < npz * (A8 ? 1 : 1 + r); i += kT) {
    const int q = i / npz, c = np + i % npz;
    if (q == 0) {
      xs[c] = make_uint4(0u, 0u, 0u, 0u);
    } else if constexpr (!A8) {
      as[(q - 1) * npm + c] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  // v49: the norm's weights of this thread's x piece, before the wait.
  float4 wn0 = make_float4(0.f, 0.f, 0.f, 0.f), wn1 = wn0;
  if (norm.h != nullptr && tid < np) {
    wn0 = *reinterpret_cast<const float4*>(norm.w + k0 + tid * 8);
    wn1 = *reinterpret_cast<const float4*>(norm.w + k0 + tid * 8 + 4);
  }
  // x's producer (launched under PDL: LaunchPdl semantics, as the v27 form).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
  if (norm.h != nullptr) {
    // v49 (m = 1): x = RMSNorm(h), this block's slice, with the fold
    // kernel's (and RmsNormF16's) sums and operations: the same bits.
    __shared__ float red[9];
    const float inv = nrm::BlockInvRms<kT, 4>(norm.h, k, norm.eps, red);
    if (tid < np) xs[tid] = nrm::Norm8W(norm.h, wn0, wn1, k0 + tid * 8, inv);
    for (int c = tid + kT; c < np; c += kT) xs[c] = nrm::Norm8(norm.h, norm.w, k0 + c * 8, inv);
  } else if (sw.gu != nullptr) {
    // v51 (m = 1): x = SiluMul of the gate_up row, this block's slice, with
    // SiluMul's (and the fold kernel's) operations: the same bits.
    for (int c = tid; c < np; c += kT) xs[c] = swg::Swiglu8(sw.gu, k, k0 + c * 8);
  } else {
    for (int i = tid; i < m * np; i += kT) {
      const int t = i / np, c = i - t * np;
      cp16(sa(xs + t * npm + c), x + t * ldx + k0 + c * 8);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();
  // (every block has started long before: this returns at once)
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  // v60 (the default): u by tensor cores. One m16n8k16 step takes sixteen
  // ranks as A's rows (lane (g, t): ranks 16 o + g and 16 o + g + 8 at
  // piece c0 + t, its 8 values as the k slots 2t, 2t + 1, 2t + 8, 2t + 9 of
  // two steps) and x as B's column 0 (lanes 0..3, x's piece in the same
  // slots; the other columns zero): a dot product does not depend on which
  // k slot holds which k. D's column 0 (lanes 4g) holds ranks 16 o + g and
  // + 8. Tiles of sixteen ranks round-robin over the warps; rows past r
  // read row r - 1 (their sums are not stored). Int8 A: the codes as fp16
  // integers (exact), each 64-value group (two steps) summed apart and
  // times its scale in fp32 (code x scale exactly, as the CPU backend; the
  // lanes' form and the r x P form multiply in fp16). x (and fp16 A's rows)
  // hold zeros past this block's pieces up to its last group. ~15
  // instructions a lane per 8 ranks x 32 k against ~45 for the lanes' form
  // (SASS): 8B batch 1 at the int8 recipe's ranks 2.929 -> 2.849 ms on an
  // H100 (W4 2.512; docs/results/gpu.md, v60). Ranks as B's columns (eight a
  // step, x as A's row 0) measured no faster than the lanes (2.938 ms).
  if (lanes_u == 0) {
    const int gq = lane >> 2, t4 = lane & 3;
    const int ntile = (r + 15) / 16;
    for (int o = warp; o < ntile; o += kNW) {
      const int qa = min(o * 16 + gq, r - 1), qb = min(o * 16 + gq + 8, r - 1);
      float acc[2][4] = {};
      if constexpr (A8) {
        const int godd = (k0 >> 6) - g0e;
        for (int G = 0; G * 8 < np; ++G) {
          const int ca = 8 * G + t4, cb = ca + 4;
          uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = x0;
          if (gq == 0) x0 = xs[ca], x1 = xs[cb];
          const uint2 pa0 = as8[qa * npm + ca], pb0 = as8[qb * npm + ca];
          const uint2 pa1 = as8[qa * npm + cb], pb1 = as8[qb * npm + cb];
          uint32_t a[16];
          I8x4ToHalf2Int(pa0.x, &a[0], &a[1]);
          I8x4ToHalf2Int(pa0.y, &a[2], &a[3]);
          I8x4ToHalf2Int(pb0.x, &a[4], &a[5]);
          I8x4ToHalf2Int(pb0.y, &a[6], &a[7]);
          I8x4ToHalf2Int(pa1.x, &a[8], &a[9]);
          I8x4ToHalf2Int(pa1.y, &a[10], &a[11]);
          I8x4ToHalf2Int(pb1.x, &a[12], &a[13]);
          I8x4ToHalf2Int(pb1.y, &a[14], &a[15]);
          float d0[4], d1[4];
          MmaZ(d0, a[0], a[4], a[1], a[5], x0.x, x0.y);
          MmaZ(d1, a[2], a[6], a[3], a[7], x0.z, x0.w);
          Mma(d0, a[8], a[12], a[9], a[13], x1.x, x1.y);
          Mma(d1, a[10], a[14], a[11], a[15], x1.z, x1.w);
          if (t4 == 0) {
            acc[0][0] = fmaf(__half2float(ss[qa * nsp + G + godd]), d0[0] + d1[0], acc[0][0]);
            acc[0][2] = fmaf(__half2float(ss[qb * nsp + G + godd]), d0[2] + d1[2], acc[0][2]);
          }
        }
      } else {
        for (int c0 = 0; c0 < np; c0 += 4) {
          const int c = c0 + t4;
          uint4 xv = make_uint4(0u, 0u, 0u, 0u);
          if (gq == 0) xv = xs[c];
          const uint4 pa = as[qa * npm + c], pb = as[qb * npm + c];
          Mma(acc[0], pa.x, pb.x, pa.y, pb.y, xv.x, xv.y);
          Mma(acc[1], pa.z, pb.z, pa.w, pb.w, xv.z, xv.w);
        }
      }
      if (t4 == 0) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int q = o * 16 + gq + 8 * e;
          if (q < r) {
            unsigned remote;
            asm volatile("mapa.shared::cluster.u32 %0, %1, 0;\n"
                         : "=r"(remote)
                         : "r"(sa(parts + b * m * r + q)));
            asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote),
                         "f"(acc[0][2 * e] + acc[1][2 * e])
                         : "memory");
          }
        }
      }
    }
  }
  // Before v60 (ec_prologue flag 1024): the lanes' dot products, four ranks
  // per warp at a time (their loads, dot products and shuffle chains
  // interleaved: the ranks' sums are serial otherwise, ~r / 8 chains of
  // loads and 5 shuffles a warp); each rank's sum in the same order as one
  // at a time.
  constexpr int QB = 4;
  for (int q0 = warp * QB; lanes_u != 0 && q0 < r; q0 += kNW * QB) {
    float acc[QB][kClusterMaxM] = {};
    for (int c = lane; c < np; c += 32) {
#pragma unroll
      for (int j = 0; j < QB; ++j) {
        const int q = q0 + j;
        if (q >= r) break;
        uint4 av;
        if constexpr (A8) {
          av = A8Halves(as8[q * npm + c], ss[q * nsp + ((k0 + 8 * c) >> 6) - g0e]);
        } else {
          av = as[q * npm + c];
        }
#pragma unroll
        for (int t = 0; t < kClusterMaxM; ++t) {
          if (t < m) acc[j][t] += Dot8(av, xs[t * npm + c]);
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int j = 0; j < QB; ++j)
#pragma unroll
        for (int t = 0; t < kClusterMaxM; ++t)
          acc[j][t] += __shfl_xor_sync(0xffffffffu, acc[j][t], off);
    }
    if (lane < QB && q0 + lane < r) {
      // lane j stores rank q0 + j (the values are the same in every lane)
      float v[kClusterMaxM];
#pragma unroll
      for (int t = 0; t < kClusterMaxM; ++t) {
        v[t] = acc[0][t];
#pragma unroll
        for (int j = 1; j < QB; ++j) v[t] = lane == j ? acc[j][t] : v[t];
      }
#pragma unroll
      for (int t = 0; t < kClusterMaxM; ++t) {
        if (t < m) {
          unsigned remote;
          asm volatile("mapa.shared::cluster.u32 %0, %1, 0;\n"
                       : "=r"(remote)
                       : "r"(sa(parts + (b * m + t) * r + q0 + lane)));
          asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(v[t]) : "memory");
        }
      }
    }
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
  if (b != 0) return;
  for (int i = tid; i < m * r; i += kT) {
    const int t = i / r, q = i - t * r;
    float v = 0.f;
    for (int bb = 0; bb < C; ++bb) v += parts[(bb * m + t) * r + q];
    st.us[i] = v;
  }
  __syncthreads();
  const ecg::GateWeights gw = ecg::StagedWeights(st, r, h);
  ecg::GateBlock(m, r, g.rp, h, g.gated != 0, st.us, st.hs, gw, tid, kT, [] { __syncthreads(); },
                 [&] { return gw; },
                 [&](int t, int c, float gate, float v) { StoreGateOutputs(g, t, c, gate, v); });
}

__global__ void __launch_bounds__(256) EcGateRowsKernel(const float* __restrict__ u, int m,
                                                        GateArgs g) {
  __shared__ float us[8][kMaxRank];
  __shared__ float hs[8][kMaxRank];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long t = blockIdx.x * 8LL + warp;
  if (t >= m) return;
  for (int i = lane; i < g.r; i += 32) us[warp][i] = u[t * g.r + i];
  __syncwarp();
  GateWarp(g, t, us[warp], hs[warp]);
}

// B[c][q] as an fp16 value (the epilogues' operand: fp16(code x scale) for
// int8 records).
__device__ __forceinline__ float EcB16(const EcTileArgs& e, int c, int q) {
  return __half2float(__float2half_rn(EcBValue(e, c, q)));
}

// y[i, c] += sum_q B[c, q] v[i, q]: one thread per output element.
__global__ void EcApplyKernel(EcTileArgs b, const float* __restrict__ v, int m, int n, int r,
                              float* y32, __half* y16, long long ldy) {
  const long long idx = blockIdx.x * 256LL + threadIdx.x;
  if (idx >= static_cast<long long>(m) * n) return;
  const int i = static_cast<int>(idx / n), c = static_cast<int>(idx % n);
  float acc = 0.f;
  for (int q = 0; q < r; ++q) acc += EcB16(b, c, q) * v[i * r + q];
  if (y32 != nullptr) {
    y32[i * ldy + c] += acc;
  } else {
    y16[i * ldy + c] = __float2half_rn(__half2float(y16[i * ldy + c]) + acc);
  }
}

GateArgs MakeGate(const W4DeviceWeight::Impl& w, uint16_t* v_half, int64_t ldv, float* v_f32,
                  float* gate_out, int64_t ldg) {
  GateArgs g{};
  g.r = static_cast<int>(w.r);
  g.rp = v_half != nullptr ? static_cast<int>(w.rp) : static_cast<int>(w.r);
  g.h = static_cast<int>(w.h);
  g.gated = w.gated ? 1 : 0;
  g.w1 = w.w1;
  g.b1 = w.b1;
  g.w2 = w.w2;
  g.b2 = w.b2;
  g.v_half = reinterpret_cast<__half*>(v_half);
  g.ldv = static_cast<int>(ldv);
  g.v_f32 = v_f32;
  g.gate_out = gate_out;
  g.ldg = static_cast<int>(ldg > 0 ? ldg : w.r);
  return g;
}

}  // namespace

namespace {
// The one-cluster form's k slice per block: a multiple of 64 (v60: whole
// groups of int8 A's scales, and of the tensor-core form's 32-value steps).
int ClusterKChunk(int64_t k) {
  return static_cast<int>((k + kClusterBlocks - 1) / kClusterBlocks + 63) / 64 * 64;
}
}  // namespace

// v47: one cluster before the fold kernel (pdl_launch) at m = 1 with no
// flag (16: the v27 form), 16-byte pieces of A, and the slices and the
// staged gate within 160 KB a block.
bool EcPrologueIsCluster(const W4DeviceWeight::Impl& w, int64_t m, int flags, bool pdl_launch) {
  if (!pdl_launch || flags != 0 || m < 1 || m > kClusterMaxM || w.k % 8 != 0) return false;
  const int64_t par = ecg::StagedFloats(static_cast<int>(m), static_cast<int>(w.r),
                                        static_cast<int>(w.h), w.gated);
  return ClusterSmem(m, w.r, ClusterKChunk(w.k), par, w.ec_a8 != nullptr) <= 160 * 1024;
}

namespace {
int EcPrologueParts(int64_t k, int flags) {
  // k split: parts of >= 2048 elements (one 16-byte load per thread of a
  // 256-thread block), at most kEcMaxKParts; flag 1 = one part (v12).
  if ((flags & 1) != 0) return 1;
  return static_cast<int>(std::min<int64_t>((k + 2047) / 2048, kEcMaxKParts));
}
}  // namespace

absl::Status LaunchEcPrologue(const W4DeviceWeight::Impl& w, const uint16_t* x, int64_t m,
                              int64_t ldx, W4Workspace::Impl& ws, uint16_t* v_half, int64_t ldv,
                              float* v_f32, float* gate_out, int64_t ldg, cudaStream_t stream,
                              int flags, bool pdl_launch, const RowNorm* norm,
                              const RowSwiglu* swiglu) {
  if (m == 0) return absl::OkStatus();
  const bool cluster = EcPrologueIsCluster(w, m, flags & ~kEcClusterFormFlags, pdl_launch);
  if ((norm != nullptr || swiglu != nullptr) && !cluster) {
    return absl::InternalError(
        "LaunchEcPrologue: x = RMSNorm(h) or SiluMul(gate_up) needs the one-cluster form");
  }
  if (m > kDecodeMaxM) return absl::InternalError("LaunchEcPrologue: m > 64");
  const int parts = EcPrologueParts(w.k, flags);
  const int kchunk = static_cast<int>((w.k + parts - 1) / parts + 7) / 8 * 8;
  const int r = static_cast<int>(w.r), h = static_cast<int>(w.h);
  // The parallel gate's shared memory (floats): u and hidden for m tokens,
  // then W1 (rows of r | 1), b1, W2 (rows of h | 1), b2; where that does not
  // fit, W1 and then W2 in one region (two phases, v58); one warp per token
  // (v12's way) where neither fits, or with flag 1 (flag 512: wherever the
  // staged form does not fit, as before v58).
  const int64_t par = ecg::StagedFloats(static_cast<int>(m), r, h, w.gated);
  const int64_t two = ecg::TwoPhaseFloats(static_cast<int>(m), r, h);
  // kStageGroups (v27, the default): x-independent loads before the wait,
  // the gate's dot products split over lane groups.
  int stage = (flags & 1) != 0                                 ? kStageWarp
              : par <= kGateStageFloats                          ? kStageGroups
              : (flags & 512) == 0 && two <= kGateStageFloats  ? kStageGroupsTwoPhase
                                                                 : kStageWarp;
  const size_t smem = (stage == kStageGroups           ? static_cast<size_t>(par)
                       : stage == kStageGroupsTwoPhase ? static_cast<size_t>(two)
                                                       : 8 * static_cast<size_t>(r + h)) *
                      sizeof(float);
  const dim3 grid(static_cast<unsigned>(r), static_cast<unsigned>(parts));
  const auto* xh = reinterpret_cast<const __half*>(x);
  const EcAArgs ah = EcAOf(w);
  const GateArgs g = MakeGate(w, v_half, ldv, v_f32, gate_out, ldg);
  // v47: one cluster (EcPrologueClusterKernel) where EcPrologueIsCluster
  // says so and x's rows are 16-byte pieces (or x = RMSNorm(h), v49).
  if (cluster && (norm != nullptr || swiglu != nullptr ||
                  (ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0))) {
    constexpr int C = kClusterBlocks;
    const int kc = ClusterKChunk(w.k);
    const size_t csmem = ClusterSmem(m, r, kc, par, w.ec_a8 != nullptr);
    auto go = [&](auto kernel) -> absl::Status {
      // Once per device and form (ConfigureOnce: thread-safe).
      SPEAR_CUDA_RETURN_IF_ERROR(ConfigureOnce(reinterpret_cast<const void*>(kernel), [&] {
        return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    160 * 1024);
      }));
      SPEAR_CUDA_RETURN_IF_ERROR(LaunchCluster(
          kernel, dim3(C), dim3(256), csmem, stream, C, 1, ProgrammaticLaunchEnabled(), xh,
          static_cast<int>(m), static_cast<long long>(ldx), static_cast<int>(w.k), kc, ah, g,
          norm != nullptr ? *norm : RowNorm{}, swiglu != nullptr ? *swiglu : RowSwiglu{},
          ((flags & 1024) != 0 ? kClusterLanesU : 0) | ((flags & 2048) != 0 ? kClusterNoA : 0) |
              ((flags & 4096) != 0 ? kClusterLaunchOnly : 0)));
      return absl::OkStatus();
    };
    return w.ec_a8 != nullptr ? go(EcPrologueClusterKernel<true>)
                              : go(EcPrologueClusterKernel<false>);
  }
  // measurement only (the output is then wrong): flag 64 the launch alone,
  // 128 u's partials without the ticket and the gate.
  if ((flags & 64) != 0) stage = kStageLaunchOnly;
  if ((flags & 128) != 0) stage = kStageUOnly;
  cudaError_t e;
  auto kernel = w.ec_a8 != nullptr ? EcPrologueKernel<true> : EcPrologueKernel<false>;
  if (pdl_launch) {
    e = LaunchPdl(kernel, grid, dim3(256), smem, stream, xh, static_cast<int>(m),
                  static_cast<long long>(ldx), static_cast<int>(w.k), kchunk, ah, ws.u,
                  ws.ec_counter, g, stage);
  } else {
    kernel<<<grid, 256, smem, stream>>>(xh, static_cast<int>(m), ldx, static_cast<int>(w.k),
                                        kchunk, ah, ws.u, ws.ec_counter, g, stage);
    e = cudaGetLastError();
  }
  SPEAR_CUDA_RETURN_IF_ERROR(e);
  return absl::OkStatus();
}

absl::Status LaunchEcGateRows(const W4DeviceWeight::Impl& w, const float* u, int64_t m,
                              uint16_t* v_half, int64_t ldv, float* gate_out, int64_t ldg,
                              cudaStream_t stream) {
  if (m == 0) return absl::OkStatus();
  EcGateRowsKernel<<<static_cast<unsigned>((m + 7) / 8), 256, 0, stream>>>(
      u, static_cast<int>(m), MakeGate(w, v_half, ldv, nullptr, gate_out, ldg));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status EcApply(const W4DeviceWeight& w, const float* v, int64_t m, float* y_f32,
                     uint16_t* y_f16, int64_t ldy, cudaStream_t stream) {
  const auto& d = w.impl();
  if (d.r == 0 || v == nullptr || m < 0 || ((y_f32 == nullptr) == (y_f16 == nullptr)) ||
      ldy < d.n) {
    return absl::InvalidArgumentError("cuda::EcApply: bad parameters or no EC");
  }
  if (m == 0) return absl::OkStatus();
  const long long total = m * d.n;
  EcApplyKernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      d.ecb, v, static_cast<int>(m), static_cast<int>(d.n),
      static_cast<int>(d.r), y_f32, reinterpret_cast<__half*>(y_f16), ldy);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

namespace {
// out[c][q] = B[c][q] as fp16 (the epilogues' values), one thread each.
__global__ void EcUnpackBKernel(EcTileArgs b, int n, int r, __half* out) {
  const long long idx = blockIdx.x * 256LL + threadIdx.x;
  if (idx >= static_cast<long long>(n) * r) return;
  const int c = static_cast<int>(idx / r), q = static_cast<int>(idx % r);
  out[idx] = __float2half_rn(EcBValue(b, c, q));
}

// out[q][j] = A[q][j] as fp16 (the prologue's values), one thread each.
__global__ void EcUnpackAKernel(EcAArgs a, int r, int k, __half* out) {
  const long long idx = blockIdx.x * 256LL + threadIdx.x;
  if (idx >= static_cast<long long>(r) * k) return;
  out[idx] = __float2half_rn(AElem<true>(a, static_cast<int>(idx / k), k, static_cast<int>(idx % k)));
}
}  // namespace

absl::Status LaunchEcUnpackA(const W4DeviceWeight::Impl& w, uint16_t* out, cudaStream_t stream) {
  if (w.r == 0 || w.ec_a8 == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("LaunchEcUnpackA: no int8 A");
  }
  const long long total = w.r * w.k;
  EcUnpackAKernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      EcAOf(w), static_cast<int>(w.r), static_cast<int>(w.k), reinterpret_cast<__half*>(out));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchEcUnpackB(const W4DeviceWeight::Impl& w, uint16_t* out, cudaStream_t stream) {
  if (w.r == 0 || out == nullptr) return absl::InvalidArgumentError("LaunchEcUnpackB: no EC");
  const long long total = w.n * w.r;
  EcUnpackBKernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      w.ecb, static_cast<int>(w.n), static_cast<int>(w.r), reinterpret_cast<__half*>(out));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
