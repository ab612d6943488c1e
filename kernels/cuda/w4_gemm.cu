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
#include "kernels/cuda_ops.h"

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

// v49: x = RMSNorm(h) by RmsNormF16 into norm_x_out (the call's x after it).
absl::Status NormApart(const W4CudaParams& p, int64_t k, bool early, cudaStream_t stream) {
  RmsNormF16Params n;
  n.x = p.norm_h;
  n.weight = p.norm_weight;
  n.y = p.norm_x_out;
  n.m = p.m;
  n.d = k;
  n.ldx = p.norm_ld;
  n.ldy = p.ldx;
  n.eps = p.norm_eps;
  n.early_trigger = early;
  return RmsNormF16(n, stream);
}

bool Aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

// v51: x = SiluMul(gate, up) of swiglu_gu's rows into swiglu_x_out (the
// call's x after it).
absl::Status SwigluApart(const W4CudaParams& p, int64_t k, bool early, cudaStream_t stream) {
  SiluMulF16Params s;
  s.gate = p.swiglu_gu;
  s.up = p.swiglu_gu + k;
  s.y = p.swiglu_x_out;
  s.m = p.m;
  s.n = k;
  s.ld_gate = s.ld_up = p.swiglu_ld;
  s.ldy = p.ldx;
  s.early_trigger = early;
  return SiluMul(s, stream);
}

// x's producer (the norm or the SwiGLU of W4CudaParams) as its own launch.
absl::Status XApart(const W4CudaParams& p, int64_t k, bool early, cudaStream_t stream) {
  return p.norm_h != nullptr ? NormApart(p, k, early, stream) : SwigluApart(p, k, early, stream);
}

// The same call with x = the producer's output (norm_x_out / swiglu_x_out)
// after XApart wrote it.
W4CudaParams WithXApart(const W4CudaParams& p) {
  W4CudaParams q = p;
  if (p.norm_h != nullptr) {
    q.x = p.norm_x_out;
    q.norm_h = nullptr;
  } else {
    q.x = p.swiglu_x_out;
    q.swiglu_gu = nullptr;
  }
  return q;
}

// v49: whether RunDecode's kernels compute x = RMSNorm(h) themselves: one
// row on the fold kernel (not forced elsewhere: m = 1 always picks it
// otherwise) with the row in 4 float4 pieces per thread of 256, and the
// EC's prologue, where it runs, in its one-cluster form.
// v51: the same for x = SiluMul(gate_up row) (no k bound: no row sum), but
// only where the GEMM has an EC: before a GEMM without one the SiluMul
// launch triggers the GEMM early and cost the 8B step less (docs/results/
// gpu.md, v51: in the kernels +0.02 ms without ECs, -0.035 ms with them).
bool XInKernels(const W4DeviceWeight& w, const W4CudaParams& p, bool ec) {
  const auto& d = w.impl();
  if (p.m != 1 || d.act_scale != nullptr || d.k % 8 != 0) return false;
  if (p.norm_h != nullptr &&
      (d.k > 4096 || p.norm_ld % 4 != 0 || !Aligned16(p.norm_h) || !Aligned16(p.norm_weight))) {
    return false;
  }
  if (p.swiglu_gu != nullptr && (!ec || p.swiglu_ld % 8 != 0 || !Aligned16(p.swiglu_gu))) {
    return false;
  }
  int dk = p.decode_kernel & 15;
  if (dk == 0 && p.decode_splits == 0 && p.decode_depth == 0) {
    const W4DeviceWeight::DecodeTuning t = w.decode_tuning(1);
    if (t.warps > 0) dk = 4;
  }
  if (dk >= 1 && dk <= 3) return false;  // not the fold kernel
  if (ec && (p.ec_prologue & 4) == 0 &&
      !EcPrologueIsCluster(d, 1, p.ec_prologue & kEcPrologueFlags & ~kEcClusterFormFlags,
                           (p.ec_prologue & 2) == 0)) {
    return false;
  }
  return true;
}

absl::Status RunDecode(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws,
                       cudaStream_t stream) {
  const auto& d = w.impl();
  auto& s = ws->impl();
  const bool ec = p.use_ec && d.r > 0;
  if ((p.norm_h != nullptr || p.swiglu_gu != nullptr) && !XInKernels(w, p, ec)) {
    if (absl::Status st = XApart(p, d.k, !ec, stream); !st.ok()) return st;
    return RunDecode(w, WithXApart(p), ws, stream);
  }
  const bool norm = p.norm_h != nullptr;      // (then one row, the fold kernel)
  const bool swiglu = p.swiglu_gu != nullptr;  // (likewise; v51)
  const bool need_x = !norm && !swiglu &&
                      (d.act_scale != nullptr || d.k % 8 != 0 || p.ldx % 8 != 0 ||
                       reinterpret_cast<uintptr_t>(p.x) % 16 != 0);
  if (need_x && s.xs_elems < kDecodeMaxM * d.kp) {
    if (absl::Status st = ws->Reserve(w, 0); !st.ok()) return st;
  }
  // v43: 33..63 rows as launches of <= 32 rows (the fold kernel's four
  // token tiles, each launch streaming the weights once), not one launch of
  // the x-as-m16 kernel, unless a kernel other than the fold kernel is forced
  // (v44: reached at 17..63 rows only where W4Linear's small tiles cannot run,
  // are off, or the GEMM has an EC at <= 32 rows).
  const int dk_forced = p.decode_kernel & 15;
  const int64_t chunk =
      p.m > 32 && p.m < kDecodeMaxM && (dk_forced == 0 || dk_forced >= 4) ? 32 : kDecodeMaxM;
  for (int64_t r0 = 0; r0 < p.m; r0 += chunk) {
    const int64_t mc = p.m - r0 < chunk ? p.m - r0 : chunk;
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
        // v41: the warp groups of a measured pick as the forced flags.
        const int gflag = t.groups == 2 ? 256 : t.groups == 4 ? 512 : t.groups == 8 ? 768 : 0;
        if ((t.warps != 4 && t.warps != 8) || (t.groups > 1 && (gflag == 0 || t.groups > t.warps))) {
          return absl::InvalidArgumentError(
              absl::StrCat("W4Linear: the weight's decode tuning for m = ", mc, " (warps ", t.warps,
                           ", groups ", t.groups, ") is not a fold configuration"));
        }
        decode_kernel = (t.warps == 4 ? 4 : 5) | gflag;
        splits = t.splits;
        depth = t.depth;
      }
    }
    const int dk = decode_kernel & 15;
    a.variant = dk;
    a.partials = s.partials;
    a.counters = s.counters;
    const bool fold = mc <= 32 && (dk >= 4 || (dk == 0 && FoldPreferred(a, s.num_sms))) &&
                      FoldSupported(a);
    const bool swap = mc <= 16 && dk != 1;
    if (dk == 3) a.variant = 0;  // the v8 ring kernel, forced
    if (fold) a.variant = decode_kernel;
    if ((norm || swiglu) && !fold) {
      // Not expected (one row picks the fold kernel unless another is
      // forced, which XInKernels saw); safe all the same: nothing is launched
      // yet (one row: the first and only chunk), so x is computed apart.
      if (absl::Status st = XApart(p, d.k, !ec, stream); !st.ok()) return st;
      return RunDecode(w, WithXApart(p), ws, stream);
    }
    if (norm) a.norm = RowNorm{p.norm_h, p.norm_weight, p.norm_eps};
    if (swiglu) a.swiglu = RowSwiglu{p.swiglu_gu};
    if (ec) {
      // ec_prologue flags 4 / 8 (benchmarks only): no prologue (v left from
      // the last call) / the prologue without the epilogue.
      if ((p.ec_prologue & 4) == 0) {
        // Under PDL before the fold kernel (M <= 16; v14, -0.04 ms on the 8B
        // step in three calls); a plain launch before the others (v12: PDL
        // was slower there at M >= 8) or with ec_prologue flag 2.
        if (absl::Status st = LaunchEcPrologue(
                d, x, mc, p.ldx, s, s.v, d.rp, nullptr,
                p.gate_out ? p.gate_out + r0 * (p.gate_ld > 0 ? p.gate_ld : d.r) : nullptr,
                p.gate_ld, stream, p.ec_prologue & kEcPrologueFlags,
                fold && (p.ec_prologue & 2) == 0, norm ? &a.norm : nullptr,
                swiglu ? &a.swiglu : nullptr);
            !st.ok()) {
          return st;
        }
      }
      if ((p.ec_prologue & 8) == 0) {
        a.ec = d.ecb;
        a.v = s.v;
        a.ldv = static_cast<int>(d.rp);
        a.ec_late = 1;
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

// v44: the token tile (32 or 64) when W4Linear runs these decode-sized m
// rows on the wgmma kernel's small tiles (W4CudaParams::small_tiles), else 0.
static int SmallTileTokens(const W4DeviceWeight::Impl& d, const W4CudaParams& p) {
  // Automatic: a GEMM with an EC at <= 32 rows keeps the fold kernel, whose
  // epilogue adds B v (v44 call 2: its step at batch 24 was slower on the
  // small tiles); 2 runs every GEMM there.
  if (p.small_tiles == 0 && p.use_ec && d.r > 0 && p.m <= 32) return 0;
  if (p.small_tiles == 1 || p.force_decode || p.force_prefill || p.m < kSmallTileMinM ||
      p.m >= kPrefillM || p.decode_kernel != 0 || p.decode_splits != 0 || p.decode_depth != 0 ||
      p.prefill_kernel != 0 || p.prefill_splits != 0 || p.ec_prologue != 0 || d.k % 8 != 0 ||
      p.ldx % 8 != 0 || reinterpret_cast<uintptr_t>(p.x) % 16 != 0 || !PrefillWgmmaAvailable()) {
    return 0;
  }
  return p.m <= 32 ? 32 : 64;
}

absl::Status W4LinearXApart(const W4CudaParams& p, int64_t k, bool early_trigger,
                            cudaStream_t stream) {
  if ((p.norm_h != nullptr) == (p.swiglu_gu != nullptr)) {
    return Bad("W4LinearXApart: needs exactly one of norm_h, swiglu_gu");
  }
  return XApart(p, k, early_trigger, stream);
}

absl::Status W4Linear(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws,
                      cudaStream_t stream) {
  const auto& d = w.impl();
  if (ws == nullptr) return Bad("workspace is null");
  if (p.m < 0 || p.m > (int64_t{1} << 30)) return Bad(absl::StrCat("bad m=", p.m));
  if (p.m == 0) return absl::OkStatus();
  if (p.norm_h != nullptr) {  // v49: x = RMSNorm(norm_h)
    if (p.x != nullptr) return Bad("norm_h and x both set (x goes to norm_x_out)");
    if (p.norm_weight == nullptr || p.norm_x_out == nullptr) {
      return Bad("norm_h needs norm_weight and norm_x_out");
    }
    if (p.norm_ld < d.k) return Bad(absl::StrCat("norm_ld ", p.norm_ld, " below k=", d.k));
    if (!(p.norm_eps >= 0.f && p.norm_eps < 1.f)) {
      return Bad(absl::StrCat("norm_eps ", p.norm_eps, " outside [0, 1)"));
    }
    if (p.swiglu_gu != nullptr) return Bad("norm_h and swiglu_gu both set");
  } else if (p.swiglu_gu != nullptr) {  // v51: x = SiluMul(gate_up row)
    if (p.x != nullptr) return Bad("swiglu_gu and x both set (x goes to swiglu_x_out)");
    if (p.swiglu_x_out == nullptr) return Bad("swiglu_gu needs swiglu_x_out");
    if (p.swiglu_ld < 2 * d.k) {
      return Bad(absl::StrCat("swiglu_ld ", p.swiglu_ld, " below 2k=", 2 * d.k));
    }
  } else if (p.x == nullptr) {
    return Bad("x is null");
  }
  if ((p.y_f32 == nullptr) == (p.y_f16 == nullptr)) return Bad("need exactly one of y_f32, y_f16");
  if (p.ldx < d.k || p.ldy < d.n) {
    return Bad(absl::StrCat("strides ldx=", p.ldx, " ldy=", p.ldy, " below k=", d.k, " / n=", d.n));
  }
  if (p.force_decode && p.force_prefill) return Bad("force_decode and force_prefill");
  if (p.prefill_ec_stream < 0 || p.prefill_ec_stream > 2) {
    return Bad(absl::StrCat("prefill_ec_stream ", p.prefill_ec_stream, ": 0, 1 or 2"));
  }
  if (p.prefill_kernel < 0 || (p.prefill_kernel & ~(15 | 96 | 128 | 256 | 512 | 1024)) != 0 ||
      ((p.prefill_kernel & (512 | 1024)) != 0 && (p.prefill_kernel & 256) == 0) ||
      (p.prefill_kernel & 15) > 6 || (p.prefill_kernel >= 16 && (p.prefill_kernel & 15) < 2) ||
      ((p.prefill_kernel & 15) >= 4 && (p.prefill_kernel & ~(15 | 96)) != 128) ||
      (p.prefill_kernel & 96) == 96 ||
      ((p.prefill_kernel & 128) != 0 && (p.prefill_kernel & 96) != 0 &&
       !((p.prefill_kernel & 15) >= 4 && (p.prefill_kernel & 96) != 96)) ||
      ((p.prefill_kernel & 256) != 0 && (p.prefill_kernel & 128) == 0)) {
    return Bad(absl::StrCat("prefill_kernel ", p.prefill_kernel,
                            ": 0..3, or 2 / 3 + flag 32 or 64, or 2 / 3 + 128 (warp-specialized)",
                            " or + 128 + 256 (its stream-K form; benchmarks: + 512 / 1024), or",
                            " 4 / 5 / 6 + 128 (warp-specialized, 64- / 32- / 16-token tiles;",
                            " benchmarks: + 32 or + 64)"));
  }
  if ((p.prefill_kernel & 256) != 0 && p.prefill_splits > 4) {
    return Bad(absl::StrCat("prefill_splits ", p.prefill_splits,
                            ": the stream-K kernel (prefill_kernel + 256) takes 0..4 (its most "
                            "pieces per tile; 0 / 1: 4)"));
  }
  if (p.prefill_splits < 0 || p.prefill_splits > 4) {
    return Bad(absl::StrCat("prefill_splits ", p.prefill_splits, ": 0 (automatic) .. 4"));
  }
  if (p.gate_ld != 0 && p.gate_ld < d.r) {
    return Bad(absl::StrCat("gate_ld ", p.gate_ld, " below the EC rank ", d.r));
  }
  if (p.ec_prologue < 0 || (p.ec_prologue & ~(15 | kEcPrologueFlags)) != 0 ||
      (p.ec_prologue & 12) == 12) {
    return Bad(absl::StrCat("ec_prologue ", p.ec_prologue,
                            ": flags 1, 2, 16, 64, 128, 512, 1024, 2048, 4096 and one of 4 / 8 "
                            "only"));
  }
  if (p.decode_kernel < 0 || (p.decode_kernel & 15) > 5) {
    // 6 was the fold kernel's bulk-copy ring: removed (it raced and measured
    // no faster than the cp.async ring; docs/results/gpu.md).
    return Bad(absl::StrCat("decode_kernel ", p.decode_kernel, ": kernel ", p.decode_kernel & 15,
                            " unknown (0..5; 6, the fold kernel's bulk-copy ring, was removed)"));
  }
  if ((p.decode_kernel & ~(15 | 16 | 32 | 64 | 128 | 256 | 512)) != 0) {
    return Bad(absl::StrCat("decode_kernel ", p.decode_kernel,
                            ": flags 16, 32, 64, 128, 256, 512 only"));
  }
  const int forced_nw = (p.decode_kernel & 15) == 4 ? 4 : (p.decode_kernel & 15) == 5 ? 8 : 0;
  if ((p.decode_kernel & 768) != 0 && (1 << ((p.decode_kernel >> 8) & 3)) > forced_nw) {
    return Bad(absl::StrCat("decode_kernel ", p.decode_kernel,
                            ": warp groups (flags 256 / 512 / 768) need the fold kernel forced "
                            "(4 or 5) and at most one group per warp"));
  }
  if (static_cast<size_t>(d.ntiles) > static_cast<size_t>(ws->impl().ncounters)) {
    return Bad("n too large for the workspace counters");
  }
  if (p.small_tiles < 0 || p.small_tiles > 2) {
    return Bad(absl::StrCat("small_tiles ", p.small_tiles,
                            ": 0 (automatic), 1 (off) or 2 (every GEMM at 17..63 rows)"));
  }
  const bool prefill = p.force_prefill || (!p.force_decode && p.m >= kPrefillM);
  if ((p.norm_h != nullptr || p.swiglu_gu != nullptr) && (prefill || p.m != 1)) {
    // v49 / v51: only the one-row decode kernels compute x themselves.
    if (absl::Status st = XApart(p, d.k, !(p.use_ec && d.r > 0), stream); !st.ok()) return st;
    return W4Linear(w, WithXApart(p), ws, stream);
  }
  if (prefill) return RunPrefill(w, p, ws, stream);
  if (const int tokens = SmallTileTokens(d, p); tokens > 0) {
    // v44: one launch of the wgmma kernel's small token tiles, k split so
    // that the grid fills two blocks per SM (at most 4 splits; unsplit where
    // they do not fit).
    W4CudaParams q = p;
    q.prefill_kernel = (tokens == 32 ? 5 : 4) | 128;
    const int64_t blocks = (d.n + 127) / 128 * ((p.m + tokens - 1) / tokens);
    const int64_t fill = 2 * static_cast<int64_t>(ws->impl().num_sms) / blocks;
    q.prefill_splits = -static_cast<int>(fill < 1 ? 1 : fill > 4 ? 4 : fill);
    return RunPrefill(w, q, ws, stream);
  }
  return RunDecode(w, p, ws, stream);
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
