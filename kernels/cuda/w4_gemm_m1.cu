// Decode GEMM instantiation for 1..16 rows (see w4_gemm_kernel.cuh).
#include "kernels/cuda/w4_gemm_kernel.cuh"

namespace spear::kernels::cuda {
absl::Status LaunchDecodeM1(DecodeArgs a, int num_sms, cudaStream_t stream) {
  return decode::Launch<1, 1, 4, 4, 16>(a, num_sms, stream);
}
}  // namespace spear::kernels::cuda
