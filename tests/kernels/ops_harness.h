// Shared harness for the cpu:: vs ref:: op tests (ggml test-backend-ops
// style): every test runs once per (ISA variant, pool) combination on seeded
// random inputs; outputs (and row padding) are poisoned with NaN first, and
// results are checked with a stated per-op tolerance:
//   every element: |got - ref| <= tol * (1 + |ref|)   (NaN fails)
//   whole tensor:  NMSE = sum (got-ref)^2 / sum ref^2 <= nmse
// and padding between rows must still hold the poison afterwards.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_features.h"
#include "kernels/ops.h"
#include "kernels/thread_pool.h"

namespace spear::kernels::testing {

inline constexpr float kPoison = std::numeric_limits<float>::quiet_NaN();

// Seed: $SPEAR_TEST_SEED or a fixed default; printed by every test so a
// failure can be replayed.
inline uint64_t BaseSeed() {
  if (const char* s = std::getenv("SPEAR_TEST_SEED"); s && *s) return std::strtoull(s, nullptr, 10);
  return 20240611;
}

struct Variant {
  Isa isa;
  int threads;  // 0 = no pool (nullptr)
};

inline std::string VariantName(const ::testing::TestParamInfo<Variant>& info) {
  return std::string(IsaName(info.param.isa)) + "_" +
         (info.param.threads == 0 ? std::string("nopool")
                                  : "pool" + std::to_string(info.param.threads));
}

inline std::vector<Variant> AllVariants() {
  std::vector<Variant> v;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    for (int t : {0, 1, 3}) v.push_back({isa, t});
  }
  return v;
}

// Fixture: selects the ISA (skipping when the CPU lacks it), owns the pool
// and the RNG, restores the detected ISA afterwards.
class OpsTest : public ::testing::TestWithParam<Variant> {
 protected:
  void SetUp() override {
    if (!SetIsaForTesting(GetParam().isa)) {
      GTEST_SKIP() << "CPU lacks " << IsaName(GetParam().isa) << " (detected "
                   << IsaName(DetectIsa()) << "); variant not run";
    }
    if (GetParam().threads > 0) pool_ = std::make_unique<ThreadPool>(GetParam().threads);
    seed_ = BaseSeed();
    rng_.seed(seed_);
    std::cout << "[ seed ] " << seed_ << " (set SPEAR_TEST_SEED to replay)\n";
  }
  void TearDown() override { SetIsaForTesting(DetectIsa()); }

  ThreadPool* pool() { return pool_.get(); }

  std::vector<float> Random(size_t n, float lo = -1.f, float hi = 1.f) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = d(rng_);
    return v;
  }
  // rows x cols with row stride ld; padding columns hold the poison.
  std::vector<float> RandomRows(int64_t rows, int64_t cols, int64_t ld, float lo = -1.f,
                                float hi = 1.f) {
    std::vector<float> v(rows * ld, kPoison);
    std::uniform_real_distribution<float> d(lo, hi);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) v[i * ld + j] = d(rng_);
    }
    return v;
  }

  std::unique_ptr<ThreadPool> pool_;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

// Compares a [rows, cols] matrix with stride ld against the reference; cells
// in the padding [cols, ld) must still be NaN in `got`. Prints the first
// mismatches (the "dump on failure").
inline ::testing::AssertionResult Close(const std::vector<float>& got,
                                        const std::vector<float>& want, int64_t rows,
                                        int64_t cols, int64_t ld, double tol, double nmse_bound) {
  double err2 = 0, ref2 = 0;
  int bad = 0;
  std::ostringstream msg;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < ld; ++j) {
      const float g = got[i * ld + j], w = want[i * ld + j];
      if (j >= cols) {
        if (!std::isnan(g)) {
          if (bad++ < 8) msg << "\n  padding [" << i << "," << j << "] overwritten: " << g;
        }
        continue;
      }
      const double diff = std::fabs(static_cast<double>(g) - w);
      err2 += diff * diff;
      ref2 += static_cast<double>(w) * w;
      if (!(diff <= tol * (1.0 + std::fabs(w)))) {
        if (bad++ < 8) msg << "\n  [" << i << "," << j << "] got " << g << " want " << w;
      }
    }
  }
  const double nmse = ref2 > 0 ? err2 / ref2 : err2;
  if (bad == 0 && nmse <= nmse_bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " bad cells of " << rows << "x" << cols << " (ld " << ld << "), NMSE " << nmse
         << " (bound " << nmse_bound << ", tol " << tol << ")" << msg.str();
}

}  // namespace spear::kernels::testing
