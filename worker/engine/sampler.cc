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

// The top 12 bits of a mass's float (>= 0, or NaN): sign, exponent and 3
// mantissa bits; non-decreasing in the mass.
int MassBucket(float e) {
  uint32_t bits;
  std::memcpy(&bits, &e, sizeof bits);
  return static_cast<int>(bits >> 20);
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

  // Candidates: the top_k best (or all), in no particular order yet. With
  // top-p and no top-k they are gathered below (only the nucleus' part of
  // the vocabulary).
  const bool top_k = params_.top_k > 0 && params_.top_k < vocab;
  const bool all = !top_k && params_.top_p < 1.f;
  const double inv_t = 1.0 / params_.temperature;
  double mx = l[0];
  if (all) {
    for (int64_t i = 0; i < vocab; ++i) mx = std::max<double>(mx, l[i]);
  } else {
    cand_.resize(vocab);
    for (int64_t i = 0; i < vocab; ++i) cand_[i] = {l[i], static_cast<int32_t>(i)};
    if (top_k) {
      std::nth_element(cand_.begin(), cand_.begin() + params_.top_k, cand_.end(), Better);
      cand_.resize(params_.top_k);
    }
    mx = cand_[0].first;
    for (const auto& c : cand_) mx = std::max<double>(mx, c.first);
  }
  std::vector<double>& p = probs_;
  size_t n = cand_.size();
  double sum = 0;
  if (params_.top_p < 1.f) {
    // The nucleus: the smallest best-first prefix whose mass reaches top_p of
    // the total. The total in float exp (vectorisable; relative error ~1e-7
    // of a mass that only sets the cut), summed in double, in id order.
    const float fmx = static_cast<float>(mx), finv_t = static_cast<float>(inv_t);
    double total = 0;
    if (all) {
      // Without top-k the candidates are the vocabulary in id order: the
      // same sum, plus a histogram of the float masses by their top 12
      // bits (sign, exponent, 3 mantissa bits: monotone in the mass, which
      // is monotone in the logit), so the nucleus' candidates can be
      // gathered without ordering the vocabulary.
      bucket_.resize(static_cast<size_t>(vocab));
      std::fill(hist_.begin(), hist_.end(), 0.0);
      for (int64_t i = 0; i < vocab; ++i) {
        const float e = std::exp((l[i] - fmx) * finv_t);
        const int bk = MassBucket(e);
        bucket_[static_cast<size_t>(i)] = static_cast<uint16_t>(bk);
        total += e;
        hist_[bk] += e;
      }
    } else {
      for (const auto& c : cand_) total += std::exp((c.first - fmx) * finv_t);
    }
    const double target = params_.top_p * total;
    int gathered_from = 0;  // > 0: cand_ holds the tokens of mass buckets >= it
    if (all) {
      // Every token whose mass bucket is at or above the bucket where the
      // best-first bucket masses reach the target (with a 1e-4 margin over
      // the float-vs-double difference) is a candidate: a best-first
      // prefix that contains the nucleus, so ordering just it gives the
      // same cut and the same pick as ordering everything (the loop below
      // checks that the cut was reached inside it, else orders it all).
      int b = kMassBuckets - 1;
      double acc = 0;
      for (; b > 0; --b) {
        acc += hist_[b];
        if (acc >= target * (1 + 1e-4)) break;
      }
      gathered_from = b;
      cand_.clear();
      for (int64_t i = 0; i < vocab; ++i) {
        if (bucket_[static_cast<size_t>(i)] >= b) {
          cand_.emplace_back(l[i], static_cast<int32_t>(i));
        }
      }
    }
    p.clear();
    size_t sorted = 0, slice = 64;
    double acc = 0;
    n = 0;
    while (n == 0) {
      // Only the prefix is ordered: the next best candidates are selected
      // (nth_element) and sorted in growing slices until the mass is
      // reached.
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
      if (n == 0 && upto == cand_.size()) {
        if (gathered_from > 0) {
          // The gathered prefix fell short of the target (the margin did
          // not cover a rounding case): add the rest of the vocabulary,
          // every token of it worse than every gathered one, and go on.
          for (int64_t i = 0; i < vocab; ++i) {
            if (bucket_[static_cast<size_t>(i)] < gathered_from) {
              cand_.emplace_back(l[i], static_cast<int32_t>(i));
            }
          }
          gathered_from = 0;
        } else {
          n = upto;  // rounding: keep everything
        }
      }
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
