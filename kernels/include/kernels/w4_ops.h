// The W4 linear op with an optional per-token gated Error Compensator (EC):
// the quantized backbone of every SPEAR layer. Layout and symbols are in
// kernels/w4_format.h (and kernels/FORMAT.md); backends:
//   spear::kernels::ref  plain scalar C++ with double accumulation: the
//                        ground truth, single-threaded;
//   spear::kernels::cpu  SIMD (scalar / AVX2 / AVX-512 by ActiveIsa()),
//                        multi-threaded through `pool` (nullptr = inline).
//                        m <= 8 (decode): one fused dequantize-GEMV pass over
//                        the packed codes with the EC in its epilogue;
//                        m > 8 (prefill): W dequantized tile by tile into
//                        thread-local F32 scratch + cpu::Linear.
//
// Semantics, for every token i < m (x_i = row i of x, y_i = row i of y):
//   xs_i = x_i / act_scale                 (elementwise; x_i when act_scale is empty)
//   y_i (+)= Q(W) xs_i + bias              (Q(W)[j, c] = scale * (code - zero))
//   if ec != nullptr:
//     u_i = A x_i                          NOTE: the EC sees the RAW input x_i,
//                                          not x_i / act_scale: it corrects the
//                                          module's output as a function of the
//                                          module's input, whatever the backbone.
//     g_i = 1 + tanh(W2 silu(W1 u_i + b1) + b2)     (ec->gated)
//     g_i = 1                                       (!ec->gated)
//     y_i += B (g_i ⊙ u_i)
//     gate_out[i * r + c] = g_i[c]  when gate_out != nullptr (also 1s when
//                                    !gated). gate_out is untouched when ec
//                                    is null.
// accumulate=false overwrites y (whatever it held, NaN included).
//
// Preconditions (InvalidArgument otherwise; nothing is written then):
//   x, w, y non-null (x may be null only when m == 0); m >= 0;
//   k == w->fmt.k; ldx >= k, ldy >= n = w->fmt.n;
//   w->fmt: n, k > 0, 0 < group_size <= k (last group ragged when it does not divide k), packed/scales/zeros sized
//   [n, (k+1)/2] / [n, num_groups] / [n, num_groups], act_scale empty
//   or [k]. The VALUES (zeros <= 15, act_scale > 0) are not scanned per call
//   (O(n k / group) work); model::W4Linear::Create checks them once. Bad
//   values give wrong numbers, never out-of-bounds access;
//   ec (when non-null): ec->n == n, ec->k == k, rank > 0, a [r, k],
//   b [n, r], and when gated: gate_hidden > 0, w1 [h, r], b1 [h], w2 [r, h],
//   b2 [r].
// x and y must not overlap; gate_out must not overlap x or y.
// Thread-safety: re-entrant; the weight structs are only read. `pool` has
// its own rules (one ParallelFor caller at a time).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/thread_pool.h"
#include "kernels/w4_format.h"

namespace spear::kernels {

struct W4LinearParams {
  const float* x = nullptr;  // [m, k], row stride ldx >= k
  int64_t m = 0, k = 0, ldx = 0;
  const W4Weight* w = nullptr;  // n = w->fmt.n outputs
  const EcWeights* ec = nullptr;  // nullable: no compensation
  const float* bias = nullptr;    // nullable, [n]
  float* y = nullptr;             // [m, n], row stride ldy >= n
  int64_t ldy = 0;
  bool accumulate = false;        // y += instead of y =
  float* gate_out = nullptr;      // nullable, [m, r] contiguous: the gate values g
  // CPU prefill of >= 16 rows only: the dequantized weights and x rounded to
  // bf16, multiplied by the CPU's bf16 dot products (AVX512-BF16;
  // LinearParams::bf16_products) where it has them, else ignored. Outputs
  // then differ from the fp32 path by those roundings (2^-9 of each
  // element: perplexity +0.09 % on SmolLM2, docs/results/foundation.md).
  // Off by default; the environment variable SPEAR_CPU_BF16_PREFILL=1 turns
  // it on for every call (read once).
  bool bf16_products = false;
};

// Checks every precondition above (shared by all backends).
absl::Status ValidateW4Linear(const W4LinearParams& p);

namespace ref {
absl::Status W4Linear(const W4LinearParams& p);
}  // namespace ref

namespace cpu {
absl::Status W4Linear(const W4LinearParams& p, ThreadPool* pool);
}  // namespace cpu

}  // namespace spear::kernels
