#include "worker/quantize/ec_train.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "worker/quantize/ec_model.h"

namespace spear::quantize {
namespace {

using Mat = EMat<float>;
using Vec = EVec<float>;

absl::Status CheckData(const EcWeights& ec, MatrixView x, MatrixView r, bool need_r) {
  if (auto s = ValidateEc(ec); !s.ok()) return s;
  if (x.cols != ec.k || x.rows < 1 || x.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("EC data: X must be [T, ", ec.k, "]"));
  }
  if (need_r && (r.cols != ec.n || r.rows != x.rows || r.data == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat("EC data: R must be [", x.rows, ", ", ec.n, "]"));
  }
  return absl::OkStatus();
}

void Gather(MatrixView src, const int64_t* idx, int64_t m, Mat* dst) {
  dst->resize(m, src.cols);
  for (int64_t i = 0; i < m; ++i) {
    std::copy(src.row(idx[i]), src.row(idx[i]) + src.cols, dst->row(i).data());
  }
}

// Mean loss over the given rows, in chunks (float64 accumulation across chunks).
double LossOnRows(const EcParams<float>& p, MatrixView x, MatrixView r,
                  const std::vector<int64_t>& rows, const Vec& weights) {
  constexpr int64_t kChunk = 1024;
  double sum = 0.0;
  Mat xb, rb;
  const int64_t total = static_cast<int64_t>(rows.size());
  for (int64_t s = 0; s < total; s += kChunk) {
    const int64_t m = std::min(kChunk, total - s);
    Gather(x, rows.data() + s, m, &xb);
    Gather(r, rows.data() + s, m, &rb);
    sum += static_cast<double>(EcLossAndGrad<float>(p, xb, rb, weights, nullptr)) * m;
  }
  return total > 0 ? sum / total : 0.0;
}

double ZeroLoss(MatrixView r, const std::vector<int64_t>& rows, const Vec& weights) {
  double sum = 0.0;
  for (int64_t t : rows) {
    const float* rr = r.row(t);
    for (int64_t i = 0; i < r.cols; ++i) {
      sum += static_cast<double>(weights.size() ? weights(i) : 1.0f) * rr[i] * rr[i];
    }
  }
  return rows.empty() ? 0.0 : sum / static_cast<double>(rows.size());
}

}  // namespace

absl::Status ValidateEc(const EcWeights& ec) {
  if (ec.n <= 0 || ec.k <= 0 || ec.rank <= 0) return absl::InvalidArgumentError("EC: bad shape");
  const auto sz = [](int64_t a, int64_t b) { return static_cast<size_t>(a * b); };
  if (ec.a.size() != sz(ec.rank, ec.k) || ec.b.size() != sz(ec.n, ec.rank)) {
    return absl::InvalidArgumentError("EC: A/B sizes do not match [r, k] / [n, r]");
  }
  if (ec.gated) {
    const int64_t h = ec.gate_hidden, r = ec.rank;
    if (h <= 0 || ec.w1.size() != sz(h, r) || ec.b1.size() != sz(h, 1) ||
        ec.w2.size() != sz(r, h) || ec.b2.size() != sz(r, 1)) {
      return absl::InvalidArgumentError("EC: gate sizes do not match h / r");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<EcTrainReport> TrainEc(MatrixView x, MatrixView r, EcWeights* ec,
                                      const EcTrainOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  if (ec == nullptr) return absl::InvalidArgumentError("TrainEc: null EC");
  if (auto s = CheckData(*ec, x, r, true); !s.ok()) return s;
  const int64_t tokens = x.rows;
  if (tokens < 2 || opt.batch_tokens < 1 || opt.steps < 0 || opt.eval_every < 1 ||
      opt.val_fraction <= 0.0 || opt.val_fraction >= 1.0 || !(opt.lr > 0.0f)) {
    return absl::InvalidArgumentError(
        "TrainEc: need T >= 2, batch_tokens >= 1, eval_every >= 1, 0 < val_fraction < 1, lr > 0");
  }
  Vec weights;
  if (!opt.channel_weights.empty()) {
    if (opt.channel_weights.size() != static_cast<size_t>(ec->n)) {
      return absl::InvalidArgumentError("TrainEc: channel_weights must have n entries");
    }
    weights = Eigen::Map<const Vec>(opt.channel_weights.data(), ec->n);
  }
  std::mt19937_64 rng(opt.seed);
  std::vector<int64_t> order(static_cast<size_t>(tokens));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  const int64_t nval = std::clamp<int64_t>(std::llround(opt.val_fraction * tokens), 1, tokens - 1);
  std::vector<int64_t> val(order.begin(), order.begin() + nval);
  std::vector<int64_t> train(order.begin() + nval, order.end());
  EcTrainReport rep;
  rep.train_tokens = static_cast<int64_t>(train.size());
  rep.val_tokens = nval;

  EcParams<float> p = ParamsFromEc<float>(*ec);
  const bool gated = p.gated;
  const bool train_gate = gated && opt.train_gate;
  if (gated && opt.scale_gate_init && p.w2.isZero(0) && p.b2.isZero(0)) {
    // Unit-RMS gate pre-activations; the gate output is still exactly 1.
    Mat xb;
    const int64_t m = std::min<int64_t>(2048, static_cast<int64_t>(train.size()));
    Gather(x, train.data(), m, &xb);
    const Mat h1 = (xb * p.a.transpose()) * p.w1.transpose();
    const double rms = std::sqrt(h1.squaredNorm() / std::max<double>(1.0, h1.size()));
    if (rms > 0 && std::isfinite(rms)) p.w1 /= static_cast<float>(rms);
  }
  rep.zero_train_loss = ZeroLoss(r, train, weights);
  rep.zero_val_loss = ZeroLoss(r, val, weights);
  rep.init_train_loss = LossOnRows(p, x, r, train, weights);
  rep.init_val_loss = LossOnRows(p, x, r, val, weights);

  EcParams<float> best = p, grad;
  double best_val = rep.init_val_loss;
  AdamTensor<float> adam_a, adam_b, adam_w1, adam_b1, adam_w2, adam_b2;
  Mat xb, rb;
  size_t cursor = 0;
  int64_t bad_evals = 0;
  const int64_t batch = std::min<int64_t>(opt.batch_tokens, static_cast<int64_t>(train.size()));
  for (int64_t step = 1; step <= opt.steps; ++step) {
    if (cursor + static_cast<size_t>(batch) > train.size()) {
      std::shuffle(train.begin(), train.end(), rng);
      cursor = 0;
    }
    Gather(x, train.data() + cursor, batch, &xb);
    Gather(r, train.data() + cursor, batch, &rb);
    cursor += static_cast<size_t>(batch);
    EcLossAndGradExpanded<float>(p, xb, rb, weights, &grad);
    float lr = opt.lr;
    if (step <= opt.warmup_steps) {
      lr *= static_cast<float>(step) / static_cast<float>(opt.warmup_steps);
    } else {
      const double span = std::max<int64_t>(1, opt.steps - opt.warmup_steps);
      const double progress = static_cast<double>(step - opt.warmup_steps) / span;
      lr *= static_cast<float>(opt.lr_min_ratio +
                               (1.0 - opt.lr_min_ratio) * 0.5 * (1.0 + std::cos(M_PI * progress)));
    }
    const auto adam = [&](AdamTensor<float>& st, auto& prm, const auto& g) {
      st.Step(prm, g, lr, step, opt.beta1, opt.beta2, opt.adam_eps);
    };
    if (opt.train_a) adam(adam_a, p.a, grad.a);
    if (opt.train_b) adam(adam_b, p.b, grad.b);
    if (train_gate) {
      adam(adam_w1, p.w1, grad.w1);
      adam(adam_b1, p.b1, grad.b1);
      adam(adam_w2, p.w2, grad.w2);
      adam(adam_b2, p.b2, grad.b2);
    }
    rep.steps_run = step;
    if (step % opt.eval_every == 0 || step == opt.steps) {
      const double v = LossOnRows(p, x, r, val, weights);
      if (std::isfinite(v) && v < best_val) {
        best_val = v;
        best = p;
        rep.best_step = step;
        bad_evals = 0;
      } else if (opt.patience > 0 && ++bad_evals >= opt.patience) {
        rep.stopped_early = true;
        break;
      }
    }
  }
  ParamsToEc(best, ec);
  rep.final_val_loss = best_val;
  rep.final_train_loss = LossOnRows(best, x, r, train, weights);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

absl::StatusOr<double> EcLoss(const EcWeights& ec, MatrixView x, MatrixView r) {
  if (auto s = CheckData(ec, x, r, true); !s.ok()) return s;
  std::vector<int64_t> rows(static_cast<size_t>(x.rows));
  std::iota(rows.begin(), rows.end(), 0);
  return LossOnRows(ParamsFromEc<float>(ec), x, r, rows, Vec());
}

absl::StatusOr<Matrix> ApplyEc(const EcWeights& ec, MatrixView x) {
  if (auto s = CheckData(ec, x, {}, false); !s.ok()) return s;
  const EcParams<float> p = ParamsFromEc<float>(ec);
  EcActivations<float> acts;
  return FromEigen(EcForward<float>(p, Eigen::Map<const Mat>(x.data, x.rows, x.cols), &acts));
}

absl::StatusOr<EcTokenStats> ComputeEcTokenStats(const EcWeights& ec, MatrixView x, MatrixView r) {
  if (auto s = CheckData(ec, x, r, true); !s.ok()) return s;
  const EcParams<float> p = ParamsFromEc<float>(ec);
  EcActivations<float> acts;
  const Mat y = EcForward<float>(p, Eigen::Map<const Mat>(x.data, x.rows, x.cols), &acts);
  const Eigen::Map<const Mat> rm(r.data, r.rows, r.cols);
  EcTokenStats st;
  const int64_t tokens = x.rows;
  st.mean_gate.resize(static_cast<size_t>(tokens));
  st.err_without.resize(static_cast<size_t>(tokens));
  st.err_with.resize(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    st.mean_gate[static_cast<size_t>(t)] = p.gated ? 1.0f + acts.t.row(t).mean() : 1.0f;
    st.err_without[static_cast<size_t>(t)] = rm.row(t).norm();
    st.err_with[static_cast<size_t>(t)] = (rm.row(t) - y.row(t)).norm();
  }
  return st;
}

}  // namespace spear::quantize
