// The process-wide switch of programmatic dependent launch for the small
// decode-step kernels (kernels/cuda/pdl.cuh; declared in cuda_ops.h).
#include <atomic>

#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {
namespace {
std::atomic<bool> g_pdl{true};
}  // namespace

void SetProgrammaticLaunch(bool on) { g_pdl.store(on, std::memory_order_relaxed); }
bool ProgrammaticLaunchEnabled() { return g_pdl.load(std::memory_order_relaxed); }

}  // namespace spear::kernels::cuda
