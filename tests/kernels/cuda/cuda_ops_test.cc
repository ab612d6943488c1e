// CUDA ops against the scalar reference on fresh random inputs. Labelled
// `gpu`; each test skips with a message when no CUDA device is present.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gpu_skip.h"
#include "kernels/cuda_ops.h"
#include "kernels/ops.h"

namespace spear::kernels {
namespace {

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t floats) { EXPECT_EQ(cudaMalloc(&p_, floats * 4), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(p_); }
  float* get() { return static_cast<float*>(p_); }

 private:
  void* p_ = nullptr;
};

TEST(CudaRmsNorm, MatchesReference) {
  SKIP_WITHOUT_GPU();
  const unsigned seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (int64_t d : {1, 7, 64, 576, 4097}) {
    for (bool with_residual : {false, true}) {
      const int64_t m = 17;
      std::vector<float> x(m * d), r(m * d), w(d);
          for (auto* v : {&x, &r, &w}) {
        for (float& e : *v) e = nd(rng);
      }
      std::vector<float> r_ref = r, y_ref(m * d);
      RmsNormParams p;
      p.x = x.data();
      p.residual = with_residual ? r_ref.data() : nullptr;
      p.weight = w.data();
      p.y = y_ref.data();
      p.m = m;
      p.d = p.ldx = p.ldr = p.ldy = d;
      p.eps = 1e-5f;
      ASSERT_TRUE(ref::RmsNorm(p).ok());

      DeviceBuffer dx(m * d), dr(m * d), dw(d), dy(m * d);
      ASSERT_EQ(cudaMemcpy(dx.get(), x.data(), m * d * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dr.get(), r.data(), m * d * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dw.get(), w.data(), d * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemset(dy.get(), 0xff, m * d * 4), cudaSuccess);  // NaN poison
      RmsNormParams q = p;
      q.x = dx.get();
      q.residual = with_residual ? dr.get() : nullptr;
      q.weight = dw.get();
      q.y = dy.get();
      ASSERT_TRUE(cuda::RmsNorm(q, nullptr).ok());
      std::vector<float> y(m * d), r_out(m * d);
      ASSERT_EQ(cudaMemcpy(y.data(), dy.get(), m * d * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(r_out.data(), dr.get(), m * d * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      // Tolerance: float32 sums in a different order: |a-b| <= 1e-5 (1 + |ref|).
      for (int64_t i = 0; i < m * d; ++i) {
        ASSERT_NEAR(y[i], y_ref[i], 1e-5 * (1 + std::fabs(y_ref[i]))) << "d=" << d << " i=" << i;
        if (with_residual) {
          ASSERT_NEAR(r_out[i], r_ref[i], 1e-6 * (1 + std::fabs(r_ref[i])));
        }
      }
    }
  }
}

TEST(CudaRmsNorm, RejectsBadParams) {
  SKIP_WITHOUT_GPU();
  RmsNormParams p;
  EXPECT_TRUE(absl::IsInvalidArgument(cuda::RmsNorm(p, nullptr)));
}

}  // namespace
}  // namespace spear::kernels
