// Decode GEMM instantiations for 1..16 rows (see w4_gemm_kernel.cuh).
#include "kernels/cuda/w4_gemm_kernel.cuh"

namespace spear::kernels::cuda {
absl::Status LaunchDecodeM1(DecodeArgs a, int num_sms, cudaStream_t stream) {
  // 128-column tile groups (8 k16 steps per warp per stage: the per-stage
  // overhead amortized twice as far) when there are enough units to fill
  // the SMs four times over; 64-column groups otherwise. Measured on the
  // H200: 8B gate_up M=1 38.0 us vs 46.3 us; 8B o unchanged (12.1 us).
  const int nst = (a.nks + 3) / 4;
  if ((a.ntiles + 1) / 2 * nst >= 4 * num_sms) {
    return decode::Launch<1, 2, 4, 3, 8>(a, num_sms, stream);
  }
  return decode::Launch<1, 1, 4, 5, 8>(a, num_sms, stream);
}
}  // namespace spear::kernels::cuda
