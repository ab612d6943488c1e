// The dense CPU ops of the LLaMA forward pass. Every op has the same
// signature in two namespaces:
//   spear::kernels::ref  plain scalar C++: the ground truth, single-threaded;
//   spear::kernels::cpu  SIMD (AVX2 / AVX-512 chosen at run time by
//                        ActiveIsa()), multi-threaded through `pool`
//                        (nullptr = run on the calling thread).
// All activations are float32, row-major, with explicit row strides (in
// elements). Weights are row-major [n, k] (the PyTorch/HF layout) of
// DType F32, F16 or BF16; accumulation is float32. Ops return
// InvalidArgument on inconsistent sizes and never read out of bounds.
#pragma once

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/op_params.h"
#include "kernels/thread_pool.h"

namespace spear::kernels {

// The parameter structs (LinearParams, RmsNormParams, RopeParams,
// AttentionParams, SiluMulParams, LogSumExpParams, KlDivergenceParams) and
// their semantics are in op_params.h.

namespace ref {
absl::Status Linear(const LinearParams& p);
absl::Status RmsNorm(const RmsNormParams& p);
absl::Status Rope(const RopeParams& p);
absl::Status Attention(const AttentionParams& p);
absl::Status SiluMul(const SiluMulParams& p);
absl::Status LogSumExp(const LogSumExpParams& p);
absl::Status KlDivergence(const KlDivergenceParams& p);
}  // namespace ref

namespace cpu {
absl::Status Linear(const LinearParams& p, ThreadPool* pool);
absl::Status RmsNorm(const RmsNormParams& p, ThreadPool* pool);
absl::Status Rope(const RopeParams& p, ThreadPool* pool);
absl::Status Attention(const AttentionParams& p, ThreadPool* pool);
absl::Status SiluMul(const SiluMulParams& p, ThreadPool* pool);
absl::Status LogSumExp(const LogSumExpParams& p, ThreadPool* pool);
absl::Status KlDivergence(const KlDivergenceParams& p, ThreadPool* pool);
}  // namespace cpu

}  // namespace spear::kernels
