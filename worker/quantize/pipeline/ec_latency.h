// The measured EC latency table: what an EC adds to a W4 GEMM's time on a
// given GPU, per module shape (n, k), batch rows m and EC rank, written by
// `spear_bench_w4_cuda --ec-latency=NxK,... --ec-ranks=... --ec-ms=...`
// (kernels/bench/bench_w4_cuda.cu) and read by `spear quantize
// --ec-latency-table FILE`, whose placement then ranks modules by damage
// per byte penalised by the *measured* relative latency (ec_us - w4_us) /
// w4_us at m = 1 and the smallest placement rank, instead of the bytes
// proxy (EC bytes / W4 bytes: right for a bandwidth-bound GEMM, far off for
// small ones, where the EC's prologue launch dominates).
//
// Format (CSV, UTF-8): lines starting with '#' are comments (the bench
// writes the device and method there); the first other line is exactly
// `n,k,m,rank,w4_us,ec_us`; then one row per (n, k, m, rank): four
// positive integers and two positive finite times in microseconds. A
// repeated (n, k, m, rank) is an error. Example: docs/results/data/
// ec_latency_smollm2_h200_pc.csv. The rows say nothing about the W4 group
// or the gate: measure with the quantize's --group (the bench's --group)
// and a gated EC; the bench writes both into its comment line ("... W4
// group G ..."), which the provenance keeps and `group` reads back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::quantize {

struct EcLatencyRow {
  int64_t n = 0, k = 0, m = 0, rank = 0;
  double w4_us = 0, ec_us = 0;
};

struct EcLatencyTable {
  std::string source;                 // file name (messages, provenance)
  std::vector<std::string> comments;  // '#' lines without the '#'
  std::vector<EcLatencyRow> rows;
  // The W4 group size named by a comment "W4 group G" (-1 = per channel),
  // or 0 when no comment names one.
  int64_t group = 0;
  // (ec_us - w4_us) / w4_us of the row (n, k, m, rank), clamped at 0 (a
  // faster EC is timing noise, not a gain). NotFound naming the missing
  // row and the file.
  absl::StatusOr<double> Relative(int64_t n, int64_t k, int64_t m, int64_t rank) const;
};

// InvalidArgument "SOURCE:LINE: what" for a malformed table.
absl::StatusOr<EcLatencyTable> ParseEcLatencyTable(const std::string& text, std::string source);
// NotFound / InvalidArgument when the file cannot be read.
absl::StatusOr<EcLatencyTable> ReadEcLatencyTable(const std::string& path);

}  // namespace spear::quantize
