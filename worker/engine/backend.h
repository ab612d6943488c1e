// What the Engine drives: one model-execution backend (forward passes over
// a paged KV cache that the backend owns, and that cache's block
// allocator). Two implementations:
//   CpuBackend (here, spear_engine): ModelRunner over a host float32 KvCache;
//   CudaBackend (cuda_backend.h, spear_engine_cuda, only with
//     SPEAR_WITH_CUDA): CudaModelRunner with its device fp16 KV cache.
// Engine, EngineLoop (BlockManager, latency table) and EvalPerplexity see
// only this interface; engine_factory.h picks one from a Device.
//
// Contract of every backend (the ModelRunner batch contract,
// model_runner.h): Forward runs a batch of SeqChunks whose block tables
// index THIS backend's cache (blocks come from allocator()) and returns
// the requested logits rows in fp32 on the host. InvalidArgument before
// touching the cache for a bad batch (ValidateBatch); other codes for
// kernel / device failures.
//
// Thread-safety: one Forward at a time (not re-entrant); allocator() is
// internally synchronized.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/thread_pool.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/engine/sampler.h"
#include "worker/model/weights.h"

namespace spear::engine {

// Where a model runs. kAuto resolves to kCuda when this build has the CUDA
// backend and a CUDA device is present, else kCpu (engine_factory.h).
enum class Device { kCpu, kCuda, kAuto };

// "cpu" | "cuda" | "auto"; InvalidArgument naming the accepted values.
absl::StatusOr<Device> ParseDevice(std::string_view s);
const char* DeviceName(Device d);

class ModelBackend {
 public:
  virtual ~ModelBackend() = default;

  virtual absl::Status Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out) = 0;

  // Sampling on the backend's device: a backend for which
  // samples_on_device() is true runs the batch as Forward does and samples
  // the next token of every logits row there (rows in Forward's row order,
  // one RowSampling each, as Sampler::Pick with the row's draw), so only
  // the ids come back (`tokens`, one per row). Only LogitsMode kLast /
  // kNone chunks; InvalidArgument for kAll or a row count that does not
  // match. The Engine uses it when offered; the default backend does not
  // offer it (the Engine then samples Forward's rows on the host).
  virtual bool samples_on_device() const { return false; }
  // Whether Forward honours SeqChunk::hidden (the final-normed hidden
  // states of a chunk's tokens): the CPU backend does.
  virtual bool returns_hidden() const { return false; }
  virtual absl::Status ForwardSample(const std::vector<SeqChunk>& batch,
                                     const std::vector<RowSampling>& rows,
                                     std::vector<int32_t>* tokens) {
    (void)batch;
    (void)rows;
    (void)tokens;
    return absl::UnimplementedError("this backend does not sample on a device");
  }

  // The KV cache's blocks. The engine (or the one BlockManager over it)
  // is the only user.
  virtual BlockAllocator& allocator() = 0;
  virtual const BlockAllocator& allocator() const = 0;
  virtual int block_size() const = 0;
  virtual int64_t num_blocks() const = 0;
  // Blocks needed to hold `tokens` positions.
  int64_t BlocksFor(int64_t tokens) const {
    return (tokens + block_size() - 1) / block_size();
  }

  virtual const model::LoadedModel& model() const = 0;
  // Host threads the backend's caller may borrow for work on Forward's
  // outputs between calls (e.g. perplexity's log-softmax rows); nullptr:
  // none (run on the calling thread).
  virtual kernels::ThreadPool* host_pool() { return nullptr; }
  // Which device runs: Device::kCpu or Device::kCuda (never kAuto).
  virtual Device device() const = 0;
  // "cpu" or "cuda" (a metric label value).
  const char* name() const { return DeviceName(device()); }
  // One line for logs: the hardware and the KV cache, e.g.
  // "cuda: NVIDIA H200 (device 0), KV 512 blocks x 16 fp16".
  virtual std::string Describe() const = 0;
};

// The CPU backend: a ModelRunner over a host KvCache. Either owns both
// (Create) or borrows an existing runner (for code that built its own).
class CpuBackend final : public ModelBackend {
 public:
  // Borrows model and pool (both must outlive the backend); owns a KvCache
  // of `kv` (KvCache::Create's errors) and the runner over it.
  static absl::StatusOr<std::unique_ptr<CpuBackend>> Create(const model::LoadedModel* model,
                                                            const KvCacheOptions& kv,
                                                            kernels::ThreadPool* pool);
  // Borrows `runner` (and so its model, cache and pool).
  explicit CpuBackend(ModelRunner* runner) : runner_(runner) {}

  absl::Status Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out) override {
    return runner_->Forward(batch, out);
  }
  bool returns_hidden() const override { return true; }
  BlockAllocator& allocator() override { return runner_->kv_cache().allocator(); }
  const BlockAllocator& allocator() const override { return runner_->kv_cache().allocator(); }
  int block_size() const override { return runner_->kv_cache().block_size(); }
  int64_t num_blocks() const override { return runner_->kv_cache().num_blocks(); }
  const model::LoadedModel& model() const override { return runner_->model(); }
  kernels::ThreadPool* host_pool() override { return runner_->pool(); }
  Device device() const override { return Device::kCpu; }
  std::string Describe() const override;

  ModelRunner& runner() { return *runner_; }
  KvCache& kv_cache() { return runner_->kv_cache(); }

 private:
  CpuBackend() = default;
  std::unique_ptr<KvCache> owned_cache_;
  std::unique_ptr<ModelRunner> owned_runner_;
  ModelRunner* runner_ = nullptr;
};

}  // namespace spear::engine
