// Private to kernels/cuda: the physical GPU layout of a W4 (+EC) weight and
// the workspace, shared by the host re-layout (w4_layout.cc), the decode
// GEMM (w4_gemm*.cu), the EC kernels (w4_ec.cu) and the prefill path
// (w4_prefill.cu). kernels/FORMAT.md ("CUDA layout") documents it.
//
// Geometry: the n outputs are cut into 64-column tiles (ntiles =
// ceil(n / 64)); k is padded to kp = roundup(k, 128) and cut into k16 steps
// (ksteps = kp / 16) and 128-wide pipeline stages (nks = kp / 128).
//
// qw   uint32 [ntiles][ksteps][32 lanes][4 words]: for tile t, step s, lane
//      l (gid = l / 4, tig = l % 4), word p holds the codes that lane l
//      needs for the mma.sync m16n8k16 B fragments of column subtiles
//      j = 2p and 2p + 1 (column c(j) = 64 t + 8 j + gid, k0 = 16 s + 2 tig):
//        nibble 0: (c(2p), k0)     nibble 4: (c(2p), k0+1)
//        nibble 1: (c(2p), k0+8)   nibble 5: (c(2p), k0+9)
//        nibble 2: (c(2p+1), k0)   nibble 6: (c(2p+1), k0+1)
//        nibble 3: (c(2p+1), k0+8) nibble 7: (c(2p+1), k0+9)
//      so (w & 0x000f000f) | 0x64006400 is the half2 {1024 + code, ...} of
//      fragment register 0 and (w & 0x00f000f0) | 0x64006400 that of
//      register 1 (16 x code), then w >>= 8 for the next subtile. Padding
//      (k >= K or column >= n) holds code 0.
// sz   uint32 (half2 {scale, 1024 + zero}) [ntiles][ngroups][64]: slot
//      gid * 8 + j holds column 64 t + 8 j + gid, so one lane's 8 columns are
//      32 contiguous bytes. ngroups = ceil(k / group_size); padded columns
//      have scale 0.
// ec_rec / ec_bscales: the EC up-projection B in the tile layout of
//      kernels/ec_tile_layout.h (per tile only the rank pairs its columns
//      use; int8 codes + per-(tile, rank) fp16 scales for an EcFactors::kI8
//      EC, fp16 values otherwise), read through EcTileArgs (ec_tile.cuh).
//      The dense B the prefill and naive paths multiply by is unpacked from
//      it into the workspace per call (LaunchEcUnpackB).
#pragma once

#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "kernels/ec_tile_layout.h"
#include "kernels/w4_cuda.h"

typedef struct cublasContext* cublasHandle_t;
typedef struct CUevent_st* cudaEvent_t;

namespace spear::kernels::cuda {

inline constexpr int kTileN = 64;     // columns per tile
inline constexpr int kStageK = 128;   // k per pipeline stage
inline constexpr int kMaxRank = 256;  // EC rank / gate hidden supported on the GPU
inline constexpr int kDecodeMaxM = 64;
inline constexpr int kEcMaxKParts = 16;  // k ranges of the decode EC prologue

inline int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The decode kernels' view of an EC's B in the tile layout
// (kernels/ec_tile_layout.h; device pointers; rec null: no EC term).
struct EcTileArgs {
  const uint32_t* rec = nullptr;
  const uint16_t* scales = nullptr;  // int8 records' scales; null: fp16 records
  int rs = 0;
  int nseg = 0;
  int tile0[kEcMaxSegs] = {}, q0[kEcMaxSegs] = {}, npairs[kEcMaxSegs] = {};
  long long rec0[kEcMaxSegs] = {};
  int max_steps = 0;  // k8 steps of the widest tile
};

// The prologue's view of the EC's A (device pointers): fp16 [r][k] (h), or,
// for an int8 EC, its codes [r][k] (c) with fp16 scales [r][ng], one per 64
// values along k (ng even: 4-byte pairs); exactly one of h and c is set.
struct EcAArgs {
  const __half* h = nullptr;
  const int8_t* c = nullptr;
  const __half* s = nullptr;
  int ng = 0;
};

struct W4DeviceWeight::Impl {
  int64_t n = 0, k = 0, group = 0, ngroups = 0, kp = 0, ksteps = 0, nks = 0, ntiles = 0;
  uint32_t* qw = nullptr;
  uint32_t* sz = nullptr;
  float* act_scale = nullptr;  // [k] or null
  // EC (rank == 0: none)
  int64_t r = 0, rp = 0, h = 0;
  bool gated = false;
  uint16_t* ec_a = nullptr;      // fp16 [r][k] (null for int8 A)
  int8_t* ec_a8 = nullptr;       // int8 EC (k % 8 == 0): A's codes [r][k]
  uint16_t* ec_ascales = nullptr;  // their fp16 scales [r][ec_ang]
  int64_t ec_ang = 0;
  uint32_t* ec_rec = nullptr;    // B's records (see above)
  uint16_t* ec_bscales = nullptr;  // int8 records: fp16 [ntiles][rs]
  size_t ec_rec_words = 0, ec_bscale_count = 0;
  EcTileArgs ecb;                // the kernels' view of ec_rec / ec_bscales
  float* w1 = nullptr;           // [h][r]
  float* b1 = nullptr;           // [h]
  float* w2 = nullptr;           // [r][h]
  float* b2 = nullptr;           // [r]
};

struct W4Workspace::Impl {
  int num_sms = 0;
  float* partials = nullptr;  // split-K partial tiles, 2 slots per block
  size_t partial_floats = 0;
  int* counters = nullptr;    // per tile group, zero between calls
  int64_t ncounters = 0;
  unsigned* ec_counter = nullptr;
  float* u = nullptr;         // fp32 [kEcMaxKParts][64][kMaxRank] (decode EC: partial u)
  uint16_t* eb = nullptr;     // fp16 [n][r]: an EC's B unpacked (prefill / naive paths)
  size_t eb_elems = 0;
  uint16_t* ea = nullptr;     // fp16 [r][k]: an int8 EC's A unpacked (prefill path)
  size_t ea_elems = 0;
  uint16_t* v = nullptr;      // fp16 [64][kMaxRank] (decode EC: g ⊙ u, A operand)
  uint16_t* xs = nullptr;     // fp16 [64][kxs] (decode: x / act_scale, padded)
  int64_t xs_elems = 0;
  // prefill
  uint16_t* wh = nullptr;     // fp16 dequantized W [n][kp]
  size_t wh_elems = 0;
  uint16_t* pxs = nullptr;    // fp16 x / act_scale [m][k]
  size_t pxs_elems = 0;
  float* pu = nullptr;        // fp32 U [m][r]
  uint16_t* pv = nullptr;     // fp16 V [m][rp]
  size_t pu_elems = 0;
  cublasHandle_t cublas = nullptr;
  // The prefill EC's first half (U = x A^T and the gate) runs on its own
  // stream, forked from and joined back to the caller's by events (also
  // inside a stream capture), with its own cuBLAS handle (a handle's
  // workspace must not be shared by concurrent GEMMs).
  cudaStream_t ec_stream = nullptr;
  cudaEvent_t ec_fork = nullptr, ec_join = nullptr;
  cublasHandle_t cublas_ec = nullptr;
};

// v49: x = RMSNorm of one row computed inside a GEMM's kernels
// (norm_rows.cuh); h null: none.
struct RowNorm {
  const float* h = nullptr;  // fp32 [k], 16-byte aligned
  const float* w = nullptr;  // the norm's weight, fp32 [k], 16-byte aligned
  float eps = 0.f;
};

// v51: x = SiluMul(gate, up) of one gate_up row computed inside a down
// GEMM's kernels (swiglu_rows.cuh): gate = gu[0, k), up = gu[k, 2k); gu
// 16-byte aligned; null: none.
struct RowSwiglu {
  const uint16_t* gu = nullptr;
};

// Launchers (w4_gemm_*.cu, w4_ec.cu, w4_prefill.cu); all check the launch.
struct DecodeArgs {
  const uint32_t* qw;
  const uint32_t* sz;
  int ntiles, ksteps, nks, ngroups;
  int gshift;  // group of k index kk = kk >> gshift (clamped to ngroups - 1); 30 for per-channel
  const uint16_t* x;
  int m, k, n;
  long long ldx;
  const float* bias;
  float* y32;
  uint16_t* y16;
  long long ldy;
  int accumulate;
  EcTileArgs ec;  // ec.rec null: no EC term
  const uint16_t* v;
  int ldv;
  int debug;    // profiling only (SPEAR_W4_DEBUG): 1 skip compute, 2 skip weight loads
  int ec_late;  // 1: an EC prologue precedes this launch (see the kernel)
  // v49 (fold kernel, m = 1): x = RMSNorm(norm.h) computed by the blocks
  // (norm.h null: x as given; else x is unused).
  RowNorm norm;
  // v51 (fold kernel, m = 1): x = SiluMul of swiglu.gu's row computed by the
  // warps (swiglu.gu null: x as given; else x is unused). Not with norm.
  RowSwiglu swiglu;
  int variant;  // m <= 16 kernel: 0 the cp.async-ring kernel, 2 the register-direct one (fold: the flags)
  float* partials;
  int* counters;
  int total_units;
};
// mt = ceil(m / 16) in 1..4.
absl::Status LaunchDecode(int mt, DecodeArgs a, int num_sms, cudaStream_t stream);
// The m <= 32 fold kernel (w4_gemv_fold.cu; m 9..16 since v17: two n8
// token tiles; 17..32 since v43: four); FoldSupported: m <= 32 and the
// per-warp x range fits shared memory. forced_*: 0 = automatic.
bool FoldSupported(const DecodeArgs& a);
// The default dispatch: m <= 8 always; m 9..16 only where v17 measured the
// fold kernel faster than the v8 ring kernel (>= 96 tiles, k >= 4096, at
// most 2 k splits); elsewhere the v8 ring kernel; m 17..32 wherever a
// configuration fits (v43; else the x-as-m16 kernel).
bool FoldPreferred(const DecodeArgs& a, int num_sms);
absl::Status LaunchDecodeFold(DecodeArgs a, int num_sms, int forced_splits, int forced_depth,
                              cudaStream_t stream);

// W4CudaParams::ec_prologue's bits that LaunchEcPrologue takes (the others
// are RunDecode's: 2 a plain launch, 4 / 8 no prologue / no epilogue), and of
// those the ones the one-cluster form serves (any other set bit picks the
// r x P form).
constexpr int kEcPrologueFlags = 1 | 16 | 64 | 128 | 512 | 1024 | 2048 | 4096;
constexpr int kEcClusterFormFlags = 512 | 1024 | 2048 | 4096;

absl::Status LaunchPrepareX(const uint16_t* x, int64_t m, int64_t ldx, int64_t k,
                            const float* act_scale, uint16_t* xs, int64_t ldxs,
                            cudaStream_t stream);
// u = A x for m tokens, then the gate; writes v_half [m][ldv] (padded columns
// zero), v_f32 [m][r] and gate_out [m][ldg] (0: r) where non-null. flags: 1 v12's
// prologue (one k range per rank, one warp per token for the gate);
// pdl_launch: with programmatic serialization (the kernel waits for x's
// producer first).
// norm (v49, non-null): x = RMSNorm of one row h computed by the prologue
// (x unused); swiglu (v51, non-null): x = SiluMul of one gate_up row,
// likewise; only for the one-cluster form (EcPrologueIsCluster),
// InternalError otherwise.
absl::Status LaunchEcPrologue(const W4DeviceWeight::Impl& w, const uint16_t* x, int64_t m,
                              int64_t ldx, W4Workspace::Impl& ws, uint16_t* v_half,
                              int64_t ldv, float* v_f32, float* gate_out, int64_t ldg,
                              cudaStream_t stream, int flags = 0, bool pdl_launch = false,
                              const RowNorm* norm = nullptr,
                              const RowSwiglu* swiglu = nullptr);
// Whether LaunchEcPrologue takes the one-cluster form (v47) for these
// arguments, given x 16-byte aligned with ldx % 8 == 0 (or norm set).
bool EcPrologueIsCluster(const W4DeviceWeight::Impl& w, int64_t m, int flags, bool pdl_launch);
inline EcAArgs EcAOf(const W4DeviceWeight::Impl& w) {
  EcAArgs a;
  a.h = reinterpret_cast<const __half*>(w.ec_a);
  a.c = w.ec_a8;
  a.s = reinterpret_cast<const __half*>(w.ec_ascales);
  a.ng = static_cast<int>(w.ec_ang);
  return a;
}
// out = the EC's A as dense fp16 [r][k] (int8 A only), for the prefill
// path's U = x A^T (out: the workspace's ea).
absl::Status LaunchEcUnpackA(const W4DeviceWeight::Impl& w, uint16_t* out, cudaStream_t stream);
// out = the EC's B as dense fp16 [n][r] (the epilogues' values), for the
// prefill path's y += V B^T (out: the workspace's eb).
absl::Status LaunchEcUnpackB(const W4DeviceWeight::Impl& w, uint16_t* out, cudaStream_t stream);
// Gate only, from u [m][r] fp32 (prefill path).
absl::Status LaunchEcGateRows(const W4DeviceWeight::Impl& w, const float* u, int64_t m,
                              uint16_t* v_half, int64_t ldv, float* gate_out, int64_t ldg,
                              cudaStream_t stream);
absl::Status LaunchDequantW(const W4DeviceWeight::Impl& w, uint16_t* wh, cudaStream_t stream);
// x[0..n) = fp16 N(0, 1)-distributed values from a hash of (index, seed)
// (Box-Muller; the tuners' inputs: a GEMM on repeated or zero data draws
// less power and times faster on power-bound paths, v36).
absl::Status LaunchFillNormal(uint16_t* x, size_t n, uint32_t seed, cudaStream_t stream);
// The prefill GEMM on wgmma straight from the layout (w4_prefill_wgmma.cu):
// y (=|+=) Q(W) x (+ bias), no EC. Available: an sm_90 device running the
// build's sm_90a code. tokens: the block's token tile (128 or 256).
// FailedPrecondition where not available; InvalidArgument for k or ldx not
// a multiple of 8 or x not 16-byte aligned.
bool PrefillWgmmaAvailable();
// The stream-K kernel's partial slots: 2 per block (<= one block per SM) of
// 256 tokens x 128 fp32 columns, in halves of the fp16 scratch.
inline size_t SkPartialHalves(int num_sms) { return size_t{2} * num_sms * 256 * 128 * 2; }
// ws lends the split-K partials (its fp16 weight scratch, unused on this
// path) and tickets (its counters); ksplits: W4CudaParams::prefill_splits
// (0 or 1 no split, 2..4 forced: InvalidArgument where they do not fit;
// -2..-4 preferred: unsplit where they do not fit). flags: prefill_kernel's
// 32 / 64 (timing splits), 128 (warp-specialized), 128 + 256 (its
// stream-K form: ksplits 0 / 1 / -n only, partial slots in the same
// scratch, SkPartialHalves of it: W4Workspace::Reserve grows it so for a
// prefill's m).
absl::Status LaunchPrefillWgmma(const W4DeviceWeight::Impl& w, const uint16_t* x, int64_t m,
                                int64_t ldx, const float* bias, float* y32, uint16_t* y16,
                                int64_t ldy, bool accumulate, int tokens, cudaStream_t stream,
                                int flags, W4Workspace::Impl& ws, int ksplits);
absl::Status LaunchAddBias(const float* bias, int64_t m, int64_t n, float* y32, uint16_t* y16,
                           int64_t ldy, cudaStream_t stream);

absl::Status RunPrefill(const W4DeviceWeight& w, const W4CudaParams& p, W4Workspace* ws,
                        cudaStream_t stream);

}  // namespace spear::kernels::cuda
