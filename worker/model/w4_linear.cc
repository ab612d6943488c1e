#include "worker/model/w4_linear.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/w4_ops.h"

namespace spear::model {

absl::StatusOr<std::unique_ptr<W4Linear>> W4Linear::Create(kernels::W4Weight w,
                                                           std::optional<kernels::EcWeights> ec,
                                                           std::vector<float> bias) {
  const int64_t n = w.fmt.n;
  // The op's validation covers packing, group sizes and the EC's shapes;
  // run it on a parameter set with no tokens.
  kernels::W4LinearParams p;
  p.w = &w;
  p.k = w.fmt.k;
  p.ec = ec ? &*ec : nullptr;
  if (absl::Status s = kernels::ValidateW4Linear(p); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("W4Linear::Create: ", s.message()));
  }
  // What the per-call validation does not scan (O(n * groups)): the values.
  for (uint8_t z : w.zeros) {
    if (z > 15) return absl::InvalidArgumentError("W4Linear::Create: zero point > 15");
  }
  for (float s : w.act_scale) {
    if (!(std::isfinite(s) && s > 0.f)) {
      return absl::InvalidArgumentError("W4Linear::Create: act_scale must be finite and > 0");
    }
  }
  if (!bias.empty() && static_cast<int64_t>(bias.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("W4Linear::Create: bias has ", bias.size(), " entries, want ", n));
  }
  return std::unique_ptr<W4Linear>(new W4Linear(std::move(w), std::move(ec), std::move(bias)));
}

absl::Status W4Linear::Forward(const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy,
                               bool accumulate, kernels::ThreadPool* pool) const {
  if (m == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr || m < 0 || ldx < in_features() || ldy < out_features()) {
    return absl::InvalidArgumentError(absl::StrCat("W4Linear::Forward: bad arguments (m=", m,
                                                   ", ldx=", ldx, ", ldy=", ldy, ") for ",
                                                   DebugString()));
  }
  kernels::W4LinearParams p;
  p.x = x;
  p.m = m;
  p.k = w_.fmt.k;
  p.ldx = ldx;
  p.w = &w_;
  p.ec = ec_ && ec_enabled() ? &*ec_ : nullptr;
  p.bias = bias_.empty() ? nullptr : bias_.data();
  p.y = y;
  p.ldy = ldy;
  p.accumulate = accumulate;
  std::shared_ptr<const GateObserver> obs = p.ec != nullptr ? observer() : nullptr;
  if (obs == nullptr) return kernels::cpu::W4Linear(p, pool);
  // The gate buffer lives only for this call (observers must copy).
  thread_local std::vector<float> gate;
  gate.resize(static_cast<size_t>(m * ec_->rank));
  p.gate_out = gate.data();
  if (absl::Status s = kernels::cpu::W4Linear(p, pool); !s.ok()) return s;
  (*obs)(gate.data(), m, ec_->rank);
  return absl::OkStatus();
}

int64_t W4Linear::weight_bytes() const {
  return static_cast<int64_t>(w_.bytes()) + ec_bytes() + static_cast<int64_t>(bias_.size()) * 4;
}

std::string W4Linear::DebugString() const {
  const kernels::W4Format& f = w_.fmt;
  std::string s = absl::StrCat("w4 ", f.group_size == f.k ? std::string("per-channel")
                                                           : absl::StrCat("g", f.group_size),
                               f.symmetric ? " sym" : " asym", " [", f.n, " x ", f.k, "]");
  if (!w_.act_scale.empty()) absl::StrAppend(&s, " +act_scale");
  if (ec_) {
    absl::StrAppend(&s, " +ec(r=", ec_->rank,
                    ec_->gated ? absl::StrCat(", gated h=", ec_->gate_hidden) : ", static",
                    ec_enabled() ? "" : ", disabled", ")");
  }
  if (!bias_.empty()) absl::StrAppend(&s, " +bias");
  return s;
}

void W4Linear::set_gate_observer(GateObserver observer) {
  std::shared_ptr<const GateObserver> next =
      observer ? std::make_shared<const GateObserver>(std::move(observer)) : nullptr;
  std::lock_guard<std::mutex> lock(observer_mu_);
  has_observer_.store(next != nullptr, std::memory_order_relaxed);
  observer_ = std::move(next);
}

void W4Linear::ObserveGate(const float* g, int64_t m, int64_t r) const {
  if (std::shared_ptr<const GateObserver> obs = observer(); obs != nullptr) (*obs)(g, m, r);
}

std::shared_ptr<const W4Linear::GateObserver> W4Linear::observer() const {
  std::lock_guard<std::mutex> lock(observer_mu_);
  return observer_;
}

}  // namespace spear::model
