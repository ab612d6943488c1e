// The output store of the swapped-operand decode kernels (w4_gemv_swap.cu,
// w4_gemv_fold.cu): the weights are the mma m16 operand and the tokens the
// n8 operand, so a 64-column tile's sums come in the accumulator order
// below, whether straight from a warp's registers or after a reduction.
#pragma once

#include <cuda_fp16.h>

#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {

// y[row, col] = s (+ bias[col]; + y[row, col] where a.accumulate; fp32 y32
// or fp16 y16) for output o = e * 32 + lane of 64-column tile `tile`,
// fragment e = token tile * 16 + p * 4 + c: row = 8 (e / 16) + 2 (lane % 4)
// + c % 2, col = 64 tile + 16 p + lane / 4 + 8 (c / 2). Rows >= m and
// columns >= n are not stored.
__device__ __forceinline__ void StoreTileOutput(const DecodeArgs& a, int tile, int o, float s) {
  const int e = o >> 5, l = o & 31;
  const int lg = l >> 2, lt = l & 3;
  const int p = (e >> 2) & 3, c = e & 3;
  const int row = 8 * (e >> 4) + 2 * lt + (c & 1);
  const int col = tile * 64 + 16 * p + lg + 8 * (c >> 1);
  if (row < a.m && col < a.n) {
    if (a.bias != nullptr) s += a.bias[col];
    const long long idx = row * a.ldy + col;
    if (a.y32 != nullptr) {
      a.y32[idx] = a.accumulate ? a.y32[idx] + s : s;
    } else {
      __half* y = reinterpret_cast<__half*>(a.y16);
      y[idx] = __float2half_rn(a.accumulate ? __half2float(y[idx]) + s : s);
    }
  }
}

}  // namespace spear::kernels::cuda
