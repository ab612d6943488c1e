// Parameter structs of the dense ops declared in kernels/ops.h (see there
// for the backends). Kept apart from ops.h so that the ISA-specific
// translation units, compiled with -mavx2 / -mavx512*, include no header
// with static initialisers (absl/status/status.h pulls in <iostream>).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace spear::kernels {

// y[i, j] (+)= sum_k x[i, k] * w[j, k] (+ bias[j])   for i < m, j < n.
struct LinearParams {
  const float* x = nullptr;  // [m, k], row stride ldx >= k
  int64_t m = 0, k = 0, ldx = 0;
  const void* w = nullptr;  // [n, k] contiguous, element type w_dtype
  DType w_dtype = DType::kF32;
  int64_t n = 0;
  const float* bias = nullptr;  // [n] or nullptr
  float* y = nullptr;           // [m, n], row stride ldy >= n
  int64_t ldy = 0;
  bool accumulate = false;  // y += instead of y =
  // With w_dtype kBF16 only: the GEMM path (m >= 16 rows) may round x to
  // bf16 and multiply with the CPU's bf16 dot-product instructions (fp32
  // accumulation) where CpuHasBf16Dot(); elsewhere, and for fewer rows, x
  // stays fp32. For callers that accept bf16 activations (EC training).
  bool bf16_products = false;
  // With w_dtype kBF16 only: the GEMM path (m >= 16 rows) may round x to
  // fp16 (each row of x and of W scaled by a power of two, undone exactly)
  // and multiply with AVX512-FP16 (products summed in fp16 over 64 k indices,
  // then in fp32) where CpuHasF16Fma(); it takes precedence over
  // bf16_products there (about twice the bf16 products' rate on Intel
  // cores). Elsewhere, and for fewer rows, bf16_products decides.
  bool f16_products = false;
};

// y = x / rms(x) * weight, per row; rms = sqrt(mean(x^2) + eps).
// If residual != nullptr: first residual += x (in place), then normalise the
// updated residual into y (the fused "add + norm" of a pre-norm block).
struct RmsNormParams {
  const float* x = nullptr;  // [m, d], stride ldx
  float* residual = nullptr; // optional [m, d], stride ldr
  const float* weight = nullptr;  // [d]
  float* y = nullptr;        // [m, d], stride ldy (may alias x)
  int64_t m = 0, d = 0, ldx = 0, ldr = 0, ldy = 0;
  float eps = 1e-5f;
};

// Rotary embedding in the HF/NeoX "rotate_half" convention, in place:
// for head h of token i at position p = positions[i], and j < head_dim/2:
//   a = x[j], b = x[j + head_dim/2], t = p * inv_freq[j] ;
//   x[j] = a cos t - b sin t ; x[j + head_dim/2] = b cos t + a sin t
// (cos and sin multiplied by attention_scaling, 1 for plain RoPE).
struct RopeParams {
  float* x = nullptr;  // [m, n_heads * head_dim], stride ldx
  int64_t m = 0, ldx = 0;
  int n_heads = 0, head_dim = 0;
  const int32_t* positions = nullptr;  // [m]
  const float* inv_freq = nullptr;     // [head_dim / 2]
  float attention_scaling = 1.f;
};

// Causal GQA attention of one sequence's new tokens over a paged KV cache.
// KV layout: k_cache/v_cache [num_blocks, block_size, n_kv_heads, head_dim];
// logical position p of the sequence lives in block block_table[p /
// block_size], slot p % block_size. The new tokens' K and V must already be
// written. Query token i sits at position q_start + i and attends to
// positions [0, q_start + i]. Query head h uses kv head h / (n_heads /
// n_kv_heads). Softmax in float32 with max subtraction.
struct AttentionParams {
  const float* q = nullptr;  // [m, n_heads * head_dim], stride ldq
  int64_t m = 0, ldq = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  int block_size = 0;
  const int32_t* block_table = nullptr;
  int64_t num_blocks_in_table = 0;  // entries in block_table
  // Blocks in k_cache / v_cache. When > 0, every block id the op reads is
  // checked against it (InvalidArgument otherwise); 0 = caller vouches.
  int64_t num_cache_blocks = 0;
  int64_t q_start = 0;
  float scale = 0.f;     // usually 1/sqrt(head_dim)
  float* out = nullptr;  // [m, n_heads * head_dim], stride ldo
  int64_t ldo = 0;
};

// y[i, j] = silu(gate[i, j]) * up[i, j]; silu(v) = v / (1 + exp(-v)).
struct SiluMulParams {
  const float* gate = nullptr;
  const float* up = nullptr;
  float* y = nullptr;  // may alias gate
  int64_t m = 0, n = 0, ld_gate = 0, ld_up = 0, ldy = 0;
};

// LogSumExp: y[i] = log(sum_j exp(x[i, j])) for m rows of n >= 1 finite
// floats (row stride ldx >= n), computed as max + log(sum exp(x - max)) in
// double (the log-softmax normalizer: -log softmax(x)[t] = y - x[t]). ref::
// takes exp in double; cpu:: takes exp in float (the SIMD polynomial,
// < 2e-7 relative), adds each 4 vectors' terms in float and those sums in
// double, so the two differ by ~1e-7 absolute.
struct LogSumExpParams {
  const float* x = nullptr;
  double* y = nullptr;
  int64_t m = 0, n = 0, ldx = 0;
};

// KlDivergence (distillation of logits rows): for each of m rows, with
// p_t = softmax(zt / tau) and p_s = softmax(zs / tau) over n >= 1 finite
// floats,
//   kl[i] = tau^2 KL(p_t || p_s) = tau^2 sum_j p_t[j] (log p_t[j] - log p_s[j])
// (Hinton's temperature scaling; tau = 1: the plain KL) and, if dzs !=
// nullptr, its gradient with respect to zs times `weight`:
//   dzs[i, j] = weight * tau * (p_s[j] - p_t[j]).
// dzs may alias zs (each element is read before it is written). ref:: works
// in double; cpu:: takes the exponentials in float (the SIMD polynomial) and
// sums in float over <= 16 vectors, then in double.
struct KlDivergenceParams {
  const float* zs = nullptr;  // student logits [m, n], row stride ldz
  const float* zt = nullptr;  // teacher logits [m, n], row stride ldz
  double* kl = nullptr;       // [m]
  float* dzs = nullptr;       // optional [m, n], row stride ldz; may alias zs
  int64_t m = 0, n = 0, ldz = 0;
  float tau = 1.f;     // > 0
  float weight = 1.f;  // finite
};

}  // namespace spear::kernels
