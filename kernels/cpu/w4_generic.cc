// Portable W4 kernels (Isa::kScalar): w4_simd.inc with one float per
// "vector" (a block is one byte: its low and high nibble, natural order).
// Compiled with the baseline flags.
#include <cstdint>

#include "cpu/w4_isa.h"
#include "kernels/dtype.h"

namespace spear::kernels::cpu::internal {
namespace {

struct W4Scalar {
  static constexpr int kW = 1;
  using F = float;
  // Keeps v in a register: the compiler may not re-load it per use.
  static void Pin(F&) {}
  static F Zero() { return 0.f; }
  static F Set1(float v) { return v; }
  static F Load(const float* p) { return *p; }
  static F LoadPartial(const float* p, int n) { return n > 0 ? *p : 0.f; }
  static void Store(float* p, F v) { *p = v; }
  static F Fma(F a, F b, F c) { return a * b + c; }
  static F Add(F a, F b) { return a + b; }
  static F Mul(F a, F b) { return a * b; }
  static F LoadI8(const int8_t* p) { return static_cast<float>(*p); }
  static F LoadI8Partial(const int8_t* p, int n) { return n > 0 ? static_cast<float>(*p) : 0.f; }
  static float ReduceAdd(F v) { return v; }
  static float H2F(uint16_t h) { return HalfToFloat(h); }
  static F LoadH(const uint16_t* p) { return HalfToFloat(*p); }
  static void Codes(const uint8_t* p, F* lo, F* hi) {
    *lo = static_cast<float>(p[0] & 0x0f);
    *hi = static_cast<float>(p[0] >> 4);
  }
};

#include "cpu/w4_simd.inc"

}  // namespace

constinit const W4IsaKernels kW4ScalarKernels = MakeW4Kernels<W4Scalar>();

}  // namespace spear::kernels::cpu::internal
