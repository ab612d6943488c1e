// Scalar reference ops: the ground truth every other backend is tested
// against. Written for obviousness, not speed; dot products and sums of
// squares accumulate in double so the reference is more accurate than any
// float32 kernel it judges.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/validate.h"
#include "kernels/ops.h"

namespace spear::kernels::ref {

absl::Status Linear(const LinearParams& p) {
  if (absl::Status s = internal::ValidateLinear(p); !s.ok()) return s;
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t j = 0; j < p.n; ++j) {
      double acc = 0.0;
      for (int64_t c = 0; c < p.k; ++c) {
        acc += static_cast<double>(p.x[i * p.ldx + c]) * LoadAsFloat(p.w, p.w_dtype, j * p.k + c);
      }
      if (p.bias != nullptr) acc += p.bias[j];
      float& y = p.y[i * p.ldy + j];
      y = p.accumulate ? static_cast<float>(y + acc) : static_cast<float>(acc);
    }
  }
  return absl::OkStatus();
}

absl::Status RmsNorm(const RmsNormParams& p) {
  if (absl::Status s = internal::ValidateRmsNorm(p); !s.ok()) return s;
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = p.x + i * p.ldx;
    float* y = p.y + i * p.ldy;
    const float* src = x;
    if (p.residual != nullptr) {
      float* r = p.residual + i * p.ldr;
      for (int64_t c = 0; c < p.d; ++c) r[c] += x[c];
      src = r;
    }
    double ss = 0.0;
    for (int64_t c = 0; c < p.d; ++c) ss += static_cast<double>(src[c]) * src[c];
    const double inv = 1.0 / std::sqrt(ss / p.d + p.eps);
    for (int64_t c = 0; c < p.d; ++c) y[c] = static_cast<float>(src[c] * inv * p.weight[c]);
  }
  return absl::OkStatus();
}

absl::Status Rope(const RopeParams& p) {
  if (absl::Status s = internal::ValidateRope(p); !s.ok()) return s;
  const int half = p.head_dim / 2;
  for (int64_t i = 0; i < p.m; ++i) {
    const float pos = static_cast<float>(p.positions[i]);
    for (int h = 0; h < p.n_heads; ++h) {
      float* x = p.x + i * p.ldx + static_cast<int64_t>(h) * p.head_dim;
      for (int j = 0; j < half; ++j) {
        // The angle is formed in float32 as HF does (positions @ inv_freq).
        const float t = pos * p.inv_freq[j];
        const float c = std::cos(t) * p.attention_scaling;
        const float s = std::sin(t) * p.attention_scaling;
        const float a = x[j], b = x[j + half];
        x[j] = a * c - b * s;
        x[j + half] = b * c + a * s;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Attention(const AttentionParams& p) {
  if (absl::Status s = internal::ValidateAttention(p); !s.ok()) return s;
  const int group = p.n_heads / p.n_kv_heads;
  const int64_t kv_row = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
  std::vector<double> scores, acc(p.head_dim);
  for (int64_t i = 0; i < p.m; ++i) {
    const int64_t len = p.q_start + i + 1;  // causal: positions [0, q_start + i]
    scores.resize(len);
    for (int h = 0; h < p.n_heads; ++h) {
      const float* q = p.q + i * p.ldq + static_cast<int64_t>(h) * p.head_dim;
      const int64_t kvh = h / group;
      double max_s = -INFINITY;
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t slot =
            static_cast<int64_t>(p.block_table[pos / p.block_size]) * p.block_size +
            pos % p.block_size;
        const float* k = p.k_cache + slot * kv_row + kvh * p.head_dim;
        double dot = 0.0;
        for (int d = 0; d < p.head_dim; ++d) dot += static_cast<double>(q[d]) * k[d];
        scores[pos] = dot * p.scale;
        if (scores[pos] > max_s) max_s = scores[pos];
      }
      double sum = 0.0;
      for (int64_t pos = 0; pos < len; ++pos) {
        scores[pos] = std::exp(scores[pos] - max_s);
        sum += scores[pos];
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t slot =
            static_cast<int64_t>(p.block_table[pos / p.block_size]) * p.block_size +
            pos % p.block_size;
        const float* v = p.v_cache + slot * kv_row + kvh * p.head_dim;
        for (int d = 0; d < p.head_dim; ++d) acc[d] += scores[pos] * v[d];
      }
      float* out = p.out + i * p.ldo + static_cast<int64_t>(h) * p.head_dim;
      for (int d = 0; d < p.head_dim; ++d) out[d] = static_cast<float>(acc[d] / sum);
    }
  }
  return absl::OkStatus();
}

absl::Status SiluMul(const SiluMulParams& p) {
  if (absl::Status s = internal::ValidateSiluMul(p); !s.ok()) return s;
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t j = 0; j < p.n; ++j) {
      const double g = p.gate[i * p.ld_gate + j];
      const double u = p.up[i * p.ld_up + j];
      p.y[i * p.ldy + j] = static_cast<float>(g / (1.0 + std::exp(-g)) * u);
    }
  }
  return absl::OkStatus();
}

absl::Status LogSumExp(const LogSumExpParams& p) {
  if (absl::Status s = internal::ValidateLogSumExp(p); !s.ok()) return s;
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = p.x + i * p.ldx;
    double mx = x[0];
    for (int64_t j = 1; j < p.n; ++j) mx = std::max<double>(mx, x[j]);
    double sum = 0;
    for (int64_t j = 0; j < p.n; ++j) sum += std::exp(static_cast<double>(x[j]) - mx);
    p.y[i] = mx + std::log(sum);
  }
  return absl::OkStatus();
}

absl::Status KlDivergence(const KlDivergenceParams& p) {
  if (absl::Status s = internal::ValidateKlDivergence(p); !s.ok()) return s;
  const double it = 1.0 / static_cast<double>(p.tau);
  std::vector<double> ls(p.n), lt(p.n);  // log-softmax of zs / tau and zt / tau
  for (int64_t i = 0; i < p.m; ++i) {
    for (int pass = 0; pass < 2; ++pass) {
      const float* z = (pass == 0 ? p.zs : p.zt) + i * p.ldz;
      std::vector<double>& l = pass == 0 ? ls : lt;
      double mx = z[0] * it;
      for (int64_t j = 1; j < p.n; ++j) mx = std::max(mx, z[j] * it);
      double sum = 0;
      for (int64_t j = 0; j < p.n; ++j) sum += std::exp(z[j] * it - mx);
      const double lz = mx + std::log(sum);
      for (int64_t j = 0; j < p.n; ++j) l[j] = z[j] * it - lz;
    }
    double kl = 0;
    for (int64_t j = 0; j < p.n; ++j) {
      const double pt = std::exp(lt[j]);
      kl += pt * (lt[j] - ls[j]);
      if (p.dzs != nullptr) {
        p.dzs[i * p.ldz + j] = static_cast<float>(static_cast<double>(p.weight) * p.tau *
                                                  (std::exp(ls[j]) - pt));
      }
    }
    p.kl[i] = kl * p.tau * p.tau;
  }
  return absl::OkStatus();
}

}  // namespace spear::kernels::ref
