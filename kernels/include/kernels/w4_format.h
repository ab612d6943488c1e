// The W4 weight format and the Error Compensator (EC) layout, shared by the
// quantizers, the checkpoint (.spear), the CPU kernels and (later) the CUDA
// kernels. This is the LOGICAL format; backends may re-lay it at load time
// (the GPU path does). kernels/FORMAT.md documents it byte by byte.
//
// A W4 linear weight W [n, k] (PyTorch layout: n outputs, k inputs) is split
// along k into groups of `group_size` consecutive inputs (group_size == k:
// per-channel, no groups). When group_size does not divide k the last group
// is shorter (ragged): k = 576 with groups of 128 has 4 groups of 128 and
// one of 64. Element (i, j) has a 4-bit code q in [0, 15] and
//     W[i, j] ~= scale[i, j / group_size] * (q - zero[i, j / group_size])
// Symmetric formats have zero == 8 everywhere (signed int4 q - 8 in [-8, 7]).
// Optionally an activation scale s [k] (AWQ-style, when it cannot be folded
// into the previous op): the layer computes W' (x / s) where W' = Q(W diag(s)).
//
// An EC adds a per-token gated low-rank correction:
//     u = A x                       A: [r, k]
//     z = W2 silu(W1 u + b1) + b2   W1: [h, r], b1: [h], W2: [r, h], b2: [r]
//     g = 1 + tanh(z)               (per token, per low-rank coordinate, in (0, 2))
//     y = Q(W) x + B (g ⊙ u)        B: [n, r]
// With W2 = 0 and b2 = 0 the gate is exactly 1: a static low-rank term.
// `gated == false` means the gate is absent (static compensation).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/dtype.h"

namespace spear::kernels {

struct W4Format {
  int64_t n = 0;           // output features (rows)
  int64_t k = 0;           // input features (columns)
  int64_t group_size = 0;  // 1..k; == k for per-channel; the last group may be shorter
  bool symmetric = false;  // zero fixed at 8

  int64_t num_groups() const { return group_size > 0 ? (k + group_size - 1) / group_size : 0; }
  // Inputs in group g (group_size except for a ragged last group).
  int64_t group_len(int64_t g) const {
    const int64_t rest = k - g * group_size;
    return rest < group_size ? rest : group_size;
  }
  int64_t packed_row_bytes() const { return (k + 1) / 2; }

  // Same format: shape, group size and symmetry (written out, not
  // defaulted: the CUDA sources that include this header are C++17).
  bool operator==(const W4Format& o) const {
    return n == o.n && k == o.k && group_size == o.group_size && symmetric == o.symmetric;
  }
};

struct W4Weight {
  W4Format fmt;
  // [n, packed_row_bytes]: element (i, j) is in byte i * packed_row_bytes +
  // j / 2, low nibble for even j, high nibble for odd j.
  std::vector<uint8_t> packed;
  std::vector<uint16_t> scales;  // IEEE fp16 [n, num_groups]
  std::vector<uint8_t> zeros;    // [n, num_groups], values 0..15 (8 when symmetric)
  std::vector<float> act_scale;  // empty, or [k] (AWQ input scaling, divides x)

  uint8_t Code(int64_t i, int64_t j) const {
    const uint8_t b = packed[static_cast<size_t>(i * fmt.packed_row_bytes() + j / 2)];
    return (j & 1) ? (b >> 4) : (b & 0x0f);
  }
  // The dequantized weight element (without act_scale).
  float Dequant(int64_t i, int64_t j) const {
    const int64_t g = i * fmt.num_groups() + j / fmt.group_size;
    return HalfToFloat(scales[static_cast<size_t>(g)]) *
           (static_cast<float>(Code(i, j)) - static_cast<float>(zeros[static_cast<size_t>(g)]));
  }
  // Bytes as served: codes + fp16 scales + zero points (one byte each) +
  // activation scales (fp16).
  size_t bytes() const {
    return packed.size() + scales.size() * 2 + zeros.size() + act_scale.size() * 2;
  }
};

// How an EC's factors A and B are stored (FORMAT.md, "EC factor storage").
// kF16: fp16. kI8: int8 codes in [-127, 127] with one fp16 scale per
// kEcI8Group consecutive values along k (A's rows) and along n (B's
// columns); the last group of a row / column may be shorter. The gate MLP
// is fp16 either way.
enum class EcFactors : uint8_t { kF16 = 0, kI8 = 1 };
constexpr int64_t kEcI8Group = 64;

// Bytes one rank of A and B costs as stored: A's row [k] and B's column [n].
inline int64_t EcFactorBytesPerRank(int64_t n, int64_t k, EcFactors f) {
  if (f == EcFactors::kF16) return 2 * (n + k);
  return (n + k) + 2 * ((n + kEcI8Group - 1) / kEcI8Group + (k + kEcI8Group - 1) / kEcI8Group);
}

// int8 codes and fp16 scales of an EC's A and B (EcFactors::kI8; FORMAT.md,
// "EC factor storage"; the codecs are in kernels/ec_factors.h).
struct EcI8Factors {
  std::vector<int8_t> a;           // [r, k] codes
  std::vector<uint16_t> a_scales;  // [r, ceil(k / 64)] fp16
  std::vector<int8_t> b;           // [n, r] codes
  std::vector<uint16_t> b_scales;  // [ceil(n / 64), r] fp16
};

struct EcWeights {
  int64_t n = 0, k = 0;
  int64_t rank = 0;         // r
  int64_t gate_hidden = 0;  // h (0 when !gated)
  bool gated = true;
  // A and B as stored (kI8: a and b hold the codes times their scales, exactly;
  // RoundEcFactorsI8 in kernels/ec_factors.h puts them on that grid).
  EcFactors factors = EcFactors::kF16;
  // Two forms. Float: a, b and the gate MLP as float32 (training, fp16
  // checkpoints, tests). Compact (kI8 as served: a .spear loaded by
  // model::LoadModel): exactly the stored bytes, A and B as int8 codes and
  // scales in i8, the gate MLP as fp16 in gate16, every float vector empty;
  // the CPU kernels read the codes in place in a decode call and decode
  // them into scratch in a prefill call, the CUDA loader re-lays them once
  // (kernels/ec_factors.h: EcFloats, WithFloatFactors). Made only from
  // values on the grid (CompactEcFactorsI8), so its codes are in
  // [-127, 127] and its scales positive normal fp16.
  std::vector<float> a;   // [r, k]
  std::vector<float> b;   // [n, r]
  std::vector<float> w1;  // [h, r]
  std::vector<float> b1;  // [h]
  std::vector<float> w2;  // [r, h]
  std::vector<float> b2;  // [r]
  EcI8Factors i8;         // compact form: A and B; empty otherwise
  struct Gate16 {
    std::vector<uint16_t> w1, b1, w2, b2;  // fp16, shapes as above
  } gate16;               // compact form: the gate MLP; empty otherwise

  // True when A and B are held only as int8 codes (i8), not as floats.
  bool compact_i8() const { return a.empty() && !i8.a.empty(); }
  size_t num_params() const {
    const int64_t h = gated ? gate_hidden : 0;
    return static_cast<size_t>(rank * (n + k) + (gated ? 2 * h * rank + h + rank : 0));
  }
  // Bytes the EC takes in memory in its present form (A, B and the gate;
  // compact: the bytes() a checkpoint stores).
  size_t resident_bytes() const {
    return 4 * (a.size() + b.size() + w1.size() + b1.size() + w2.size() + b2.size()) +
           i8.a.size() + i8.b.size() + 2 * (i8.a_scales.size() + i8.b_scales.size()) +
           2 * (gate16.w1.size() + gate16.b1.size() + gate16.w2.size() + gate16.b2.size());
  }
  // Bytes as stored in a .spear checkpoint (the EC budget's measure).
  size_t bytes() const {
    const int64_t h = gated ? gate_hidden : 0;
    const size_t gate = static_cast<size_t>(gated ? 2 * h * rank + h + rank : 0);
    return static_cast<size_t>(rank * EcFactorBytesPerRank(n, k, factors)) + 2 * gate;
  }
};

}  // namespace spear::kernels
