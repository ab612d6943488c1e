// CaptureGraph (declared in cuda_ops.h): stream capture + instantiation,
// the one copy used by the model runner and the prefill tuner.
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda_ops.h"

namespace spear::kernels::cuda {

absl::StatusOr<cudaGraphExec_t> CaptureGraph(cudaStream_t stream,
                                             absl::FunctionRef<absl::Status()> enqueue) {
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const absl::Status enq = enqueue();
  cudaGraph_t graph = nullptr;
  // Always ended, so that a failed enqueue leaves the stream usable.
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (!enq.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return enq;
  }
  SPEAR_CUDA_RETURN_IF_ERROR(end);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  SPEAR_CUDA_RETURN_IF_ERROR(inst);
  return exec;
}

}  // namespace spear::kernels::cuda
