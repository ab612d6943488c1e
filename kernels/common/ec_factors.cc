#include "kernels/ec_factors.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"

namespace spear::kernels {
namespace {

// The smallest normal fp16 (2^-14): the scales' floor. Subnormal scales would
// make the grid not reproduce itself on a second encode (their spacing is
// coarser than 2^-10 relative); a group whose max is below 127 * 2^-14 keeps
// this scale and codes below 127.
constexpr uint16_t kMinScale = 0x0400;
constexpr uint16_t kHalfInf = 0x7c00;

// One line of `len` values x[0], x[stride], ...: codes at the same positions,
// one scale per group at scales[g * sstride].
absl::Status EncodeLine(const float* x, int64_t len, int64_t stride, int8_t* codes,
                        uint16_t* scales, int64_t sstride, const char* what, int64_t line) {
  for (int64_t g0 = 0, g = 0; g0 < len; g0 += kEcI8Group, ++g) {
    const int64_t g1 = std::min(len, g0 + kEcI8Group);
    float m = 0;
    for (int64_t j = g0; j < g1; ++j) {
      const float v = x[j * stride];
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("EC factor ", what, ": non-finite value in line ", line, " at ", j));
      }
      m = std::max(m, std::fabs(v));
    }
    uint16_t h = std::max(FloatToHalf(m / 127.f), kMinScale);
    while (h < kHalfInf && HalfToFloat(h) * 127.f < m) ++h;
    if (h >= kHalfInf) {
      return absl::InvalidArgumentError(absl::StrCat("EC factor ", what, ": line ", line,
                                                     " has values too large for an fp16 scale"));
    }
    const float s = HalfToFloat(h);
    scales[g * sstride] = h;
    for (int64_t j = g0; j < g1; ++j) {
      const float c = std::nearbyint(x[j * stride] / s);
      codes[j * stride] = static_cast<int8_t>(std::clamp(c, -127.f, 127.f));
    }
  }
  return absl::OkStatus();
}

absl::Status DecodeLine(const int8_t* codes, int64_t len, int64_t stride, const uint16_t* scales,
                        int64_t sstride, float* x, const char* what, int64_t line) {
  for (int64_t g0 = 0, g = 0; g0 < len; g0 += kEcI8Group, ++g) {
    const uint16_t h = scales[g * sstride];
    if (h < kMinScale || h >= kHalfInf) {
      return absl::InvalidArgumentError(absl::StrCat(
          "EC factor ", what, ": scale of line ", line, ", group ", g,
          " is not a positive normal fp16 (bits 0x", absl::Hex(h), ")"));
    }
    const float s = HalfToFloat(h);
    for (int64_t j = g0; j < std::min(len, g0 + kEcI8Group); ++j) {
      const int8_t c = codes[j * stride];
      if (c == -128) {
        return absl::InvalidArgumentError(absl::StrCat("EC factor ", what, ": code -128 in line ",
                                                       line, " at ", j, " (codes are in [-127, 127])"));
      }
      x[j * stride] = static_cast<float>(c) * s;
    }
  }
  return absl::OkStatus();
}

absl::Status CheckShapes(int64_t n, int64_t k, int64_t r) {
  if (n <= 0 || k <= 0 || r <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("EC factors: bad shape (n ", n, ", k ", k, ", rank ", r, ")"));
  }
  return absl::OkStatus();
}

absl::Status EncodeRaw(int64_t n, int64_t k, int64_t r, const float* a, const float* b,
                       EcI8Factors* f) {
  const int64_t ga = EcI8Groups(k), gb = EcI8Groups(n);
  f->a.assign(static_cast<size_t>(r * k), 0);
  f->a_scales.assign(static_cast<size_t>(r * ga), 0);
  f->b.assign(static_cast<size_t>(n * r), 0);
  f->b_scales.assign(static_cast<size_t>(gb * r), 0);
  for (int64_t i = 0; i < r; ++i) {
    absl::Status s = EncodeLine(a + i * k, k, 1, f->a.data() + i * k, f->a_scales.data() + i * ga,
                                1, "A", i);
    if (!s.ok()) return s;
    s = EncodeLine(b + i, n, r, f->b.data() + i, f->b_scales.data() + i, r, "B", i);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status DecodeRaw(const EcI8Factors& f, int64_t n, int64_t k, int64_t r, float* a, float* b) {
  const int64_t ga = EcI8Groups(k), gb = EcI8Groups(n);
  if (static_cast<int64_t>(f.a.size()) != r * k || static_cast<int64_t>(f.b.size()) != n * r ||
      static_cast<int64_t>(f.a_scales.size()) != r * ga ||
      static_cast<int64_t>(f.b_scales.size()) != gb * r) {
    return absl::InvalidArgumentError(absl::StrCat(
        "EC factors: int8 codes / scales of sizes ", f.a.size(), " / ", f.a_scales.size(), " and ",
        f.b.size(), " / ", f.b_scales.size(), " do not match n ", n, ", k ", k, ", rank ", r));
  }
  for (int64_t i = 0; i < r; ++i) {
    absl::Status s =
        DecodeLine(f.a.data() + i * k, k, 1, f.a_scales.data() + i * ga, 1, a + i * k, "A", i);
    if (!s.ok()) return s;
    s = DecodeLine(f.b.data() + i, n, r, f.b_scales.data() + i, r, b + i, "B", i);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status EncodeEcFactorsI8(const EcWeights& e, EcI8Factors* out) {
  if (absl::Status s = CheckShapes(e.n, e.k, e.rank); !s.ok()) return s;
  if (static_cast<int64_t>(e.a.size()) != e.rank * e.k ||
      static_cast<int64_t>(e.b.size()) != e.n * e.rank) {
    return absl::InvalidArgumentError("EC factors: A / B sizes do not match the shapes");
  }
  return EncodeRaw(e.n, e.k, e.rank, e.a.data(), e.b.data(), out);
}

absl::Status DecodeEcFactorsI8(const EcI8Factors& f, EcWeights* e) {
  if (absl::Status s = CheckShapes(e->n, e->k, e->rank); !s.ok()) return s;
  e->a.resize(static_cast<size_t>(e->rank * e->k));
  e->b.resize(static_cast<size_t>(e->n * e->rank));
  if (absl::Status s = DecodeRaw(f, e->n, e->k, e->rank, e->a.data(), e->b.data()); !s.ok()) {
    return s;
  }
  e->factors = EcFactors::kI8;
  return absl::OkStatus();
}

absl::Status RoundEcFactorsI8(int64_t n, int64_t k, int64_t r, float* a, float* b) {
  if (absl::Status s = CheckShapes(n, k, r); !s.ok()) return s;
  EcI8Factors f;
  if (absl::Status s = EncodeRaw(n, k, r, a, b, &f); !s.ok()) return s;
  return DecodeRaw(f, n, k, r, a, b);
}

absl::Status RoundEcFactorsI8(EcWeights* e) {
  EcI8Factors f;
  if (absl::Status s = EncodeEcFactorsI8(*e, &f); !s.ok()) return s;
  return DecodeEcFactorsI8(f, e);
}

}  // namespace spear::kernels
