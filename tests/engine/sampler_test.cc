// Sampler and BlockAllocator unit tests.
#include <cmath>
#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/sampler.h"

namespace spear::engine {
namespace {

TEST(SamplingParamsTest, Validate) {
  EXPECT_TRUE(SamplingParams{}.Validate().ok());
  SamplingParams p;
  p.temperature = -0.1f;
  EXPECT_EQ(p.Validate().code(), absl::StatusCode::kInvalidArgument);
  p = {};
  p.temperature = NAN;
  EXPECT_FALSE(p.Validate().ok());
  p = {};
  p.top_p = 0.f;
  EXPECT_FALSE(p.Validate().ok());
  p.top_p = 1.01f;
  EXPECT_FALSE(p.Validate().ok());
  p = {};
  p.top_k = -1;
  EXPECT_FALSE(p.Validate().ok());
  p = {};
  p.repetition_penalty = 0.f;
  EXPECT_FALSE(p.Validate().ok());
}

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler s(SamplingParams{});
  const std::vector<float> l = {0.f, 3.f, -1.f, 3.f};
  EXPECT_EQ(s.Sample(l.data(), 4, {}), 1);
}

// -0 and +0 are equal logits: one tie group, walked in id order (the
// device sampler's keys follow this: kernels/cuda/sampling.cu, Key).
TEST(SamplerTest, SignedZerosAreOneTieGroup) {
  const std::vector<float> logits = {0.f, -0.f, 0.f, -0.f};
  SamplingParams p;
  p.temperature = 1.f;
  p.top_p = 0.5f;  // the first two of the four equal best tokens
  Sampler s(p);
  // In (logit, id) order the nucleus is ids 0 and 1; were -0 below +0 it
  // would be ids 0 and 2.
  EXPECT_EQ(s.Pick(logits.data(), 4, {}, 0.25), 0);
  EXPECT_EQ(s.Pick(logits.data(), 4, {}, 0.75), 1);
}

TEST(SamplerTest, SeededSamplingFollowsTheDistribution) {
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 123;
  const std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler a(p), b(p);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 20000; ++i) {
    const int32_t t = a.Sample(l.data(), 3, {});
    ASSERT_EQ(t, b.Sample(l.data(), 3, {}));  // same seed, same stream
    ++counts[t];
  }
  EXPECT_NEAR(counts[0] / 20000.0, 0.5, 0.02);
  EXPECT_NEAR(counts[1] / 20000.0, 0.3, 0.02);
  EXPECT_NEAR(counts[2] / 20000.0, 0.2, 0.02);
}

TEST(SamplerTest, TopKAndTopPCut) {
  const std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                std::log(0.05f)};
  SamplingParams p;
  p.temperature = 1.f;
  p.top_k = 2;
  Sampler k2(p);
  for (int i = 0; i < 2000; ++i) EXPECT_LT(k2.Sample(l.data(), 4, {}), 2);
  p.top_k = 0;
  p.top_p = 0.7f;  // 0.5 + 0.3 >= 0.7: tokens 0 and 1
  Sampler tp(p);
  for (int i = 0; i < 2000; ++i) EXPECT_LT(tp.Sample(l.data(), 4, {}), 2);
  p.top_p = 0.01f;  // only the best
  Sampler tiny(p);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(tiny.Sample(l.data(), 4, {}), 0);
}

// The nucleus is built from growing best-first slices (not a full sort):
// against a full-sort reference on a 50,000-token vocabulary whose nucleus
// spans several slices, every sample lies in the reference nucleus and the
// frequencies of its best tokens match their renormalised probabilities.
// The ids best first: higher logit first, equal logits lower id first.
std::vector<int32_t> BestFirst(const std::vector<float>& l) {
  std::vector<int32_t> order(l.size());
  for (size_t i = 0; i < l.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return l[a] != l[b] ? l[a] > l[b] : a < b;
  });
  return order;
}

TEST(SamplerTest, TopPLargeVocabularyMatchesFullSortReference) {
  constexpr int64_t kVocab = 50000;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::vector<float> l(kVocab);
  for (float& x : l) x = nd(rng);
  l[123] = 9.f;  // a few clear leaders so their frequencies are testable
  l[4567] = 8.5f;
  l[49999] = 8.f;
  const float top_p = 0.8f;
  const std::vector<int32_t> order = BestFirst(l);
  double mx = l[order[0]], total = 0;
  for (float x : l) total += std::exp(x - mx);
  std::vector<char> in_nucleus(kVocab, 0);
  double acc = 0;
  size_t n = 0;
  while (acc < top_p * total) acc += std::exp(l[order[n++]] - mx);
  for (size_t i = 0; i < n; ++i) in_nucleus[order[i]] = 1;
  ASSERT_GT(n, 64u * 5) << "the nucleus must span several slices";

  SamplingParams p;
  p.temperature = 1.f;
  p.top_p = top_p;
  p.seed = 99;
  Sampler s(p);
  std::map<int32_t, int> counts;
  constexpr int kDraws = 3000;
  for (int i = 0; i < kDraws; ++i) {
    const int32_t t = s.Sample(l.data(), kVocab, {});
    ASSERT_TRUE(in_nucleus[t]) << "token " << t << " is outside the nucleus";
    ++counts[t];
  }
  for (int32_t t : {123, 4567, 49999}) {
    const double want = std::exp(l[t] - mx) / acc;
    EXPECT_NEAR(counts[t] / static_cast<double>(kDraws), want, 4 * std::sqrt(want / kDraws) + 1e-3)
        << "token " << t;
  }
  // top_p just below 1 on a flat distribution keeps (almost) everything.
  std::vector<float> flat(kVocab, 0.f);
  p.top_p = 0.9999f;
  Sampler f(p);
  std::map<int32_t, int> seen;
  for (int i = 0; i < 2000; ++i) ++seen[f.Sample(flat.data(), kVocab, {})];
  EXPECT_GT(seen.size(), 1900u);  // ~2000 distinct draws out of 50,000
}

// Next() draws exactly as Sample() does, and Pick() with that draw picks
// Sample()'s token: the host reference of device sampling.
TEST(SamplerTest, NextAndPickReproduceSample) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> logits(3000);
  std::vector<int32_t> hist = {5, 17, 17, 2999, -4, 40000};
  for (int c = 0; c < 40; ++c) {
    for (auto& x : logits) x = nd(rng);
    SamplingParams p;
    p.seed = 9 + c;
    p.temperature = c % 5 == 0 ? 0.f : 0.3f + 0.1f * static_cast<float>(c % 7);
    p.top_k = c % 3 == 1 ? 1 + c * 7 : 0;
    p.top_p = c % 4 == 2 ? 0.5f + 0.01f * static_cast<float>(c) : 1.f;
    p.repetition_penalty = c % 6 == 3 ? 1.7f : 1.f;
    Sampler a(p), b(p);
    for (int step = 0; step < 3; ++step) {
      const int32_t want = a.Sample(logits.data(), 3000, hist);
      const RowSampling r = b.Next(hist);
      EXPECT_EQ(r.history.size(), p.repetition_penalty != 1.f ? hist.size() : 0u);
      if (p.temperature == 0.f) {
        EXPECT_EQ(r.uniform, 0.0);
      }
      ASSERT_TRUE(r.uniform >= 0.0 && r.uniform < 1.0);
      EXPECT_EQ(b.Pick(logits.data(), 3000, r.history, r.uniform), want) << c << " " << step;
    }
  }
}

// The top-p pick as the sampler defines it, by ordering the whole
// vocabulary: the total of the float masses in id order (double sum), the
// smallest best-first prefix whose double masses reach top_p of it, then
// the token under u * (that prefix's mass), walked best first; `order`
// is BestFirst(l).
int32_t TopPByFullSort(const std::vector<float>& l, const std::vector<int32_t>& order,
                       float temperature, float top_p, double u) {
  double mx = l[0];
  for (float x : l) mx = std::max<double>(mx, x);
  const double inv_t = 1.0 / temperature;
  const float fmx = static_cast<float>(mx), finv_t = static_cast<float>(inv_t);
  double total = 0;
  for (float x : l) total += std::exp((x - fmx) * finv_t);
  std::vector<double> p;
  double acc = 0;
  size_t n = 0;
  while (n < order.size()) {
    p.push_back(std::exp((l[order[n]] - mx) * inv_t));
    acc += p.back();
    ++n;
    if (acc >= top_p * total) break;
  }
  double r = u * acc;
  for (size_t i = 0; i < n; ++i) {
    r -= p[i];
    if (r < 0) return order[i];
  }
  return order[n - 1];
}

// The sampler gathers the nucleus' candidates from a histogram of the
// masses instead of ordering the vocabulary: it must pick exactly the
// reference's token, on fresh random logits of several shapes (wide,
// narrow, coarse with many ties, signed zeros, -inf), several vocabulary
// sizes, temperatures, top_p values and draws.
TEST(SamplerTest, TopPPicksTheFullSortReferenceToken) {
  std::random_device rd;
  const uint32_t seed = rd();
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  int cases = 0;
  for (int64_t vocab : {1, 2, 7, 1000, 49152}) {
    for (int shape = 0; shape < 5; ++shape) {
      std::normal_distribution<float> nd(0.f, shape == 0 ? 0.3f : shape == 1 ? 2.f : 6.f);
      std::vector<float> l(static_cast<size_t>(vocab));
      for (float& x : l) x = nd(rng);
      if (shape == 3) {
        for (float& x : l) x = std::round(x);  // coarse: large tie groups, +0 and -0
        for (size_t i = 0; i < l.size(); i += 3) l[i] = l[i] == 0.f ? -0.f : l[i];
      }
      if (shape == 4 && vocab > 2) {
        for (size_t i = 0; i < l.size(); i += 5) l[i] = -INFINITY;
      }
      const std::vector<int32_t> order = BestFirst(l);
      for (float t : {0.7f, 1.f, 1.3f}) {
        for (float top_p : {0.05f, 0.5f, 0.9f, 0.95f, 0.9999f}) {
          SamplingParams p;
          p.temperature = t;
          p.top_p = top_p;
          Sampler s(p);
          for (int d = 0; d < 12; ++d) {
            const double u = d == 0 ? 0.0 : d == 1 ? 0.9999999 : ud(rng);
            ASSERT_EQ(s.Pick(l.data(), vocab, {}, u), TopPByFullSort(l, order, t, top_p, u))
                << "seed " << seed << " vocab " << vocab << " shape " << shape << " T " << t
                << " top_p " << top_p << " u " << u;
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 5 * 5 * 3 * 5 * 12);
}

TEST(SamplerTest, RepetitionPenalty) {
  SamplingParams p;
  p.repetition_penalty = 2.f;
  Sampler s(p);
  const std::vector<float> l = {2.f, 1.5f, -1.f};
  const std::vector<int32_t> hist = {0, 0, 99};  // 99 out of range: ignored
  EXPECT_EQ(s.Sample(l.data(), 3, hist), 1);  // 2/2 = 1 < 1.5
  EXPECT_EQ(s.Sample(l.data(), 3, {}), 0);
}

TEST(BlockAllocatorTest, AllocateFreeAndExhaustion) {
  BlockAllocator a(5);
  std::vector<int32_t> t1, t2;
  ASSERT_TRUE(a.Allocate(3, &t1).ok());
  EXPECT_EQ(a.num_free(), 2);
  EXPECT_EQ(a.Allocate(3, &t2).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(t2.empty());  // all or nothing
  ASSERT_TRUE(a.Allocate(2, &t2).ok());
  for (int32_t b : t1) EXPECT_EQ(std::count(t2.begin(), t2.end(), b), 0);
  ASSERT_TRUE(a.Free(t1).ok());
  EXPECT_EQ(a.num_free(), 3);
  EXPECT_EQ(a.Free(t1).code(), absl::StatusCode::kInvalidArgument);  // double free
  EXPECT_EQ(a.Free({7}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.num_free(), 3);
}

TEST(KvCacheTest, CapacityFromBytes) {
  model::ModelConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  KvCacheOptions o;
  o.block_size = 4;
  o.bytes = KvCache::BytesPerBlock(c, 4) * 10 + 7;
  auto kv = KvCache::Create(c, o);
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ((*kv)->num_blocks(), 10);
  EXPECT_EQ((*kv)->BlocksFor(9), 3);
  EXPECT_EQ((*kv)->v(1) - (*kv)->k(0), 3 * 10 * 4 * 16);
  o.bytes = 10;
  EXPECT_EQ(KvCache::Create(c, o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spear::engine
