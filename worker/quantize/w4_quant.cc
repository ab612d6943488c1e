#include "worker/quantize/w4_quant.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"

namespace spear::quantize {
namespace {

using kernels::FloatToHalf;
using kernels::HalfToFloat;

// Smallest fp16 value >= x (x > 0, finite); inf when x exceeds the fp16 range.
float RoundUpToHalf(float x) {
  uint16_t h = FloatToHalf(x);
  if (HalfToFloat(h) < x && (h & 0x7c00u) != 0x7c00u) ++h;
  return HalfToFloat(h);
}

}  // namespace

absl::Status ValidateFormat(const W4Format& fmt) {
  if (fmt.n <= 0 || fmt.k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("W4 format: bad shape [", fmt.n, ", ", fmt.k, "]"));
  }
  if (fmt.group_size <= 0 || fmt.group_size > fmt.k) {
    return absl::InvalidArgumentError(
        absl::StrCat("W4 format: group_size ", fmt.group_size, " not in [1, k = ", fmt.k, "]"));
  }
  return absl::OkStatus();
}

absl::Status ValidateW4Weight(const W4Weight& w) {
  if (auto s = ValidateFormat(w.fmt); !s.ok()) return s;
  const size_t groups = static_cast<size_t>(w.fmt.n * w.fmt.num_groups());
  if (w.packed.size() != static_cast<size_t>(w.fmt.n * w.fmt.packed_row_bytes()) ||
      w.scales.size() != groups || w.zeros.size() != groups ||
      (!w.act_scale.empty() && w.act_scale.size() != static_cast<size_t>(w.fmt.k))) {
    return absl::InvalidArgumentError("W4 weight: buffer sizes do not match the format");
  }
  for (uint8_t z : w.zeros) {
    if (z > 15) return absl::InvalidArgumentError("W4 weight: zero point > 15");
  }
  return absl::OkStatus();
}

GroupParams ComputeGroupParams(const float* w, int64_t len, bool symmetric, float clip_ratio,
                               int64_t stride) {
  GroupParams p;
  if (symmetric) {
    float amax = 0.0f;
    for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(w[j * stride]));
    amax *= clip_ratio;
    p.zero = 8;
    p.scale = amax > 0.0f ? RoundUpToHalf(amax / 7.5f) : 1.0f;
    return p;
  }
  float lo = 0.0f, hi = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    lo = std::min(lo, w[j * stride]);
    hi = std::max(hi, w[j * stride]);
  }
  lo *= clip_ratio;
  hi *= clip_ratio;
  if (hi - lo <= 0.0f) {
    p.scale = 1.0f;
    p.zero = 8;
    return p;
  }
  p.scale = RoundUpToHalf((hi - lo) / 15.0f);
  const float z = std::nearbyint(-lo / p.scale);
  p.zero = static_cast<uint8_t>(std::clamp(z, 0.0f, 15.0f));
  return p;
}

absl::StatusOr<W4Weight> PackW4(const W4Format& fmt, const std::vector<uint8_t>& codes,
                                const std::vector<GroupParams>& params) {
  if (auto s = ValidateFormat(fmt); !s.ok()) return s;
  const int64_t ng = fmt.num_groups();
  if (codes.size() != static_cast<size_t>(fmt.n * fmt.k) ||
      params.size() != static_cast<size_t>(fmt.n * ng)) {
    return absl::InvalidArgumentError("PackW4: codes/params sizes do not match the format");
  }
  W4Weight out;
  out.fmt = fmt;
  const int64_t rb = fmt.packed_row_bytes();
  out.packed.assign(static_cast<size_t>(fmt.n * rb), 0);
  for (int64_t i = 0; i < fmt.n; ++i) {
    const uint8_t* c = codes.data() + i * fmt.k;
    uint8_t* dst = out.packed.data() + i * rb;
    for (int64_t j = 0; j < fmt.k; ++j) {
      if (c[j] > 15) return absl::InvalidArgumentError("PackW4: code > 15");
      dst[j / 2] |= (j & 1) ? static_cast<uint8_t>(c[j] << 4) : c[j];
    }
  }
  out.scales.resize(params.size());
  out.zeros.resize(params.size());
  for (size_t g = 0; g < params.size(); ++g) {
    if (!std::isfinite(params[g].scale) || params[g].zero > 15) {
      return absl::InvalidArgumentError("PackW4: non-finite scale or zero > 15");
    }
    out.scales[g] = FloatToHalf(params[g].scale);
    if (!std::isfinite(HalfToFloat(out.scales[g]))) {
      return absl::InvalidArgumentError("PackW4: scale overflows fp16");
    }
    out.zeros[g] = params[g].zero;
  }
  return out;
}

std::vector<uint8_t> UnpackCodes(const W4Weight& w) {
  std::vector<uint8_t> codes(static_cast<size_t>(w.fmt.n * w.fmt.k));
  for (int64_t i = 0; i < w.fmt.n; ++i) {
    for (int64_t j = 0; j < w.fmt.k; ++j) codes[static_cast<size_t>(i * w.fmt.k + j)] = w.Code(i, j);
  }
  return codes;
}

absl::StatusOr<W4Weight> QuantizeRtn(MatrixView w, const W4Format& fmt,
                                     const std::vector<float>& clip_ratios) {
  if (auto s = ValidateFormat(fmt); !s.ok()) return s;
  if (w.rows != fmt.n || w.cols != fmt.k || w.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("QuantizeRtn: weight [", w.rows, ", ", w.cols,
                                                   "] does not match format [", fmt.n, ", ",
                                                   fmt.k, "]"));
  }
  const int64_t ng = fmt.num_groups(), gs = fmt.group_size;
  if (!clip_ratios.empty() && clip_ratios.size() != static_cast<size_t>(fmt.n * ng)) {
    return absl::InvalidArgumentError("QuantizeRtn: clip_ratios must be [n, num_groups]");
  }
  for (int64_t e = 0; e < w.size(); ++e) {
    if (!std::isfinite(w.data[e])) return absl::InvalidArgumentError("QuantizeRtn: non-finite weight");
  }
  std::vector<uint8_t> codes(static_cast<size_t>(fmt.n * fmt.k));
  std::vector<GroupParams> params(static_cast<size_t>(fmt.n * ng));
  for (int64_t i = 0; i < fmt.n; ++i) {
    for (int64_t g = 0; g < ng; ++g) {
      const float* src = w.row(i) + g * gs;
      const float clip = clip_ratios.empty() ? 1.0f : clip_ratios[static_cast<size_t>(i * ng + g)];
      const int64_t len = fmt.group_len(g);
      const GroupParams p = ComputeGroupParams(src, len, fmt.symmetric, clip);
      params[static_cast<size_t>(i * ng + g)] = p;
      uint8_t* c = codes.data() + i * fmt.k + g * gs;
      for (int64_t j = 0; j < len; ++j) c[j] = QuantizeCode(src[j], p);
    }
  }
  return PackW4(fmt, codes, params);
}

absl::Status DequantizeW4(const W4Weight& w, float* out) {
  if (auto s = ValidateW4Weight(w); !s.ok()) return s;
  const int64_t ng = w.fmt.num_groups(), gs = w.fmt.group_size;
  for (int64_t i = 0; i < w.fmt.n; ++i) {
    for (int64_t g = 0; g < ng; ++g) {
      const size_t gi = static_cast<size_t>(i * ng + g);
      const GroupParams p{HalfToFloat(w.scales[gi]), w.zeros[gi]};
      const int64_t end = g * gs + w.fmt.group_len(g);
      for (int64_t j = g * gs; j < end; ++j) out[i * w.fmt.k + j] = DequantCode(w.Code(i, j), p);
    }
  }
  return absl::OkStatus();
}

void FoldActScale(const std::vector<float>& act_scale, int64_t n, int64_t k, float* w) {
  if (act_scale.empty()) return;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) w[i * k + j] /= act_scale[static_cast<size_t>(j)];
  }
}

absl::StatusOr<Matrix> DequantizeW4Effective(const W4Weight& w) {
  Matrix out(w.fmt.n, w.fmt.k);
  if (auto s = DequantizeW4(w, out.data.data()); !s.ok()) return s;
  FoldActScale(w.act_scale, w.fmt.n, w.fmt.k, out.data.data());
  return out;
}

absl::StatusOr<Matrix> QuantizationError(MatrixView w, const W4Weight& q) {
  if (w.rows != q.fmt.n || w.cols != q.fmt.k) {
    return absl::InvalidArgumentError("QuantizationError: shape mismatch");
  }
  auto deq = DequantizeW4Effective(q);
  if (!deq.ok()) return deq.status();
  for (int64_t e = 0; e < w.size(); ++e) deq->data[static_cast<size_t>(e)] = w.data[e] - deq->data[static_cast<size_t>(e)];
  return std::move(*deq);
}

}  // namespace spear::quantize
