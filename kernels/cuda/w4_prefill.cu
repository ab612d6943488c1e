// The prefill path (m >= kPrefillM): dequantize W from the GPU layout into
// an fp16 scratch [n][kp] (same fp16 arithmetic as the decode kernel, so the
// two paths see identical weights), then cuBLAS (fp16 in, fp32 accumulate).
// The EC through cuBLAS too: U = x A^T and the row-wise gate (on a second
// stream, overlapped with the dequantization and the main GEMM, which need
// only x, for large GEMMs; W4CudaParams::prefill_ec_stream), then y += V
// B^T on the caller's stream after both.
// The main GEMM runs instead on a wgmma kernel straight from the W4 layout
// (w4_prefill_wgmma.cu) where the caller forces it or TunePrefill measured
// it faster for the weight's shape and m (PrefillChoice below; gpu.md, v34).
#include "kernels/cuda/cublas_loader.h"
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/w4_layout.h"

#define SPEAR_CUBLAS_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                       \
    const cublasStatus_t spear_cublas_st_ = (expr);                                          \
    if (spear_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                         \
      return absl::InternalError(absl::StrCat(#expr, " failed at ", __FILE__, ":", __LINE__, \
                                              ": cublas status ",                            \
                                              static_cast<int>(spear_cublas_st_)));          \
    }                                                                                        \
  } while (0)

namespace spear::kernels::cuda {
namespace {

constexpr int kRow = kStageK + 8;

// One block per (64-column tile, 128-deep k stage): 256 threads, thread
// (step s, lane l) decodes its 16-byte code load into smem, then the block
// writes 64 rows of 256 bytes.
__global__ void __launch_bounds__(256) DequantKernel(const uint4* __restrict__ qw,
                                                     const uint32_t* __restrict__ sz, int n,
                                                     int ksteps, int ngroups, int group,
                                                     long long kp, __half* __restrict__ wh) {
  __shared__ __align__(16) __half tile_s[kTileN * kRow];
  const int tile = blockIdx.x, ks = blockIdx.y;
  const int s = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const uint4 wq = qw[(static_cast<size_t>(tile) * ksteps + ks * 8 + s) * 32 + lane];
  const int g = min((ks * kStageK + s * 16) / group, ngroups - 1);
  const uint32_t* scp = sz + (static_cast<size_t>(tile) * ngroups + g) * kTileN + gid * 8;
  const __half2 k960 = __float2half2_rn(960.f), k16th = __float2half2_rn(1.f / 16.f);
  const uint32_t wv[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    uint32_t w = wv[p];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * p + h;
      uint32_t szw = scp[j];
      const __half2 sz2 = *reinterpret_cast<__half2*>(&szw);
      const __half2 s2 = __low2half2(sz2), zz = __high2half2(sz2);
      uint32_t lo = (w & 0x000f000fu) | 0x64006400u, hi = (w & 0x00f000f0u) | 0x64006400u;
      const __half2 b0 = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&lo), zz), s2);
      const __half2 b1 =
          __hmul2(__hfma2(*reinterpret_cast<__half2*>(&hi), k16th, __hneg2(__hsub2(zz, k960))), s2);
      w >>= 8;
      const int col = j * 8 + gid, kk = s * 16 + 2 * tig;
      *reinterpret_cast<__half2*>(&tile_s[col * kRow + kk]) = b0;
      *reinterpret_cast<__half2*>(&tile_s[col * kRow + kk + 8]) = b1;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTileN * 16; i += 256) {
    const int row = i >> 4, c = i & 15;
    const int col = tile * kTileN + row;
    if (col < n) {
      reinterpret_cast<uint4*>(wh + col * kp + ks * kStageK)[c] =
          reinterpret_cast<const uint4*>(&tile_s[row * kRow])[c];
    }
  }
}

__global__ void AddBiasKernel(const float* __restrict__ bias, int m, int n, float* y32,
                              __half* y16, long long ldy) {
  const long long idx = blockIdx.x * 256LL + threadIdx.x;
  if (idx >= static_cast<long long>(m) * n) return;
  const long long i = idx / n, c = idx % n;
  if (y32 != nullptr) {
    y32[i * ldy + c] += bias[c];
  } else {
    y16[i * ldy + c] = __float2half_rn(__half2float(y16[i * ldy + c]) + bias[c]);
  }
}

}  // namespace

namespace {
// 32-bit integer hash (lowbias32, a public-domain mixer): good enough to
// make timing inputs look random to the hardware.
__device__ __forceinline__ uint32_t Mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352du;
  v ^= v >> 15;
  v *= 0x846ca68bu;
  v ^= v >> 16;
  return v;
}
__global__ void FillNormalKernel(__half* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint32_t h1 = Mix32(static_cast<uint32_t>(i) ^ seed ^ static_cast<uint32_t>(i >> 32) * 0x9e3779b9u);
    const uint32_t h2 = Mix32(h1 ^ 0x85ebca6bu);
    const float u1 = (static_cast<float>(h1 >> 8) + 1.f) * (1.f / 16777216.f);  // (0, 1]
    const float u2 = static_cast<float>(h2 >> 8) * (1.f / 16777216.f);
    x[i] = __float2half_rn(sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));  // Box-Muller
  }
}
}  // namespace

absl::Status LaunchFillNormal(uint16_t* x, size_t n, uint32_t seed, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>((n + 255) / 256, 4096));
  FillNormalKernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<__half*>(x), n, seed);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchDequantW(const W4DeviceWeight::Impl& w, uint16_t* wh, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(w.ntiles), static_cast<unsigned>(w.nks));
  DequantKernel<<<grid, 256, 0, stream>>>(reinterpret_cast<const uint4*>(w.qw), w.sz,
                                          static_cast<int>(w.n), static_cast<int>(w.ksteps),
                                          static_cast<int>(w.ngroups), static_cast<int>(w.group),
                                          w.kp, reinterpret_cast<__half*>(wh));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchAddBias(const float* bias, int64_t m, int64_t n, float* y32, uint16_t* y16,
                           int64_t ldy, cudaStream_t stream) {
  const long long total = m * n;
  if (total == 0) return absl::OkStatus();
  AddBiasKernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      bias, static_cast<int>(m), static_cast<int>(n), y32, reinterpret_cast<__half*>(y16), ldy);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// The main GEMM's kernel: 0 dequantize + cuBLAS, else the wgmma kernel's
// token tile (128 or 256; v44: 64, 32 or 16) of `kernel`
// (W4CudaParams::prefill_kernel).
static int PrefillWgmmaTokens(int kernel) {
  switch (kernel & 15) {
    case 2: return 128;
    case 3: return 256;
    case 4: return 64;
    case 5: return 32;
    case 6: return 16;
    default: return 0;
  }
}

// The main GEMM's kernel and k splits for this call: what the caller forces
// (LaunchPrefillWgmma reports what it cannot run), else the weight's
// measured choice for m (TunePrefill, v34) where the wgmma kernels can run
// it, with its splits as a preference (-splits: unsplit where they do not
// fit this m), else dequantize + cuBLAS ({1, 0}). Without a measurement the
// dequantizing path is the default: the wgmma kernels win or lose by shape
// and m (docs/results/gpu.md, v34).
static std::pair<int, int> PrefillChoice(const W4DeviceWeight& w, const W4CudaParams& p,
                                         const uint16_t* x, int64_t ldx) {
  if (p.prefill_kernel != 0 || p.prefill_splits != 0) return {p.prefill_kernel, p.prefill_splits};
  const W4DeviceWeight::PrefillTuning t = w.prefill_tuning(p.m);
  if (t.kernel == 0 || w.impl().k % 8 != 0 || ldx % 8 != 0 ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0 || !PrefillWgmmaAvailable()) {
    return {1, 0};
  }
  return {t.kernel, -std::max(t.splits, 1)};
}

absl::Status RunPrefill(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws,
                        cudaStream_t stream) {
  const auto& d = w.impl();
  if (absl::Status st = ws->Reserve(w, p.m); !st.ok()) return st;
  auto& s = ws->impl();
  const bool ec = p.use_ec && d.r > 0;
  const int n = static_cast<int>(d.n), m = static_cast<int>(p.m), k = static_cast<int>(d.k);
  const float one = 1.f, zero = 0.f;
  // The EC's first half on a second stream when the GEMM is large enough
  // for the overlap to pay (W4CudaParams::prefill_ec_stream).
  // v44e: at decode-sized m (the small token tiles, inside the decode
  // step's graph, where the fork and join are graph edges) always.
  const bool overlap =
      ec && (p.prefill_ec_stream == 2 ||
             (p.prefill_ec_stream == 0 &&
              (d.n * d.k >= (int64_t{32} << 20) || p.m < kPrefillM)));
  if (ec) {
    // U = x A^T and the gate: forked onto the EC stream (overlap), or first
    // on the caller's. The EC stream always records ec_join, so a failure
    // here still leaves the fork joinable (a capture in progress must end
    // joined).
    const int r = static_cast<int>(d.r), rp = static_cast<int>(d.rp);
    cudaStream_t es = overlap ? s.ec_stream : stream;
    cublasHandle_t eh = overlap ? s.cublas_ec : s.cublas;
    if (overlap) {
      SPEAR_CUDA_RETURN_IF_ERROR(cudaEventRecord(s.ec_fork, stream));
      SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(s.ec_stream, s.ec_fork, 0));
    }
    // An int8 A is unpacked first (fp16 [r][k] in the workspace).
    const absl::Status ua = d.ec_a8 != nullptr ? LaunchEcUnpackA(d, s.ea, es) : absl::OkStatus();
    const uint16_t* a16 = d.ec_a8 != nullptr ? s.ea : d.ec_a;
    cublasStatus_t bs = ua.ok() ? blas::SetStream(eh, es) : CUBLAS_STATUS_EXECUTION_FAILED;
    if (bs == CUBLAS_STATUS_SUCCESS) {
      bs = blas::GemmEx(eh, CUBLAS_OP_T, CUBLAS_OP_N, r, m, k, &one, a16, CUDA_R_16F, k, p.x,
                        CUDA_R_16F, static_cast<int>(p.ldx), &zero, s.pu, CUDA_R_32F, r,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    // (initialized, not assigned: nvcc 13 warns on the discarded Status&
    // of an assignment)
    const absl::Status st =
        !ua.ok() ? ua
        : bs != CUBLAS_STATUS_SUCCESS
            ? absl::InternalError(absl::StrCat("prefill EC: cublas U = x A^T failed: status ",
                                               static_cast<int>(bs)))
            : LaunchEcGateRows(d, s.pu, p.m, s.pv, rp, p.gate_out, p.gate_ld, es);
    // B unpacked beside U (it does not depend on x) for y += V B^T below.
    const absl::Status unpacked = st.ok() ? LaunchEcUnpackB(d, s.eb, es) : st;
    if (overlap) {
      SPEAR_CUDA_RETURN_IF_ERROR(cudaEventRecord(s.ec_join, s.ec_stream));
      if (!unpacked.ok()) (void)cudaStreamWaitEvent(stream, s.ec_join, 0);
    }
    if (!unpacked.ok()) return unpacked;
  }
  auto join = [&] {
    if (overlap) (void)cudaStreamWaitEvent(stream, s.ec_join, 0);
  };
  absl::Status main = [&]() -> absl::Status {
    const uint16_t* x = p.x;
    int64_t ldx = p.ldx;
    if (d.act_scale != nullptr) {
      if (absl::Status st = LaunchPrepareX(p.x, p.m, p.ldx, d.k, d.act_scale, s.pxs, d.kp, stream);
          !st.ok()) {
        return st;
      }
      x = s.pxs;
      ldx = d.kp;
    }
    const float beta = p.accumulate ? 1.f : 0.f;
    void* y = p.y_f32 != nullptr ? static_cast<void*>(p.y_f32) : static_cast<void*>(p.y_f16);
    const cudaDataType_t yt = p.y_f32 != nullptr ? CUDA_R_32F : CUDA_R_16F;
    // (the handle serves the EC's y += V B^T below as well)
    SPEAR_CUBLAS_RETURN_IF_ERROR(blas::SetStream(s.cublas, stream));
    const auto [kernel, splits] = PrefillChoice(w, p, x, ldx);
    const int tokens = PrefillWgmmaTokens(kernel);
    if (tokens > 0) {
      // Bias in the kernel's epilogue.
      if (absl::Status st = LaunchPrefillWgmma(d, x, p.m, ldx, p.bias, p.y_f32, p.y_f16, p.ldy,
                                               p.accumulate, tokens, stream,
                                               kernel & (96 | 128 | 256 | 512 | 1024), s, splits);
          !st.ok()) {
        return st;
      }
    } else {
      if (absl::Status st = LaunchDequantW(d, s.wh, stream); !st.ok()) return st;
      SPEAR_CUBLAS_RETURN_IF_ERROR(blas::GemmEx(s.cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one,
                                                s.wh, CUDA_R_16F, static_cast<int>(d.kp), x,
                                                CUDA_R_16F, static_cast<int>(ldx), &beta, y, yt,
                                                static_cast<int>(p.ldy), CUBLAS_COMPUTE_32F,
                                                CUBLAS_GEMM_DEFAULT));
    }
    if (p.bias != nullptr && tokens == 0) {
      if (absl::Status st = LaunchAddBias(p.bias, p.m, d.n, p.y_f32, p.y_f16, p.ldy, stream);
          !st.ok()) {
        return st;
      }
    }
    if (ec) {
      // Join, then y += V B^T after the GEMM wrote y.
      if (overlap) SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, s.ec_join, 0));
      const int r = static_cast<int>(d.r), rp = static_cast<int>(d.rp);
      SPEAR_CUBLAS_RETURN_IF_ERROR(blas::GemmEx(s.cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, r, &one,
                                                s.eb, CUDA_R_16F, r, s.pv, CUDA_R_16F, rp, &one,
                                                y, yt, static_cast<int>(p.ldy), CUBLAS_COMPUTE_32F,
                                                CUBLAS_GEMM_DEFAULT));
    }
    return absl::OkStatus();
  }();
  if (!main.ok()) join();  // (a no-op when the join above already ran)
  return main;
}

}  // namespace spear::kernels::cuda
