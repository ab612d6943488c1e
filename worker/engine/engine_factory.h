// Engines on a chosen device: where the CPU and CUDA backends meet. Lives
// in its own library (spear_engine_device) that links the CUDA backend
// when the build has one (SPEAR_WITH_CUDA), so spear_engine stays
// CPU-only and Engine::Create(model, options) stays the CPU engine.
//
// Device resolution (`--device` of spear generate / eval / bench / serve
// and spear-worker):
//   cpu  -> the CPU backend;
//   cuda -> the CUDA backend, or an error saying why not:
//           FailedPrecondition when this build has no CUDA backend,
//           Unavailable when no CUDA device is usable;
//   auto -> cuda when this build has it and a device is present, else cpu.
//           If the CUDA backend cannot run the model (Unimplemented: e.g.
//           dense decoder weights), auto falls back to the CPU and logs why.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/engine/backend.h"
#include "worker/engine/engine.h"

namespace spear::engine {

// Whether this binary was built with the CUDA backend.
bool BuiltWithCuda();

// OK when the CUDA backend can be used here; else the error of
// ResolveDevice(kCuda).
absl::Status CudaUsable();

// kCpu or kCuda for `requested` on this build and machine (see above).
absl::StatusOr<Device> ResolveDevice(Device requested);

// An engine on `device` (resolved first). kCpu is Engine::Create(model,
// options). kCuda maps options.kv_cache onto the CUDA runner's cache
// (block_size, num_blocks; `bytes` counted at fp16); errors of
// ResolveDevice and CudaBackend::Create.
absl::StatusOr<std::unique_ptr<Engine>> CreateEngine(const model::LoadedModel* model,
                                                     const EngineOptions& options, Device device);

}  // namespace spear::engine
