#include "worker/quantize/pipeline/ec_latency.h"

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace spear::quantize {
namespace {

constexpr absl::string_view kHeader = "n,k,m,rank,w4_us,ec_us";

}  // namespace

absl::StatusOr<double> EcLatencyTable::Relative(int64_t n, int64_t k, int64_t m,
                                                int64_t rank) const {
  for (const EcLatencyRow& r : rows) {
    if (r.n == n && r.k == k && r.m == m && r.rank == rank) {
      const double rel = (r.ec_us - r.w4_us) / r.w4_us;
      return rel > 0 ? rel : 0.0;
    }
  }
  return absl::NotFoundError(absl::StrCat("EC latency table ", source, ": no row for n=", n,
                                          " k=", k, " m=", m, " rank=", rank,
                                          " (measure it with spear_bench_w4_cuda --ec-latency=",
                                          n, "x", k, " --ec-ranks=", rank, " --ec-ms=", m, ")"));
}

absl::StatusOr<EcLatencyTable> ParseEcLatencyTable(const std::string& text, std::string source) {
  EcLatencyTable t;
  t.source = std::move(source);
  bool header = false;
  std::set<std::tuple<int64_t, int64_t, int64_t, int64_t>> seen;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripTrailingAsciiWhitespace(line);  // also '\r'
    auto bad = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(t.source, ":", line_no, ": ", what));
    };
    if (line.empty()) continue;
    if (line.front() == '#') {
      const absl::string_view c = absl::StripAsciiWhitespace(line.substr(1));
      t.comments.emplace_back(c);
      const size_t at = c.find("W4 group ");
      if (at != absl::string_view::npos) {
        absl::string_view g = c.substr(at + 9);
        g = g.substr(0, g.find_first_of(" ,;"));
        int64_t v = 0;
        if (!absl::SimpleAtoi(g, &v) || (v != -1 && v < 1)) {
          return bad(absl::StrCat("unreadable W4 group in the comment: '", g, "'"));
        }
        t.group = v;
      }
      continue;
    }
    if (!header) {
      if (line != kHeader) {
        return bad(absl::StrCat("expected the header '", kHeader, "', got '", line, "'"));
      }
      header = true;
      continue;
    }
    const std::vector<absl::string_view> f = absl::StrSplit(line, ',');
    if (f.size() != 6) return bad(absl::StrCat("expected 6 fields, got ", f.size()));
    EcLatencyRow r;
    if (!absl::SimpleAtoi(f[0], &r.n) || !absl::SimpleAtoi(f[1], &r.k) ||
        !absl::SimpleAtoi(f[2], &r.m) || !absl::SimpleAtoi(f[3], &r.rank) || r.n < 1 || r.k < 1 ||
        r.m < 1 || r.rank < 1) {
      return bad("n, k, m and rank must be positive integers");
    }
    if (!absl::SimpleAtod(f[4], &r.w4_us) || !absl::SimpleAtod(f[5], &r.ec_us) ||
        !std::isfinite(r.w4_us) || !std::isfinite(r.ec_us) || r.w4_us <= 0 || r.ec_us <= 0) {
      return bad("w4_us and ec_us must be positive finite numbers");
    }
    if (!seen.insert({r.n, r.k, r.m, r.rank}).second) {
      return bad(absl::StrCat("repeated row n=", r.n, " k=", r.k, " m=", r.m, " rank=", r.rank));
    }
    t.rows.push_back(r);
  }
  if (!header) {
    return absl::InvalidArgumentError(
        absl::StrCat(t.source, ": no header line '", kHeader, "' (not an EC latency table)"));
  }
  if (t.rows.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(t.source, ": no rows"));
  }
  return t;
}

absl::StatusOr<EcLatencyTable> ReadEcLatencyTable(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read EC latency table ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("error reading ", path));
  return ParseEcLatencyTable(ss.str(), path);
}

}  // namespace spear::quantize
