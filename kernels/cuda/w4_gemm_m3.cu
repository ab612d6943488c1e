// Decode GEMM instantiation for 33..48 rows (see w4_gemm_kernel.cuh).
#include "kernels/cuda/w4_gemm_kernel.cuh"

namespace spear::kernels::cuda {
absl::Status LaunchDecodeM3(DecodeArgs a, int num_sms, cudaStream_t stream) {
  return decode::Launch<3, 4, 1, 4, 8>(a, num_sms, stream);
}
}  // namespace spear::kernels::cuda
