// Decode GEMM instantiation for 17..32 rows (see w4_gemm_kernel.cuh).
#include "kernels/cuda/w4_gemm_kernel.cuh"

namespace spear::kernels::cuda {
absl::Status LaunchDecodeM2(DecodeArgs a, int num_sms, cudaStream_t stream) {
  return decode::Launch<2, 2, 2, 4, 8>(a, num_sms, stream);
}
}  // namespace spear::kernels::cuda
