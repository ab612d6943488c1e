#include "common/validate.h"

#include <cmath>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"

namespace spear::kernels::internal {
namespace {

absl::Status Bad(const char* op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
}

}  // namespace

absl::Status ValidateLinear(const LinearParams& p) {
  constexpr const char* kOp = "Linear";
  if (!InRange(p.m, 0) || !InRange(p.n, 0) || !InRange(p.k, 0)) {
    return Bad(kOp, absl::StrCat("bad sizes m=", p.m, " n=", p.n, " k=", p.k));
  }
  if (p.w_dtype != DType::kF32 && p.w_dtype != DType::kF16 && p.w_dtype != DType::kBF16) {
    return Bad(kOp, "unknown weight dtype");
  }
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  if (!InRange(p.ldx, p.k) || !InRange(p.ldy, p.n)) {
    return Bad(kOp, absl::StrCat("strides ldx=", p.ldx, " ldy=", p.ldy, " below k=", p.k,
                                 " / n=", p.n));
  }
  if (p.y == nullptr) return Bad(kOp, "y is null");
  if (p.k > 0 && (p.x == nullptr || p.w == nullptr)) return Bad(kOp, "x or w is null");
  return absl::OkStatus();
}

absl::Status ValidateRmsNorm(const RmsNormParams& p) {
  constexpr const char* kOp = "RmsNorm";
  if (!InRange(p.m, 0) || !InRange(p.d, 1)) {
    return Bad(kOp, absl::StrCat("bad sizes m=", p.m, " d=", p.d));
  }
  if (!(p.eps >= 0.f)) return Bad(kOp, "eps must be >= 0");
  if (p.m == 0) return absl::OkStatus();
  if (!InRange(p.ldx, p.d) || !InRange(p.ldy, p.d) ||
      (p.residual != nullptr && !InRange(p.ldr, p.d))) {
    return Bad(kOp, absl::StrCat("strides ldx=", p.ldx, " ldr=", p.ldr, " ldy=", p.ldy,
                                 " below d=", p.d));
  }
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr) {
    return Bad(kOp, "x, weight or y is null");
  }
  return absl::OkStatus();
}

absl::Status ValidateRope(const RopeParams& p) {
  constexpr const char* kOp = "Rope";
  if (!InRange(p.m, 0) || p.n_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 ||
      !InRange(int64_t{p.n_heads} * p.head_dim, 1)) {
    return Bad(kOp, absl::StrCat("bad sizes m=", p.m, " n_heads=", p.n_heads,
                                 " head_dim=", p.head_dim, " (must be even)"));
  }
  if (p.m == 0) return absl::OkStatus();
  if (!InRange(p.ldx, int64_t{p.n_heads} * p.head_dim)) {
    return Bad(kOp, absl::StrCat("ldx=", p.ldx, " below n_heads*head_dim"));
  }
  if (p.x == nullptr || p.positions == nullptr || p.inv_freq == nullptr) {
    return Bad(kOp, "x, positions or inv_freq is null");
  }
  return absl::OkStatus();
}

absl::Status ValidateAttention(const AttentionParams& p) {
  constexpr const char* kOp = "Attention";
  if (!InRange(p.m, 0) || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 ||
      p.n_heads % p.n_kv_heads != 0 || p.block_size <= 0 ||
      !InRange(int64_t{p.n_heads} * p.head_dim, 1)) {
    return Bad(kOp, absl::StrCat("bad sizes m=", p.m, " n_heads=", p.n_heads,
                                 " n_kv_heads=", p.n_kv_heads, " head_dim=", p.head_dim,
                                 " block_size=", p.block_size));
  }
  if (!InRange(p.q_start, 0) || !InRange(p.num_blocks_in_table, 0) ||
      p.num_cache_blocks < 0) {
    return Bad(kOp, "negative q_start or block counts");
  }
  if (p.m == 0) return absl::OkStatus();
  const int64_t width = int64_t{p.n_heads} * p.head_dim;
  if (!InRange(p.ldq, width) || !InRange(p.ldo, width)) {
    return Bad(kOp, absl::StrCat("ldq=", p.ldq, " ldo=", p.ldo, " below n_heads*head_dim"));
  }
  if (p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr || p.out == nullptr ||
      p.block_table == nullptr) {
    return Bad(kOp, "null pointer");
  }
  const int64_t positions = p.q_start + p.m;
  const int64_t blocks_needed = (positions + p.block_size - 1) / p.block_size;
  if (blocks_needed > p.num_blocks_in_table) {
    return Bad(kOp, absl::StrCat(positions, " positions need ", blocks_needed,
                                 " blocks but the table has ", p.num_blocks_in_table));
  }
  for (int64_t b = 0; b < blocks_needed; ++b) {
    const int32_t id = p.block_table[b];
    if (id < 0 || (p.num_cache_blocks > 0 && id >= p.num_cache_blocks)) {
      return Bad(kOp, absl::StrCat("block_table[", b, "]=", id, " out of range"));
    }
  }
  if (!(p.scale == p.scale)) return Bad(kOp, "scale is NaN");
  return absl::OkStatus();
}

absl::Status ValidateSiluMul(const SiluMulParams& p) {
  constexpr const char* kOp = "SiluMul";
  if (!InRange(p.m, 0) || !InRange(p.n, 0)) {
    return Bad(kOp, absl::StrCat("bad sizes m=", p.m, " n=", p.n));
  }
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  if (!InRange(p.ld_gate, p.n) || !InRange(p.ld_up, p.n) || !InRange(p.ldy, p.n)) {
    return Bad(kOp, "a stride is below n");
  }
  if (p.gate == nullptr || p.up == nullptr || p.y == nullptr) return Bad(kOp, "null pointer");
  return absl::OkStatus();
}

absl::Status ValidateLogSumExp(const LogSumExpParams& p) {
  constexpr const char* kOp = "LogSumExp";
  if (!InRange(p.m, 0) || !InRange(p.n, 1)) {
    return Bad(kOp, absl::StrCat("bad sizes m=", p.m, " n=", p.n, " (n >= 1)"));
  }
  if (p.m == 0) return absl::OkStatus();
  if (!InRange(p.ldx, p.n)) return Bad(kOp, "ldx is below n");
  if (p.x == nullptr || p.y == nullptr) return Bad(kOp, "null pointer");
  return absl::OkStatus();
}

absl::Status ValidateKlDivergence(const KlDivergenceParams& p) {
  constexpr const char* kOp = "KlDivergence";
  if (!InRange(p.m, 0) || !InRange(p.n, 1)) {
    return Bad(kOp, absl::StrCat("bad sizes m=", p.m, " n=", p.n, " (n >= 1)"));
  }
  if (!(p.tau > 0.f) || !std::isfinite(p.tau) || !std::isfinite(p.weight)) {
    return Bad(kOp, absl::StrCat("tau must be finite and > 0 and weight finite, got tau=", p.tau,
                                 " weight=", p.weight));
  }
  if (p.m == 0) return absl::OkStatus();
  if (!InRange(p.ldz, p.n)) return Bad(kOp, "ldz is below n");
  if (p.zs == nullptr || p.zt == nullptr || p.kl == nullptr) return Bad(kOp, "null pointer");
  return absl::OkStatus();
}

}  // namespace spear::kernels::internal
