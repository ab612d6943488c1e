#include "worker/quantize/awq.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/dtype.h"

namespace spear::quantize {
namespace {

// ||D X^T||_F^2 / m, by whichever of the two equal forms is cheaper:
// directly (n*k*m) or through the Gram matrix G = X^T X (n*k*k).
class OutputError {
 public:
  explicit OutputError(const RowMatrixXf& x) : x_(x), m_(static_cast<double>(x.rows())) {
    if (x.rows() >= x.cols()) gram_ = x.transpose() * x;
  }
  // Error of a column block [c0, c0 + len) of D, per row of D.
  Eigen::VectorXd PerRow(const RowMatrixXf& d, int64_t c0, int64_t len) const {
    RowMatrixXf prod;
    if (gram_.size() > 0) {
      prod = (d * gram_.block(c0, c0, len, len)).cwiseProduct(d);
      return prod.rowwise().sum().cast<double>() / m_;
    }
    prod = d * x_.middleCols(c0, len).transpose();
    return prod.cwiseAbs2().rowwise().sum().cast<double>() / m_;
  }
  double Total(const RowMatrixXf& d) const { return PerRow(d, 0, d.cols()).sum(); }

 private:
  const RowMatrixXf& x_;
  double m_;
  RowMatrixXf gram_;
};

}  // namespace

absl::StatusOr<W4Weight> QuantizeAwq(MatrixView w, MatrixView x, const W4Format& fmt,
                                     const AwqOptions& opt, AwqReport* report,
                                     const std::vector<double>& mean_abs) {
  if (auto s = ValidateFormat(fmt); !s.ok()) return s;
  const int64_t n = fmt.n, k = fmt.k, gs = fmt.group_size, ng = fmt.num_groups();
  if (w.rows != n || w.cols != k || x.cols != k || x.rows < 1) {
    return absl::InvalidArgumentError("QuantizeAwq: shapes of W, X and the format disagree");
  }
  if (!mean_abs.empty() && mean_abs.size() != static_cast<size_t>(k)) {
    return absl::InvalidArgumentError("QuantizeAwq: mean_abs must have k entries");
  }
  if (opt.grid < 1 || opt.clip_grid < 1 || opt.max_rows < 1) {
    return absl::InvalidArgumentError("QuantizeAwq: grid, clip_grid and max_rows must be >= 1");
  }
  // Evenly strided sample of the calibration rows.
  const int64_t m = std::min(x.rows, opt.max_rows);
  RowMatrixXf xs(m, k);
  for (int64_t r = 0; r < m; ++r) {
    xs.row(r) = Eigen::Map<const Eigen::RowVectorXf>(x.row(r * x.rows / m), k);
  }
  if (!xs.allFinite()) return absl::InvalidArgumentError("QuantizeAwq: non-finite input");
  Eigen::VectorXd stat(k);
  if (!mean_abs.empty()) {
    for (int64_t j = 0; j < k; ++j) stat(j) = mean_abs[static_cast<size_t>(j)];
  } else {
    const auto xa = AsEigen(x);
    stat = xa.cwiseAbs().colwise().sum().transpose().cast<double>() / static_cast<double>(x.rows);
  }
  stat = stat.cwiseMax(1e-4);
  const OutputError out_err(xs);
  const auto wm = AsEigen(w);

  // Quantize W diag(s) and return the effective-weight error D = Q/s - W.
  auto eval = [&](const Eigen::VectorXf& s, const std::vector<float>& clips,
                  W4Weight* q_out) -> absl::StatusOr<RowMatrixXf> {
    RowMatrixXf ws = wm * s.asDiagonal();
    auto q = QuantizeRtn({ws.data(), n, k}, fmt, clips);
    if (!q.ok()) return q.status();
    RowMatrixXf deq(n, k);
    if (auto st = DequantizeW4(*q, deq.data()); !st.ok()) return st;
    RowMatrixXf d = deq * s.cwiseInverse().asDiagonal() - wm;
    if (q_out != nullptr) *q_out = std::move(*q);
    return d;
  };

  AwqReport rep;
  double best = std::numeric_limits<double>::infinity();
  Eigen::VectorXf best_s = Eigen::VectorXf::Ones(k);
  for (int a = 0; a <= opt.grid; ++a) {
    const double alpha = static_cast<double>(a) / opt.grid;
    Eigen::VectorXd sd = stat.array().pow(alpha);
    sd /= std::sqrt(sd.maxCoeff() * sd.minCoeff());
    // act_scale is served as fp16: search with the values the layer will use.
    const Eigen::VectorXf s = sd.cast<float>().unaryExpr(
        [](float v) { return kernels::HalfToFloat(kernels::FloatToHalf(v)); });
    auto d = eval(s, {}, nullptr);
    if (!d.ok()) return d.status();
    const double e = out_err.Total(*d);
    rep.alpha_errors.push_back(e);
    if (a == 0) rep.rtn_error = e;
    if (e < best) {
      best = e;
      best_s = s;
      rep.best_alpha = alpha;
    }
  }
  rep.scaled_error = best;

  std::vector<float> clips;
  if (opt.clip_search) {
    clips.assign(static_cast<size_t>(n * ng), 1.0f);
    std::vector<double> best_err(static_cast<size_t>(n * ng), std::numeric_limits<double>::infinity());
    const RowMatrixXf ws = wm * best_s.asDiagonal();
    for (int c = 0; c <= opt.clip_grid; ++c) {
      const float rho = 1.0f - 0.5f * static_cast<float>(c) / static_cast<float>(opt.clip_grid);
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t len = fmt.group_len(g);
        RowMatrixXf d(n, len);
        for (int64_t i = 0; i < n; ++i) {
          const float* src = ws.data() + i * k + g * gs;
          const GroupParams p = ComputeGroupParams(src, len, fmt.symmetric, rho);
          for (int64_t j = 0; j < len; ++j) {
            d(i, j) = (QuantDequant(src[j], p) - src[j]) / best_s(g * gs + j);
          }
        }
        const Eigen::VectorXd e = out_err.PerRow(d, g * gs, len);
        for (int64_t i = 0; i < n; ++i) {
          const size_t idx = static_cast<size_t>(i * ng + g);
          if (e(i) < best_err[idx]) {
            best_err[idx] = e(i);
            clips[idx] = rho;
          }
        }
      }
    }
  }
  W4Weight q;
  auto d = eval(best_s, clips, &q);
  if (!d.ok()) return d.status();
  rep.final_error = out_err.Total(*d);
  q.act_scale.assign(best_s.data(), best_s.data() + k);
  if (report != nullptr) *report = std::move(rep);
  return q;
}

}  // namespace spear::quantize
