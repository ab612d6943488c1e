#include "worker/quantize/distill_ops.h"

#include <cstdio>
#include <cstdlib>

#include "kernels/ops.h"

namespace spear::quantize::distill {

void MatMulNT(const float* x, int64_t m, int64_t k, int64_t ldx, const float* w, int64_t n,
              float* y, int64_t ldy, bool accumulate) {
  kernels::LinearParams p;
  p.x = x;
  p.m = m;
  p.k = k;
  p.ldx = ldx;
  p.w = w;
  p.w_dtype = kernels::DType::kF32;
  p.n = n;
  p.y = y;
  p.ldy = ldy;
  p.accumulate = accumulate;
  // Shapes come from AttentionShape (validated by the distiller): a failure
  // here is a programming error, not bad input.
  const absl::Status s = kernels::cpu::Linear(p, nullptr);
  if (!s.ok()) {
    std::fprintf(stderr, "distill::MatMulNT: %s\n", s.ToString().c_str());
    std::abort();
  }
}

}  // namespace spear::quantize::distill
