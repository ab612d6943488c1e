// Portable cpu:: kernels (Isa::kScalar): the shared kernel bodies of
// ops_simd.inc instantiated with one float per "vector". Compiled with the
// baseline flags, so this is what runs on a CPU without AVX2.
#include <cmath>
#include <cstdint>

#include "cpu/ops_isa.h"
#include "kernels/dtype.h"

namespace spear::kernels::cpu::internal {
namespace {

struct Scalar {
  static constexpr int kW = 1;
  static constexpr int kMr = 4, kNr = 4, kGemvNr = 4;
  static constexpr int kGemmMr = 4, kGemmNv = 2;
  using F = float;
  static F Zero() { return 0.f; }
  static F Set1(float v) { return v; }
  static F Load(const float* p) { return *p; }
  static F LoadPartial(const float* p, int n) { return n > 0 ? *p : 0.f; }
  static void Store(float* p, F v) { *p = v; }
  static void StorePartial(float* p, F v, int n) {
    if (n > 0) *p = v;
  }
  static F LoadF16(const uint16_t* p) { return HalfToFloat(*p); }
  static F LoadF16Partial(const uint16_t* p, int n) { return n > 0 ? HalfToFloat(*p) : 0.f; }
  static F LoadBF16(const uint16_t* p) { return BF16ToFloat(*p); }
  static F LoadBF16Partial(const uint16_t* p, int n) { return n > 0 ? BF16ToFloat(*p) : 0.f; }
  static F Fma(F a, F b, F c) { return a * b + c; }
  static F Add(F a, F b) { return a + b; }
  static F Sub(F a, F b) { return a - b; }
  static F Mul(F a, F b) { return a * b; }
  static F Div(F a, F b) { return a / b; }
  static F Max(F a, F b) { return a > b ? a : b; }
  static float ReduceAdd(F v) { return v; }
  static float ReduceMax(F v) { return v; }
  static F Exp(F x) { return std::exp(x); }
  static void Transpose(F*) {}
};

#include "cpu/ops_simd.inc"

}  // namespace

constinit const IsaKernels kScalarKernels = MakeKernels<Scalar>();

}  // namespace spear::kernels::cpu::internal
