// int8 storage of an EC's factors A and B (EcFactors::kI8; FORMAT.md, "EC
// factor storage"): codes in [-127, 127], one fp16 scale per kEcI8Group
// consecutive values along k for A's rows and along n for B's columns. The
// value of a code c with scale s is c * s, exact in float32 (an 8-bit code
// times an 11-bit fp16 significand), so a decoded EcWeights holds exactly
// the stored values.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/w4_format.h"

namespace spear::kernels {

struct EcI8Factors {
  std::vector<int8_t> a;           // [r, k] codes
  std::vector<uint16_t> a_scales;  // [r, ceil(k / 64)] fp16
  std::vector<int8_t> b;           // [n, r] codes
  std::vector<uint16_t> b_scales;  // [ceil(n / 64), r] fp16
};

inline int64_t EcI8Groups(int64_t len) { return (len + kEcI8Group - 1) / kEcI8Group; }

// The codes and scales of e.a and e.b (e.rank, e.n, e.k give the shapes):
// per group s = the smallest fp16 with 127 s >= max |x| (0 for an all-zero
// group), c = round(x / s). InvalidArgument for non-finite values, a group
// whose scale overflows fp16, or sizes that do not match the shapes.
absl::Status EncodeEcFactorsI8(const EcWeights& e, EcI8Factors* out);

// e.a and e.b from codes and scales (e's shapes must be set); InvalidArgument
// for a code outside [-127, 127], a scale that is not a positive normal fp16
// (the encoder's scales are >= 2^-14: subnormal ones would not re-encode to
// themselves), or sizes that do not match. Sets e->factors = kI8.
absl::Status DecodeEcFactorsI8(const EcI8Factors& f, EcWeights* e);

// Rounds [r, k] A and [n, r] B in place to the int8 grid (encode + decode).
// Idempotent: values already on the grid stay bit for bit.
absl::Status RoundEcFactorsI8(int64_t n, int64_t k, int64_t r, float* a, float* b);

// The same on an EcWeights; sets e->factors = kI8.
absl::Status RoundEcFactorsI8(EcWeights* e);

}  // namespace spear::kernels
