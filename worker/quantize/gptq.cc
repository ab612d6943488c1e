#include "worker/quantize/gptq.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace spear::quantize {

HessianAccumulator::HessianAccumulator(int64_t k)
    : k_(k), sum_(Eigen::MatrixXd::Zero(k, k)), abs_sum_(Eigen::VectorXd::Zero(k)) {}

absl::Status HessianAccumulator::Add(MatrixView x) {
  if (x.cols != k_ || (x.rows > 0 && x.data == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat("HessianAccumulator: expected ", k_,
                                                   " columns, got ", x.cols));
  }
  for (int64_t e = 0; e < x.size(); ++e) {
    if (!std::isfinite(x.data[e])) return absl::InvalidArgumentError("HessianAccumulator: non-finite input");
  }
  // float GEMM per chunk of rows (twice the speed of double), summed in double
  // across chunks so long calibration runs do not lose precision.
  constexpr int64_t kChunk = 512;
  for (int64_t r0 = 0; r0 < x.rows; r0 += kChunk) {
    const int64_t m = std::min(kChunk, x.rows - r0);
    Eigen::Map<const RowMatrixXf> xc(x.row(r0), m, k_);
    Eigen::MatrixXf g = Eigen::MatrixXf::Zero(k_, k_);
    g.selfadjointView<Eigen::Lower>().rankUpdate(xc.transpose());
    sum_ += g.selfadjointView<Eigen::Lower>().toDenseMatrix().cast<double>();
    abs_sum_ += xc.cwiseAbs().colwise().sum().transpose().cast<double>();
  }
  count_ += x.rows;
  return absl::OkStatus();
}

Eigen::MatrixXd HessianAccumulator::SecondMoment() const {
  return count_ > 0 ? Eigen::MatrixXd(sum_ / static_cast<double>(count_))
                    : Eigen::MatrixXd::Zero(k_, k_);
}

Eigen::MatrixXd HessianAccumulator::Hessian() const { return 2.0 * SecondMoment(); }

std::vector<double> HessianAccumulator::MeanAbs() const {
  std::vector<double> out(static_cast<size_t>(k_), 0.0);
  if (count_ == 0) return out;
  for (int64_t j = 0; j < k_; ++j) out[static_cast<size_t>(j)] = abs_sum_(j) / static_cast<double>(count_);
  return out;
}

absl::StatusOr<W4Weight> QuantizeGptq(MatrixView w, const Eigen::MatrixXd& hessian,
                                      const W4Format& fmt, const GptqOptions& opt,
                                      GptqReport* report) {
  if (auto s = ValidateFormat(fmt); !s.ok()) return s;
  const int64_t n = fmt.n, k = fmt.k, gs = fmt.group_size, ng = fmt.num_groups();
  if (w.rows != n || w.cols != k || hessian.rows() != k || hessian.cols() != k) {
    return absl::InvalidArgumentError("QuantizeGptq: weight/Hessian shapes do not match the format");
  }
  if (opt.block_size <= 0 || opt.percdamp < 0) {
    return absl::InvalidArgumentError("QuantizeGptq: block_size must be > 0, percdamp >= 0");
  }
  if (!hessian.allFinite()) return absl::InvalidArgumentError("QuantizeGptq: non-finite Hessian");
  for (int64_t e = 0; e < w.size(); ++e) {
    if (!std::isfinite(w.data[e])) return absl::InvalidArgumentError("QuantizeGptq: non-finite weight");
  }
  GptqReport rep;
  Eigen::MatrixXd h = hessian;
  for (int64_t j = 0; j < k; ++j) {
    if (h(j, j) <= 0.0) {
      h(j, j) = 1.0;
      ++rep.dead_columns;
    }
  }
  // Processing order.
  std::vector<int64_t> perm(static_cast<size_t>(k));
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return h(a, a) > h(b, b); });
  }
  std::vector<int64_t> pos(static_cast<size_t>(k));  // original column -> processing position
  for (int64_t c = 0; c < k; ++c) pos[static_cast<size_t>(perm[c])] = c;

  Eigen::MatrixXd hp(k, k);
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b) hp(a, b) = h(perm[a], perm[b]);
  }
  const double mean_diag = hp.diagonal().mean();
  double damp = opt.percdamp * mean_diag;
  Eigen::MatrixXd u;  // upper Cholesky factor of H^-1
  bool ok = false;
  for (int attempt = 0; attempt < 7 && !ok; ++attempt) {
    Eigen::MatrixXd hd = hp;
    hd.diagonal().array() += damp;
    Eigen::LLT<Eigen::MatrixXd> llt(hd);
    if (llt.info() == Eigen::Success) {
      Eigen::MatrixXd hinv = llt.solve(Eigen::MatrixXd::Identity(k, k));
      hinv = 0.5 * (hinv + hinv.transpose());
      Eigen::LLT<Eigen::MatrixXd> llt2(hinv);
      if (llt2.info() == Eigen::Success) {
        u = llt2.matrixU();
        ok = true;
        break;
      }
    }
    damp = damp > 0 ? damp * 10.0 : 1e-8 * std::max(mean_diag, 1.0);
  }
  if (!ok) return absl::FailedPreconditionError("QuantizeGptq: Hessian is not positive definite after dampening");
  rep.damp = damp;
  const Eigen::MatrixXf uf = u.cast<float>();

  // Working weights in processing order, column-major (columns contiguous).
  const auto w_orig = AsEigen(w);
  Eigen::MatrixXf wp(n, k);
  for (int64_t c = 0; c < k; ++c) wp.col(c) = w_orig.col(perm[c]);

  std::vector<GroupParams> params(static_cast<size_t>(n * ng));
  std::vector<char> have(static_cast<size_t>(ng), 0);
  std::vector<uint8_t> codes(static_cast<size_t>(n * k));
  Eigen::MatrixXf group_vals(n, gs);
  // vals holds the group's columns (a ragged last group uses its first
  // group_len(g) columns).
  auto set_group = [&](int64_t g, const Eigen::MatrixXf& vals) {
    const int64_t len = fmt.group_len(g);
    for (int64_t r = 0; r < n; ++r) {
      params[static_cast<size_t>(r * ng + g)] = ComputeGroupParams(vals.data() + r, len, fmt.symmetric, 1.0f, n);
    }
    have[static_cast<size_t>(g)] = 1;
  };
  if (opt.static_groups) {
    for (int64_t g = 0; g < ng; ++g) {
      group_vals.leftCols(fmt.group_len(g)) = w_orig.middleCols(g * gs, fmt.group_len(g));
      set_group(g, group_vals);
    }
  }

  const int64_t bs = opt.block_size;
  Eigen::MatrixXf err(n, bs);
  for (int64_t i1 = 0; i1 < k; i1 += bs) {
    const int64_t i2 = std::min(i1 + bs, k), cnt = i2 - i1;
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t c = i1 + i, j = perm[c], g = j / gs;
      if (!have[static_cast<size_t>(g)]) {
        // Current values of the group's columns: in-block columns are up to
        // date; later columns still owe this block's pending updates.
        for (int64_t jj = 0; jj < fmt.group_len(g); ++jj) {
          const int64_t pc = pos[static_cast<size_t>(g * gs + jj)];
          group_vals.col(jj) = wp.col(pc);
          if (pc >= i2 && i > 0) group_vals.col(jj).noalias() -= err.leftCols(i) * uf.block(i1, pc, i, 1);
        }
        set_group(g, group_vals);
      }
      const float d = uf(c, c);
      for (int64_t r = 0; r < n; ++r) {
        const float wv = wp(r, c);
        const GroupParams p = params[static_cast<size_t>(r * ng + g)];
        const uint8_t code = QuantizeCode(wv, p);
        codes[static_cast<size_t>(r * k + j)] = code;
        const float e = (wv - DequantCode(code, p)) / d;
        err(r, i) = e;
        rep.proxy_loss += 0.5 * static_cast<double>(e) * e;
      }
      if (c + 1 < i2) {
        wp.middleCols(c + 1, i2 - c - 1).noalias() -=
            err.col(i) * uf.block(c, c + 1, 1, i2 - c - 1);
      }
    }
    if (i2 < k) wp.rightCols(k - i2).noalias() -= err.leftCols(cnt) * uf.block(i1, i2, cnt, k - i2);
  }
  if (report != nullptr) *report = rep;
  return PackW4(fmt, codes, params);
}

}  // namespace spear::quantize
