// ref::W4Linear: the ground truth of the W4 + EC op, written straight from
// the formulas in w4_ops.h with double accumulation and no shortcuts (every
// weight through W4Weight::Dequant, the gate with std::tanh / std::exp).
// Also ValidateW4Linear, shared by every backend.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/validate.h"
#include "kernels/ec_factors.h"
#include "kernels/w4_ops.h"

namespace spear::kernels {
namespace {

// Same size bound as the dense ops.
using internal::InRange;

absl::Status Bad(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("W4Linear: ", what));
}

size_t Sz(int64_t a, int64_t b) { return static_cast<size_t>(a) * static_cast<size_t>(b); }

}  // namespace

absl::Status ValidateW4Linear(const W4LinearParams& p) {
  if (p.w == nullptr) return Bad("w is null");
  const W4Format& f = p.w->fmt;
  if (!InRange(f.n, 1) || !InRange(f.k, 1)) {
    return Bad(absl::StrCat("bad weight shape [", f.n, " x ", f.k, "]"));
  }
  if (f.group_size <= 0 || f.group_size > f.k) {
    return Bad(absl::StrCat("group_size ", f.group_size, " not in [1, k=", f.k, "]"));
  }
  if (p.w->packed.size() != Sz(f.n, f.packed_row_bytes()) ||
      p.w->scales.size() != Sz(f.n, f.num_groups()) ||
      p.w->zeros.size() != Sz(f.n, f.num_groups())) {
    return Bad(absl::StrCat("packed/scales/zeros sizes ", p.w->packed.size(), "/",
                            p.w->scales.size(), "/", p.w->zeros.size(), " do not match [", f.n,
                            " x ", f.k, "] g", f.group_size));
  }
  if (!p.w->act_scale.empty() && p.w->act_scale.size() != Sz(f.k, 1)) {
    return Bad(absl::StrCat("act_scale has ", p.w->act_scale.size(), " entries, want k=", f.k));
  }
  if (!InRange(p.m, 0)) return Bad(absl::StrCat("bad m=", p.m));
  if (p.k != f.k) return Bad(absl::StrCat("k=", p.k, " but the weight has k=", f.k));
  if (p.ec != nullptr) {
    const EcWeights& e = *p.ec;
    if (e.n != f.n || e.k != f.k) {
      return Bad(absl::StrCat("EC shape [", e.n, " x ", e.k, "] != weight [", f.n, " x ", f.k,
                              "]"));
    }
    if (!InRange(e.rank, 1)) return Bad(absl::StrCat("EC rank ", e.rank));
    if (e.compact_i8()) {
      if (e.i8.a.size() != Sz(e.rank, e.k) || e.i8.b.size() != Sz(e.n, e.rank) ||
          e.i8.a_scales.size() != Sz(e.rank, EcI8Groups(e.k)) ||
          e.i8.b_scales.size() != Sz(EcI8Groups(e.n), e.rank)) {
        return Bad(absl::StrCat("EC int8 A/B sizes ", e.i8.a.size(), "/", e.i8.b.size(),
                                " or their scales' do not match [r, k]/[n, r]"));
      }
    } else if (e.a.size() != Sz(e.rank, e.k) || e.b.size() != Sz(e.n, e.rank)) {
      return Bad(absl::StrCat("EC A/B sizes ", e.a.size(), "/", e.b.size(), " != [r, k]/[n, r]"));
    }
    if (e.gated) {
      const int64_t h = e.gate_hidden, r = e.rank;
      const bool c = e.compact_i8();
      const size_t w1 = c ? e.gate16.w1.size() : e.w1.size(),
                   b1 = c ? e.gate16.b1.size() : e.b1.size(),
                   w2 = c ? e.gate16.w2.size() : e.w2.size(),
                   b2 = c ? e.gate16.b2.size() : e.b2.size();
      if (!InRange(h, 1) || w1 != Sz(h, r) || b1 != Sz(h, 1) || w2 != Sz(r, h) || b2 != Sz(r, 1)) {
        return Bad(absl::StrCat("EC gate sizes do not match r=", r, " h=", h));
      }
    }
  }
  if (p.m == 0) return absl::OkStatus();
  if (!InRange(p.ldx, p.k) || !InRange(p.ldy, f.n)) {
    return Bad(absl::StrCat("strides ldx=", p.ldx, " ldy=", p.ldy, " below k=", p.k, " / n=",
                            f.n));
  }
  if (p.x == nullptr || p.y == nullptr) return Bad("x or y is null");
  return absl::OkStatus();
}

namespace ref {

absl::Status W4Linear(const W4LinearParams& p) {
  if (absl::Status s = ValidateW4Linear(p); !s.ok()) return s;
  const W4Weight& w = *p.w;
  const int64_t n = w.fmt.n, k = w.fmt.k;
  const bool has_as = !w.act_scale.empty();
  std::vector<double> xs(k), y(n);
  EcScratch dec;  // a compact int8 EC's A, B and gate, decoded
  EcFloatView f;
  if (p.ec != nullptr) {
    if (absl::Status s = EcFloats(*p.ec, &dec, &f); !s.ok()) return s;
  }
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = p.x + i * p.ldx;
    for (int64_t c = 0; c < k; ++c) xs[c] = has_as ? double{x[c]} / w.act_scale[c] : x[c];
    for (int64_t j = 0; j < n; ++j) {
      double acc = p.bias != nullptr ? p.bias[j] : 0.0;
      for (int64_t c = 0; c < k; ++c) acc += double{w.Dequant(j, c)} * xs[c];
      y[j] = acc;
    }
    if (p.ec != nullptr) {
      const EcWeights& e = *p.ec;
      const int64_t r = e.rank, h = e.gate_hidden;
      std::vector<double> u(r), g(r, 1.0);
      for (int64_t q = 0; q < r; ++q) {
        double acc = 0;
        for (int64_t c = 0; c < k; ++c) acc += double{f.a[q * k + c]} * x[c];  // raw x
        u[q] = acc;
      }
      if (e.gated) {
        std::vector<double> hid(h);
        for (int64_t t = 0; t < h; ++t) {
          double acc = f.b1[t];
          for (int64_t q = 0; q < r; ++q) acc += double{f.w1[t * r + q]} * u[q];
          hid[t] = acc / (1.0 + std::exp(-acc));  // silu
        }
        for (int64_t q = 0; q < r; ++q) {
          double z = f.b2[q];
          for (int64_t t = 0; t < h; ++t) z += double{f.w2[q * h + t]} * hid[t];
          g[q] = 1.0 + std::tanh(z);
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t q = 0; q < r; ++q) acc += double{f.b[j * r + q]} * g[q] * u[q];
        y[j] += acc;
      }
      if (p.gate_out != nullptr) {
        for (int64_t q = 0; q < r; ++q) p.gate_out[i * r + q] = static_cast<float>(g[q]);
      }
    }
    float* out = p.y + i * p.ldy;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = static_cast<float>(p.accumulate ? out[j] + y[j] : y[j]);
    }
  }
  return absl::OkStatus();
}

}  // namespace ref
}  // namespace spear::kernels
