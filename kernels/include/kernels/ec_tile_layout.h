// The EC up-projection B as the CUDA decode kernels hold it on the device
// (kernels/FORMAT.md, "CUDA layout", ec records): pure host code, so that the
// layout and its decoding are tested on any machine.
//
// B is [n][r] (output column, rank). The kernels add B (g ⊙ u) per 64-column
// tile in record steps of 8 ranks = 4 rank pairs over the rank, two steps
// to one mma.sync m16n8k16 (kernels/cuda/ec_tile.cuh). A tile stores only
// the rank pairs its columns use: a merged q/k/v or gate/up EC is
// block-diagonal (a module's columns use its own ranks), so the
// tiles of one module share a range [q0, q0 + 2 npairs) and form a segment;
// up to kEcMaxSegs segments, else one segment of every rank. A record is
// what lane (gid, tig) reads for rank pair pi = 4 step + tig: for the four
// 16-column subtiles p, the values (column 16 p + gid, ranks q, q + 1) and
// (column 16 p + 8 + gid, ranks q, q + 1), q = q0 + 2 pi, in that order.
//  - fp16 records (32 bytes): word 2 p / 2 p + 1 = the two half2 pairs.
//  - int8 records (16 bytes, EcFactors::kI8 served as stored): word p =
//    bytes {c(16p + gid, q), c(16p + gid, q + 1), c(16p + 8 + gid, q),
//    c(16p + 8 + gid, q + 1)}; the value is code x scale, the scale one fp16
//    per (tile, rank) = B's own int8 group (64 values along n), in `scales`
//    [ntiles][rs]. The kernels form fp16(code x scale) in registers: the
//    value an fp16 copy of the decoded B would hold, from half the bytes.
// Records of a tile: pair-major, then gid: tile t of segment s starts at
// record rec0[s] + (t - tile0[s]) npairs[s] 8. Columns >= n and ranks >= r
// hold zeros.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::kernels {

inline constexpr int kEcMaxSegs = 4;
inline constexpr int64_t kEcTileN = 64;

struct EcTileLayout {
  int64_t n = 0, r = 0, ntiles = 0;
  bool i8 = false;
  int nseg = 0;
  int tile0[kEcMaxSegs] = {};   // first tile of each segment (tile0[0] = 0)
  int q0[kEcMaxSegs] = {};      // first rank (even)
  int npairs[kEcMaxSegs] = {};  // rank pairs stored per tile (0: no EC term there)
  int64_t rec0[kEcMaxSegs] = {};
  int max_steps = 0;            // max over segments of ceil(npairs / 4)
  std::vector<uint32_t> words;  // nrec() records of 4 (int8) or 8 (fp16) words
  int rs = 0;                   // int8: scale row stride (r rounded up to even)
  std::vector<uint16_t> scales; // int8: fp16 [ntiles][rs] (0 past r)

  int words_per_record() const { return i8 ? 4 : 8; }
  int64_t nrec() const { return static_cast<int64_t>(words.size()) / words_per_record(); }
  size_t bytes() const { return words.size() * 4 + scales.size() * 2; }
  // The segment of tile t.
  int SegmentOf(int64_t t) const;
  // B[col][q] as the kernels multiply it: the fp16 value (fp16 records) or
  // code x scale (int8, exact in float).
  float Value(int64_t col, int64_t q) const;
};

// From B [n][r] floats, rounded to fp16 (the fp16 form). InvalidArgument for
// bad shapes or sizes.
absl::StatusOr<EcTileLayout> BuildEcTileLayoutF16(const float* b, int64_t n, int64_t r);

// From int8 codes [n][r] and fp16 scales [ceil(n / 64)][r] (EcI8Factors' b
// and b_scales: their groups along n are the tiles). InvalidArgument for bad
// shapes, sizes, or a code of -128.
absl::StatusOr<EcTileLayout> BuildEcTileLayoutI8(const int8_t* codes, const uint16_t* scales,
                                                 int64_t n, int64_t r);

}  // namespace spear::kernels
