// Programmatic dependent launch (PDL) for the small kernels of a decode step
// (RMSNorm, RoPE, KV append, attention, SwiGLU, embedding, argmax) and the
// EC prologue before the fold kernel (w4_ec.cu).
//
// A kernel launched by LaunchPdl may start while the previous kernel of the
// stream is still running (CUDA 12.3+ keeps this as a programmatic edge when
// the stream is captured into a graph). Its blocks then sit at PdlEnter,
// which every thread executes first, before any global memory access: it
// waits until the previous kernel has completed and its writes are visible
// (griddepcontrol.wait), then lets the next kernel launch
// (griddepcontrol.launch_dependents). So the order of memory effects is
// exactly that of a plain launch; what overlaps is the launch latency and
// block start of each kernel with the tail of the one before (the W4 GEMMs
// also request their first weights before their wait: w4_gemv_fold.cu).
// Every block of a PDL kernel must pass the wait: a later kernel's wait
// covers the grids before it only through that chain.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <utility>

#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {

// v30 (early_trigger of RmsNormF16, SiluMul and PagedDecodeAttention, the
// producers of a W4 GEMM's x): `early` lets the next kernel launch before
// this one's wait, so that the GEMM's blocks become resident and fetch
// weights while the kernel before this one still runs. Memory order is
// unchanged: the next kernel's griddepcontrol.wait still waits for this
// grid's completion, which follows this grid's own wait.
__device__ __forceinline__ void PdlEnter(int early = 0) {
  if (early) asm volatile("griddepcontrol.launch_dependents;\n" ::);
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  if (!early) asm volatile("griddepcontrol.launch_dependents;\n" ::);
}

// Runs `configure()` (the cudaFuncSetAttribute calls a kernel needs before
// its first launch; they apply to the current device) once per kernel and
// device, under a lock, and returns its result; a failure is not recorded,
// so the next call tries again. `kernel` is the key (any pointer that
// identifies the kernel).
template <typename F>
cudaError_t ConfigureOnce(const void* kernel, F&& configure) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, dev}) != 0) return cudaSuccess;
  const cudaError_t e = configure();
  if (e == cudaSuccess) done.insert({kernel, dev});
  return e;
}

// cudaLaunchKernelEx with `n` attributes, the last of them programmatic
// serialization where `pdl_last`: a launch refused with it is retried
// without it (a driver or capture that does not take the attribute).
template <typename... KArgs, typename... Args>
cudaError_t LaunchWithAttrs(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                            cudaStream_t stream, cudaLaunchAttribute* attrs, int n,
                            bool pdl_last, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = static_cast<unsigned>(n);
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
  if (e != cudaSuccess && pdl_last && n > 0) {
    (void)cudaGetLastError();
    cfg.numAttrs = static_cast<unsigned>(n - 1);
    e = cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
  }
  return e;
}

// <<<grid, block, smem, stream>>>(args...) with the programmatic-serialization
// attribute while ProgrammaticLaunchEnabled(); a launch refused with it is
// retried without.
template <typename... KArgs, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0] = {};
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  const bool pdl = ProgrammaticLaunchEnabled();
  return LaunchWithAttrs(kernel, grid, block, smem, stream, attr, pdl ? 1 : 0, pdl, args...);
}

// cudaLaunchKernelEx's attributes for clusters of x * y blocks, then
// programmatic serialization; returns how many apply (1 without PDL).
inline int ClusterPdlAttrs(cudaLaunchAttribute (&attr)[2], unsigned x, unsigned y, bool pdl) {
  attr[0] = {};
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = x;
  attr[0].val.clusterDim.y = y;
  attr[0].val.clusterDim.z = 1;
  attr[1] = {};
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  return pdl ? 2 : 1;
}

// <<<grid, block, smem, stream>>>(args...) in clusters of cx * cy blocks,
// with programmatic serialization where `pdl` (retried without, as above).
template <typename... KArgs, typename... Args>
cudaError_t LaunchCluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, unsigned cx, unsigned cy, bool pdl,
                          Args... args) {
  cudaLaunchAttribute attr[2];
  const int n = ClusterPdlAttrs(attr, cx, cy, pdl);
  return LaunchWithAttrs(kernel, grid, block, smem, stream, attr, n, n == 2, args...);
}

}  // namespace spear::kernels::cuda
