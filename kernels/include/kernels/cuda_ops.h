// CUDA backend ops (built when SPEAR_WITH_CUDA; sm_90a by default).
// Same semantics as the CPU ops of ops.h; pointers are device pointers and
// the op is enqueued on `stream` (nothing synchronises). The W4(+EC) GEMMs
// are in w4_cuda.h; below RMSNorm come the fp16 ops of a decode step.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "kernels/op_params.h"

typedef struct CUstream_st* cudaStream_t;
typedef struct CUgraphExec_st* cudaGraphExec_t;

namespace spear::kernels::cuda {

// Number of usable CUDA devices; an error status (never a crash) when the
// driver or runtime is missing, so callers can skip or fall back.
absl::StatusOr<int> DeviceCount();

// Records what `enqueue` puts on `stream` (thread-local capture mode) into
// a graph and instantiates it; the caller owns the result
// (cudaGraphExecDestroy). enqueue's own error is returned as it is; a CUDA
// error of the capture or the instantiation as Internal. Nothing is leaked
// on any path, and the stream is out of capture mode on return.
absl::StatusOr<cudaGraphExec_t> CaptureGraph(cudaStream_t stream,
                                             absl::FunctionRef<absl::Status()> enqueue);

// RMSNorm (with the optional fused residual add) of RmsNormParams, device
// pointers. One thread block per row.
absl::Status RmsNorm(const RmsNormParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------
// The rest of the decoder layer (issue 5, part 2). Activations are IEEE fp16
// (uint16_t bit patterns) on the device, accumulation is fp32; the residual
// stream stays fp32 (the W4 GEMMs add into it with W4CudaParams::accumulate).
// All pointers are device pointers; all ops are enqueued on `stream`, never
// synchronise and allocate nothing, so they can be captured into a CUDA
// graph. InvalidArgument for bad parameters (nothing enqueued), Internal for
// CUDA errors.

// Programmatic dependent launch (PDL) of the ops below (and RmsNorm): each
// kernel may launch while the previous kernel of its stream still runs and
// waits on the device (griddepcontrol.wait) before touching memory, so the
// results and their order are those of plain launches; only the launch
// latency overlaps (kernels/cuda/pdl.cuh). On by default; process-wide (a
// kill switch, and the A/B of spear_bench_decode_cuda). Thread-safe; read at
// each launch, so a captured graph keeps the setting it was captured with.
void SetProgrammaticLaunch(bool on);
bool ProgrammaticLaunchEnabled();

// RMSNorm as RmsNormParams (fp32 x, optional fp32 residual added in place,
// fp32 weight) with the normalised row written as fp16 into y (row stride
// ldy): the input of the next W4 GEMM.
struct RmsNormF16Params {
  const float* x = nullptr;       // [m, d], stride ldx
  float* residual = nullptr;      // optional [m, d], stride ldr
  const float* weight = nullptr;  // [d]
  uint16_t* y = nullptr;          // fp16 [m, d], stride ldy
  int64_t m = 0, d = 0, ldx = 0, ldr = 0, ldy = 0;
  float eps = 1e-5f;
  // v30: let the next kernel launch before this one's dependency wait
  // instead of after it (kernels/cuda/pdl.cuh). Same results. Set it where
  // the next kernel is a W4 GEMM without an EC: the GEMM's blocks are then
  // resident and fetching weights earlier (8B W4 decode step -1.7 % at
  // batch 1, -2.8 % at 8); before a GEMM with an EC prologue it measured
  // slower (docs/results/gpu.md, "v30").
  bool early_trigger = false;
};
absl::Status RmsNormF16(const RmsNormF16Params& p, cudaStream_t stream);

// RoPE of RopeParams (HF rotate_half, angle p * inv_freq[j] formed in fp32,
// cos/sin times attention_scaling) on fp16 x, in place. positions [m] and
// inv_freq [head_dim / 2] are device arrays. To rotate q and k of a fused
// qkv row in one launch, pass n_heads = n_q + n_kv (they are contiguous).
struct RopeF16Params {
  uint16_t* x = nullptr;  // [m, n_heads * head_dim], stride ldx
  int64_t m = 0, ldx = 0;
  int n_heads = 0, head_dim = 0;
  const int32_t* positions = nullptr;  // [m]
  const float* inv_freq = nullptr;     // [head_dim / 2]
  float attention_scaling = 1.f;
};
absl::Status Rope(const RopeF16Params& p, cudaStream_t stream);

// y[i, j] = silu(gate[i, j]) * up[i, j] (SiluMulParams) in fp16, computed in
// fp32. For the gate_up W4 GEMM output [m, 2F] (weight rows: F gate rows,
// then F up rows): gate = out, up = out + F, ld_gate = ld_up = 2F, n = F.
struct SiluMulF16Params {
  const uint16_t* gate = nullptr;
  const uint16_t* up = nullptr;
  uint16_t* y = nullptr;  // may alias gate
  int64_t m = 0, n = 0, ld_gate = 0, ld_up = 0, ldy = 0;
  bool early_trigger = false;  // as RmsNormF16Params::early_trigger
};
absl::Status SiluMul(const SiluMulF16Params& p, cudaStream_t stream);

// Paged fp16 KV cache, the layout of AttentionParams:
// k_cache / v_cache [num_blocks, block_size, n_kv_heads, head_dim]; physical
// slot s = block * block_size + offset.
//
// KvAppend writes token i's k and v rows (n_kv_heads * head_dim fp16 each)
// into slot slots[i] of both caches. A slot < 0 (padding) or >= num_blocks *
// block_size is skipped (never written out of bounds; the engine validates
// slots on the host).
struct KvAppendParams {
  const uint16_t* k = nullptr;  // [m, n_kv_heads * head_dim], stride ldk
  const uint16_t* v = nullptr;  // [m, n_kv_heads * head_dim], stride ldv
  int64_t m = 0, ldk = 0, ldv = 0;
  int n_kv_heads = 0, head_dim = 0;
  const int32_t* slots = nullptr;  // [m], device
  uint16_t* k_cache = nullptr;
  uint16_t* v_cache = nullptr;
  int block_size = 0;
  int64_t num_cache_blocks = 0;
};
absl::Status KvAppend(const KvAppendParams& p, cudaStream_t stream);

// RoPE of q and k and the KV-cache append of a fused qkv row, in ONE launch
// (one graph node instead of two per layer): exactly Rope with n_heads =
// n_q_heads + n_kv_heads on qkv (q and k rotated in place), then KvAppend of
// k = qkv + n_q_heads * head_dim (rotated) and v = k + n_kv_heads * head_dim
// (the next n_kv_heads * head_dim values of the row, not rotated). The cache
// receives the same fp16 values that the row holds afterwards; slot rules as
// KvAppend (a slot < 0 or >= num_cache_blocks * block_size is skipped).
struct RopeKvAppendParams {
  uint16_t* qkv = nullptr;  // [m, (n_q + 2 n_kv) * head_dim], stride ldqkv
  int64_t m = 0, ldqkv = 0;
  int n_q_heads = 0, n_kv_heads = 0, head_dim = 0;
  const int32_t* positions = nullptr;  // [m]
  const float* inv_freq = nullptr;     // [head_dim / 2]
  float attention_scaling = 1.f;
  const int32_t* slots = nullptr;  // [m], device
  uint16_t* k_cache = nullptr;
  uint16_t* v_cache = nullptr;
  int block_size = 0;
  int64_t num_cache_blocks = 0;
};
absl::Status RopeKvAppend(const RopeKvAppendParams& p, cudaStream_t stream);

// Decode attention over a paged KV cache: one query token per sequence,
// GQA (query head h reads kv head h / (n_heads / n_kv_heads)). Sequence s
// attends to its positions [0, context_lens[s]) (the new token's K/V must be
// appended first); position t lives in block block_tables[s * max_blocks +
// t / block_size], offset t % block_size. Softmax in fp32 with max
// subtraction; output fp16. context_lens[s] == 0 gives a zero row; lengths
// above max_context_len are clamped to it, block ids outside
// [0, num_cache_blocks) read as masked (never out of bounds).
//
// Split-K (flash-decoding): the context is cut into partitions so that
// sequences x kv heads x partitions fill the GPU even at batch 1; each
// partition writes an unnormalised partial output with its max and sum into
// the workspace, and they are combined (log-sum-exp rescaling; nothing to
// combine when one partition covers max_context_len). With `tickets` the
// combine runs inside the split launch (one graph node): the last block of
// each (sequence, head group) to finish, found by an atomic ticket, combines
// its group's partitions in partition order, so the result does not depend
// on which block came last (deterministic); without tickets, or past 512
// partitions (contexts over 256K tokens), a second kernel combines.
// head_dim 64 or 128; any GQA ratio.
struct PagedDecodeAttentionParams {
  const uint16_t* q = nullptr;  // [num_seqs, n_heads * head_dim], stride ldq
  int64_t num_seqs = 0, ldq = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  const uint16_t* k_cache = nullptr;
  const uint16_t* v_cache = nullptr;
  int block_size = 0;
  int64_t num_cache_blocks = 0;
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  int64_t max_blocks_per_seq = 0;
  const int32_t* context_lens = nullptr;  // [num_seqs], device
  int64_t max_context_len = 0;            // host-side bound: sets the grid
  float scale = 0.f;                      // usually 1/sqrt(head_dim)
  uint16_t* out = nullptr;                // [num_seqs, n_heads * head_dim], stride ldo
  int64_t ldo = 0;
  void* workspace = nullptr;  // PagedDecodeAttentionWorkspaceBytes(p) bytes
  size_t workspace_bytes = 0;
  // Optional, [PagedDecodeAttentionTickets(p)] ints: zero before the first
  // call (cudaMemset once after allocating), and every call leaves them zero
  // again, so one array serves every later call (and graph replay) whose
  // ticket count is not larger. Calls that use it must be ordered (one
  // stream). Null: the separate combine kernel. Measured on the H200 (8B
  // shapes, ctx 512, docs/results/gpu.md v13b): the in-launch combine was
  // slower at batch 1 (+0.06 ms a step) and equal at batch 8, so the decode
  // step passes none.
  int32_t* tickets = nullptr;
  bool early_trigger = false;  // as RmsNormF16Params::early_trigger (split and combine)
  // v50: where <= cluster_max partitions cover max_context_len without
  // making them longer than 64 tokens or than the split's own partitions
  // (at batch 1 up to 512 tokens with the default; at batch 8 up to 2560),
  // the partitions of a head group run as one thread-block cluster and
  // combine through distributed shared memory inside the one launch (no
  // workspace, no tickets needed; outputs deterministic). Longer partitions
  // measured slower (docs/results/gpu.md, v50). false, or where it does not
  // apply: as above.
  bool cluster_combine = true;
  // v50: the largest cluster (partitions) the cluster combine may use, 2..16
  // (the device's own cap applies too); a smaller cap means fewer, longer
  // partitions. Values outside 2..16 are refused. Default 8: on the H200 the
  // 8B / 1B decode steps at batch 1 were 0.02-0.04 ms faster with clusters of
  // <= 8 than <= 16 or <= 4, equal at batch 8 (docs/results/gpu.md, v50).
  int cluster_max = 8;
  // v52: the split kernel requests its partition's K / V rows into L2 before
  // its dependency wait (programmatic dependent launch), i.e. under the tail
  // of the launch before it (addresses from the page table read there; only
  // hints, so always safe). 0 automatic: where the launch's K and V take
  // <= kPrefetchRowBytes per position (num_seqs x kv heads x head_dim x 4
  // bytes). On the H200 (docs/results/gpu.md, v52 and "The v52c rule
  // checked"), over 8B / 1B at batches 1-16 and contexts 512 / 2048, the
  // prefetch made the decode step faster at every point of <= 8 KiB per
  // position (seven, 0.004-0.030 ms), slower at every point of >= 32 KiB
  // (four, 0.0085-0.17 ms) and at two of the three points of 16 KiB (8B
  // batch 4 at context 512 +0.013 ms, 1B batch 8 at 2048 +0.020; 1B batch
  // 8 at 512 -0.007), hence 8 KiB (was 16). Per position, so it ignores the
  // context's length. 1 always, 2 never (testing / benchmarks); other
  // values are refused.
  int prefetch_rows = 0;
  static constexpr int64_t kPrefetchRowBytes = 8 << 10;
};
// Whether this call takes the cluster combine (v50) on the current device.
bool PagedDecodeAttentionCombinesInCluster(const PagedDecodeAttentionParams& p);
// Whether this call's split kernel prefetches its K / V rows before its
// dependency wait (prefetch_rows, v52).
bool PagedDecodeAttentionPrefetchesRows(const PagedDecodeAttentionParams& p);
// Number of ints `tickets` must hold for these sizes (num_seqs x kv heads x
// head groups of 8; 0 for invalid parameters).
int64_t PagedDecodeAttentionTickets(const PagedDecodeAttentionParams& p);
// Scratch the call needs for these sizes without the cluster combine (0 when
// one partition suffices; the cluster combine needs none).
size_t PagedDecodeAttentionWorkspaceBytes(const PagedDecodeAttentionParams& p);
absl::Status PagedDecodeAttention(const PagedDecodeAttentionParams& p, cudaStream_t stream);

// out[i, :] = table[ids[i], :] (fp16 table [vocab, d]); exactly one of
// y_f32 / y_f16 (row stride ldy). An id outside [0, vocab) gives a zero row.
struct EmbeddingParams {
  const uint16_t* table = nullptr;
  int64_t vocab = 0, d = 0;
  const int32_t* ids = nullptr;  // [m], device
  int64_t m = 0;
  float* y_f32 = nullptr;
  uint16_t* y_f16 = nullptr;
  int64_t ldy = 0;
};
absl::Status Embedding(const EmbeddingParams& p, cudaStream_t stream);

// Greedy sampling: out[i] = argmax_j logits[i, j] (fp32 [m, n], stride ld);
// ties go to the lowest index, NaN never wins (an all-NaN row gives 0).
absl::Status Argmax(const float* logits, int64_t m, int64_t n, int64_t ld, int32_t* out,
                    cudaStream_t stream);

// Sampling on the device (kernels/cuda/sampling.cu): row i of logits is
// sampled as the host Sampler (worker/engine/sampler.h, Sampler::Pick)
// samples it with the uniform draw params[i].uniform: repetition penalty
// over the row's history tokens, then greedy (temperature 0) or top-k,
// top-p and temperature. Deterministic (the same tokens for any cluster
// size). One thread-block cluster per row.
struct SampleRowParams {
  float temperature = 0.f;        // 0 = greedy
  int32_t top_k = 0;              // 0 = off
  float top_p = 1.f;              // (0, 1]
  float repetition_penalty = 1.f; // 1 = off
  double uniform = 0.0;           // [0, 1); unused when greedy
  int64_t hist_begin = 0, hist_len = 0;  // the row's tokens in hist
};
struct SampleRowsArgs {
  float* logits = nullptr;  // [m, ld] fp32; the penalty is applied IN PLACE
  int64_t m = 0, n = 0, ld = 0;
  const SampleRowParams* params = nullptr;  // [m], device
  const int32_t* hist = nullptr;  // device; ids outside [0, n) are ignored
  float* hist_vals = nullptr;     // device scratch, as long as hist
  int32_t* cand = nullptr;        // device scratch [m, 4 n] (16 bytes a token)
  int32_t* out = nullptr;         // [m], device
  // Blocks per row (a thread-block cluster): 0 = automatic (8 while rows x
  // 8 fit the SMs, halved until they do); 1, 2, 4, 8 force it (tests,
  // benchmarks).
  int cluster = 0;
};
// InvalidArgument for bad sizes or null pointers (the params' own values
// are the caller's: validated on the host, SamplingParams::Validate).
absl::Status SampleRows(const SampleRowsArgs& a, cudaStream_t stream);

}  // namespace spear::kernels::cuda
