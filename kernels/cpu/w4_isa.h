// Private interface between the W4 CPU dispatcher (w4_cpu.cc) and the
// ISA-specific W4 kernels (w4_simd.inc instantiated by w4_generic.cc,
// w4_avx2.cc and w4_avx512.cc). Same rules as ops_isa.h: the tables are
// constant data, and w4_cpu.cc calls through a table only after ActiveIsa()
// says the CPU has that ISA. No absl or std headers with static
// initialisers here (this header is compiled with -mavx2 / -mavx512*).
//
// Permuted-k layout ("xp order"). The kernels unpack the two nibbles of a
// byte into two vectors (low nibbles = even k, high nibbles = odd k) instead
// of interleaving them back, so the activations are permuted instead, once
// per token: inside each group, k is cut into blocks of `block` = 2 * lanes
// consecutive inputs; a block's lanes even inputs come first, then its
// lanes odd inputs. The group's last len % block inputs (its tail; len is
// shorter for a ragged last group) and every
// group of odd size stay in natural order. The prefill path dequantizes W
// into the same order, so x and W agree and the dot products are unchanged.
#pragma once

#include <cstdint>

#include "kernels/w4_format.h"

namespace spear::kernels::cpu::internal {

struct W4KernelArgs {
  // The W4 weight (validated).
  const uint8_t* packed = nullptr;   // [n, packed_row_bytes]
  const uint16_t* scales = nullptr;  // fp16 [n, num_groups]
  const uint8_t* zeros = nullptr;    // [n, num_groups]
  int64_t n = 0, k = 0, group_size = 0, num_groups = 0, packed_row_bytes = 0;

  // GEMV only: m <= 8 tokens of activations in xp order, [m, k] contiguous
  // (already divided by act_scale).
  const float* xp = nullptr;
  // GEMV only: xsum[t, g] = sum of token t's activations (xp, act-scaled)
  // over group g, [m, num_groups]: the zero-point correction.
  const float* xsum = nullptr;
  int64_t m = 0;
  const float* bias = nullptr;  // [n] or null
  float* y = nullptr;           // [m, n], stride ldy
  int64_t ldy = 0;
  bool accumulate = false;
  // EC epilogue: y[t, j] += dot(ec_b[j, :], ec_v[t, :]) when ec_b != null;
  // or, B held as int8 codes (EcWeights::compact_i8), when ec_b8 != null:
  // B[j, i] = ec_b8[j, i] * ec_b8_scales[j / 64, i], each product exact (an
  // 8-bit code times an fp16 value), so the sums are ec_b's bit for bit.
  const float* ec_b = nullptr;          // [n, rank]
  const int8_t* ec_b8 = nullptr;        // [n, rank] codes
  const float* ec_b8_scales = nullptr;  // [ceil(n / 64), rank], widened from fp16
  const float* ec_v = nullptr;          // [m, rank]: g ⊙ u per token
  int64_t rank = 0;
};

// u = A x for an EC in a decode call (m <= kW4MaxGemvTokens tokens of raw
// x): u[t, i] for A's rows [i0, i1), A as float32 or as int8 codes with one
// fp16 scale per 64 values along k (the products exact), the sums in the
// same order either way: the two forms give the same u bit for bit.
struct EcUArgs {
  const float* x = nullptr;  // [m, k], stride ldx
  int64_t ldx = 0, m = 0, k = 0;
  const float* a = nullptr;             // [r, k] float32, or (a == null)
  const int8_t* a8 = nullptr;           // [r, k] codes
  const uint16_t* a8_scales = nullptr;  // [r, ceil(k / 64)] fp16
  float* u = nullptr;                   // [m, ldu]
  int64_t ldu = 0;
};

struct W4IsaKernels {
  int block;  // 2 * float lanes: the xp permutation block
  // Output rows [j0, j1) of the fused dequantize-GEMV for all a.m tokens
  // (1 <= m <= 8), bias and EC epilogue included.
  void (*gemv)(const W4KernelArgs& a, int64_t j0, int64_t j1);
  // Dequantizes rows [j0, j1) into out [j1 - j0, k] (xp order, float32).
  void (*dequant)(const W4KernelArgs& a, int64_t j0, int64_t j1, float* out);
  // u = A x for A's rows [i0, i1) (EcUArgs; 1 <= m <= 8).
  void (*ec_u)(const EcUArgs& a, int64_t i0, int64_t i1);
  // out[i] = in[i] as float (fp16 -> float32, exact; F16C where the ISA has
  // it): a compact EC's gate MLP and B's scales, per decode call.
  void (*widen_f16)(const uint16_t* in, int64_t n, float* out);
};

inline constexpr int kW4MaxGemvTokens = 8;
// kEcI8Group (w4_format.h), the values per fp16 scale of an int8 EC
// factor, is a multiple of every ISA's float lanes: no vector of the
// kernels straddles two scales.
static_assert(kEcI8Group % 16 == 0, "an int8 EC scale group of whole AVX-512 vectors");

extern const W4IsaKernels kW4ScalarKernels;  // w4_generic.cc
extern const W4IsaKernels kW4Avx2Kernels;    // w4_avx2.cc
extern const W4IsaKernels kW4Avx512Kernels;  // w4_avx512.cc

}  // namespace spear::kernels::cpu::internal
