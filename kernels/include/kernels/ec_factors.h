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
#include "absl/status/statusor.h"
#include "kernels/w4_format.h"

namespace spear::kernels {

inline int64_t EcI8Groups(int64_t len) { return (len + kEcI8Group - 1) / kEcI8Group; }

// (EcI8Factors is declared in w4_format.h, beside EcWeights, which holds one
// for an int8 EC as served.)

// The codes and scales of e.a and e.b (e.rank, e.n, e.k give the shapes;
// a compact e, EcWeights::compact_i8, gives its own i8 unchanged):
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

// The compact form of an int8 EC (EcWeights::compact_i8): e->i8 = the
// codes and scales of e->a and e->b (which must be on the grid: a value off
// it is InvalidArgument, not rounded), the gate MLP rounded to fp16 into
// e->gate16 (as a checkpoint stores it), every float vector released. kI8
// only; a compact e stays as it is.
absl::Status CompactEcFactorsI8(EcWeights* e);

// Float pointers to an EC's A, B and gate MLP whatever its form: its own
// vectors, or, when e is compact, its codes and fp16 values decoded into
// *scratch (resized; the pointers are valid while it is). The values are the
// same floats either way (decoding is exact). w1..b2 are null when !gated.
struct EcFloatView {
  const float *a = nullptr, *b = nullptr;
  const float *w1 = nullptr, *b1 = nullptr, *w2 = nullptr, *b2 = nullptr;
};
struct EcScratch {
  std::vector<float> a, b, w1, b1, w2, b2;
};
absl::Status EcFloats(const EcWeights& e, EcScratch* scratch, EcFloatView* view);

// A copy of e in the float form (decoded when e is compact).
absl::StatusOr<EcWeights> WithFloatFactors(const EcWeights& e);

}  // namespace spear::kernels
