// The W4A16 (+ gated EC) linear op on CUDA (sm_90a). Same math as
// kernels/w4_ops.h (ref:: / cpu::W4Linear); differences:
//   - activations x are IEEE fp16 on the device ([m, k], row stride ldx);
//   - the output is fp32 or fp16 on the device (exactly one of y_f32 / y_f16);
//   - the weight lives on the device in a PHYSICAL layout made once at load
//     (W4DeviceWeight::Create, kernels/FORMAT.md "CUDA layout"); the logical
//     W4Weight is not read again;
//   - A and B of the EC are fp16 on the device (their served dtype); the
//     gate MLP (W1, b1, W2, b2) is fp32.
//
// Dispatch (see kernels/cuda/w4_gemm.cu, numbers in docs/results/gpu.md):
//   launches of <= 8 rows: the fold kernel (w4_gemv_fold.cu): the swapped
//                     operands below with no per-weight zero subtraction
//                     (the zero folded in once per 128 k with sums of x),
//                     x staged once per warp, B fragments by ldmatrix;
//   launches of 9..16 rows (m <= 16, or the last 64-row chunk's remainder):
//                     the swapped-operand decode kernel (w4_gemv_swap.cu):
//                     weights as the mma m16 operand, tokens as n8, a per-warp
//                     cp.async ring, split-K over a thread-block cluster with
//                     a deterministic DSMEM reduction; EC as below;
//   launches of 17..32 rows (v43): the fold kernel with four n8 token tiles
//                     where its configuration fits shared memory (m of
//                     33..63 runs as launches of <= 32 rows unless another
//                     decode kernel is forced; since v44 only where the
//                     small tiles below cannot run or are off);
//   m < kPrefillM     decode kernel: fused dequantize + mma.sync m16n8k16,
//                     multi-stage cp.async, stream-K over the SMs with a
//                     deterministic fix-up; EC: u = A x and the gate in a tiny
//                     prologue kernel, B (g ⊙ u) as two extra mma k-steps in
//                     the GEMM epilogue (no extra pass over y);
//   17..63 rows (v44, W4CudaParams::small_tiles): the warp-specialized
//                     wgmma kernel of the prefill path with 32- / 64-token
//                     tiles and k splits (one launch reads the weights once),
//                     the EC as on the prefill path; where it cannot run,
//                     the decode kernels above;
//   m >= kPrefillM    prefill: W dequantized to an fp16 scratch, then cuBLAS;
//                     the EC through cuBLAS (U = x A^T, gate, y += V B^T);
//                     or, where TunePrefill measured it faster for the
//                     weight's shape and m (v34), a wgmma kernel straight
//                     from the W4 layout, no scratch (prefill_kernel 2 / 3,
//                     + 128 warp-specialized, k splits).
//
// Threads: a W4DeviceWeight is immutable after Create (and TuneDecode, run
// before any other use) and may be used from any stream; a W4Workspace
// belongs to ONE stream at a time (it holds the split-K partials, counters
// and EC scratch of the calls enqueued on it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/w4_format.h"

typedef struct CUstream_st* cudaStream_t;

namespace spear::kernels::cuda {

// m at and above which W4Linear takes the prefill (dequantize + cuBLAS) path.
// Measured on the H200 (docs/results/gpu.md): at m = 128 the prefill path
// beats the decode kernel (run per 64 rows) on all 8 Llama shapes, at m = 64
// on 6 of 8 (8B gate_up is the exception: 116 vs 146 us; 8B down a tie).
// With force_decode the decode kernel runs any m, 64 rows per launch.
inline constexpr int64_t kPrefillM = 64;
// v44: m at and above which (below kPrefillM) W4Linear runs the wgmma
// kernel's small token tiles (W4CudaParams::small_tiles; docs/results/gpu.md,
// "v44").
inline constexpr int64_t kSmallTileMinM = 17;

// True when the CUDA kernels support this format: group_size >= k
// (per-channel, any k) or group_size a power of two >= 32 (32, 64, 128,
// 256, ...; a ragged last group, ngroups = ceil(k / group_size), is
// handled). k and n any positive size below 2^24.
bool IsSupported(const W4Format& f);

// The device copy of one W4 linear module (+ optional EC) in the GPU layout.
class W4DeviceWeight {
 public:
  // Re-lays `w` (and `ec`, nullable) and uploads it (synchronously: the call
  // returns once the device copy is complete). act_scale is uploaded too.
  static absl::StatusOr<std::unique_ptr<W4DeviceWeight>> Create(const W4Weight& w,
                                                               const EcWeights* ec);
  ~W4DeviceWeight();
  // A second device copy (device-to-device; benchmarks rotate copies to
  // defeat the L2).
  absl::StatusOr<std::unique_ptr<W4DeviceWeight>> Clone() const;
  W4DeviceWeight(const W4DeviceWeight&) = delete;
  W4DeviceWeight& operator=(const W4DeviceWeight&) = delete;

  const W4Format& fmt() const { return fmt_; }
  bool has_ec() const { return rank_ > 0; }
  int64_t rank() const { return rank_; }
  // Bytes a decode GEMM reads for the backbone (codes + scale/zero words in
  // the GPU layout, padding included) and for the EC (A, B, gate).
  size_t backbone_bytes() const { return qw_bytes_ + sz_bytes_; }
  size_t ec_bytes() const { return ec_bytes_; }
  // Everything this weight holds on the device: the above and act_scale
  // (the prefill and naive paths unpack the EC's A / B into the workspace
  // per call).
  size_t device_bytes() const { return qw_bytes_ + sz_bytes_ + ec_bytes_ + extra_bytes_; }

  struct Impl;  // device pointers and padded sizes (kernels/cuda/w4_layout.h)
  const Impl& impl() const { return *impl_; }

  // The fold kernel's launch configuration for launches of m rows (1..8),
  // measured by TuneDecode; warps == 0: none (the cost model chooses).
  // W4Linear uses it where the caller forces nothing (decode_kernel,
  // decode_splits and decode_depth all 0). Copied by Clone.
  // groups (v41): the block's warps in 2, 4 or 8 groups, each on its own
  // 64-column tile (decode_kernel flags 256 / 512 / 768; at most one group
  // per warp); 0 or 1: one group.
  struct DecodeTuning {
    int warps = 0, splits = 0, depth = 0;  // 4 or 8; 1, 2, 4, 8; 2..4
    int groups = 0;                        // 0 / 1, 2, 4, 8 (<= warps)
  };
  static constexpr int kMaxTunedM = 8;
  DecodeTuning decode_tuning(int64_t m) const {
    return m >= 1 && m <= kMaxTunedM ? tuning_[m] : DecodeTuning{};
  }
  void set_decode_tuning(int64_t m, DecodeTuning t) {
    if (m >= 1 && m <= kMaxTunedM) tuning_[m] = t;
  }
  // The prefill path's main GEMM for launches of m rows, measured by
  // TunePrefill per bucket of m (bucket b: 64 << b <= m < 128 << b, the
  // last open-ended); kernel == 0: none (dequantize + cuBLAS). W4Linear
  // uses it where the caller forces nothing (prefill_kernel and
  // prefill_splits 0), on an sm_90 device with k, ldx multiples of 8 and
  // x 16-byte aligned; splits that do not fit the call's m run unsplit.
  // Copied by Clone.
  struct PrefillTuning {
    int kernel = 0, splits = 0;  // W4CudaParams::prefill_kernel / prefill_splits
  };
  static constexpr int kPrefillBuckets = 7;  // 64, 128, ..., 4096 and above
  static int PrefillBucket(int64_t m) {
    int b = 0;
    while (b + 1 < kPrefillBuckets && (int64_t{128} << b) <= m) ++b;
    return b;
  }
  PrefillTuning prefill_tuning(int64_t m) const { return prefill_tuning_[PrefillBucket(m)]; }
  void set_prefill_tuning(int bucket, PrefillTuning t) {
    if (bucket >= 0 && bucket < kPrefillBuckets) prefill_tuning_[bucket] = t;
  }

 private:
  W4DeviceWeight();
  DecodeTuning tuning_[kMaxTunedM + 1];
  PrefillTuning prefill_tuning_[kPrefillBuckets];
  W4Format fmt_;
  int64_t rank_ = 0;
  size_t qw_bytes_ = 0, sz_bytes_ = 0, ec_bytes_ = 0;
  size_t extra_bytes_ = 0;  // act_scale
  std::unique_ptr<Impl> impl_;
};

// Scratch for calls on one stream: split-K partials and tile counters, EC
// scratch, the fp16 dequant scratch of the prefill path (grown on demand
// outside graph capture) and a cuBLAS handle.
class W4Workspace {
 public:
  static absl::StatusOr<std::unique_ptr<W4Workspace>> Create();
  ~W4Workspace();
  W4Workspace(const W4Workspace&) = delete;
  W4Workspace& operator=(const W4Workspace&) = delete;
  // Makes the prefill scratch large enough for `w` and m rows now, so that
  // later calls can be captured into a CUDA graph (no allocation inside).
  absl::Status Reserve(const W4DeviceWeight& w, int64_t m);

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  W4Workspace();
  std::unique_ptr<Impl> impl_;
};

struct W4CudaParams {
  const uint16_t* x = nullptr;  // fp16 [m, k], row stride ldx >= k (device)
  int64_t m = 0, ldx = 0;
  // v49: x = RMSNorm(norm_h) computed by the call (RmsNormF16 without a
  // residual: fp16 of h rsqrt(mean(h^2) + norm_eps) norm_weight): norm_h
  // fp32 [m, norm_ld >= k], norm_weight fp32 [k] (device); x must then be
  // null and norm_x_out (fp16 [m, ldx], device) is where x is written when
  // the call does not normalize inside its kernels. At one row on the fold
  // kernel (k % 8 == 0, k <= 4096, norm_h and norm_weight 16-byte aligned,
  // norm_ld % 4 == 0, no activation scale; with an EC, where its one-cluster
  // prologue runs) the GEMM's blocks and the EC prologue normalize their
  // own slices of h, bit for bit as RmsNormF16 would, and norm_x_out is
  // left as it was; otherwise RmsNormF16 writes norm_x_out first (under
  // PDL; it lets the GEMM launch before its own wait where the GEMM has no
  // EC, v30) and the call goes on with x = norm_x_out.
  const float* norm_h = nullptr;
  const float* norm_weight = nullptr;
  int64_t norm_ld = 0;
  float norm_eps = 0.f;
  uint16_t* norm_x_out = nullptr;
  // v51: x = SiluMul(gate, up) computed by the call (cuda::SiluMul: fp16 of
  // silu(gate) * up in fp32) from a gate_up row: swiglu_gu fp16 [m,
  // swiglu_ld >= 2k], gate = its columns [0, k), up = [k, 2k); x must then be
  // null (and norm_h too) and swiglu_x_out (fp16 [m, ldx], device) is where x
  // is written when the call does not compute it inside its kernels. At one
  // row with an EC (use_ec, where its one-cluster prologue runs) on the fold
  // kernel (k % 8 == 0, swiglu_gu 16-byte aligned, swiglu_ld % 8 == 0, no
  // activation scale) the GEMM's warps and the EC prologue compute their own
  // slices, bit for bit as SiluMul would, and swiglu_x_out is left as it
  // was; otherwise (without an EC too: there the SiluMul launch, which lets
  // the GEMM launch early, measured cheaper) SiluMul writes swiglu_x_out
  // first (early trigger as norm_h's) and the call goes on with x =
  // swiglu_x_out.
  const uint16_t* swiglu_gu = nullptr;
  int64_t swiglu_ld = 0;
  uint16_t* swiglu_x_out = nullptr;
  const float* bias = nullptr;  // nullable, fp32 [n] (device)
  float* y_f32 = nullptr;       // exactly one of y_f32 / y_f16 (device)
  uint16_t* y_f16 = nullptr;    // [m, n], row stride ldy >= n
  int64_t ldy = 0;
  bool accumulate = false;      // y += instead of y = (y read only then)
  bool use_ec = true;           // false: skip the weight's EC (backbone only)
  float* gate_out = nullptr;    // nullable, fp32 [m, r] (device), row stride gate_ld
  int64_t gate_ld = 0;          // 0 = r; else >= r
  bool force_decode = false;    // testing/benchmarks: decode kernel at any m
  bool force_prefill = false;   // testing/benchmarks: prefill path at any m
  // v44: decode-sized m (kSmallTileMinM <= m < kPrefillM) on the
  // warp-specialized wgmma kernel's 32- / 64-token tiles (w4_prefill_wgmma.cu;
  // k splits filling two blocks per SM; the EC through the prefill path's
  // cuBLAS U, gate and y += V B^T: v44 call 3 measured the decode prologue
  // there slower at 33..63 rows) instead of the decode kernels, where it
  // can run (sm_90a, k and ldx multiples of 8, x 16-byte aligned) and
  // nothing else is forced. 0 automatic (a GEMM with an EC at <= 32 rows
  // keeps the fold kernel and its fused EC epilogue), 1 off
  // (testing/benchmarks: the decode kernels as before v44), 2 every GEMM at
  // 17..63 rows.
  int small_tiles = 0;
  // testing/benchmarks: which decode kernel runs a launch of <= 16 rows:
  // 0 the default (the fold kernel, w4_gemv_fold.cu, at <= 8 rows, in the
  // weight's measured configuration where TuneDecode recorded one and
  // decode_splits / decode_depth are 0 too; at 9..16
  // rows, two n8 token tiles since v17, only on wide GEMMs (FoldPreferred:
  // >= 96 tiles, k >= 4096), else the v8 ring kernel; at 17..32 rows, v43,
  // the fold kernel's four token tiles where they fit, else the x-as-m16
  // kernel), 1 the x-as-m16 kernel, 2 the
  // swapped-operand kernel with register-direct loads (v7), 3 the
  // swapped-operand cp.async-ring kernel (v8) at any m <= 16, 4 / 5 the fold
  // kernel (m <= 32) with 4 / 8 warps per block forced (6, the bulk-copy ring,
  // was removed: InvalidArgument). Flags added
  // to the value, fold kernel only: 16 an L2 prefetch of each warp's weights
  // before the dependency wait in the first wave's blocks, 32 the same in
  // every block (both measured slower; off by default), 64 one tile per
  // block (by default a GEMM whose tiles need more than one wave runs one
  // wave of blocks looping over tiles), 128 the EC's B fragments read from
  // global memory in the epilogue (by default, when it fits, they are
  // fetched into shared memory with each tile's first ring chunk); v40:
  // 256 / 512 / 768 (with 4 or 5) the block's warps in 2 / 4 / 8 groups,
  // each group on its own tile (at most one group per warp; else
  // InvalidArgument).
  int decode_kernel = 0;
  // testing/benchmarks, fold kernel only: k splits (1, 2, 4, 8; 0 = the
  // cost model's choice) and cp.async ring depth (2..4; 0 = automatic). A
  // forced combination that does not fit shared memory: InvalidArgument.
  int decode_splits = 0;
  int decode_depth = 0;
  // testing/benchmarks: the decode EC prologue (u = A x and the gate, one
  // launch before the GEMM). 0 the default (v27: k split into ranges of
  // >= 2048 over r x P blocks, A's first piece and the gate's weights
  // requested before the dependency wait, an acquire-release ticket, the
  // last block's gate with each dot product split over a lane group from
  // shared memory; launched under programmatic dependent launch before the
  // fold kernel, M <= 16, a plain launch otherwise; v47: before the fold
  // kernel at M = 1, one cluster of 8 blocks, u's partial sums meeting in
  // distributed shared memory, where A's slices fit); flags: 1 v12's
  // prologue (one block per rank over all of k, one warp per token for the
  // gate), 2 a plain launch at any M, 16 the v27 form at every M (no
  // cluster), 512 the r x P form's gate one warp per token wherever its
  // staged weights do not fit 40 KB (before v58; v58: W1 then W2 staged in
  // one region where that fits), 1024 the one-cluster form's u by the
  // lanes' dot products (before v60; v60: by tensor cores); benchmarks only
  // (the output is then wrong): 4 no prologue (the epilogue uses whatever v
  // the last call left), 8 the prologue without the epilogue (4 and 8
  // together: InvalidArgument), 64 the prologue's launch alone, 128 its
  // partial sums of u without the ticket and the gate (64 and 128: the r x P
  // form), 2048 the one-cluster form without loading A's slices (u from
  // whatever shared memory holds), 4096 the one-cluster form's launch alone
  // (its dependency wait, then exit).
  int ec_prologue = 0;
  // testing/benchmarks: where the prefill path (m >= kPrefillM, and the
  // small token tiles below it) runs the EC's U = x A^T and gate: 0
  // automatic (a second stream, overlapped with the dequantization and the
  // main GEMM, for n x k >= 32 Mi weights and, v44e, at every shape on the
  // small tiles' decode-sized m, where a captured step makes the fork and
  // join graph edges; the caller's stream for smaller prefill GEMMs, where
  // the fork and join cost more than they hide: docs/results/gpu.md,
  // "Prefill EC on a second stream"), 1 the caller's stream, 2 the second
  // stream.
  int prefill_ec_stream = 0;
  // testing/benchmarks: the prefill path's main GEMM (m >= kPrefillM): 0
  // automatic (the weight's TunePrefill choice for m where it has one and
  // the kernel can run this call, else 1); 1 W dequantized into the
  // workspace's fp16 scratch, then cuBLAS; 2 / 3 the wgmma kernel straight
  // from the W4 layout (kernels/cuda/w4_prefill_wgmma.cu, no scratch) with
  // 128- / 256-token tiles, + 128 its warp-specialized form (v34: a
  // producer warpgroup, two consumer warpgroups), + 128 + 256 its
  // stream-K form (v36: persistent blocks, the tiles past full waves cut
  // into k ranges; prefill_splits 0 or 1); benchmarks only, added to 2 / 3
  // (the output is then wrong): 32 the code words not dequantized, 64 no
  // code words loaded either, and to the stream-K form 512 whole tiles
  // only, 1024 no output stores (timing splits). v44: 4 / 5 / 6 + 128 the
  // warp-specialized kernel with 64- / 32- / 16-token tiles (two blocks per
  // SM, for decode-sized m; with force_prefill below kPrefillM; benchmarks
  // only: + 32 the code words not dequantized, + 64 the consumers only
  // waiting for and releasing the stages). 2..6
  // where the device has no sm_90a code: FailedPrecondition; with k or ldx
  // not a multiple of 8 or x not 16-byte aligned: InvalidArgument.
  int prefill_kernel = 0;
  // testing/benchmarks, the wgmma prefill kernels (prefill_kernel 2 / 3
  // [+ 128]): their k splits (v33: the grid's z splits k, the last split of
  // a tile adds the fp32 partials in order and runs the epilogue;
  // deterministic). 0 automatic (the TunePrefill choice's splits where
  // prefill_kernel is 0 too, else 1), 1..4 forced (InvalidArgument where
  // the partials do not fit the workspace's scratch or a split would be
  // empty). The stream-K form (prefill_kernel + 256) takes 0..4: the most
  // blocks a stream-K tile is cut into (v38; 0 / 1: 4).
  int prefill_splits = 0;
};

// y = Q(W) (x / act_scale) + bias [+ B (g ⊙ u), u = A x]  (see w4_ops.h).
// Enqueued on `stream`, no synchronisation; capturable into a CUDA graph
// (with the prefill path only after ws->Reserve). InvalidArgument for bad
// parameters (nothing enqueued), Internal for CUDA errors.
absl::Status W4Linear(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws,
                      cudaStream_t stream);

// x's producer of p (norm_h: RmsNormF16 into norm_x_out; swiglu_gu: SiluMul
// into swiglu_x_out) for k columns, as its own launch: what W4Linear does
// where its kernels do not compute x, for a caller that feeds several calls
// from one x. early_trigger as RmsNormF16Params'. InvalidArgument unless
// exactly one of norm_h / swiglu_gu is set (the producer's own checks too).
absl::Status W4LinearXApart(const W4CudaParams& p, int64_t k, bool early_trigger,
                            cudaStream_t stream);

// The pieces, exposed for the naive (unfused) baseline of the benchmark:
// EcGate writes v = g ⊙ u as fp32 [m, r] into `v` (device); EcApply adds
// B v to y (one more pass over y). Both on `stream`.
absl::Status EcGate(const W4DeviceWeight& w, const uint16_t* x, int64_t m, int64_t ldx,
                    float* v, W4Workspace* ws, cudaStream_t stream);
absl::Status EcApply(const W4DeviceWeight& w, const float* v, int64_t m, float* y_f32,
                     uint16_t* y_f16, int64_t ldy, cudaStream_t stream);

// Measured decode dispatch (v23, docs/results/gpu.md): for m = 1..max_m
// (<= 8) times the fold kernel as the cost model dispatches it and in every
// configuration that fits (4 / 8 warps x 1 / 2 / 4 / 8 k splits x ring
// depth 2..4) on `weights` (one shape, e.g. a model's qkv of every layer:
// the launches rotate through them, so that they stream from DRAM as in a
// decode step), and records in every weight the fastest configuration for
// m where it beats the cost model's choice by at least 5 % (else none: the
// margin keeps the choice stable from one load to the next). Synchronous;
// not while `stream` is being captured (FailedPrecondition). InvalidArgument
// for no weights, weights of different shapes or max_m outside 1..8.
absl::Status TuneDecode(const std::vector<W4DeviceWeight*>& weights, int max_m, W4Workspace* ws,
                        cudaStream_t stream);

// Measured prefill dispatch (v34, docs/results/gpu.md): for each bucket of
// m from 64 up to max_m (timed at 64 << b rows, x of N(0, 1) values), times
// the prefill path's main GEMM as dequantize + cuBLAS and as the wgmma
// kernels (128- / 256-token tiles, plain and warp-specialized, the latter
// with 1..4 k splits or in its stream-K form, v36), each as a CUDA graph
// on a stream of its own, after >= 20 ms of the baseline (a sustained
// prefill's clocks), the graphs replayed in 3 interleaved rounds of
// rotating order (v35 / v36; per candidate the median), over
// `weights` (one shape, rotated as in TuneDecode), and records in every
// weight the fastest where it beats dequantize + cuBLAS by at least 5 %
// (else none). On a device without the sm_90a kernels, or k not a
// multiple of 8, it records nothing. Grows `ws` for max_m rows.
// Synchronous; not while `stream` is being captured (FailedPrecondition).
// InvalidArgument for no weights, weights of different shapes or max_m
// outside 64..65536. `report` (nullable) receives every measurement: one
// row per bucket and candidate (baseline first, then the candidates).
// TunePrefill's candidates ({W4CudaParams::prefill_kernel, prefill_splits}),
// timed after the baseline {1, 0} (dequantize + cuBLAS) in this order: the
// plain wgmma kernel (128- / 256-token tiles), the warp-specialized one
// with 1..4 k splits (more splits fill the SMs at small m and long k;
// docs/results/gpu.md, v34) and its stream-K form (v36).
inline constexpr int kPrefillCandidates[][2] = {
    {2, 1},       {3, 1},       {2 | 128, 1},       {2 | 128, 2},       {3 | 128, 1},
    {3 | 128, 2}, {3 | 128, 3}, {3 | 128, 4},       {2 | 128 | 256, 1}, {3 | 128 | 256, 1}};
inline constexpr int kNumPrefillCandidates =
    static_cast<int>(sizeof(kPrefillCandidates) / sizeof(kPrefillCandidates[0]));
struct PrefillTuneRow {
  int64_t m = 0;            // rows timed (64 << bucket)
  int kernel = 0;           // W4CudaParams::prefill_kernel; 1 dequantize + cuBLAS
  int splits = 0;           // W4CudaParams::prefill_splits
  double us = 0;            // per launch, the median round; infinity where refused
};
absl::Status TunePrefill(const std::vector<W4DeviceWeight*>& weights, int64_t max_m,
                         W4Workspace* ws, cudaStream_t stream,
                         std::vector<PrefillTuneRow>* report = nullptr);

// Number of SMs of the current device (cached per device).
int NumSms();

}  // namespace spear::kernels::cuda
