// Device sampling (kernels::cuda::SampleRows) against the host sampler
// (engine::Sampler::Pick) on the same fresh random logits and the same
// uniform draws: every row's token must be the host's. Rows mix greedy,
// temperature, top-k, top-p, both, and the repetition penalty (history
// with duplicates and out-of-range ids); vocabularies of 1000, 49152
// (SmolLM2) and 128259 (Llama-3's 128256 + 3, off every multiple); logits
// continuous (N(0, s)) and coarse (multiples of 0.5: many exact ties, so the
// id order of equal logits decides). Tolerance: the device sums masses
// from fp32 exp in 2^-40 fixed point, the host from double exp in double,
// so a draw (or a nucleus edge) within ~1e-6 of the boundary between two
// tokens may legitimately fall on the other side. A row whose device token
// differs from the host's passes only if the host picks the device's token
// with u or top_p moved by at most 1e-5 (relative), and at most 2 rows of
// a batch may need that; every other row must be equal. Also: a second
// launch with another cluster size (1, 2, 4 or 8 blocks per row, in
// rotation) gives the same tokens (deterministic), the penalty edits only
// the history's logits, and bad arguments are InvalidArgument.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gpu_skip.h"
#include "kernels/cuda_ops.h"
#include "worker/engine/sampler.h"

namespace spear::engine {
namespace {

namespace kc = kernels::cuda;

#define CK(x) ASSERT_EQ((x), cudaSuccess) << #x

uint32_t Seed() {
  const char* e = std::getenv("SPEAR_TEST_SEED");
  const uint32_t s = e ? static_cast<uint32_t>(std::strtoul(e, nullptr, 10)) : std::random_device{}();
  std::printf("cuda_sampling_test seed %u\n", s);
  return s;
}

template <class T>
struct Dev {
  T* p = nullptr;
  explicit Dev(size_t n) { cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(n, 1) * sizeof(T)); }
  ~Dev() { cudaFree(p); }
};

struct Case {
  SamplingParams p;
  double u = 0;
  std::vector<int32_t> hist;
};

// forced: the cluster size (blocks per row) of the second launch, which
// must give the first (automatic) launch's tokens.
void RunBatch(int64_t vocab, bool coarse, int rows, int forced, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  std::vector<float> logits(static_cast<size_t>(rows * vocab));
  std::vector<Case> cases(rows);
  for (int r = 0; r < rows; ++r) {
    const float scale = 1.f + 4.f * static_cast<float>(rng() % 4);
    for (int64_t j = 0; j < vocab; ++j) {
      float v = nd(rng) * scale;
      if (coarse) v = std::round(v * 2.f) / 2.f;  // also makes -0 and +0 logits (one tie group)
      logits[r * vocab + j] = v;
    }
    Case& c = cases[r];
    const int kind = static_cast<int>(rng() % 6);
    c.p.temperature = kind == 0 ? 0.f : 0.2f + 1.8f * static_cast<float>(ud(rng));
    c.p.top_k = kind == 2 || kind == 4 ? 1 + static_cast<int>(rng() % 200) : 0;
    c.p.top_p = kind == 3 || kind == 4 ? 0.3f + 0.69f * static_cast<float>(ud(rng)) : 1.f;
    if (kind == 5 || rng() % 4 == 0) {
      c.p.repetition_penalty = 1.1f + static_cast<float>(ud(rng));
      for (int i = 0; i < 40; ++i) c.hist.push_back(static_cast<int32_t>(rng() % vocab));
      c.hist.push_back(c.hist[3]);  // a duplicate
      c.hist.push_back(-1);
      c.hist.push_back(static_cast<int32_t>(vocab + 5));
    }
    c.u = c.p.temperature == 0.f ? 0.0 : ud(rng);
  }
  // host reference
  std::vector<int32_t> want(rows);
  for (int r = 0; r < rows; ++r) {
    Sampler s(cases[r].p);
    want[r] = s.Pick(&logits[r * vocab], vocab, cases[r].hist, cases[r].u);
  }
  // device
  std::vector<kc::SampleRowParams> params(rows);
  std::vector<int32_t> hist;
  for (int r = 0; r < rows; ++r) {
    kc::SampleRowParams& q = params[r];
    q.temperature = cases[r].p.temperature;
    q.top_k = cases[r].p.top_k;
    q.top_p = cases[r].p.top_p;
    q.repetition_penalty = cases[r].p.repetition_penalty;
    q.uniform = cases[r].u;
    q.hist_begin = static_cast<int64_t>(hist.size());
    q.hist_len = static_cast<int64_t>(cases[r].hist.size());
    hist.insert(hist.end(), cases[r].hist.begin(), cases[r].hist.end());
  }
  Dev<float> dl(logits.size());
  Dev<kc::SampleRowParams> dp(rows);
  Dev<int32_t> dh(hist.size()), dc(static_cast<size_t>(rows * vocab * 4)), dout(rows);
  Dev<float> dhv(hist.size());
  CK(cudaMemcpy(dp.p, params.data(), rows * sizeof(kc::SampleRowParams), cudaMemcpyHostToDevice));
  if (!hist.empty()) {
    CK(cudaMemcpy(dh.p, hist.data(), hist.size() * 4, cudaMemcpyHostToDevice));
  }
  kc::SampleRowsArgs a;
  a.logits = dl.p;
  a.m = rows;
  a.n = vocab;
  a.ld = vocab;
  a.params = dp.p;
  a.hist = dh.p;
  a.hist_vals = dhv.p;
  a.cand = dc.p;
  a.out = dout.p;
  std::vector<int32_t> got(rows, -7), again(rows, -9);
  for (int pass = 0; pass < 2; ++pass) {
    a.cluster = pass == 0 ? 0 : forced;
    CK(cudaMemcpy(dl.p, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(dout.p, 0xff, rows * 4));  // poisoned: -1
    ASSERT_TRUE(kc::SampleRows(a, nullptr).ok());
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(pass == 0 ? got.data() : again.data(), dout.p, rows * 4, cudaMemcpyDeviceToHost));
  }
  EXPECT_EQ(got, again) << "automatic vs " << forced << " blocks per row: not deterministic";
  int near_boundary = 0;
  for (int r = 0; r < rows; ++r) {
    const Case& c = cases[r];
    if (got[r] == want[r]) continue;
    bool reachable = false;
    for (double du : {-1e-5, 0.0, 1e-5}) {
      for (float dp : {-1e-5f, 0.f, 1e-5f}) {
        SamplingParams q = c.p;
        if (q.top_p < 1.f) q.top_p = std::min(1.f, q.top_p * (1.f + dp));
        const double u = std::min(std::max(c.u * (1.0 + du), 0.0), 0.9999999999);
        Sampler s(q);
        reachable |= s.Pick(&logits[r * vocab], vocab, c.hist, u) == got[r];
      }
    }
    ++near_boundary;
    std::printf("vocab %lld row %d: device %d, host %d (%s)\n", static_cast<long long>(vocab), r,
                got[r], want[r], reachable ? "within 1e-5 of a boundary" : "NOT near a boundary");
    EXPECT_TRUE(reachable) << "vocab " << vocab << (coarse ? " coarse" : "") << " row " << r
                           << ": device " << got[r] << ", host " << want[r] << "; T "
                           << c.p.temperature << " top_k " << c.p.top_k << " top_p " << c.p.top_p
                           << " penalty " << c.p.repetition_penalty << " u " << c.u;
  }
  EXPECT_LE(near_boundary, 2) << "vocab " << vocab << (coarse ? " coarse" : "");
  // The penalty edited exactly the history's logits (in place).
  std::vector<float> after(logits.size());
  CK(cudaMemcpy(after.data(), dl.p, after.size() * 4, cudaMemcpyDeviceToHost));
  for (int r = 0; r < rows; ++r) {
    std::vector<float> ref(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
    if (cases[r].p.repetition_penalty != 1.f) {
      for (int32_t t : cases[r].hist) {
        if (t < 0 || t >= vocab) continue;
        const float o = logits[r * vocab + t];
        ref[t] = o > 0.f ? o / cases[r].p.repetition_penalty : o * cases[r].p.repetition_penalty;
      }
    }
    for (int64_t j = 0; j < vocab; ++j) {
      ASSERT_EQ(after[r * vocab + j], ref[j]) << "row " << r << " logit " << j;
    }
  }
}

TEST(CudaSampling, MatchesHostSampler) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(Seed());
  int forced = 0;
  for (int64_t vocab : {int64_t{1000}, int64_t{49152}, int64_t{128259}}) {
    for (bool coarse : {false, true}) {
      // 40 rows: 2 blocks per row automatically on 132 SMs; 3 rows: 8
      const int rows = vocab == 1000 ? 3 : vocab > 100000 ? 24 : 40;
      RunBatch(vocab, coarse, rows, 1 << (forced++ % 4), rng);
      if (HasFatalFailure()) return;
    }
  }
}

TEST(CudaSampling, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  Dev<float> l(16);
  Dev<kc::SampleRowParams> p(1);
  Dev<int32_t> c(64), o(1);
  kc::SampleRowsArgs a;
  a.logits = l.p;
  a.m = 1;
  a.n = 16;
  a.ld = 16;
  a.params = p.p;
  a.cand = c.p;
  a.out = o.p;
  CK(cudaMemset(p.p, 0, sizeof(kc::SampleRowParams)));  // greedy, no penalty
  CK(cudaMemset(l.p, 0, 16 * 4));
  EXPECT_TRUE(kc::SampleRows(a, nullptr).ok());
  kc::SampleRowsArgs b = a;
  b.n = 0;
  EXPECT_EQ(kc::SampleRows(b, nullptr).code(), absl::StatusCode::kInvalidArgument);
  b = a;
  b.ld = 8;
  EXPECT_EQ(kc::SampleRows(b, nullptr).code(), absl::StatusCode::kInvalidArgument);
  b = a;
  b.cand = nullptr;
  EXPECT_EQ(kc::SampleRows(b, nullptr).code(), absl::StatusCode::kInvalidArgument);
  b = a;
  b.cluster = 3;
  EXPECT_EQ(kc::SampleRows(b, nullptr).code(), absl::StatusCode::kInvalidArgument);
  b = a;
  b.m = -1;
  EXPECT_EQ(kc::SampleRows(b, nullptr).code(), absl::StatusCode::kInvalidArgument);
  CK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace spear::engine
