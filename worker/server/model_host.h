// What a worker process hosts: a loaded model, its engine (KV cache sized
// in tokens) and the EC control. Shared by spear-worker and the scheduler
// benchmark.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/engine/backend.h"
#include "worker/engine/ec_control.h"
#include "worker/engine/engine.h"
#include "worker/model/weights.h"

namespace spear::server {

struct HostOptions {
  std::string model;        // cache name or path (.spear dir, HF dir, .gguf)
  int threads = 0;          // <= 0: all hardware threads
  int64_t kv_tokens = 8192;  // KV capacity in positions
  int block_size = 16;
  int64_t max_batch_tokens = 512;
  // cpu | cuda | auto (engine_factory.h).
  engine::Device device = engine::Device::kCpu;
};

struct ModelHost {
  std::unique_ptr<model::LoadedModel> model;
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<engine::EcControl> ec;
  std::string name;          // model name for labels (cache name or directory name)
  std::string quantization;  // e.g. "w4 210/210 modules + ec 72 units (0.98% bytes)"
  double load_seconds = 0;
};

// Resolves (model::ResolveModel), loads (model::LoadModel) and builds the
// engine on options.device and the EC control. NotFound / InvalidArgument
// from the loaders; FailedPrecondition / Unavailable (checked before the
// model is loaded) when cuda is asked for and this build or machine has
// none; the CUDA backend's errors.
absl::StatusOr<ModelHost> OpenModelHost(const HostOptions& options);

}  // namespace spear::server
