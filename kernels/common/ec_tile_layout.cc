#include "kernels/ec_tile_layout.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"

namespace spear::kernels {
namespace {

absl::Status CheckShape(int64_t n, int64_t r) {
  if (n <= 0 || r <= 0 || n >= (int64_t{1} << 24) || r > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("EC tile layout: bad shape (n ", n, ", rank ", r, ")"));
  }
  return absl::OkStatus();
}

// Segments from each tile's used rank range: `used(col, q)` says whether
// B[col][q] is nonzero.
template <typename Used>
void PlanSegments(EcTileLayout* l, Used used) {
  const int64_t nt = l->ntiles;
  std::vector<int> tq0(static_cast<size_t>(nt), 0), tnp(static_cast<size_t>(nt), 0);
  for (int64_t t = 0; t < nt; ++t) {
    int64_t lo = l->r, hi = -1;
    for (int64_t c = t * kEcTileN; c < std::min(l->n, (t + 1) * kEcTileN); ++c) {
      for (int64_t q = 0; q < l->r; ++q) {
        if (used(c, q)) {
          lo = std::min(lo, q);
          hi = std::max(hi, q);
        }
      }
    }
    if (hi >= 0) {
      tq0[static_cast<size_t>(t)] = static_cast<int>(lo & ~int64_t{1});
      tnp[static_cast<size_t>(t)] = static_cast<int>((hi + 2 - (lo & ~int64_t{1})) / 2);
    }
  }
  int nseg = 0;
  bool fits = true;
  for (int64_t t = 0; t < nt && fits; ++t) {
    const size_t i = static_cast<size_t>(t);
    if (nseg > 0 && tq0[i] == l->q0[nseg - 1] && tnp[i] == l->npairs[nseg - 1]) continue;
    if (nseg == kEcMaxSegs) {
      fits = false;
      break;
    }
    l->tile0[nseg] = static_cast<int>(t);
    l->q0[nseg] = tq0[i];
    l->npairs[nseg] = tnp[i];
    ++nseg;
  }
  if (!fits) {  // one segment of every rank
    nseg = 1;
    l->tile0[0] = 0;
    l->q0[0] = 0;
    l->npairs[0] = static_cast<int>((l->r + 1) / 2);
  }
  l->nseg = nseg;
  int64_t rec = 0;
  l->max_steps = 0;
  for (int s = 0; s < nseg; ++s) {
    const int64_t t1 = s + 1 < nseg ? l->tile0[s + 1] : nt;
    l->rec0[s] = rec;
    rec += (t1 - l->tile0[s]) * l->npairs[s] * 8;
    l->max_steps = std::max(l->max_steps, (l->npairs[s] + 3) / 4);
  }
  for (int s = nseg; s < kEcMaxSegs; ++s) {
    l->tile0[s] = static_cast<int>(nt);  // never chosen
    l->q0[s] = l->npairs[s] = 0;
    l->rec0[s] = rec;
  }
  l->words.assign(static_cast<size_t>(rec * l->words_per_record()), 0u);
}

// Calls f(first word of the record, p, column of a0, column of a1, q) for
// every subtile p of every record.
template <typename F>
void ForEachRecord(const EcTileLayout& l, F f) {
  for (int s = 0; s < l.nseg; ++s) {
    const int64_t t1 = s + 1 < l.nseg ? l.tile0[s + 1] : l.ntiles;
    for (int64_t t = l.tile0[s]; t < t1; ++t) {
      for (int pi = 0; pi < l.npairs[s]; ++pi) {
        for (int gid = 0; gid < 8; ++gid) {
          const int64_t rec = l.rec0[s] + ((t - l.tile0[s]) * l.npairs[s] + pi) * 8 + gid;
          const int64_t q = l.q0[s] + 2 * pi;
          for (int p = 0; p < 4; ++p) {
            const int64_t c0 = t * kEcTileN + 16 * p + gid;
            f(rec * l.words_per_record(), p, c0, c0 + 8, q);
          }
        }
      }
    }
  }
}

}  // namespace

int EcTileLayout::SegmentOf(int64_t t) const {
  int s = 0;
  for (int i = 1; i < nseg; ++i) {
    if (t >= tile0[i]) s = i;
  }
  return s;
}

float EcTileLayout::Value(int64_t col, int64_t q) const {
  if (col < 0 || col >= n || q < 0 || q >= r) return 0.f;
  const int64_t t = col / kEcTileN;
  const int s = SegmentOf(t);
  const int64_t pi = (q - q0[s]) >> 1;
  if (q < q0[s] || pi >= npairs[s]) return 0.f;
  const int64_t c = col - t * kEcTileN, p = c / 16, gid = c % 8, hi = (c % 16) / 8;
  const int64_t rec = rec0[s] + ((t - tile0[s]) * npairs[s] + pi) * 8 + gid;
  const int64_t h = (q - q0[s]) & 1;
  const uint32_t* w = words.data() + rec * words_per_record();
  if (i8) {
    const int8_t code = static_cast<int8_t>((w[p] >> (8 * (2 * hi + h))) & 0xff);
    return static_cast<float>(code) * HalfToFloat(scales[static_cast<size_t>(t * rs + q)]);
  }
  return HalfToFloat(static_cast<uint16_t>(w[2 * p + hi] >> (16 * h)));
}

absl::StatusOr<EcTileLayout> BuildEcTileLayoutF16(const float* b, int64_t n, int64_t r) {
  if (absl::Status s = CheckShape(n, r); !s.ok()) return s;
  if (b == nullptr) return absl::InvalidArgumentError("EC tile layout: B is null");
  EcTileLayout l;
  l.n = n, l.r = r, l.ntiles = (n + kEcTileN - 1) / kEcTileN, l.i8 = false;
  auto half = [&](int64_t c, int64_t q) -> uint32_t {
    if (c >= n || q >= r) return 0;
    return FloatToHalf(b[c * r + q]);
  };
  PlanSegments(&l, [&](int64_t c, int64_t q) { return (half(c, q) & 0x7fff) != 0; });
  ForEachRecord(l, [&](int64_t w0, int p, int64_t c0, int64_t c1, int64_t q) {
    l.words[static_cast<size_t>(w0 + 2 * p)] = half(c0, q) | (half(c0, q + 1) << 16);
    l.words[static_cast<size_t>(w0 + 2 * p + 1)] = half(c1, q) | (half(c1, q + 1) << 16);
  });
  return l;
}

absl::StatusOr<EcTileLayout> BuildEcTileLayoutI8(const int8_t* codes, const uint16_t* scales,
                                                 int64_t n, int64_t r) {
  if (absl::Status s = CheckShape(n, r); !s.ok()) return s;
  if (codes == nullptr || scales == nullptr) {
    return absl::InvalidArgumentError("EC tile layout: int8 codes or scales are null");
  }
  EcTileLayout l;
  l.n = n, l.r = r, l.ntiles = (n + kEcTileN - 1) / kEcTileN, l.i8 = true;
  for (int64_t i = 0; i < n * r; ++i) {
    if (codes[i] == -128) {
      return absl::InvalidArgumentError(
          absl::StrCat("EC tile layout: code -128 at B[", i / r, "][", i % r, "]"));
    }
  }
  auto code = [&](int64_t c, int64_t q) -> uint32_t {
    if (c >= n || q >= r) return 0;
    return static_cast<uint8_t>(codes[c * r + q]);
  };
  PlanSegments(&l, [&](int64_t c, int64_t q) { return code(c, q) != 0; });
  ForEachRecord(l, [&](int64_t w0, int p, int64_t c0, int64_t c1, int64_t q) {
    l.words[static_cast<size_t>(w0 + p)] =
        code(c0, q) | (code(c0, q + 1) << 8) | (code(c1, q) << 16) | (code(c1, q + 1) << 24);
  });
  l.rs = static_cast<int>((r + 1) & ~int64_t{1});
  l.scales.assign(static_cast<size_t>(l.ntiles * l.rs), 0);
  for (int64_t t = 0; t < l.ntiles; ++t) {
    for (int64_t q = 0; q < r; ++q) {
      l.scales[static_cast<size_t>(t * l.rs + q)] = scales[t * r + q];
    }
  }
  return l;
}

}  // namespace spear::kernels
