// W4Linear on CUDA: parameter checks and dispatch by m (w4_cuda.h), the
// decode path (x preparation when needed, EC prologue, decode GEMM per 64
// rows) and the x / act_scale preparation kernel.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/w4_layout.h"

namespace spear::kernels::cuda {

absl::Status LaunchDecodeM1(DecodeArgs a, int num_sms, cudaStream_t stream);
absl::Status LaunchDecodeM2(DecodeArgs a, int num_sms, cudaStream_t stream);
absl::Status LaunchDecodeM3(DecodeArgs a, int num_sms, cudaStream_t stream);
absl::Status LaunchDecodeM4(DecodeArgs a, int num_sms, cudaStream_t stream);
absl::Status LaunchDecodeSwap(DecodeArgs a, int num_sms, cudaStream_t stream);

absl::Status LaunchDecode(int mt, DecodeArgs a, int num_sms, cudaStream_t stream) {
  switch (mt) {
    case 1: return LaunchDecodeM1(a, num_sms, stream);
    case 2: return LaunchDecodeM2(a, num_sms, stream);
    case 3: return LaunchDecodeM3(a, num_sms, stream);
    case 4: return LaunchDecodeM4(a, num_sms, stream);
    default: return absl::InternalError(absl::StrCat("LaunchDecode: mt=", mt));
  }
}

namespace {

// xs[i, c] = x[i, c] / act_scale[c] (or x) for c < k, 0 for k <= c < ldxs.
__global__ void PrepareXKernel(const __half* __restrict__ x, long long ldx, int k,
                               const float* __restrict__ act_scale, __half* __restrict__ xs,
                               long long ldxs) {
  const int row = blockIdx.y;
  for (long long c = blockIdx.x * 256LL + threadIdx.x; c < ldxs; c += 256LL * gridDim.x) {
    float v = 0.f;
    if (c < k) {
      v = __half2float(x[row * ldx + c]);
      if (act_scale != nullptr) v /= act_scale[c];
    }
    xs[row * ldxs + c] = __float2half_rn(v);
  }
}

absl::Status Bad(const std::string& s) {
  return absl::InvalidArgumentError(absl::StrCat("cuda::W4Linear: ", s));
}

}  // namespace

absl::Status LaunchPrepareX(const uint16_t* x, int64_t m, int64_t ldx, int64_t k,
                            const float* act_scale, uint16_t* xs, int64_t ldxs,
                            cudaStream_t stream) {
  if (m == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>((ldxs + 255) / 256 < 64 ? (ldxs + 255) / 256 : 64),
                  static_cast<unsigned>(m));
  PrepareXKernel<<<grid, 256, 0, stream>>>(reinterpret_cast<const __half*>(x), ldx,
                                           static_cast<int>(k), act_scale,
                                           reinterpret_cast<__half*>(xs), ldxs);
  SPEAR_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

namespace {

absl::Status RunProducer(const W4XProducer& prod, cudaStream_t stream) {
  return prod.kind == W4XProducer::Kind::kRmsNorm ? RmsNormF16(prod.norm, stream)
                                                  : SiluMul(prod.silu, stream);
}

// prod (v31, W4LinearProduced): x's producer, run first: in one launch with
// the EC prologue where the fold kernel runs the EC (*fused), else on its own.
absl::Status RunDecode(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws,
                       cudaStream_t stream, const W4XProducer* prod = nullptr,
                       bool* fused = nullptr) {
  const auto& d = w.impl();
  auto& s = ws->impl();
  const bool ec = p.use_ec && d.r > 0;
  const bool need_x = d.act_scale != nullptr || d.k % 8 != 0 || p.ldx % 8 != 0 ||
                      reinterpret_cast<uintptr_t>(p.x) % 16 != 0;
  if (need_x && s.xs_elems < kDecodeMaxM * d.kp) {
    if (absl::Status st = ws->Reserve(w, 0); !st.ok()) return st;
  }
  if (prod != nullptr &&
      (need_x || !ec || p.m > 16 || (p.ec_prologue & ~(64 | 128 | 256 | 512 | 1024 | 2048)) != 0)) {
    // x is read before the EC's launch point (need_x), or there is no fused
    // form for this call.
    if (absl::Status st = RunProducer(*prod, stream); !st.ok()) return st;
    prod = nullptr;
  }
  for (int64_t r0 = 0; r0 < p.m; r0 += kDecodeMaxM) {
    const int64_t mc = p.m - r0 < kDecodeMaxM ? p.m - r0 : kDecodeMaxM;
    const uint16_t* x = p.x + r0 * p.ldx;
    DecodeArgs a{};
    a.qw = d.qw;
    a.sz = d.sz;
    a.ntiles = static_cast<int>(d.ntiles);
    a.ksteps = static_cast<int>(d.ksteps);
    a.nks = static_cast<int>(d.nks);
    a.ngroups = static_cast<int>(d.ngroups);
    a.gshift = 30;
    if (d.group < d.k) {
      a.gshift = 0;
      while ((int64_t{1} << a.gshift) < d.group) ++a.gshift;
    }
    a.m = static_cast<int>(mc);
    a.k = static_cast<int>(d.k);
    a.n = static_cast<int>(d.n);
    if (need_x) {
      if (absl::Status st = LaunchPrepareX(x, mc, p.ldx, d.k, d.act_scale, s.xs, d.kp, stream);
          !st.ok()) {
        return st;
      }
      a.x = s.xs;
      a.ldx = d.kp;
    } else {
      a.x = x;
      a.ldx = p.ldx;
    }
    a.bias = p.bias;
    a.y32 = p.y_f32 != nullptr ? p.y_f32 + r0 * p.ldy : nullptr;
    a.y16 = p.y_f16 != nullptr ? p.y_f16 + r0 * p.ldy : nullptr;
    a.ldy = p.ldy;
    a.accumulate = p.accumulate ? 1 : 0;
    static const int debug = [] {
      const char* e = std::getenv("SPEAR_W4_DEBUG");
      return e ? std::atoi(e) : 0;
    }();
    a.debug = debug;
    // decode_kernel's low 4 bits pick the kernel; 16 and 32 are fold-only
    // flags (the L2 prefetch off / in every block; W4CudaParams), passed on
    // only when the fold kernel runs.
    // v23: a measured configuration (TuneDecode) where the caller forces none.
    int decode_kernel = p.decode_kernel, splits = p.decode_splits, depth = p.decode_depth;
    if (decode_kernel == 0 && splits == 0 && depth == 0) {
      const W4DeviceWeight::DecodeTuning t = w.decode_tuning(mc);
      if (t.warps > 0) {
        decode_kernel = t.warps == 4 ? 4 : 5;
        splits = t.splits;
        depth = t.depth;
      }
    }
    const int dk = decode_kernel & 15;
    a.variant = dk;
    a.partials = s.partials;
    a.counters = s.counters;
    const bool fold = mc <= 16 && (dk >= 4 || (dk == 0 && FoldPreferred(a, s.num_sms))) &&
                      FoldSupported(a);
    const bool swap = mc <= 16 && dk != 1;
    if (dk == 3) a.variant = 0;  // the v8 ring kernel, forced
    if (fold) a.variant = decode_kernel;
    float* gate_out = p.gate_out ? p.gate_out + r0 * (p.gate_ld > 0 ? p.gate_ld : d.r) : nullptr;
    bool produced = false;  // v31: x's producer and the prologue in one launch
    if (prod != nullptr) {
      if (fold) {
        if (absl::Status st = LaunchEcFused(d, *prod, mc, s, gate_out, p.gate_ld, stream,
                                            &produced, &a.xready_target, p.ec_prologue);
            !st.ok()) {
          return st;
        }
        // ec_prologue 512 (measurement): the fold kernel waits for the whole
        // launch before reading x (v24's order) instead of the x count.
        if (produced && (p.ec_prologue & 512) == 0) a.xready = s.xready;
      }
      if (!produced) {
        if (absl::Status st = RunProducer(*prod, stream); !st.ok()) return st;
      }
      if (fused != nullptr) *fused = produced;
      prod = nullptr;
    }
    if (ec) {
      // ec_prologue flags 4 / 8 (benchmarks only): no prologue (v left from
      // the last call) / the prologue without the epilogue.
      if ((p.ec_prologue & 4) == 0 && !produced) {
        // Under PDL before the fold kernel (M <= 16; v14, -0.04 ms on the 8B
        // step in three calls); a plain launch before the others (v12: PDL
        // was slower there at M >= 8) or with ec_prologue flag 2.
        if (absl::Status st = LaunchEcPrologue(
                d, x, mc, p.ldx, s, s.v, d.rp, nullptr, gate_out, p.gate_ld, stream,
                p.ec_prologue & (1 | 64 | 128),
                fold && (p.ec_prologue & 2) == 0);
            !st.ok()) {
          return st;
        }
      }
      if ((p.ec_prologue & 8) == 0) {
        a.ecb = d.ec_bfrag;
        a.esteps = static_cast<int>(d.rp / 16);
        a.v = s.v;
        a.ldv = static_cast<int>(d.rp);
        a.ec_late = produced && (p.ec_prologue & 512) != 0 ? 0 : 1;
      }
    }
    if (absl::Status st =
            fold   ? LaunchDecodeFold(a, s.num_sms, splits, depth, stream)
            : swap ? LaunchDecodeSwap(a, s.num_sms, stream)
                   : LaunchDecode(static_cast<int>((mc + 15) / 16), a, s.num_sms, stream);
        !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// W4Linear's parameter checks (OK for m == 0: nothing to run).
absl::Status CheckParams(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws) {
  const auto& d = w.impl();
  if (ws == nullptr) return Bad("workspace is null");
  if (p.m < 0 || p.m > (int64_t{1} << 30)) return Bad(absl::StrCat("bad m=", p.m));
  if (p.m == 0) return absl::OkStatus();
  if (p.x == nullptr) return Bad("x is null");
  if ((p.y_f32 == nullptr) == (p.y_f16 == nullptr)) return Bad("need exactly one of y_f32, y_f16");
  if (p.ldx < d.k || p.ldy < d.n) {
    return Bad(absl::StrCat("strides ldx=", p.ldx, " ldy=", p.ldy, " below k=", d.k, " / n=", d.n));
  }
  if (p.force_decode && p.force_prefill) return Bad("force_decode and force_prefill");
  if (p.prefill_ec_stream < 0 || p.prefill_ec_stream > 2) {
    return Bad(absl::StrCat("prefill_ec_stream ", p.prefill_ec_stream, ": 0, 1 or 2"));
  }
  if (p.prefill_kernel < 0 || (p.prefill_kernel & ~(15 | 96)) != 0 ||
      (p.prefill_kernel & 15) > 3 || (p.prefill_kernel >= 16 && (p.prefill_kernel & 15) < 2) ||
      (p.prefill_kernel & 96) == 96) {
    return Bad(absl::StrCat("prefill_kernel ", p.prefill_kernel,
                            ": 0..3, or 2 / 3 + flag 32 or 64"));
  }
  if (p.gate_ld != 0 && p.gate_ld < d.r) {
    return Bad(absl::StrCat("gate_ld ", p.gate_ld, " below the EC rank ", d.r));
  }
  if (p.ec_prologue < 0 || (p.ec_prologue & ~(15 | 64 | 128 | 256 | 512 | 1024 | 2048)) != 0 ||
      (p.ec_prologue & 12) == 12) {
    return Bad(absl::StrCat("ec_prologue ", p.ec_prologue,
                            ": flags 1, 2, 64, 128, 256, 512, 1024, 2048 and one of 4 / 8 only"));
  }
  if (p.decode_kernel < 0 || (p.decode_kernel & 15) > 5) {
    // 6 was the fold kernel's bulk-copy ring: removed (it raced and measured
    // no faster than the cp.async ring; docs/results/gpu.md).
    return Bad(absl::StrCat("decode_kernel ", p.decode_kernel, ": kernel ", p.decode_kernel & 15,
                            " unknown (0..5; 6, the fold kernel's bulk-copy ring, was removed)"));
  }
  if (static_cast<size_t>(d.ntiles) > static_cast<size_t>(ws->impl().ncounters)) {
    return Bad("n too large for the workspace counters");
  }
  return absl::OkStatus();
}

bool Prefill(const W4CudaParams& p) {
  return p.force_prefill || (!p.force_decode && p.m >= kPrefillM);
}

}  // namespace

absl::Status W4Linear(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws,
                      cudaStream_t stream) {
  if (absl::Status st = CheckParams(w, p, ws); !st.ok() || p.m == 0) return st;
  if ((p.ec_prologue & (256 | 512 | 1024 | 2048)) != 0) {
    return Bad(absl::StrCat("ec_prologue ", p.ec_prologue,
                            ": flags 256, 512, 1024 and 2048 apply to W4LinearProduced only"));
  }
  if (Prefill(p)) return RunPrefill(w, p, ws, stream);
  return RunDecode(w, p, ws, stream);
}

absl::Status W4LinearProduced(const W4DeviceWeight& w, const W4XProducer& prod,
                              const W4CudaParams& p, W4Workspace* ws, cudaStream_t stream,
                              bool* fused) {
  if (fused != nullptr) *fused = false;
  if (absl::Status st = CheckParams(w, p, ws); !st.ok()) return st;
  const bool norm = prod.kind == W4XProducer::Kind::kRmsNorm;
  if (!norm && prod.kind != W4XProducer::Kind::kSiluMul) return Bad("unknown producer kind");
  const uint16_t* y = norm ? prod.norm.y : prod.silu.y;
  const int64_t ldy = norm ? prod.norm.ldy : prod.silu.ldy, m = norm ? prod.norm.m : prod.silu.m;
  if (norm) {
    const RmsNormF16Params& n = prod.norm;
    if (n.x == nullptr || n.weight == nullptr || n.d <= 0 || n.ldx < n.d || n.ldy < n.d ||
        (n.residual != nullptr && n.ldr < n.d) || !(n.eps >= 0.f)) {
      return Bad("invalid RMSNorm producer parameters");
    }
  } else {
    const SiluMulF16Params& q = prod.silu;
    if (q.gate == nullptr || q.up == nullptr || q.n <= 0 || q.ld_gate < q.n || q.ld_up < q.n ||
        q.ldy < q.n) {
      return Bad("invalid SwiGLU producer parameters");
    }
  }
  if (y != p.x || ldy != p.ldx || m != p.m) {
    return Bad(absl::StrCat("the producer's output (y ", y == p.x ? "== x" : "!= x", ", ldy ", ldy,
                            ", m ", m, ") is not the GEMM's x (ldx ", p.ldx, ", m ", p.m, ")"));
  }
  if (p.m == 0) return RunProducer(prod, stream);
  if (Prefill(p)) {
    if (absl::Status st = RunProducer(prod, stream); !st.ok()) return st;
    return RunPrefill(w, p, ws, stream);
  }
  return RunDecode(w, p, ws, stream, &prod, fused);
}

absl::Status EcGate(const W4DeviceWeight& w, const uint16_t* x, int64_t m, int64_t ldx, float* v,
                    W4Workspace* ws, cudaStream_t stream) {
  const auto& d = w.impl();
  if (d.r == 0 || x == nullptr || v == nullptr || ws == nullptr || m < 0 || ldx < d.k) {
    return absl::InvalidArgumentError("cuda::EcGate: bad parameters or no EC");
  }
  auto& s = ws->impl();
  for (int64_t r0 = 0; r0 < m; r0 += kDecodeMaxM) {
    const int64_t mc = m - r0 < kDecodeMaxM ? m - r0 : kDecodeMaxM;
    if (absl::Status st = LaunchEcPrologue(d, x + r0 * ldx, mc, ldx, s, s.v, d.rp, v + r0 * d.r,
                                           nullptr, 0, stream);
        !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace spear::kernels::cuda
