// Private interface between the CPU dispatcher (ops_cpu.cc) and the
// ISA-specific translation units. Each ISA exports one constant table of
// kernels that work on a sub-range of an op, so that ops_cpu.cc owns the
// threading and the kernels own the SIMD. Parameters are already validated.
//
// The tables are plain constant data: touching kAvx2Kernels executes no
// AVX2 code, and ops_cpu.cc only calls through a table after ActiveIsa()
// says the CPU has that ISA.
#pragma once

#include <cstdint>

#include "kernels/op_params.h"

namespace spear::kernels::cpu::internal {

// Linear takes the packed GEMM path for ranges of at least this many rows
// (and a scratch buffer); fewer rows use the GEMV-style dot-product tiles.
inline constexpr int64_t kGemmMinM = 16;

// Floats in the widest vector of any ISA variant (AVX-512): bounds the
// per-ISA vector width kW of scratch sized before the variant is known.
constexpr int kMaxVectorFloats = 16;

struct IsaKernels {
  // y[m0:m1, n0:n1] of Linear (all of k). `scratch`: linear_scratch(k) floats
  // owned by the calling thread, or nullptr (no GEMM path then).
  void (*linear)(const LinearParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                 float* scratch);
  // Rows [r0, r1) of RmsNorm.
  void (*rms_norm)(const RmsNormParams& p, int64_t r0, int64_t r1);
  // Rows [r0, r1) of Rope.
  void (*rope)(const RopeParams& p, int64_t r0, int64_t r1);
  // Rows [r0, r1), columns [c0, c1) of SiluMul.
  void (*silu_mul)(const SiluMulParams& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1);
  // Attention of query token i over key positions [pos0, pos1) (pos1 >
  // pos0) for the G = n_heads / n_kv_heads query heads of kv head kvh (heads
  // kvh * G .. kvh * G + G - 1). `scores` is scratch of G * (pos1 - pos0)
  // floats. Writes, per head g, stats[2g] = max scaled score, stats[2g + 1] =
  // sum of exp(score - max), and acc[g * head_dim : (g + 1) * head_dim] = sum
  // of exp(score - max) * v, divided by stats[2g + 1] when `normalize` (then
  // acc holds the G final output rows, one after the other). `prefetch`:
  // request the K / V rows ahead of their use (software prefetch; for rows
  // that are likely cold, e.g. not just read for the token before).
  void (*attention)(const AttentionParams& p, int64_t i, int64_t kvh, int64_t pos0, int64_t pos1,
                    float* scores, float* acc, float* stats, bool normalize, bool prefetch);
  // Prefill: query tokens [i0, i1) of the call (one sequence), every query
  // head of kv head kvh, each over its causal keys [0, q_start + i + 1);
  // writes the normalised output rows. `scores`: (i1 - i0) * G * (q_start +
  // i1) floats of scratch, `kt`: head_dim * kMaxVectorFloats, `stats`: 2 * G.
  void (*attention_tile)(const AttentionParams& p, int64_t i0, int64_t i1, int64_t kvh,
                         float* scores, float* kt, float* stats);
  // Rows [r0, r1) of LogSumExp.
  void (*log_sum_exp)(const LogSumExpParams& p, int64_t r0, int64_t r1);
  // Rows [r0, r1) of KlDivergence; `scratch`: 2 * n floats.
  void (*kl_divergence)(const KlDivergenceParams& p, int64_t r0, int64_t r1, float* scratch);
  // Per-thread scratch (floats) linear wants for its GEMM path, given k.
  int64_t (*linear_scratch)(int64_t k);
  // GEMM tile: rows of x and outputs (columns of y). Splitting work at
  // multiples of these avoids edge tiles inside a range.
  int gemm_mr, gemm_nr;
};

// A GEMM variant Linear can take in place of IsaKernels::linear's GEMM path
// (same contract for y[m0:m1, n0:n1]; `scratch`: scratch(k) floats of the
// calling thread's).
struct GemmKernel {
  void (*range)(const LinearParams& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                float* scratch);
  int64_t (*scratch)(int64_t k);
  int mr, nr;
  // range() reads x once per 128 outputs whatever k is (the F32 GEMM: once
  // per packed panel, which holds all of k in ~192 KiB).
  bool x_once_per_range;
};

extern const IsaKernels kScalarKernels;  // ops_generic.cc, baseline x86-64
extern const IsaKernels kAvx2Kernels;    // ops_avx2.cc, AVX2 + FMA + F16C
extern const IsaKernels kAvx512Kernels;  // ops_avx512.cc, AVX-512 F/BW/VL/DQ
// gemm_bf16_avx512.cc, AVX-512 BF16: BF16 weights with bf16 products (only
// for LinearParams::bf16_products, after CpuHasBf16Dot()).
extern const GemmKernel kAvx512Bf16Gemm;
// gemm_f16_avx512.cc, AVX512-FP16: BF16 weights with fp16 products (only for
// LinearParams::f16_products, after CpuHasF16Fma()).
extern const GemmKernel kAvx512F16Gemm;

}  // namespace spear::kernels::cpu::internal
