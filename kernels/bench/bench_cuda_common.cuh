// Helpers shared by the CUDA benchmarks (bench_w4_cuda.cu,
// bench_decode_cuda.cu): fail-fast checks, the grid-stride copy kernel that
// measures the device's copy bandwidth, and random W4 weights / gated ECs
// (synthetic shapes, never quality). Header-only, benchmark code only.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/w4_cuda.h"

namespace spear::kernels::bench {

#define CK(expr)                                                                               \
  do {                                                                                         \
    const cudaError_t e_ = (expr);                                                             \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #expr, cudaGetErrorString(e_), __FILE__, \
                   __LINE__);                                                                  \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)
#define CKS(expr)                                                                                \
  do {                                                                                           \
    const absl::Status st_ = (expr);                                                             \
    if (!st_.ok()) {                                                                             \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #expr, std::string(st_.message()).c_str(), \
                   __FILE__, __LINE__);                                                          \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)
#define CKB(expr)                                                                          \
  do {                                                                                     \
    const cublasStatus_t b_ = (expr);                                                      \
    if (b_ != CUBLAS_STATUS_SUCCESS) {                                                     \
      std::fprintf(stderr, "%s failed: %d (%s:%d)\n", #expr, (int)b_, __FILE__, __LINE__); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

static __global__ void CopyKernel(const uint4* __restrict__ a, uint4* __restrict__ b, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    b[i] = a[i];
  }
}

// cuda::W4Linear's parameters for y [m, ldy] = x [m, ldx] W^T into fp16 y
// (the caller adds EC and kernel choices).
inline cuda::W4CudaParams GemmParams(const uint16_t* x, int64_t m, int64_t ldx, uint16_t* y16,
                                     int64_t ldy) {
  cuda::W4CudaParams p;
  p.x = x;
  p.m = m;
  p.ldx = ldx;
  p.y_f16 = y16;
  p.ldy = ldy;
  return p;
}

inline W4Weight RandomW4(int64_t n, int64_t k, int64_t group, std::mt19937& rng) {
  W4Weight w;
  w.fmt = {n, k, group, false};
  const int64_t ng = (k + group - 1) / group;
  w.packed.resize(static_cast<size_t>(n * k / 2));
  uint64_t s = rng();
  for (auto& b : w.packed) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    b = static_cast<uint8_t>(s >> 56);
  }
  w.scales.resize(static_cast<size_t>(n * ng));
  w.zeros.resize(static_cast<size_t>(n * ng));
  std::uniform_real_distribution<float> sc(0.004f, 0.02f);
  for (size_t i = 0; i < w.scales.size(); ++i) {
    w.scales[i] = FloatToHalf(sc(rng));
    w.zeros[i] = static_cast<uint8_t>(rng() & 15);
  }
  return w;
}

// Rank 32, gated with hidden width 16.
inline EcWeights RandomEc(int64_t n, int64_t k, std::mt19937& rng, int64_t rank = 32,
                          int64_t gate_hidden = 16) {
  EcWeights e;
  e.n = n;
  e.k = k;
  e.rank = rank;
  e.gate_hidden = gate_hidden;
  e.gated = gate_hidden > 0;  // 0: a static EC (no gate MLP)
  std::normal_distribution<float> nd;
  e.a.resize(static_cast<size_t>(rank * k));
  for (float& v : e.a) v = nd(rng) / 64.f;
  e.b.resize(static_cast<size_t>(n * rank));
  for (float& v : e.b) v = 0.01f * nd(rng);
  e.w1.resize(static_cast<size_t>(gate_hidden * rank));
  e.b1.resize(static_cast<size_t>(gate_hidden));
  e.w2.resize(static_cast<size_t>(rank * gate_hidden));
  e.b2.resize(static_cast<size_t>(rank));
  for (auto* v : {&e.w1, &e.b1, &e.w2, &e.b2})
    for (float& x : *v) x = 0.3f * nd(rng);
  return e;
}

}  // namespace spear::kernels::bench
