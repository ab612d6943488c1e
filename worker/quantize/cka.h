// Linear CKA (Kornblith et al., 2019) and the entropy of a damage
// distribution: the two measurements behind SPEAR's EC placement
// (placement.h turns them into a plan).
//
// Linear CKA between X [T, d1] and Y [T, d2] (rows = tokens, the same tokens
// in the same order), features centered over tokens (Xc = X - mean_t X):
//     CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)   in [0, 1]
// computed in float64 in the feature-space (d x d) form, so the cost is
// O(T d^2) time and O(d^2) memory (T may be large). Invariant to orthogonal
// transforms and isotropic scaling of either side; CKA(X, X) = 1.
// A module's damage = 1 - CKA(final hidden states of the FP16 model, those of
// the model with only that module quantized).
//
// Entropy of damages d_i >= 0 (N modules): p_i = d_i / sum d,
// H = -sum p_i ln p_i (0 ln 0 = 0), normalized H / ln N (0 when N = 1), and
// the effective number of damaged modules exp(H) (1 = all damage in one
// module, N = spread evenly). With no damage at all (sum d = 0) p = 0, H = 0
// and effective_modules = 0 (nothing needs compensation).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/quantize/matrix.h"

namespace spear::quantize {

// InvalidArgument when the row counts differ, T < 2 or a value is not finite.
// A constant (zero-variance) side gives CKA 0.
absl::StatusOr<double> LinearCka(MatrixView x, MatrixView y);

// Caches the centered reference X and ||Xc^T Xc||_F, so comparing many Y
// against one reference (one per module) costs one pass over Y each.
class CkaReference {
 public:
  static absl::StatusOr<CkaReference> Create(MatrixView x);
  absl::StatusOr<double> Cka(MatrixView y) const;
  int64_t tokens() const { return xc_.rows(); }

 private:
  RowMatrixXd xc_;
  double x_norm_ = 0.0;
};

struct DamageEntropy {
  std::vector<double> p;
  double entropy = 0.0;
  double normalized_entropy = 0.0;
  double effective_modules = 0.0;
};
// InvalidArgument on a negative or non-finite damage, or an empty list.
absl::StatusOr<DamageEntropy> ComputeDamageEntropy(const std::vector<double>& damages);

}  // namespace spear::quantize
