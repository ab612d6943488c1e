#include "worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace spear::engine {
namespace {

// Higher logit first; equal logits: lower id first.
bool Better(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
  return a.first != b.first ? a.first > b.first : a.second < b.second;
}

}  // namespace

absl::Status SamplingParams::Validate() const {
  if (!(temperature >= 0.f) || std::isinf(temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be finite and >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.f && top_p <= 1.f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  if (!(repetition_penalty > 0.f) || std::isinf(repetition_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be finite and > 0, got ", repetition_penalty));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

double Sampler::Uniform() {
  return static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

int32_t Sampler::Sample(const float* logits, int64_t vocab, std::span<const int32_t> history) {
  const double u = params_.temperature == 0.f ? 0.0 : Uniform();
  return Pick(logits, vocab, history, u);
}

RowSampling Sampler::Next(std::span<const int32_t> history) {
  RowSampling r;
  r.params = params_;
  r.uniform = params_.temperature == 0.f ? 0.0 : Uniform();
  if (params_.repetition_penalty != 1.f) r.history = history;
  return r;
}

int32_t Sampler::Pick(const float* logits, int64_t vocab, std::span<const int32_t> history,
                      double u) {
  const float* l = logits;
  if (params_.repetition_penalty != 1.f && !history.empty()) {
    work_.assign(logits, logits + vocab);
    const float pen = params_.repetition_penalty;
    // Each distinct token penalised once: mark by applying on a copy read
    // from the original logits.
    for (int32_t t : history) {
      if (t < 0 || t >= vocab) continue;
      const float o = logits[t];
      work_[t] = o > 0.f ? o / pen : o * pen;
    }
    l = work_.data();
  }

  if (params_.temperature == 0.f) {
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i) {
      if (l[i] > l[best]) best = i;  // strict: ties keep the lower id
    }
    return static_cast<int32_t>(best);
  }

  // Candidates: the top_k best (or all), in no particular order yet.
  cand_.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) cand_[i] = {l[i], static_cast<int32_t>(i)};
  int64_t k = vocab;
  if (params_.top_k > 0 && params_.top_k < vocab) k = params_.top_k;
  if (k < vocab) {
    std::nth_element(cand_.begin(), cand_.begin() + k, cand_.end(), Better);
    cand_.resize(k);
  }
  const double inv_t = 1.0 / params_.temperature;
  double mx = cand_[0].first;
  for (const auto& c : cand_) mx = std::max<double>(mx, c.first);
  std::vector<double>& p = probs_;
  size_t n = cand_.size();
  double sum = 0;
  if (params_.top_p < 1.f) {
    // The nucleus: the smallest best-first prefix whose mass reaches top_p of
    // the total. Only that prefix is ordered: the next best candidates are
    // selected (nth_element) and sorted in growing slices until the mass is
    // reached — linear in the vocabulary for the usual peaked distribution
    // instead of a full sort (which dominated self-sampling's time).
    // The total in float exp (vectorisable; relative error ~1e-7 of a mass
    // that only sets the cut), summed in double.
    const float fmx = static_cast<float>(mx), finv_t = static_cast<float>(inv_t);
    double total = 0;
    for (const auto& c : cand_) total += std::exp((c.first - fmx) * finv_t);
    const double target = params_.top_p * total;
    p.clear();
    size_t sorted = 0, slice = 64;
    double acc = 0;
    n = 0;
    while (n == 0) {
      const size_t upto = std::min(cand_.size(), sorted + slice);
      if (upto < cand_.size()) {
        std::nth_element(cand_.begin() + sorted, cand_.begin() + upto, cand_.end(), Better);
      }
      std::sort(cand_.begin() + sorted, cand_.begin() + upto, Better);
      for (size_t i = sorted; i < upto; ++i) {
        p.push_back(std::exp((cand_[i].first - mx) * inv_t));
        acc += p.back();
        if (acc >= target) {
          n = i + 1;  // smallest prefix with mass >= top_p (always >= 1 token)
          break;
        }
      }
      if (n == 0 && upto == cand_.size()) n = upto;  // rounding: keep everything
      sorted = upto;
      slice *= 4;
    }
    sum = acc;
  } else {
    // Plain sampling walks the candidates in id order.
    if (n < static_cast<size_t>(vocab)) {
      std::sort(cand_.begin(), cand_.end(),
                [](const auto& a, const auto& b) { return a.second < b.second; });
    }
    p.resize(n);
    for (size_t i = 0; i < n; ++i) {
      p[i] = std::exp((cand_[i].first - mx) * inv_t);
      sum += p[i];
    }
  }
  double r = u * sum;
  for (size_t i = 0; i < n; ++i) {
    r -= p[i];
    if (r < 0) return cand_[i].second;
  }
  return cand_[n - 1].second;  // rounding: fall back to the last kept token
}

}  // namespace spear::engine
