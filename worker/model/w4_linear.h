// A W4 quantized linear layer with an optional per-token gated Error
// Compensator (EC), over kernels::cpu::W4Linear (see kernels/w4_ops.h for
// the exact math; the EC sees the raw input x, the backbone x / act_scale).
//
// Ownership: unlike DenseLinear, a W4Linear OWNS its packed weight, EC and
// bias (they are small and are produced by the quantizer or decoded from a
// .spear checkpoint's fp16 tensors).
//
// Thread-safety: weights are immutable after Create. Forward may run
// concurrently from several threads (outputs must not overlap; the pool's
// own rules apply). set_ec_enabled is atomic and may be called at any time,
// also during a Forward on another thread (that Forward sees either value;
// the scheduler flips it between iterations). set_gate_observer may also be
// called at any time (it swaps a shared pointer under a mutex); see there
// for when the observer runs.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "kernels/w4_format.h"
#include "worker/model/linear.h"

namespace spear::model {

class W4Linear final : public Linear {
 public:
  // g: [m, r] row-major gate values of one Forward (1s for a static EC).
  using GateObserver = std::function<void(const float* g, int64_t m, int64_t r)>;

  // Validates every shape (w's packing, scales, zeros, act_scale; ec's n/k
  // against w and its A/B/gate sizes; bias empty or [n]); InvalidArgument
  // otherwise.
  static absl::StatusOr<std::unique_ptr<W4Linear>> Create(kernels::W4Weight w,
                                                          std::optional<kernels::EcWeights> ec,
                                                          std::vector<float> bias = {});

  int64_t in_features() const override { return w_.fmt.k; }
  int64_t out_features() const override { return w_.fmt.n; }
  // y (+)= Q(W)(x / act_scale) + bias [+ B(g ⊙ A x) when an EC is present
  // and enabled]. Same argument rules as Linear::Forward.
  absl::Status Forward(const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy,
                       bool accumulate, kernels::ThreadPool* pool) const override;
  // W4 bytes as served (codes + fp16 scales + u8 zeros + fp16 act_scale) +
  // EC bytes (fp16 as served, whether enabled or not) + bias (float32).
  int64_t weight_bytes() const override;
  // e.g. "w4 g128 asym [576 x 1536] +act_scale +ec(r=32, gated h=16) +bias".
  std::string DebugString() const override;

  const kernels::W4Weight& weight() const { return w_; }
  const std::optional<kernels::EcWeights>& ec() const { return ec_; }
  const std::vector<float>& bias() const { return bias_; }
  bool has_ec() const { return ec_.has_value(); }
  int64_t ec_bytes() const { return ec_ ? static_cast<int64_t>(ec_->bytes()) : 0; }

  // When false, Forward skips the EC (as if there were none). Default true.
  void set_ec_enabled(bool enabled) { ec_enabled_.store(enabled, std::memory_order_relaxed); }
  bool ec_enabled() const { return ec_enabled_.load(std::memory_order_relaxed); }

  // Installs (or, with an empty function, removes) an observer of the gate
  // values. It is called synchronously at the end of every Forward that ran
  // the EC (present and enabled, m > 0), on the thread that called Forward,
  // after y is written; `g` is valid only during the call. With concurrent
  // Forwards it can run concurrently with itself: it must be thread-safe
  // (or the caller serialises Forward). It must not call back into this
  // layer's setters. Costs one [m, r] buffer per Forward while installed.
  void set_gate_observer(GateObserver observer);
  // Lock-free (the CUDA runner asks for every module on every step).
  bool has_gate_observer() const { return has_observer_.load(std::memory_order_relaxed); }
  // Calls the installed observer, if any, with gate values this layer's EC
  // produced elsewhere (the CUDA runner's kernels), under the same rules as
  // the calls from Forward.
  void ObserveGate(const float* g, int64_t m, int64_t r) const;

 private:
  W4Linear(kernels::W4Weight w, std::optional<kernels::EcWeights> ec, std::vector<float> bias)
      : w_(std::move(w)), ec_(std::move(ec)), bias_(std::move(bias)) {}

  std::shared_ptr<const GateObserver> observer() const;

  const kernels::W4Weight w_;
  const std::optional<kernels::EcWeights> ec_;
  const std::vector<float> bias_;
  std::atomic<bool> ec_enabled_{true};
  mutable std::mutex observer_mu_;
  std::shared_ptr<const GateObserver> observer_;  // guarded by observer_mu_
  std::atomic<bool> has_observer_{false};           // observer_ != nullptr
};

}  // namespace spear::model
