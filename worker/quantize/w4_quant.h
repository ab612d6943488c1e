// Round-to-nearest (RTN) 4-bit quantization into the W4 format of
// kernels/w4_format.h, and the inverse (dequantization).
//
// Grid (one group = one row i, columns [g*G, (g+1)*G) with G = group_size):
//   asymmetric: lo = min(min w, 0), hi = max(max w, 0) (the range always
//               contains 0, as in GPTQ's quantizer, so an all-positive group
//               never clamps its small values and zero stays in [0, 15]);
//               scale = (hi - lo) / 15, zero = clamp(round(-lo / scale), 0, 15).
//   symmetric:  scale = max|w| / 7.5, zero = 8. Codes q - 8 cover [-8, 7];
//               w = +max|w| maps to 7.5 (rounds to 8, clamps to 7: error
//               scale/2) and -max|w| maps to -7.5 -> -8 (exact up to scale/2).
//               /7.5 rather than /7 gives a finer grid with the same worst
//               case error bound scale/2.
//   An all-zero group gets scale 1 (zero as above), so it dequantizes to 0.
//   The scale is rounded UP to the next fp16 value FIRST (so the grid still
//   covers [lo, hi]) and the codes are computed with that served scale.
//   code = clamp(round_half_even(w / scale) + zero, 0, 15).
// Bound: |w - Q(w)| <= scale/2 (up to float rounding) for every element,
// scale being the served fp16 scale; with clip_ratio < 1 (AWQ's clip search)
// elements outside the shrunk range clamp and the bound does not hold.
//
// act_scale (AWQ): DequantizeW4 returns Q = dequant(codes) WITHOUT act_scale;
// the layer computes y = Q (x / s), i.e. the effective weight is
// Q[i, j] / s[j]. FoldActScale() applies that division in place;
// DequantizeW4Effective() does both.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/w4_format.h"
#include "worker/quantize/matrix.h"

namespace spear::quantize {

using kernels::W4Format;
using kernels::W4Weight;

// Scale (already fp16-representable) and zero point of one group.
struct GroupParams {
  float scale = 1.0f;
  uint8_t zero = 8;
};

// OK iff n, k > 0 and 0 < group_size <= k divides k.
absl::Status ValidateFormat(const W4Format& fmt);
// Format valid and every buffer has the size the format implies, zeros <= 15.
absl::Status ValidateW4Weight(const W4Weight& w);

// Grid of one group of `len` values at stride `stride` (stride lets GPTQ pass
// a column-major slice). clip_ratio in (0, 1] shrinks lo and hi (AWQ clip).
GroupParams ComputeGroupParams(const float* w, int64_t len, bool symmetric,
                               float clip_ratio = 1.0f, int64_t stride = 1);

inline uint8_t QuantizeCode(float w, GroupParams p) {
  float q = std::nearbyint(w / p.scale) + static_cast<float>(p.zero);
  q = q < 0.0f ? 0.0f : (q > 15.0f ? 15.0f : q);
  return static_cast<uint8_t>(q);
}
inline float DequantCode(uint8_t q, GroupParams p) {
  return p.scale * (static_cast<float>(q) - static_cast<float>(p.zero));
}
// Q(w) for one value: what the served weight will be.
inline float QuantDequant(float w, GroupParams p) { return DequantCode(QuantizeCode(w, p), p); }

// RTN of W [n, k] (fmt.n, fmt.k must equal w.rows, w.cols). clip_ratios, if
// non-empty, is [n, num_groups] (per-group range shrink, AWQ clip search).
// Errors: InvalidArgument for a bad format, shape mismatch, non-finite
// weights, or a scale that overflows fp16.
absl::StatusOr<W4Weight> QuantizeRtn(MatrixView w, const W4Format& fmt,
                                     const std::vector<float>& clip_ratios = {});

// Packs codes [n, k] (0..15, row-major, one per byte) with group parameters
// [n, num_groups] into a W4Weight (act_scale empty).
absl::StatusOr<W4Weight> PackW4(const W4Format& fmt, const std::vector<uint8_t>& codes,
                                const std::vector<GroupParams>& params);
// Codes [n, k], one per byte.
std::vector<uint8_t> UnpackCodes(const W4Weight& w);

// out [n, k] = scale * (code - zero), act_scale NOT applied. Fails on an
// invalid weight (never reads out of bounds).
absl::Status DequantizeW4(const W4Weight& w, float* out);
// Divides column j of w [n, k] by act_scale[j] (no-op when empty).
void FoldActScale(const std::vector<float>& act_scale, int64_t n, int64_t k, float* w);
// The effective weight the layer applies to x: DequantizeW4 + FoldActScale.
absl::StatusOr<Matrix> DequantizeW4Effective(const W4Weight& w);
// E = W - effective(Q(W)) [n, k]: the error an EC compensates.
absl::StatusOr<Matrix> QuantizationError(MatrixView w, const W4Weight& q);

}  // namespace spear::quantize
