#include "worker/engine/engine_factory.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

#ifdef SPEAR_ENGINE_HAS_CUDA
#include "kernels/cuda_ops.h"
#include "kernels/w4_cuda.h"
#include "worker/engine/cuda_backend.h"
#endif

namespace spear::engine {

bool BuiltWithCuda() {
#ifdef SPEAR_ENGINE_HAS_CUDA
  return true;
#else
  return false;
#endif
}

absl::Status CudaUsable() {
#ifdef SPEAR_ENGINE_HAS_CUDA
  auto n = kernels::cuda::DeviceCount();
  if (!n.ok()) {  // its message starts "no usable CUDA device: <runtime error>"
    return absl::UnavailableError(absl::StrCat("device cuda: ", n.status().message()));
  }
  if (*n == 0) return absl::UnavailableError("device cuda: no CUDA device on this machine");
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError(
      "device cuda: this build has no CUDA backend (it was configured with "
      "SPEAR_WITH_CUDA=OFF or without nvcc); use --device cpu or rebuild with CUDA");
#endif
}

absl::StatusOr<Device> ResolveDevice(Device requested) {
  switch (requested) {
    case Device::kCpu:
      return Device::kCpu;
    case Device::kCuda:
      if (absl::Status s = CudaUsable(); !s.ok()) return s;
      return Device::kCuda;
    case Device::kAuto:
      return CudaUsable().ok() ? Device::kCuda : Device::kCpu;
  }
  return absl::InvalidArgumentError("unknown device");
}

absl::StatusOr<std::unique_ptr<Engine>> CreateEngine(const model::LoadedModel* model,
                                                     const EngineOptions& options, Device device) {
  auto resolved = ResolveDevice(device);
  if (!resolved.ok()) return resolved.status();
  if (*resolved == Device::kCpu) return Engine::Create(model, options);
#ifdef SPEAR_ENGINE_HAS_CUDA
  if (model == nullptr) return absl::InvalidArgumentError("Engine: null model");
  CudaRunnerOptions co;
  co.block_size = options.kv_cache.block_size;
  co.num_blocks = options.kv_cache.num_blocks;
  co.kv_bytes = options.kv_cache.bytes;
  // The prefill GEMMs run at up to max_batch_tokens rows: measure their
  // kernels at load for that range (none below the prefill path's 64 rows).
  co.tune_prefill_max_m = options.max_batch_tokens >= kernels::cuda::kPrefillM
                              ? std::min<int64_t>(options.max_batch_tokens, 65536)
                              : 0;
  auto backend = CudaBackend::Create(model, co);
  if (!backend.ok()) {
    if (device == Device::kAuto && absl::IsUnimplemented(backend.status())) {
      spdlog::warn("device auto: the CUDA backend cannot run this model ({}); using the CPU",
                   std::string(backend.status().message()));
      return Engine::Create(model, options);
    }
    return backend.status();
  }
  return Engine::Create(model, options, std::move(*backend));
#else
  return absl::InternalError("CreateEngine: CUDA resolved in a build without CUDA");
#endif
}

}  // namespace spear::engine
