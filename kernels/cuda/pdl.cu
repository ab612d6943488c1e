// The process-wide switch of programmatic dependent launch for the small
// decode-step kernels (kernels/cuda/pdl.cuh; declared in cuda_ops.h).
#include <atomic>
#include <cstdlib>

#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {
std::atomic<bool> g_pdl{true};
// v30: off unless SPEAR_CUDA_EARLY_TRIGGER=1 (a testing knob: the GPU test
// suites run under both settings; SetEarlyTrigger overrides it).
bool EarlyFromEnv() {
  const char* e = std::getenv("SPEAR_CUDA_EARLY_TRIGGER");
  return e != nullptr && e[0] == '1';
}
std::atomic<bool> g_early{EarlyFromEnv()};
}  // namespace

void SetEarlyTrigger(bool on) { g_early.store(on, std::memory_order_relaxed); }
bool EarlyTriggerEnabled() { return g_early.load(std::memory_order_relaxed); }

void SetProgrammaticLaunch(bool on) { g_pdl.store(on, std::memory_order_relaxed); }
bool ProgrammaticLaunchEnabled() { return g_pdl.load(std::memory_order_relaxed); }

}  // namespace spear::kernels::cuda
