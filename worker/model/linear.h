// Linear layers of the model: y = x W^T (+ b), W of shape [out, in].
//
// `Linear` is the one interface the model code sees, so the forward pass is
// independent of the weight format: DenseLinear (F32/F16/BF16, here) and,
// later, W4 quantized linears with gated error compensators implement it.
//
// Thread-safety: a constructed Linear is immutable; Forward may be called
// concurrently from several threads as long as the outputs do not overlap
// (it parallelises internally through `pool`, whose own rules apply: one
// ParallelFor caller at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace spear::model {

class Linear {
 public:
  virtual ~Linear() = default;

  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;

  // y[i, :] (+)= W x[i, :] (+ bias) for i < m. x is [m, in] with row stride
  // ldx >= in; y is [m, out] with row stride ldy >= out; x and y must not
  // overlap. accumulate: add to y instead of overwriting it. pool may be
  // nullptr (run on the calling thread). InvalidArgument on bad sizes.
  virtual absl::Status Forward(const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy,
                               bool accumulate, kernels::ThreadPool* pool) const = 0;

  // Bytes of weight storage this layer reads per forward (weights, biases,
  // quantization scales, compensators): the memory-traffic figure.
  virtual int64_t weight_bytes() const = 0;

  // Short description for logs, e.g. "dense bf16 [576 x 1536] +bias".
  virtual std::string DebugString() const = 0;
};

// A dense layer over kernels::cpu::Linear. It does NOT own its weight or
// bias memory (typically a memory-mapped checkpoint or a buffer owned by
// LlamaWeights); the memory must outlive the layer.
class DenseLinear final : public Linear {
 public:
  // weight: [out, in] contiguous of `dtype`; bias: [out] float32 or nullptr.
  // InvalidArgument on null weight or non-positive sizes.
  static absl::StatusOr<std::unique_ptr<DenseLinear>> Create(const void* weight,
                                                             kernels::DType dtype,
                                                             int64_t out_features,
                                                             int64_t in_features,
                                                             const float* bias = nullptr);

  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  absl::Status Forward(const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy,
                       bool accumulate, kernels::ThreadPool* pool) const override;
  int64_t weight_bytes() const override;
  std::string DebugString() const override;

  // Raw access for quantizers and tests.
  const void* weight() const { return weight_; }
  kernels::DType dtype() const { return dtype_; }
  const float* bias() const { return bias_; }

 private:
  DenseLinear(const void* w, kernels::DType dt, int64_t out, int64_t in, const float* b)
      : weight_(w), dtype_(dt), out_(out), in_(in), bias_(b) {}

  const void* weight_;
  kernels::DType dtype_;
  int64_t out_, in_;
  const float* bias_;
};

}  // namespace spear::model
