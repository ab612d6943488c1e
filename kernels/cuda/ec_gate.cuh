// The decode EC's gate over a whole block, shared by the two forms of the
// prologue (w4_ec.cu): the r x P form's last block (v27) and the one-token
// cluster's block 0 (v47), so both compute g = 1 + tanh(W2 silu(W1 u + b1)
// + b2) and v = g ⊙ u from the staged u with the same operations in the
// same order: each hidden unit and each gate one dot product split over a
// group of G lanes summed by shuffles. (Written for v45, which also ran it
// in the fold kernel's EC blocks: measured slower, reverted.)
#pragma once

#include <cuda_runtime.h>

namespace spear::kernels::cuda {
namespace ecg {

// u[t][c] = the P partial sums upart[p][t][c] (written by the prologue's
// blocks, read through L2) added in order p = 0, 1, ...: deterministic.
__device__ __forceinline__ float SumParts(const float* upart, int P, int m, int r, int t, int c) {
  float v = 0.f;
  for (int p = 0; p < P; ++p) v += __ldcg(upart + (static_cast<long long>(p) * m + t) * r + c);
  return v;
}

// u [m][r] (shared memory) = the P partial sums (SumParts) by the block's
// nthreads threads.
__device__ __forceinline__ void StageU(float* us, const float* upart, int P, int m, int r, int tid,
                                       int nthreads) {
  for (int i = tid; i < m * r; i += nthreads) {
    const int t = i / r, c = i - t * r;
    us[i] = SumParts(upart, P, m, r, t, c);
  }
}

// dst (shared memory) = src [rows][cols] with rows of the odd stride
// cols | 1 (the staged gate's W1 and W2: neighbouring lane groups' rows in
// different banks), by the block's nthreads threads.
__device__ __forceinline__ void StageOddRows(float* dst, const float* src, int rows, int cols,
                                             int tid, int nthreads) {
  const int ld = cols | 1;
  for (int i = tid; i < rows * cols; i += nthreads) {
    const int j = i / cols, c = i - j * cols;
    dst[j * ld + c] = src[i];
  }
}

// sum over i = l, l + G, ... < n of w[i] u[i] (shared memory) in four
// partial sums (four independent multiply-add chains, not one).
__device__ __forceinline__ float Dot4(const float* w, const float* u, int l, int n, int G) {
  float z0 = 0.f, z1 = 0.f, z2 = 0.f, z3 = 0.f;
  int i = l;
  for (; i + 3 * G < n; i += 4 * G) {
    z0 += w[i] * u[i];
    z1 += w[i + G] * u[i + G];
    z2 += w[i + 2 * G] * u[i + 2 * G];
    z3 += w[i + 3 * G] * u[i + 3 * G];
  }
  for (; i < n; i += G) z0 += w[i] * u[i];
  return (z0 + z1) + (z2 + z3);
}

// Lanes per dot product for `outputs` of them: the largest power of two
// <= 32 with outputs x G x 2 <= 256, as for the prologue's 256-thread
// block, whatever the calling block's size (the sums' order depends on G
// only).
__device__ __forceinline__ int GroupOf(int outputs) {
  int gsz = 1;
  while (gsz < 32 && outputs * gsz * 2 <= 256) gsz *= 2;
  return gsz;
}

// Floats of the staged gate for m tokens: u [m][r], hidden [m][h], W1
// rows of r | 1, b1 [h], W2 rows of h | 1, b2 [r] (odd row strides: the
// rows neighbouring lane groups read fall in different banks).
__host__ __device__ __forceinline__ long long StagedFloats(int m, int r, int h, bool gated) {
  return static_cast<long long>(m) * (r + h) +
         (gated ? static_cast<long long>(h) * (r | 1) + r * (h | 1) + h + r : 0);
}

// Floats of the gate staged in two phases (v58): u [m][r], hidden [m][h],
// b1 [h], b2 [r], then one region that holds W1 (rows of r | 1) for the
// hidden units and then W2 (rows of h | 1) for the gates.
__host__ __device__ __forceinline__ long long TwoPhaseFloats(int m, int r, int h) {
  const long long w1 = static_cast<long long>(h) * (r | 1), w2 = static_cast<long long>(r) * (h | 1);
  return static_cast<long long>(m) * (r + h) + h + r + (w1 > w2 ? w1 : w2);
}

struct Staged {
  float *us, *hs, *w1s, *b1s, *w2s, *b2s;
};
__device__ __forceinline__ Staged StagedAt(float* base, int m, int r, int h) {
  Staged s;
  s.us = base;
  s.hs = s.us + m * r;
  s.w1s = s.hs + m * h;
  s.b1s = s.w1s + h * (r | 1);
  s.w2s = s.b1s + h;
  s.b2s = s.w2s + r * (h | 1);
  return s;
}

// The two-phase layout (TwoPhaseFloats): wr holds W1, then W2.
struct TwoPhase {
  float *us, *hs, *b1s, *b2s, *wr;
};
__device__ __forceinline__ TwoPhase TwoPhaseAt(float* base, int m, int r, int h) {
  TwoPhase s;
  s.us = base;
  s.hs = s.us + m * r;
  s.b1s = s.hs + m * h;
  s.b2s = s.b1s + h;
  s.wr = s.b2s + r;
  return s;
}

// The gate MLP's weights as GateBlock reads them: W1 [h] rows of w1ld, b1
// [h], W2 [r] rows of w2ld, b2 [r] (shared memory, odd strides).
struct GateWeights {
  const float *w1, *b1, *w2, *b2;
  int w1ld, w2ld;
};
__device__ __forceinline__ GateWeights StagedWeights(const Staged& s, int r, int h) {
  return {s.w1s, s.b1s, s.w2s, s.b2s, r | 1, h | 1};
}

// The gate of m tokens by the block's nthreads threads (a multiple of 32;
// every thread calls it): us [m][r] holds u (shared memory), hs [m][h]
// takes the hidden units, first the MLP's weights (when gated) for the
// hidden units; second() (called by every thread after the hidden units'
// barrier) returns the weights for the gates (first itself, or W2 staged
// over W1's place, v58, behind a barrier of its own); sync() is a barrier
// of those threads. The same sums in the same order whether the weights
// are staged at once or in two phases. out(t, c, gate, v) is called once
// for each t < m, c < rp (v = 0 and gate = 1 for the padding columns
// c >= r).
template <typename Sync, typename Second, typename Out>
__device__ __forceinline__ void GateBlock(int m, int r, int rp, int h, bool gated,
                                          const float* us, float* hs, const GateWeights& first,
                                          int tid, int nthreads, Sync sync, Second second,
                                          Out out) {
  GateWeights w = first;
  if (gated) {
    const int G = GroupOf(m * h), per = nthreads / G, l = tid & (G - 1);
    for (int base = 0; base < m * h; base += per) {
      const int o = base + tid / G;
      const bool ok = o < m * h;
      const int t = ok ? o / h : 0, j = ok ? o - t * h : 0;
      float z = ok ? Dot4(w.w1 + j * w.w1ld, us + t * r, l, r, G) : 0.f;
      for (int off = G >> 1; off > 0; off >>= 1) z += __shfl_xor_sync(0xffffffffu, z, off);
      if (ok && l == 0) {
        z += w.b1[j];
        hs[o] = z / (1.f + expf(-z));
      }
    }
    sync();
    w = second();
  }
  const int G = gated ? GroupOf(m * rp) : 1, per = nthreads / G, l = tid & (G - 1);
  for (int base = 0; base < m * rp; base += per) {
    const int o = base + tid / G;
    const bool ok = o < m * rp;
    const int t = ok ? o / rp : 0, c = ok ? o - t * rp : 0;
    float z = gated && ok && c < r ? Dot4(w.w2 + c * w.w2ld, hs + t * h, l, h, G) : 0.f;
    for (int off = G >> 1; off > 0; off >>= 1) z += __shfl_xor_sync(0xffffffffu, z, off);
    if (ok && l == 0) {
      float v = 0.f, gate = 1.f;
      if (c < r) {
        if (gated) gate = 1.f + tanhf(z + w.b2[c]);
        v = gate * us[t * r + c];
      }
      out(t, c, gate, v);
    }
  }
}

}  // namespace ecg
}  // namespace spear::kernels::cuda
