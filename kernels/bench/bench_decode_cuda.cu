// spear_bench_decode_cuda: one full decode step of a synthetic Llama-shaped
// W4(+EC) model on the GPU, captured as ONE CUDA graph (no host sync inside),
// against the memory-bandwidth floor measured in the same run.
//
// Step: embed -> per layer [RMSNorm -> qkv W4 -> RoPE (q and k) + KV append
// (one launch) -> paged decode attention (split + combine) -> o W4 (+= residual) -> RMSNorm -> gate_up W4
// -> SwiGLU -> down W4 (+= residual)] -> final RMSNorm -> lm_head (cuBLAS
// fp16, fp32 logits) -> argmax. Residual stream fp32, activations fp16, KV
// cache fp16 paged (block 16, shuffled page tables), every sequence at the
// same context length (--ctx, default 512, the new token included).
//
// Weights: random W4 g128 asymmetric in the CUDA layout (W4DeviceWeight),
// each module made once and cloned per layer (distinct memory, so nothing
// is served from L2); EC rank 32, gated (gate hidden 16) on every module.
// Variants: W4 (ECs off), W4+EC on all four GEMMs of every layer, W4+EC on
// every 4th layer (a subset), the W4 GEMMs alone (the rest of the step
// left out: what the other kernels cost), the W4 step without RoPE, KV
// append and attention (what attention costs), and the W4 step without
// programmatic dependent launch of the small kernels (cuda_ops.h), also
// with one tile per fold-kernel block (no persistent loop), and the step of
// v12 with RoPE and KV append as separate launches, and the step with the
// attention combine inside the split launch (tickets).
//
// Floor: bytes a step must read (weights as laid out, + EC where on, + the
// KV rows read, + lm_head, + embedding rows and norm weights) over the
// device copy bandwidth (grid-stride copy kernel, read + write bytes / time,
// as in spear_bench_w4_cuda). Time: the graph replayed 3 times to warm up,
// then --iters timed replays; median.
//
// usage: spear_bench_decode_cuda [--models=8B,1B] [--ctx=512] [--batches=1,8,32]
//                                [--iters=20] [--variants=0,...,54]  (rows of kVariants)
//                                [--ec-placement=SPEAR_DIR [--ec-pct=P] [--ec-static] [--ec-i8 | --ec-fp16]]
// --ec-static: the placed ECs without the gate MLP (a `spear quantize
// --no-gate` checkpoint's form); by default gated, gate hidden 16 each.
// --ec-i8 / --ec-fp16: the placed ECs as int8 factors, block-diagonal where
// merged (the form an `--ec-factors i8` checkpoint is served in), or as
// fp16 values dense over the merged ranks (the form of every run before
// v57); by default the checkpoint's own storage.
// --ec-placement: the EC placement of a real `spear quantize` checkpoint
// (its diagnostic's modules and ranks) mapped onto this shape (layer l takes
// the checkpoint's layer l * L_src / L; ranks scaled by one factor to P % of
// this model's served bytes, default the checkpoint's own EC %): rows 9-11
// (default prologue, v12's, the default one as a plain launch). Row 12: EC
// on all GEMMs with v12's EC prologue (against row 1: what the new prologue
// changes). Rows 13-15 at
// the placement: the B fragments read from global memory in the epilogue
// (v13), the epilogue alone and the prologue alone (timing only).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <array>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "ec_placement.h"
#include "kernels/cuda_ops.h"
#include "kernels/dtype.h"
#include "kernels/ec_factors.h"
#include "kernels/w4_cuda.h"
#include "bench_cuda_common.cuh"

namespace spear::kernels {
namespace {


constexpr int kGroup = 128;
constexpr int kBlock = 16;  // KV block size (tokens)

struct ModelShape {
  const char* name;
  int64_t hidden, inter;
  int n_q, n_kv, head_dim, layers;
  int64_t vocab;
  bool tied;  // lm_head shares the embedding table (1B)
};
const ModelShape kModels[] = {
    {"8B", 4096, 14336, 32, 8, 128, 32, 128256, false},
    {"1B", 2048, 8192, 32, 8, 64, 16, 128256, true},
};

cudaStream_t g_stream;


// Deterministic pseudo-random fp16 in [-scale, scale) (hash of the index).
__global__ void FillHalf(uint16_t* p, size_t n, float scale, uint32_t salt) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ salt;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = (static_cast<float>(h & 0xffff) / 32768.f - 1.f) * scale;
    p[i] = __half_as_ushort(__float2half_rn(v));
  }
}

// Median ms of one replay of `ge`.
double TimeGraphExec(cudaGraphExec_t ge, int iters) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, g_stream));
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    CK(cudaEventRecord(a, g_stream));
    CK(cudaGraphLaunch(ge, g_stream));
    CK(cudaEventRecord(b, g_stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Read + write bytes per second of a 1 GiB device copy (median of 10).
double CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < 4; ++r) {
    bench::CopyKernel<<<sms * 8, 512, 0, g_stream>>>(static_cast<const uint4*>(a), static_cast<uint4*>(b),
                                              bytes / 16);
  }
  CK(cudaStreamEndCapture(g_stream, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  const double ms = TimeGraphExec(ge, 10) / 4;
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * bytes / (ms * 1e-3);
}



template <typename T>
T* Alloc(size_t n) {
  void* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

enum class Ec { kOff, kAll, kEvery4th, kPlacement };
// --ec-static: the placed ECs without gate MLPs.
bool g_ec_static = false;
// The placed ECs' factor storage: -1 the checkpoint's own (default), 1
// int8 (--ec-i8), 0 fp16 (--ec-fp16). int8: as `spear quantize --ec-factors
// i8` stores them: each member's A and B on the int8 grid, its B on its own
// columns and ranks only (a merged q / k / v or gate / up EC is
// block-diagonal, as the CUDA runner builds it), the ranks scaled with int8
// bytes per rank; served from the codes (kernels/ec_tile_layout.h). fp16:
// dense random factors over the merged ranks, fp16 bytes per rank (every
// run before v57 measured this form, whatever the checkpoint's). -1 is
// resolved once the placement is read.
int g_ec_factors = -1;
struct Variant {
  const char* name;
  Ec ec;
  bool gemms_only;
  bool skip_attention = false;  // RoPE, KV append and attention left out
  bool small_pdl = true;        // cuda::SetProgrammaticLaunch while capturing
  int fold_flags = 0;           // W4CudaParams::decode_kernel (64: no persistent loop)
  bool fused = true;            // RopeKvAppend instead of RoPE + KV append
  bool tickets = false;         // the attention combine inside the split launch (v13 calls:
                                // slower at batch 1, equal at 8; so off by default)
  int ec_prologue = 0;          // W4CudaParams::ec_prologue (1 v12's, 2 under PDL)
  bool tuned = false;           // v23: the fold kernel's configurations from TuneDecode
  // v30: which producers of a GEMM's x (RMSNorm, attention, SwiGLU) let the
  // next kernel launch before their own wait (early_trigger): 0 none (the
  // order before v30), 1 all, 2 those whose GEMM has no EC (the default).
  int early = 2;
  int small_tiles = 0;          // v44: W4CudaParams::small_tiles (1 off, 2 EC'd GEMMs too)
  int ec_stream = 0;            // v44e: W4CudaParams::prefill_ec_stream (1: the caller's stream)
  // timing only (wrong outputs): the layers' RMSNorm launches left out (the
  // qkv / gate_up GEMMs read a stale x), the SwiGLU launch left out (down
  // reads a stale x): what a fusion of those into the GEMMs could save at
  // most.
  bool no_norm = false;
  bool no_silu = false;
  // v49: the layers' RMSNorm as its own launch before the qkv / gate_up
  // GEMMs (before v49), not inside their calls (W4CudaParams::norm_h).
  bool norm_apart = false;
  // v50: the attention's partitions combined by a second kernel (before
  // v50), not inside the split launch's clusters.
  bool combine_kernel = false;
  int attn_cluster_max = 8;  // v50: PagedDecodeAttentionParams::cluster_max
  bool attn_early = false;   // v50: the attention triggers early before an EC'd o GEMM too
  bool attn_cluster_no_ec_o = false;  // v50: the cluster combine only before o GEMMs without an EC
  // v51: SwiGLU as a launch of its own before the down GEMM (before v51),
  // not inside its call (W4CudaParams::swiglu_gu).
  bool silu_apart = false;
  // v52: PagedDecodeAttentionParams::prefetch_rows (0 automatic, as the
  // runner; 1 always; 2 never, before v52).
  int attn_prefetch = 0;
};
const Variant kVariants[] = {
    {"W4", Ec::kOff, false},
    {"W4+EC r32 all 4 GEMMs, all layers", Ec::kAll, false},
    {"W4+EC r32 all 4 GEMMs, every 4th layer", Ec::kEvery4th, false},
    {"W4 GEMMs only (no norm/rope/attn/lm_head)", Ec::kOff, true},
    {"W4 without RoPE/KV append/attention", Ec::kOff, false, true},
    {"W4, small kernels without PDL", Ec::kOff, false, false, false},
    {"W4, no PDL on small kernels, fold one tile per block", Ec::kOff, false, false, false, 64},
    {"W4, unfused RoPE / KV append / attention combine (v12)", Ec::kOff, false,
     false, true, 0, false},
    {"W4, attention combine inside the split launch (tickets)", Ec::kOff, false, false, true, 0,
     true, true},
    // 9-12: the EC at the placement of a real diagnostic (--ec-placement), and
    // the EC prologue variants.
    {"W4+EC at the diagnostic's placement (--ec-placement)", Ec::kPlacement, false},
    {"W4+EC at the diagnostic's placement, v12 EC prologue (plain launch)", Ec::kPlacement, false,
     false, true, 0, true, false, 3},
    {"W4+EC at the diagnostic's placement, EC prologue as a plain launch (v14b)", Ec::kPlacement,
     false, false, true, 0, true, false, 2},
    {"W4+EC r32 all 4 GEMMs, all layers, v12 EC prologue (plain launch)", Ec::kAll, false, false,
     true, 0, true, false, 3},
    // 13-15: where the EC's time goes (14 and 15 compute wrong outputs: timing only).
    {"W4+EC at the diagnostic's placement, B fragments from global memory (v13)", Ec::kPlacement,
     false, false, true, 128},
    {"W4+EC at the diagnostic's placement, epilogue only (no prologue)", Ec::kPlacement, false,
     false, true, 0, true, false, 4},
    {"W4+EC at the diagnostic's placement, prologue only (no epilogue)", Ec::kPlacement, false,
     false, true, 0, true, false, 8},
    // 16-17 (v23): the fold kernel's configurations measured at load
    // (cuda::TuneDecode over the layers' weights of each GEMM).
    {"W4, decode configurations measured at load (v23)", Ec::kOff, false, false, true, 0, true,
     false, 0, true},
    {"W4+EC at the diagnostic's placement, decode configurations measured at load (v23)",
     Ec::kPlacement, false, false, true, 0, true, false, 0, true},
    // 18-19 (v27; timing only, wrong outputs): the prologue's launch alone (it
    // returns after its dependency wait), and u's partials without the
    // ticket and the gate.
    {"W4+EC at the diagnostic's placement, empty prologue launch (timing only)", Ec::kPlacement,
     false, false, true, 0, true, false, 64},
    {"W4+EC at the diagnostic's placement, prologue u only, no ticket or gate (timing only)",
     Ec::kPlacement, false, false, true, 0, true, false, 128},
    // 20-22 (v30): every producer of a GEMM's x triggers early (slower where
    // the GEMM has an EC), and the launch order before v30 (every producer
    // waits, then triggers) against rows 0 and 9 (the default: early where
    // the GEMM has no EC).
    {"W4+EC at the diagnostic's placement, every producer triggers early (v30)", Ec::kPlacement,
     false, false, true, 0, true, false, 0, false, 1},
    {"W4, producers trigger after their wait (before v30)", Ec::kOff, false, false, true, 0, true,
     false, 0, false, 0},
    {"W4+EC at the diagnostic's placement, producers trigger after their wait (before v30)",
     Ec::kPlacement, false, false, true, 0, true, false, 0, false, 0},
    // 23-25 (v44): 17..63 rows on the decode kernels (before v44) against
    // rows 0, 9 and 16 (the wgmma kernel's small token tiles there).
    {"W4, small token tiles off (before v44)", Ec::kOff, false, false, true, 0, true, false, 0,
     false, 2, 1},
    {"W4+EC at the diagnostic's placement, small token tiles off (before v44)", Ec::kPlacement,
     false, false, true, 0, true, false, 0, false, 2, 1},
    {"W4, decode configurations measured at load, small token tiles off (before v44)", Ec::kOff,
     false, false, true, 0, true, false, 0, true, 2, 1},
    // 26 (v44): the small tiles for the GEMMs with an EC at 17..32 rows too
    // (the default keeps those on the fold kernel and its fused EC).
    {"W4+EC at the diagnostic's placement, small token tiles for the EC'd GEMMs too", Ec::kPlacement,
     false, false, true, 0, true, false, 0, false, 2, 2},
    // 27 (v44e): the small tiles' EC (U and the gate) on the caller's stream
    // where the GEMM has < 32 Mi weights (before v44e), not on the second
    // stream beside the GEMM.
    {"W4+EC at the diagnostic's placement, small tiles' EC on the caller's stream below 32 Mi weights (before v44e)",
     Ec::kPlacement, false, false, true, 0, true, false, 0, false, 2, 0, -1},
    // 28 (v47): the v27 prologue (r x P blocks, a global ticket, the last
    // block's gate), not the one-cluster prologue (the default at <= 2 rows
    // before the fold kernel).
    {"W4+EC at the diagnostic's placement, the v27 prologue (before v47)", Ec::kPlacement, false,
     false, true, 0, true, false, 16},
    // 29-32 (timing only, wrong outputs): without the layers' RMSNorm and / or
    // SwiGLU launches (the most their fusion into the GEMMs could save).
    {.name = "W4, no layer RMSNorm launches (timing only)", .ec = Ec::kOff, .gemms_only = false,
     .no_norm = true},
    {.name = "W4, no SwiGLU launches (timing only)", .ec = Ec::kOff, .gemms_only = false,
     .no_silu = true},
    {.name = "W4, neither (timing only)", .ec = Ec::kOff, .gemms_only = false, .no_norm = true,
     .no_silu = true},
    {.name = "W4+EC at the diagnostic's placement, no layer RMSNorm / SwiGLU launches (timing only)",
     .ec = Ec::kPlacement, .gemms_only = false, .no_norm = true, .no_silu = true},
    // 33-34 (v49): the layers' RMSNorm as a launch of its own (before v49).
    {.name = "W4, RMSNorm launched apart (before v49)", .ec = Ec::kOff, .gemms_only = false,
     .norm_apart = true},
    {.name = "W4+EC at the diagnostic's placement, RMSNorm launched apart (before v49)",
     .ec = Ec::kPlacement, .gemms_only = false, .norm_apart = true},
    // 35-36 (v50): the attention combine as a second kernel (before v50).
    {.name = "W4, attention combine kernel (before v50)", .ec = Ec::kOff, .gemms_only = false,
     .combine_kernel = true},
    {.name = "W4+EC at the diagnostic's placement, attention combine kernel (before v50)",
     .ec = Ec::kPlacement, .gemms_only = false, .combine_kernel = true},
    // 37-40 (v50): the cluster combine in clusters of at most 16 / 4 partitions
    // (the default: 8).
    {.name = "W4, attention clusters <= 16", .ec = Ec::kOff, .gemms_only = false,
     .attn_cluster_max = 16},
    {.name = "W4+EC at the diagnostic's placement, attention clusters <= 16", .ec = Ec::kPlacement,
     .gemms_only = false, .attn_cluster_max = 16},
    {.name = "W4, attention clusters <= 4", .ec = Ec::kOff, .gemms_only = false,
     .attn_cluster_max = 4},
    {.name = "W4+EC at the diagnostic's placement, attention clusters <= 4", .ec = Ec::kPlacement,
     .gemms_only = false, .attn_cluster_max = 4},
    // 41 (v50): the attention lets the next launch start before its own wait
    // where the o GEMM has an EC too (its prologue launched early).
    {.name = "W4+EC at the diagnostic's placement, attention triggers early before EC'd o",
     .ec = Ec::kPlacement, .gemms_only = false, .attn_early = true},
    // 42 (v50): the cluster combine only where the o GEMM has no EC (the
    // combine kernel before EC'd o GEMMs).
    {.name = "W4+EC at the diagnostic's placement, attention cluster combine only before o without EC",
     .ec = Ec::kPlacement, .gemms_only = false, .attn_cluster_no_ec_o = true},
    // 43-44 (v51): SwiGLU launched apart (before v51).
    {.name = "W4, SwiGLU launched apart (before v51)", .ec = Ec::kOff, .gemms_only = false,
     .silu_apart = true},
    {.name = "W4+EC at the diagnostic's placement, SwiGLU launched apart (before v51)",
     .ec = Ec::kPlacement, .gemms_only = false, .silu_apart = true},
    // 45-48 (v52): the attention's K / V rows never prefetched before its
    // dependency wait (before v52) / always prefetched (the default decides
    // by the rows' bytes per position).
    {.name = "W4, attention without the row prefetch (before v52)", .ec = Ec::kOff,
     .gemms_only = false, .attn_prefetch = 2},
    {.name = "W4+EC at the diagnostic's placement, attention without the row prefetch (before v52)",
     .ec = Ec::kPlacement, .gemms_only = false, .attn_prefetch = 2},
    {.name = "W4, attention row prefetch always", .ec = Ec::kOff, .gemms_only = false,
     .attn_prefetch = 1},
    {.name = "W4+EC at the diagnostic's placement, attention row prefetch always",
     .ec = Ec::kPlacement, .gemms_only = false, .attn_prefetch = 1},
    // 49-50 (v56): the measured configurations with the layers' RMSNorm as a
    // launch of its own (against 33 / 34: whether a measured pick loses to
    // the norm inside the call).
    {.name = "W4, decode configurations measured at load, RMSNorm launched apart", .ec = Ec::kOff,
     .gemms_only = false, .tuned = true, .norm_apart = true},
    {.name = "W4+EC at the diagnostic's placement, decode configurations measured at load, RMSNorm launched apart",
     .ec = Ec::kPlacement, .gemms_only = false, .tuned = true, .norm_apart = true},
    // 51 (v58): the r x P prologue's gate (m >= 2, or where the cluster
    // does not fit) one warp per token wherever its staged weights do not
    // fit 40 KB, as before v58 (not W1 then W2 in two phases).
    {.name = "W4+EC at the diagnostic's placement, the warp gate past 40 KB (before v58)",
     .ec = Ec::kPlacement, .gemms_only = false, .ec_prologue = 512},
    // 52 (v60): the one-cluster prologue's u (m = 1) by the lanes' dot
    // products, as before v60 (not by tensor cores).
    {.name = "W4+EC at the diagnostic's placement, the cluster prologue's u by lanes (before v60)",
     .ec = Ec::kPlacement, .gemms_only = false, .ec_prologue = 1024},
    // 53 / 54 (timing only, the output is wrong): the one-cluster prologue
    // (m = 1) without loading A's slices, and its launch alone (the
    // dependency wait, then exit): what A's load and the prologue's work
    // add to the step.
    {.name = "W4+EC at the diagnostic's placement, cluster prologue without A's loads (timing only)",
     .ec = Ec::kPlacement, .gemms_only = false, .ec_prologue = 2048},
    {.name = "W4+EC at the diagnostic's placement, cluster prologue's launch alone (timing only)",
     .ec = Ec::kPlacement, .gemms_only = false, .ec_prologue = 4096}};
constexpr int kFirstPlacementVariant = 9;
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

// The four GEMMs of a layer: qkv, o, gate_up, down.
enum Group { kQkv, kOGroup, kGateUp, kDownGroup, kNumGroups };

struct Layer {
  std::unique_ptr<cuda::W4DeviceWeight> qkv, o, gate_up, down;
  // --ec-placement: the group's weight with its placed EC (null: no EC there).
  std::unique_ptr<cuda::W4DeviceWeight> placed[kNumGroups];
  float *norm1 = nullptr, *norm2 = nullptr;
  uint16_t *k_cache = nullptr, *v_cache = nullptr;
};

class Model {
 public:
  Model(const ModelShape& s, int max_batch, int ctx, std::mt19937& rng,
        const bench::EcPlacement* placement, double placement_pct)
      : shape_(s), ctx_(ctx) {
    const int64_t qkv_n = int64_t{s.n_q + 2 * s.n_kv} * s.head_dim;
    std::printf("# %s: building weights (W4 g128 + EC r32, %d layers)...\n", s.name, s.layers);
    std::fflush(stdout);
    const W4Weight wq = bench::RandomW4(qkv_n, s.hidden, kGroup, rng), wo = bench::RandomW4(s.hidden, s.hidden, kGroup, rng),
                   wgu = bench::RandomW4(2 * s.inter, s.hidden, kGroup, rng),
                   wd = bench::RandomW4(s.hidden, s.inter, kGroup, rng);
    const EcWeights eq = bench::RandomEc(qkv_n, s.hidden, rng), eo = bench::RandomEc(s.hidden, s.hidden, rng),
                    egu = bench::RandomEc(2 * s.inter, s.hidden, rng),
                    ed = bench::RandomEc(s.hidden, s.inter, rng);
    auto make = [](const W4Weight& w, const EcWeights& e) {
      auto r = cuda::W4DeviceWeight::Create(w, &e);
      CKS(r.status());
      return std::move(*r);
    };
    auto clone = [](const cuda::W4DeviceWeight& w) {
      auto r = w.Clone();
      CKS(r.status());
      return std::move(*r);
    };
    blocks_per_seq_ = (ctx + kBlock - 1) / kBlock;
    num_blocks_ = int64_t{max_batch} * blocks_per_seq_;
    const size_t cache_elems = static_cast<size_t>(num_blocks_) * kBlock * s.n_kv * s.head_dim;
    std::vector<float> ones(s.hidden);
    std::normal_distribution<float> nd;
    layers_.resize(s.layers);
    for (int l = 0; l < s.layers; ++l) {
      Layer& L = layers_[l];
      if (l == 0) {
        L.qkv = make(wq, eq);
        L.o = make(wo, eo);
        L.gate_up = make(wgu, egu);
        L.down = make(wd, ed);
      } else {
        L.qkv = clone(*layers_[0].qkv);
        L.o = clone(*layers_[0].o);
        L.gate_up = clone(*layers_[0].gate_up);
        L.down = clone(*layers_[0].down);
      }
      for (float*& nw : {std::ref(L.norm1), std::ref(L.norm2)}) {
        for (float& v : ones) v = 1.f + 0.1f * nd(rng);
        nw = Alloc<float>(s.hidden);
        CK(cudaMemcpy(nw, ones.data(), s.hidden * 4, cudaMemcpyHostToDevice));
      }
      L.k_cache = Alloc<uint16_t>(cache_elems);
      L.v_cache = Alloc<uint16_t>(cache_elems);
      FillHalf<<<1024, 256, 0, g_stream>>>(L.k_cache, cache_elems, 1.f, 2 * l + 1);
      FillHalf<<<1024, 256, 0, g_stream>>>(L.v_cache, cache_elems, 1.f, 2 * l + 2);
      CK(cudaGetLastError());
    }
    final_norm_ = Alloc<float>(s.hidden);
    for (float& v : ones) v = 1.f;
    CK(cudaMemcpy(final_norm_, ones.data(), s.hidden * 4, cudaMemcpyHostToDevice));
    embed_ = Alloc<uint16_t>(static_cast<size_t>(s.vocab * s.hidden));
    FillHalf<<<1024, 256, 0, g_stream>>>(embed_, static_cast<size_t>(s.vocab * s.hidden), 0.05f,
                                         77);
    if (s.tied) {
      lm_head_ = embed_;
    } else {
      lm_head_ = Alloc<uint16_t>(static_cast<size_t>(s.vocab * s.hidden));
      FillHalf<<<1024, 256, 0, g_stream>>>(lm_head_, static_cast<size_t>(s.vocab * s.hidden), 0.05f,
                                           78);
    }
    CK(cudaGetLastError());
    std::vector<float> inv(s.head_dim / 2);
    for (int j = 0; j < s.head_dim / 2; ++j)
      inv[j] = 1.f / std::pow(500000.f, 2.f * j / static_cast<float>(s.head_dim));
    inv_freq_ = Alloc<float>(inv.size());
    CK(cudaMemcpy(inv_freq_, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));

    // Per-sequence state: every sequence at context ctx (its new token at
    // position ctx - 1), pages shuffled over the pool.
    std::vector<int32_t> perm(num_blocks_);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> tables(static_cast<size_t>(max_batch) * blocks_per_seq_), pos(max_batch),
        slots(max_batch), lens(max_batch, ctx), ids(max_batch);
    for (size_t i = 0; i < tables.size(); ++i) tables[i] = perm[i];
    for (int b = 0; b < max_batch; ++b) {
      pos[b] = ctx - 1;
      slots[b] = tables[b * blocks_per_seq_ + (ctx - 1) / kBlock] * kBlock + (ctx - 1) % kBlock;
      ids[b] = static_cast<int32_t>(rng() % s.vocab);
    }
    auto up = [](const std::vector<int32_t>& v) {
      int32_t* d = Alloc<int32_t>(v.size());
      CK(cudaMemcpy(d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
      return d;
    };
    tables_ = up(tables);
    pos_ = up(pos);
    slots_ = up(slots);
    lens_ = up(lens);
    ids_ = up(ids);
    next_ = Alloc<int32_t>(max_batch);
    residual_ = Alloc<float>(static_cast<size_t>(max_batch) * s.hidden);
    h16_ = Alloc<uint16_t>(static_cast<size_t>(max_batch) * s.hidden);
    qkv_ = Alloc<uint16_t>(static_cast<size_t>(max_batch) * qkv_n);
    attn_ = Alloc<uint16_t>(static_cast<size_t>(max_batch) * s.n_q * s.head_dim);
    gu_ = Alloc<uint16_t>(static_cast<size_t>(max_batch) * 2 * s.inter);
    act_ = Alloc<uint16_t>(static_cast<size_t>(max_batch) * s.inter);
    logits_ = Alloc<float>(static_cast<size_t>(max_batch) * s.vocab);
    cuda::PagedDecodeAttentionParams ap = AttnParams(max_batch, layers_[0]);
    attn_ws_bytes_ = cuda::PagedDecodeAttentionWorkspaceBytes(ap);
    for (int b = 1; b < max_batch; ++b) {
      attn_ws_bytes_ = std::max(
          attn_ws_bytes_, cuda::PagedDecodeAttentionWorkspaceBytes(AttnParams(b, layers_[0])));
    }
    attn_ws_ = Alloc<uint8_t>(attn_ws_bytes_);
    for (int b = 1; b <= max_batch; ++b) {
      attn_tickets_ = std::max(attn_tickets_,
                               cuda::PagedDecodeAttentionTickets(AttnParams(b, layers_[0])));
    }
    tickets_ = Alloc<int32_t>(attn_tickets_);
    CK(cudaMemset(tickets_, 0, std::max<int64_t>(attn_tickets_, 1) * sizeof(int32_t)));
    auto ws = cuda::W4Workspace::Create();
    CKS(ws.status());
    ws_ = std::move(*ws);
    CKB(cublasCreate(&cublas_));
    CKB(cublasSetStream(cublas_, g_stream));
    cublas_ws_ = Alloc<uint8_t>(size_t{64} << 20);
    CKB(cublasSetWorkspace(cublas_, cublas_ws_, size_t{64} << 20));
    CK(cudaStreamSynchronize(g_stream));
    if (placement != nullptr) {
      const W4Weight* hw[kNumGroups] = {&wq, &wo, &wgu, &wd};
      BuildPlacement(*placement, placement_pct, hw, rng);
    }
  }

  // --ec-i8: the merged EC's B block-diagonal (member m's columns use only
  // its ranks), each member's A rows and B block rounded to the int8 grid on
  // their own (as each module's EC is stored), the EC marked int8.
  static void MembersOnGrid(const std::vector<std::array<int64_t, 3>>& members, EcWeights* e) {
    const int64_t R = e->rank, k = e->k;
    int64_t q0 = 0;
    std::vector<int64_t> owner_q0(static_cast<size_t>(e->n), -1), owner_r(static_cast<size_t>(e->n), 0);
    for (const auto& [c0, nc, r] : members) {
      for (int64_t c = c0; c < c0 + nc; ++c) owner_q0[c] = q0, owner_r[c] = r;
      std::vector<float> b(static_cast<size_t>(nc * r));
      for (int64_t c = 0; c < nc; ++c) {
        for (int64_t q = 0; q < r; ++q) b[c * r + q] = e->b[(c0 + c) * R + q0 + q];
      }
      CKS(RoundEcFactorsI8(nc, k, r, e->a.data() + q0 * k, b.data()));
      for (int64_t c = 0; c < nc; ++c) {
        for (int64_t q = 0; q < r; ++q) e->b[(c0 + c) * R + q0 + q] = b[c * r + q];
      }
      q0 += r;
    }
    for (int64_t c = 0; c < e->n; ++c) {
      for (int64_t q = 0; q < R; ++q) {
        if (q < owner_q0[c] || q >= owner_q0[c] + owner_r[c]) e->b[c * R + q] = 0.f;
      }
    }
    e->factors = EcFactors::kI8;
  }

  // --ec-placement: layer l of this model takes the ECs of layer
  // l * L_src / L of the checkpoint (q, k, v -> the qkv GEMM; gate, up ->
  // gate_up; a group's EC is its members' ECs side by side, rank = the sum,
  // gate hidden 16 per member, as CudaModelWeights merges them). Every rank
  // is scaled by one factor so that the EC bytes are `pct` % of this
  // model's served bytes (W4 layers + embedding + lm_head + norms), i.e. the
  // diagnostic's budget applied to this model; at least 1 per member.
  void BuildPlacement(const bench::EcPlacement& P, double pct, const W4Weight* const hw[],
                      std::mt19937& rng) {
    const ModelShape& s = shape_;
    const int64_t H = s.hidden, qn = int64_t{s.n_q} * s.head_dim,
                  kvn = int64_t{s.n_kv} * s.head_dim;
    const int64_t mn[bench::kNumMembers] = {qn, kvn, kvn, H, s.inter, s.inter, H};
    const int64_t mk[bench::kNumMembers] = {H, H, H, qn, H, H, s.inter};
    const int group_of[bench::kNumMembers] = {kQkv, kQkv, kQkv, kOGroup, kGateUp, kGateUp,
                                              kDownGroup};
    double served = 2.0 * s.vocab * H * (s.tied ? 1 : 2) + 4.0 * (2 * s.layers + 1) * H;
    for (const Layer& L : layers_) {
      for (const auto* w : {L.qkv.get(), L.o.get(), L.gate_up.get(), L.down.get()}) {
        served += static_cast<double>(w->backbone_bytes());
      }
    }
    auto src = [&](int l) { return P.ranks[static_cast<size_t>(int64_t{l} * P.num_layers / s.layers)]; };
    const EcFactors fac = g_ec_factors == 1 ? EcFactors::kI8 : EcFactors::kF16;
    double unit = 0;  // EC bytes (A row + B column as stored) per unit of source rank
    for (int l = 0; l < s.layers; ++l) {
      for (int i = 0; i < bench::kNumMembers; ++i) {
        unit += src(l)[i] * static_cast<double>(EcFactorBytesPerRank(mn[i], mk[i], fac));
      }
    }
    if (unit <= 0) {
      std::fprintf(stderr, "--ec-placement: the checkpoint has no EC on a decoder linear\n");
      std::exit(2);
    }
    const double scale = pct / 100.0 * served / unit;
    std::map<std::vector<int64_t>, std::unique_ptr<cuda::W4DeviceWeight>> proto;
    double ec_bytes = 0;      // on the device (merged; + gate MLPs)
    double member_bytes = 0;  // the checkpoint's accounting: each module's own A and B as stored
    int placed = 0, capped = 0;
    std::map<int64_t, int> rank_hist;
    for (int l = 0; l < s.layers; ++l) {
      Layer& L = layers_[l];
      int64_t rank[kNumGroups] = {}, gates[kNumGroups] = {};
      // (first column, columns, rank) of each member with an EC, by group
      std::vector<std::array<int64_t, 3>> members[kNumGroups];
      int64_t col0[kNumGroups] = {};
      for (int i = 0; i < bench::kNumMembers; ++i) {
        const int g = group_of[i];
        const int64_t c0 = col0[g];
        col0[g] += mn[i];
        if (src(l)[i] <= 0) continue;
        const int64_t r = std::max<int64_t>(1, std::llround(src(l)[i] * scale));
        rank[g] += r;
        gates[g] += g_ec_static ? 0 : 16;
        members[g].push_back({c0, mn[i], r});
        member_bytes += static_cast<double>(r * EcFactorBytesPerRank(mn[i], mk[i], fac));
      }
      for (int g = 0; g < kNumGroups; ++g) {
        if (rank[g] == 0) continue;
        const bool group_capped = rank[g] > 256;
        if (group_capped) {
          rank[g] = 256;
          ++capped;
        }
        const W4Weight& w = *hw[g];
        std::vector<int64_t> key = {g, rank[g], gates[g]};
        for (const auto& mb : members[g]) key.push_back(mb[2]);
        auto& pr = proto[key];
        if (!pr) {
          EcWeights e = bench::RandomEc(w.fmt.n, w.fmt.k, rng, rank[g], gates[g]);
          // (a group capped at rank 256 no longer holds its members' ranks:
          // it stays dense)
          if (fac == EcFactors::kI8 && !group_capped) MembersOnGrid(members[g], &e);
          auto r = cuda::W4DeviceWeight::Create(w, &e);
          CKS(r.status());
          pr = std::move(*r);
        }
        auto c = pr->Clone();
        CKS(c.status());
        L.placed[g] = std::move(*c);
        ec_bytes += static_cast<double>(L.placed[g]->ec_bytes());
        ++placed;
        ++rank_hist[rank[g]];
      }
    }
    std::printf("# %s EC placement: %d ECs of the checkpoint (%d layers) -> %d of %d GEMMs here, "
                "ranks x %.2f: the modules' own A and B %.1f MB = %.3f %% of %.3f GB served "
                "(target %.3f %%, %s factors); on the device (q/k/v and gate/up ECs merged, B in "
                "the tile layout; + gate MLPs) %.1f MB = %.3f %%%s; GEMM ranks:",
                s.name, P.num_ecs, P.num_layers, placed, kNumGroups * s.layers, scale,
                member_bytes / 1e6, 100.0 * member_bytes / served, served / 1e9, pct,
                fac == EcFactors::kI8 ? "int8" : "fp16", ec_bytes / 1e6, 100.0 * ec_bytes / served, capped ? " (some capped at 256)" : "");
    for (const auto& [r, n] : rank_hist) std::printf(" %lldx%d", static_cast<long long>(r), n);
    std::printf("\n");
    std::fflush(stdout);
  }

  ~Model() {
    cublasDestroy(cublas_);
    for (Layer& L : layers_) {
      cudaFree(L.norm1);
      cudaFree(L.norm2);
      cudaFree(L.k_cache);
      cudaFree(L.v_cache);
    }
    for (void* p : std::initializer_list<void*>{final_norm_, embed_, inv_freq_, tables_, pos_,
                                                slots_, lens_, ids_, next_, residual_, h16_, qkv_,
                                                attn_, gu_, act_, logits_, attn_ws_, tickets_, cublas_ws_}) {
      cudaFree(p);
    }
    if (!shape_.tied) cudaFree(lm_head_);
  }

  cuda::PagedDecodeAttentionParams AttnParams(int m, const Layer& L) const {
    cuda::PagedDecodeAttentionParams p;
    p.q = qkv_;
    p.num_seqs = m;
    p.ldq = int64_t{shape_.n_q + 2 * shape_.n_kv} * shape_.head_dim;
    p.n_heads = shape_.n_q;
    p.n_kv_heads = shape_.n_kv;
    p.head_dim = shape_.head_dim;
    p.k_cache = L.k_cache;
    p.v_cache = L.v_cache;
    p.block_size = kBlock;
    p.num_cache_blocks = num_blocks_;
    p.block_tables = tables_;
    p.max_blocks_per_seq = blocks_per_seq_;
    p.context_lens = lens_;
    p.max_context_len = ctx_;
    p.scale = 1.f / std::sqrt(static_cast<float>(shape_.head_dim));
    p.out = attn_;
    p.ldo = int64_t{shape_.n_q} * shape_.head_dim;
    p.workspace = attn_ws_;
    p.workspace_bytes = attn_ws_bytes_;
    return p;
  }

  static bool EcOn(Ec ec, int layer) {
    return ec == Ec::kAll || (ec == Ec::kEvery4th && layer % 4 == 0);
  }

  // v23: measures the fold kernel's configurations per GEMM (qkv, o,
  // gate_up, down over all layers' weights, so that they stream from DRAM)
  // for m = 1..8, keeps them aside and leaves the weights untuned;
  // ApplyTuning(true) puts them on every weight (the placed EC weights share
  // their group's shape), ApplyTuning(false) clears them.
  void Tune() {
    for (int g = 0; g < kNumGroups; ++g) {
      std::vector<cuda::W4DeviceWeight*> ws;
      for (Layer& L : layers_) ws.push_back(GroupWeight(L, g));
      CKS(cuda::TuneDecode(ws, cuda::W4DeviceWeight::kMaxTunedM, ws_.get(), g_stream));
      std::string picks;
      for (int m = 1; m <= cuda::W4DeviceWeight::kMaxTunedM; ++m) {
        tuning_[g][m] = ws[0]->decode_tuning(m);
        const auto& t = tuning_[g][m];
        picks += t.warps > 0 ? " " + std::to_string(t.warps) + "/" + std::to_string(t.splits) + "/" +
                                   std::to_string(t.depth) +
                                   (t.groups > 1 ? " G" + std::to_string(t.groups) : "")
                             : " -";
      }
      std::printf("# %s %s: measured picks for m = 1..8 (warps/splits/depth[ Gg: g warp groups], - = cost model):%s\n",
                  shape_.name, kGroupNames[g], picks.c_str());
    }
    ApplyTuning(false);
  }
  void ApplyTuning(bool on) {
    for (Layer& L : layers_) {
      for (int g = 0; g < kNumGroups; ++g) {
        for (cuda::W4DeviceWeight* w : {GroupWeight(L, g), L.placed[g].get()}) {
          if (w == nullptr) continue;
          for (int m = 1; m <= cuda::W4DeviceWeight::kMaxTunedM; ++m) {
            w->set_decode_tuning(m, on ? tuning_[g][m] : cuda::W4DeviceWeight::DecodeTuning{});
          }
        }
      }
    }
  }

  // Enqueues one decode step for batch m on g_stream.
  void Step(int m, const Variant& v) {
    const int64_t H = shape_.hidden,
                  qkv_n = int64_t{shape_.n_q + 2 * shape_.n_kv} * shape_.head_dim;
    auto gemm = [&](const cuda::W4DeviceWeight& w, const uint16_t* x, int64_t ldx, uint16_t* y16,
                    float* y32, int64_t ldy, bool ec, const float* norm_w = nullptr,
                    bool swiglu = false) {
      cuda::W4CudaParams p = bench::GemmParams(x, m, ldx, y16, ldy);
      if (swiglu) {  // v51: x = SiluMul(gate_up) inside the call (x = act_)
        p.x = nullptr;
        p.swiglu_gu = gu_;
        p.swiglu_ld = 2 * shape_.inter;
        p.swiglu_x_out = act_;
      }
      if (norm_w != nullptr) {  // v49: x = RMSNorm(residual) inside the call (x = h16_)
        p.x = nullptr;
        p.norm_h = residual_;
        p.norm_weight = norm_w;
        p.norm_ld = H;
        p.norm_eps = 1e-5f;
        p.norm_x_out = h16_;
      }
      p.y_f32 = y32;
      p.accumulate = y32 != nullptr;
      p.use_ec = ec;
      p.ec_prologue = v.ec_prologue;
      p.decode_kernel = v.fold_flags;
      p.small_tiles = v.small_tiles;
      // -1: the threshold before v44e (second stream only from 32 Mi weights)
      p.prefill_ec_stream =
          v.ec_stream >= 0 ? v.ec_stream
                           : (w.fmt().n * w.fmt().k >= (int64_t{32} << 20) ? 2 : 1);
      CKS(cuda::W4Linear(w, p, ws_.get(), g_stream));
    };
    if (!v.gemms_only) {
      cuda::EmbeddingParams e;
      e.table = embed_;
      e.vocab = shape_.vocab;
      e.d = H;
      e.ids = ids_;
      e.m = m;
      e.y_f32 = residual_;
      e.ldy = H;
      CKS(cuda::Embedding(e, g_stream));
    }
    for (int l = 0; l < shape_.layers; ++l) {
      const Layer& L = layers_[l];
      const bool ec = EcOn(v.ec, l);
      // The weight of group g in this variant, and whether its EC runs.
      using Pick = std::pair<const cuda::W4DeviceWeight*, bool>;
      auto pick = [&](Group g, const cuda::W4DeviceWeight& plain) -> Pick {
        if (v.ec == Ec::kPlacement) {
          return L.placed[g] ? Pick{L.placed[g].get(), true} : Pick{&plain, false};
        }
        return Pick{&plain, ec};
      };
      const auto [wqkv, eqkv] = pick(kQkv, *L.qkv);
      const auto [wo, eo] = pick(kOGroup, *L.o);
      const auto [wgu, egu] = pick(kGateUp, *L.gate_up);
      const auto [wdn, edn] = pick(kDownGroup, *L.down);
      // v30: a producer triggers early where its GEMM has no EC (v.early 2).
      auto early_for = [&](bool gemm_ec) { return v.early == 1 || (v.early == 2 && !gemm_ec); };
      cuda::RmsNormF16Params n;
      n.x = residual_;
      n.y = h16_;
      n.m = m;
      n.d = n.ldx = n.ldy = H;
      n.eps = 1e-5f;
      const bool norm_in = !v.gemms_only && !v.no_norm && !v.norm_apart;
      if (!v.gemms_only && !v.no_norm && v.norm_apart) {
        n.weight = L.norm1;
        n.early_trigger = early_for(eqkv);
        CKS(cuda::RmsNormF16(n, g_stream));
      }
      gemm(*wqkv, h16_, H, qkv_, nullptr, qkv_n, eqkv, norm_in ? L.norm1 : nullptr);
      if (!v.gemms_only && !v.skip_attention && v.fused) {
        cuda::RopeKvAppendParams f;
        f.qkv = qkv_;
        f.m = m;
        f.ldqkv = qkv_n;
        f.n_q_heads = shape_.n_q;
        f.n_kv_heads = shape_.n_kv;
        f.head_dim = shape_.head_dim;
        f.positions = pos_;
        f.inv_freq = inv_freq_;
        f.slots = slots_;
        f.k_cache = L.k_cache;
        f.v_cache = L.v_cache;
        f.block_size = kBlock;
        f.num_cache_blocks = num_blocks_;
        CKS(cuda::RopeKvAppend(f, g_stream));
        cuda::PagedDecodeAttentionParams ap = AttnParams(m, L);
        ap.tickets = v.tickets ? tickets_ : nullptr;
        ap.cluster_combine = !v.tickets && !v.combine_kernel && !(v.attn_cluster_no_ec_o && eo);
        ap.cluster_max = v.attn_cluster_max;
        ap.early_trigger = early_for(eo) || v.attn_early;
        ap.prefetch_rows = v.attn_prefetch;
        CKS(cuda::PagedDecodeAttention(ap, g_stream));
      } else if (!v.gemms_only && !v.skip_attention) {
        cuda::RopeF16Params r;
        r.x = qkv_;
        r.m = m;
        r.ldx = qkv_n;
        r.n_heads = shape_.n_q + shape_.n_kv;  // q and k are contiguous
        r.head_dim = shape_.head_dim;
        r.positions = pos_;
        r.inv_freq = inv_freq_;
        CKS(cuda::Rope(r, g_stream));
        cuda::KvAppendParams a;
        a.k = qkv_ + int64_t{shape_.n_q} * shape_.head_dim;
        a.v = qkv_ + int64_t{shape_.n_q + shape_.n_kv} * shape_.head_dim;
        a.m = m;
        a.ldk = a.ldv = qkv_n;
        a.n_kv_heads = shape_.n_kv;
        a.head_dim = shape_.head_dim;
        a.slots = slots_;
        a.k_cache = L.k_cache;
        a.v_cache = L.v_cache;
        a.block_size = kBlock;
        a.num_cache_blocks = num_blocks_;
        CKS(cuda::KvAppend(a, g_stream));
        cuda::PagedDecodeAttentionParams ap = AttnParams(m, L);
        ap.cluster_combine = false;  // (v12's form)
        ap.prefetch_rows = 2;
        ap.early_trigger = early_for(eo);
        CKS(cuda::PagedDecodeAttention(ap, g_stream));
      }
      gemm(*wo, attn_, int64_t{shape_.n_q} * shape_.head_dim, nullptr, residual_, H, eo);
      if (!v.gemms_only && !v.no_norm && v.norm_apart) {
        n.weight = L.norm2;
        n.early_trigger = early_for(egu);
        CKS(cuda::RmsNormF16(n, g_stream));
      }
      gemm(*wgu, h16_, H, gu_, nullptr, 2 * shape_.inter, egu, norm_in ? L.norm2 : nullptr);
      // v51: SwiGLU inside the down call (its launch apart in variants 43-44
      // and where the call cannot take it).
      const bool silu_in = !v.gemms_only && !v.no_silu && !v.silu_apart;
      if (!v.gemms_only && !v.no_silu && v.silu_apart) {
        cuda::SiluMulF16Params sm;
        sm.gate = gu_;
        sm.up = gu_ + shape_.inter;
        sm.y = act_;
        sm.m = m;
        sm.n = shape_.inter;
        sm.ld_gate = sm.ld_up = 2 * shape_.inter;
        sm.ldy = shape_.inter;
        sm.early_trigger = early_for(edn);
        CKS(cuda::SiluMul(sm, g_stream));
      }
      gemm(*wdn, act_, shape_.inter, nullptr, residual_, H, edn, nullptr, silu_in);
    }
    if (v.gemms_only) return;
    cuda::RmsNormF16Params n;
    n.x = residual_;
    n.weight = final_norm_;
    n.early_trigger = false;  // next: the lm_head through cuBLAS (no PDL), as the runner
    n.y = h16_;
    n.m = m;
    n.d = n.ldx = n.ldy = H;
    CKS(cuda::RmsNormF16(n, g_stream));
    const float alpha = 1.f, beta = 0.f;
    CKB(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(shape_.vocab), m,
                     static_cast<int>(H), &alpha, lm_head_, CUDA_R_16F, static_cast<int>(H), h16_,
                     CUDA_R_16F, static_cast<int>(H), &beta, logits_, CUDA_R_32F,
                     static_cast<int>(shape_.vocab), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    CKS(cuda::Argmax(logits_, m, shape_.vocab, shape_.vocab, next_, g_stream));
  }

  // Bytes one step must read: weights as laid out (+ EC where on), the KV
  // rows of every sequence, lm_head, embedding rows, norm weights.
  double FloorBytes(int m, const Variant& v) const {
    double b = 0;
    for (int l = 0; l < shape_.layers; ++l) {
      const Layer& L = layers_[l];
      for (const cuda::W4DeviceWeight* w :
           {L.qkv.get(), L.o.get(), L.gate_up.get(), L.down.get()}) {
        b += static_cast<double>(w->backbone_bytes());
        if (EcOn(v.ec, l)) b += static_cast<double>(w->ec_bytes());
      }
      if (v.ec == Ec::kPlacement) {
        for (const auto& w : L.placed) {
          if (w) b += static_cast<double>(w->ec_bytes());
        }
      }
    }
    if (v.gemms_only) return b;
    if (!v.skip_attention) {  // K and V rows, fp16
      b += 2.0 * m * ctx_ * shape_.layers * shape_.n_kv * shape_.head_dim * 2;
    }
    b += 2.0 * shape_.vocab * shape_.hidden;  // lm_head fp16
    b += 2.0 * m * shape_.hidden + 4.0 * (2 * shape_.layers + 1) * shape_.hidden;
    return b;
  }

  // Sum of the logits of the m rows, weighted by position (so that swapped
  // values change it too), in double.
  double LogitsChecksum(int m) {
    std::vector<float> h(static_cast<size_t>(m) * shape_.vocab);
    CK(cudaMemcpy(h.data(), logits_, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
    double s = 0;
    for (size_t i = 0; i < h.size(); ++i) s += static_cast<double>(h[i]) * (1.0 + (i % 97) * 1e-3);
    return s;
  }

  std::vector<int32_t> NextIds(int m) {
    std::vector<int32_t> v(m);
    CK(cudaMemcpy(v.data(), next_, m * 4, cudaMemcpyDeviceToHost));
    return v;
  }

 private:
  ModelShape shape_;
  int ctx_;
  int64_t blocks_per_seq_ = 0, num_blocks_ = 0;
  std::vector<Layer> layers_;
  float *final_norm_ = nullptr, *inv_freq_ = nullptr;
  uint16_t *embed_ = nullptr, *lm_head_ = nullptr;
  int32_t *tables_ = nullptr, *pos_ = nullptr, *slots_ = nullptr, *lens_ = nullptr, *ids_ = nullptr,
          *next_ = nullptr;
  float* residual_ = nullptr;
  uint16_t *h16_ = nullptr, *qkv_ = nullptr, *attn_ = nullptr, *gu_ = nullptr, *act_ = nullptr;
  float* logits_ = nullptr;
  uint8_t* attn_ws_ = nullptr;
  size_t attn_ws_bytes_ = 0;
  int32_t* tickets_ = nullptr;  // the attention's combine tickets (zero between calls)
  int64_t attn_tickets_ = 0;
  std::unique_ptr<cuda::W4Workspace> ws_;
  cublasHandle_t cublas_ = nullptr;
  uint8_t* cublas_ws_ = nullptr;
  cuda::W4DeviceWeight::DecodeTuning tuning_[kNumGroups][cuda::W4DeviceWeight::kMaxTunedM + 1];
  static cuda::W4DeviceWeight* GroupWeight(Layer& L, int g) {
    return g == kQkv ? L.qkv.get() : g == kOGroup ? L.o.get() : g == kGateUp ? L.gate_up.get()
                                                                              : L.down.get();
  }
  static constexpr const char* kGroupNames[kNumGroups] = {"qkv", "o", "gate_up", "down"};
};

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ',')) out.push_back(t);
  return out;
}

int Main(int argc, char** argv) {
  std::vector<std::string> models = {"8B", "1B"};
  std::vector<int> batches = {1, 8, 32};
  int ctx = 512, iters = 20;
  std::vector<int> variants(kFirstPlacementVariant);
  std::iota(variants.begin(), variants.end(), 0);
  bool variants_given = false;
  std::string placement_path;
  double placement_pct = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--models=", 0) == 0)
      models = Split(a.substr(9));
    else if (a.rfind("--ctx=", 0) == 0)
      ctx = std::stoi(a.substr(6));
    else if (a.rfind("--ec-placement=", 0) == 0)
      placement_path = a.substr(15);
    else if (a.rfind("--ec-pct=", 0) == 0)
      placement_pct = std::atof(a.substr(9).c_str());
    else if (a == "--ec-static")
      g_ec_static = true;
    else if (a == "--ec-i8")
      g_ec_factors = 1;
    else if (a == "--ec-fp16")
      g_ec_factors = 0;
    else if (a.rfind("--variants=", 0) == 0) {
      variants_given = true;
      variants.clear();
      for (const auto& t : Split(a.substr(11))) variants.push_back(std::stoi(t));
    } else if (a.rfind("--iters=", 0) == 0)
      iters = std::stoi(a.substr(8));
    else if (a.rfind("--batches=", 0) == 0) {
      batches.clear();
      for (const auto& t : Split(a.substr(10))) batches.push_back(std::stoi(t));
    } else {
      std::fprintf(stderr,
                   "unknown flag %s\nusage: %s [--models=8B,1B] [--ctx=512] "
                   "[--batches=1,8,32] [--iters=20] [--variants=0,...,54] "
                   "[--ec-placement=SPEAR_DIR [--ec-pct=P] [--ec-static] [--ec-i8 | --ec-fp16]]\n",
                   a.c_str(), argv[0]);
      return 2;
    }
  }
  std::unique_ptr<bench::EcPlacement> placement;
  if (!placement_path.empty()) {
    auto pl = bench::ReadEcPlacement(placement_path);
    if (!pl.ok()) {
      std::fprintf(stderr, "--ec-placement: %s\n", std::string(pl.status().message()).c_str());
      return 2;
    }
    placement = std::make_unique<bench::EcPlacement>(*pl);
    if (placement_pct < 0) placement_pct = placement->ec_pct;
    if (g_ec_factors < 0) g_ec_factors = placement->int8_factors ? 1 : 0;
    if (!variants_given) {
      for (int v = kFirstPlacementVariant; v < kNumVariants; ++v) variants.push_back(v);
    }
  }
  bool bad_variant = false;
  for (int v : variants) {
    bad_variant |= v < 0 || v >= kNumVariants;
    if (v >= 0 && v < kNumVariants && kVariants[v].ec == Ec::kPlacement && !placement) {
      std::fprintf(stderr, "variant %d needs --ec-placement=SPEAR_DIR\n", v);
      return 2;
    }
  }
  if (ctx < 1 || iters < 1 || batches.empty() || bad_variant ||
      (placement && !(placement_pct > 0 && placement_pct <= 100))) {
    std::fprintf(stderr, "bad flags\n");
    return 2;
  }
  CK(cudaSetDevice(0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  const double copy_bw = CopyBandwidth();
  std::printf("device: %s, %d SMs, L2 %d MB; copy bandwidth (read+write) %.0f GB/s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_bw / 1e9);
  std::printf("context %d tokens (KV block %d), graph replays: 3 warm-up + %d timed, median\n\n",
              ctx, kBlock, iters);
  std::mt19937 rng(1234);
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  std::printf(
      "| model | batch | variant | step ms | tokens/s | graph nodes | floor GB | floor ms | step / "
      "floor |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& name : models) {
    const ModelShape* s = nullptr;
    for (const auto& m : kModels)
      if (name == m.name) s = &m;
    if (s == nullptr) {
      std::fprintf(stderr, "unknown model %s\n", name.c_str());
      return 2;
    }
    auto model = std::make_unique<Model>(*s, max_batch, ctx, rng, placement.get(), placement_pct);
    if (std::any_of(variants.begin(), variants.end(), [](int v) { return kVariants[v].tuned; })) {
      model->Tune();
    }
    for (int b : batches) {
      for (int vi : variants) {
        const Variant& v = kVariants[vi];
        model->ApplyTuning(v.tuned);  // read by W4Linear at each call (capture below)
        cuda::SetProgrammaticLaunch(v.small_pdl);  // read at each launch (capture below)
        model->Step(b, v);  // once eagerly: first-call setup outside capture
        CK(cudaStreamSynchronize(g_stream));
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal));
        model->Step(b, v);
        CK(cudaStreamEndCapture(g_stream, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        size_t nodes = 0;
        CK(cudaGraphGetNodes(g, nullptr, &nodes));
        const double ms = TimeGraphExec(ge, iters);
        CK(cudaGetLastError());
        const double bytes = model->FloorBytes(b, v);
        const double floor_ms = bytes / copy_bw * 1e3;
        std::printf("| %s | %d | %s | %.3f | %.0f | %zu | %.3f | %.3f | %.2fx |\n", s->name, b,
                    v.name, ms, b / (ms * 1e-3), nodes, bytes / 1e9, floor_ms, ms / floor_ms);
        // The logits of the last replay: variants that compute the same
        // thing (W4 0 / 21; the placement 9 / 20 / 22) must agree to the
        // bit (each replay rewrites the one KV slot it reads; the step is
        // deterministic), so a race in a launch-order variant shows here.
        std::printf("# logits checksum %s b%d variant %d: %.17g\n", s->name, b, vi,
                    model->LogitsChecksum(b));
        std::fflush(stdout);
        CK(cudaGraphExecDestroy(ge));
        CK(cudaGraphDestroy(g));
        cuda::SetProgrammaticLaunch(true);
      }
      const auto ids = model->NextIds(b);
      std::printf("# %s batch %d: next token of seq 0 = %d\n", s->name, b, ids[0]);
    }
    model.reset();
  }
  return 0;
}

}  // namespace
}  // namespace spear::kernels

int main(int argc, char** argv) { return spear::kernels::Main(argc, argv); }
