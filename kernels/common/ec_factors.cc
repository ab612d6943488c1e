#include "kernels/ec_factors.h"

#include <algorithm>
#include <cmath>
#include <vector>

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

// DecodeRaw's values and errors, fast enough for every call of a kernel (a
// compact EC is decoded per prefill call and per reference call; decode
// calls read the codes in place): scales checked first (few),
// codes decoded in loops the compiler vectorizes with an OR-reduction for
// -128; any error is re-derived by DecodeRaw for its message.
absl::Status DecodeFast(const EcI8Factors& f, int64_t n, int64_t k, int64_t r, float* a,
                        float* b) {
  const int64_t ga = EcI8Groups(k), gb = EcI8Groups(n);
  if (static_cast<int64_t>(f.a.size()) != r * k || static_cast<int64_t>(f.b.size()) != n * r ||
      static_cast<int64_t>(f.a_scales.size()) != r * ga ||
      static_cast<int64_t>(f.b_scales.size()) != gb * r) {
    return DecodeRaw(f, n, k, r, a, b);
  }
  bool bad_scale = false;
  for (uint16_t h : f.a_scales) bad_scale |= h < kMinScale || h >= kHalfInf;
  for (uint16_t h : f.b_scales) bad_scale |= h < kMinScale || h >= kHalfInf;
  if (bad_scale) return DecodeRaw(f, n, k, r, a, b);
  int bad = 0;
  for (int64_t i = 0; i < r; ++i) {
    const int8_t* c = f.a.data() + i * k;
    float* o = a + i * k;
    for (int64_t g = 0; g < ga; ++g) {
      const float s = HalfToFloat(f.a_scales[i * ga + g]);
      const int64_t j1 = std::min(k, (g + 1) * kEcI8Group);
      for (int64_t j = g * kEcI8Group; j < j1; ++j) {
        bad |= c[j] == -128;
        o[j] = static_cast<float>(c[j]) * s;
      }
    }
  }
  // B's scales of one row group, decoded once; per thread, so that serving
  // (a decode per EC per token) allocates only when a larger rank comes.
  thread_local std::vector<float> sb;
  sb.resize(static_cast<size_t>(r));
  for (int64_t g = 0; g < gb; ++g) {
    for (int64_t i = 0; i < r; ++i) sb[i] = HalfToFloat(f.b_scales[g * r + i]);
    const int64_t j1 = std::min(n, (g + 1) * kEcI8Group);
    const int8_t* c = f.b.data() + g * kEcI8Group * r;
    float* o = b + g * kEcI8Group * r;
    for (int64_t j = 0; j < (j1 - g * kEcI8Group); ++j) {
      for (int64_t i = 0; i < r; ++i) {
        bad |= c[j * r + i] == -128;
        o[j * r + i] = static_cast<float>(c[j * r + i]) * sb[i];
      }
    }
  }
  if (bad) return DecodeRaw(f, n, k, r, a, b);
  return absl::OkStatus();
}

}  // namespace

absl::Status EncodeEcFactorsI8(const EcWeights& e, EcI8Factors* out) {
  if (absl::Status s = CheckShapes(e.n, e.k, e.rank); !s.ok()) return s;
  if (e.compact_i8()) {
    *out = e.i8;
    return absl::OkStatus();
  }
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

absl::Status CompactEcFactorsI8(EcWeights* e) {
  if (e->compact_i8()) return absl::OkStatus();
  if (e->factors != EcFactors::kI8) {
    return absl::InvalidArgumentError("EC factors: only int8 factors have a compact form");
  }
  EcI8Factors f;
  if (absl::Status s = EncodeEcFactorsI8(*e, &f); !s.ok()) return s;
  // The encoder rounds; a value off the grid would change here, silently.
  std::vector<float> a(e->a.size()), b(e->b.size());
  if (absl::Status s = DecodeRaw(f, e->n, e->k, e->rank, a.data(), b.data()); !s.ok()) return s;
  if (a != e->a || b != e->b) {
    return absl::InvalidArgumentError(
        "EC factors: A / B are not on the int8 grid (RoundEcFactorsI8 first)");
  }
  const int64_t h = e->gated ? e->gate_hidden : 0, r = e->rank;
  if (e->gated && (e->w1.size() != static_cast<size_t>(h * r) ||
                   e->b1.size() != static_cast<size_t>(h) ||
                   e->w2.size() != static_cast<size_t>(r * h) ||
                   e->b2.size() != static_cast<size_t>(r))) {
    return absl::InvalidArgumentError("EC factors: gate MLP sizes do not match the shapes");
  }
  auto half = [](std::vector<float>* v, std::vector<uint16_t>* out) {
    out->resize(v->size());
    for (size_t i = 0; i < v->size(); ++i) (*out)[i] = FloatToHalf((*v)[i]);
    std::vector<float>().swap(*v);
  };
  e->i8 = std::move(f);
  half(&e->w1, &e->gate16.w1);
  half(&e->b1, &e->gate16.b1);
  half(&e->w2, &e->gate16.w2);
  half(&e->b2, &e->gate16.b2);
  std::vector<float>().swap(e->a);
  std::vector<float>().swap(e->b);
  return absl::OkStatus();
}

absl::Status EcFloats(const EcWeights& e, EcScratch* scratch, EcFloatView* view) {
  if (!e.compact_i8()) {
    *view = {e.a.data(), e.b.data(), nullptr, nullptr, nullptr, nullptr};
    if (e.gated) {
      view->w1 = e.w1.data(), view->b1 = e.b1.data(), view->w2 = e.w2.data(),
      view->b2 = e.b2.data();
    }
    return absl::OkStatus();
  }
  if (absl::Status s = CheckShapes(e.n, e.k, e.rank); !s.ok()) return s;
  scratch->a.resize(static_cast<size_t>(e.rank * e.k));
  scratch->b.resize(static_cast<size_t>(e.n * e.rank));
  if (absl::Status s =
          DecodeFast(e.i8, e.n, e.k, e.rank, scratch->a.data(), scratch->b.data());
      !s.ok()) {
    return s;
  }
  *view = {scratch->a.data(), scratch->b.data(), nullptr, nullptr, nullptr, nullptr};
  if (e.gated) {
    const int64_t h = e.gate_hidden, r = e.rank;
    const EcWeights::Gate16& g = e.gate16;
    if (h <= 0 || g.w1.size() != static_cast<size_t>(h * r) ||
        g.b1.size() != static_cast<size_t>(h) || g.w2.size() != static_cast<size_t>(r * h) ||
        g.b2.size() != static_cast<size_t>(r)) {
      return absl::InvalidArgumentError("EC factors: fp16 gate MLP sizes do not match the shapes");
    }
    auto widen = [](const std::vector<uint16_t>& in, std::vector<float>* out) {
      out->resize(in.size());
      for (size_t i = 0; i < in.size(); ++i) (*out)[i] = HalfToFloat(in[i]);
      return out->data();
    };
    view->w1 = widen(g.w1, &scratch->w1);
    view->b1 = widen(g.b1, &scratch->b1);
    view->w2 = widen(g.w2, &scratch->w2);
    view->b2 = widen(g.b2, &scratch->b2);
  }
  return absl::OkStatus();
}

absl::StatusOr<EcWeights> WithFloatFactors(const EcWeights& e) {
  if (!e.compact_i8()) return e;
  EcScratch sc;
  EcFloatView v;
  if (absl::Status s = EcFloats(e, &sc, &v); !s.ok()) return s;
  EcWeights out = e;
  out.i8 = EcI8Factors();
  out.gate16 = EcWeights::Gate16();
  out.a = std::move(sc.a);
  out.b = std::move(sc.b);
  if (e.gated) {
    out.w1 = std::move(sc.w1);
    out.b1 = std::move(sc.b1);
    out.w2 = std::move(sc.w2);
    out.b2 = std::move(sc.b2);
  }
  return out;
}

}  // namespace spear::kernels
