// The CUDA backend of the Engine (backend.h): a CudaModelRunner and its
// device fp16 KV cache behind ModelBackend. Built only with SPEAR_WITH_CUDA
// (library spear_engine_cuda); engine_factory.h creates it from a Device.
//
// Forward returns fp32 logits rows on the host, as the CPU backend does;
// with CudaRunnerOptions::device_sampling (the default) the engine calls
// ForwardSample instead, which samples every row on the GPU and returns
// only the token ids. Decode steps replay CUDA graphs inside the runner.
//
// Ownership: owns the runner (borrows the model). Thread-safety: as
// ModelBackend.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/engine/backend.h"
#include "worker/engine/cuda_model_runner.h"

namespace spear::engine {

class CudaBackend final : public ModelBackend {
 public:
  // CudaModelRunner::Create's errors: Unavailable without a CUDA device,
  // Unimplemented for models the runner cannot run (dense decoders,
  // head_dim other than 64 / 128), Internal / ResourceExhausted-like
  // device failures.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const model::LoadedModel* model,
                                                             const CudaRunnerOptions& options);

  absl::Status Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out) override {
    return runner_->Forward(batch, out);
  }
  bool samples_on_device() const override { return device_sampling_; }
  absl::Status ForwardSample(const std::vector<SeqChunk>& batch,
                             const std::vector<RowSampling>& rows,
                             std::vector<int32_t>* tokens) override {
    return runner_->Forward(batch, nullptr, nullptr, &rows, tokens);
  }
  BlockAllocator& allocator() override { return runner_->allocator(); }
  const BlockAllocator& allocator() const override { return runner_->allocator(); }
  int block_size() const override { return runner_->block_size(); }
  int64_t num_blocks() const override { return runner_->num_blocks(); }
  const model::LoadedModel& model() const override { return runner_->model(); }
  Device device() const override { return Device::kCuda; }
  std::string Describe() const override { return description_; }

  CudaModelRunner& runner() { return *runner_; }

 private:
  explicit CudaBackend(std::unique_ptr<CudaModelRunner> r) : runner_(std::move(r)) {}
  std::unique_ptr<CudaModelRunner> runner_;
  std::string description_;
  bool device_sampling_ = true;
};

}  // namespace spear::engine
