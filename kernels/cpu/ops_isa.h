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
  // Attention of query token i, head h over key positions [pos0, pos1)
  // (pos1 > pos0). `scores` is scratch of pos1 - pos0 floats. Writes
  // stats[0] = max scaled score, stats[1] = sum of exp(score - max), and
  // acc[0:head_dim] = sum of exp(score - max) * v, divided by stats[1] when
  // `normalize` (then acc is the final output row).
  void (*attention)(const AttentionParams& p, int64_t i, int h, int64_t pos0, int64_t pos1,
                    float* scores, float* acc, float* stats, bool normalize);
  // Per-thread scratch (floats) linear wants for its GEMM path, given k.
  int64_t (*linear_scratch)(int64_t k);
  // GEMM tile: rows of x and outputs (columns of y). Splitting work at
  // multiples of these avoids edge tiles inside a range.
  int gemm_mr, gemm_nr;
};

extern const IsaKernels kScalarKernels;  // ops_generic.cc, baseline x86-64
extern const IsaKernels kAvx2Kernels;    // ops_avx2.cc, AVX2 + FMA + F16C
extern const IsaKernels kAvx512Kernels;  // ops_avx512.cc, AVX-512 F/BW/VL/DQ

}  // namespace spear::kernels::cpu::internal
