#include "worker/model/linear.h"

#include "absl/strings/str_cat.h"
#include "kernels/ops.h"

namespace spear::model {

absl::StatusOr<std::unique_ptr<DenseLinear>> DenseLinear::Create(const void* weight,
                                                                 kernels::DType dtype,
                                                                 int64_t out_features,
                                                                 int64_t in_features,
                                                                 const float* bias) {
  if (weight == nullptr) return absl::InvalidArgumentError("DenseLinear: null weight");
  if (out_features <= 0 || in_features <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("DenseLinear: bad shape [", out_features,
                                                   " x ", in_features, "]"));
  }
  return std::unique_ptr<DenseLinear>(
      new DenseLinear(weight, dtype, out_features, in_features, bias));
}

absl::Status DenseLinear::Forward(const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy,
                                  bool accumulate, kernels::ThreadPool* pool) const {
  if (m == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr || m < 0 || ldx < in_ || ldy < out_) {
    return absl::InvalidArgumentError(
        absl::StrCat("DenseLinear::Forward: bad arguments (m=", m, ", ldx=", ldx, ", ldy=", ldy,
                     ") for ", DebugString()));
  }
  kernels::LinearParams p;
  p.x = x;
  p.m = m;
  p.k = in_;
  p.ldx = ldx;
  p.w = weight_;
  p.w_dtype = dtype_;
  p.n = out_;
  p.bias = bias_;
  p.y = y;
  p.ldy = ldy;
  p.accumulate = accumulate;
  return kernels::cpu::Linear(p, pool);
}

int64_t DenseLinear::weight_bytes() const {
  return out_ * in_ * static_cast<int64_t>(kernels::DTypeSize(dtype_)) +
         (bias_ != nullptr ? out_ * 4 : 0);
}

std::string DenseLinear::DebugString() const {
  return absl::StrCat("dense ", std::string(kernels::DTypeName(dtype_)), " [", out_, " x ", in_, "]",
                      bias_ != nullptr ? " +bias" : "");
}

}  // namespace spear::model
