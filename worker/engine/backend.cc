#include "worker/engine/backend.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace spear::engine {

absl::StatusOr<Device> ParseDevice(std::string_view s) {
  if (s == "cpu") return Device::kCpu;
  if (s == "cuda") return Device::kCuda;
  if (s == "auto") return Device::kAuto;
  return absl::InvalidArgumentError(
      absl::StrCat("device must be cpu, cuda or auto, got '", std::string(s), "'"));
}

const char* DeviceName(Device d) {
  switch (d) {
    case Device::kCpu: return "cpu";
    case Device::kCuda: return "cuda";
    case Device::kAuto: return "auto";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::Create(const model::LoadedModel* model,
                                                               const KvCacheOptions& kv,
                                                               kernels::ThreadPool* pool) {
  if (model == nullptr || pool == nullptr) {
    return absl::InvalidArgumentError("CpuBackend: null model or thread pool");
  }
  auto cache = KvCache::Create(model->config, kv);
  if (!cache.ok()) return cache.status();
  std::unique_ptr<CpuBackend> b(new CpuBackend());
  b->owned_cache_ = std::move(*cache);
  b->owned_runner_ = std::make_unique<ModelRunner>(model, b->owned_cache_.get(), pool);
  b->runner_ = b->owned_runner_.get();
  return b;
}

std::string CpuBackend::Describe() const {
  const KvCache& c = runner_->kv_cache();
  return absl::StrCat("cpu: ", runner_->pool()->size(), " threads, KV ", c.num_blocks(),
                      " blocks x ", c.block_size(), " fp32 (", c.bytes() >> 20, " MiB)");
}

}  // namespace spear::engine
