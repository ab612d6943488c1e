#include "worker/engine/cuda_backend.h"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"

namespace spear::engine {

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const model::LoadedModel* model, const CudaRunnerOptions& options) {
  auto r = CudaModelRunner::Create(model, options);
  if (!r.ok()) return r.status();
  std::unique_ptr<CudaBackend> b(new CudaBackend(std::move(*r)));
  b->device_sampling_ = options.device_sampling;
  int dev = 0;
  cudaDeviceProp prop{};
  std::string name = "unknown GPU";
  if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&prop, dev) == cudaSuccess) {
    name = prop.name;
  }
  const model::ModelConfig& c = model->config;
  const int64_t kv_bytes = b->num_blocks() * b->block_size() * c.num_layers * 2 *
                           c.num_kv_heads * c.head_dim * 2;
  b->description_ = absl::StrCat("cuda: ", name, " (device ", dev, "), weights ",
                                 b->runner_->weights().bytes() >> 20, " MiB (ECs ",
                                 b->runner_->weights().ec_bytes() >> 10, " KiB), KV ",
                                 b->num_blocks(), " blocks x ", b->block_size(), " fp16 (",
                                 kv_bytes >> 20, " MiB), sampling on the ",
                                 options.device_sampling ? "device" : "host");
  return b;
}

}  // namespace spear::engine
