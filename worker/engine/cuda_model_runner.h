// One forward pass of a LLaMA-family W4(+EC) model over a batch of
// sequences on one CUDA GPU, with a device paged KV cache (built only with
// SPEAR_WITH_CUDA; library spear_engine_cuda).
//
// Same batch contract as ModelRunner (model_runner.h): SeqChunks of any
// length (prefill chunks, single decode tokens) mix freely in one batch;
// block tables index THIS runner's KV cache (allocate them from
// allocator()). Per forward: embedding -> per layer [RMSNorm to fp16 ->
// qkv W4 -> RoPE -> KV append -> attention -> o W4 (+= residual) -> RMSNorm
// -> gate_up W4 -> SwiGLU -> down W4 (+= residual)] -> final RMSNorm ->
// lm_head (cuBLAS fp16, fp32 logits) [-> argmax | -> sampling]. Residual stream fp32,
// activations fp16, KV fp16.
//
// Attention: every token of the batch is one query row of the paged decode
// attention kernel, attending to positions [0, its position] of its
// sequence's pages (its K/V appended first). For a decode token that is
// decode attention; for a prefill chunk it is causal attention (each query
// row reads its prefix: O(T * context), the simple correct choice; a flash
// prefill kernel is future work).
//
// CUDA graphs: a batch of B single tokens that all want logits (a decode
// step) is captured once per (B, context bucket) — the bucket is the
// longest context rounded up to a power of two, which sets the attention
// grid — and replayed afterwards: the inputs (ids, positions, slots,
// context lengths, page tables) are copied into fixed device buffers before
// the replay. Nothing synchronises inside an iteration except the final
// copy of the results to the host.
//
// ECs: a W4Linear's ec_enabled() is read at every Forward. Modules fused
// into one device weight (q/k/v, gate/up) must agree (FailedPrecondition
// otherwise); a change of any flag drops the captured graphs.
//
// Ownership: borrows the model (must outlive the runner); owns the device
// weights, KV cache, scratch, stream, cuBLAS handle and graphs.
// Thread-safety: one Forward at a time (not re-entrant); the allocator is
// internally synchronised.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/w4_cuda.h"
#include "worker/engine/cuda_model_weights.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/model_runner.h"
#include "worker/engine/sampler.h"

typedef struct cublasContext* cublasHandle_t;
typedef struct CUgraphExec_st* cudaGraphExec_t;

namespace spear::engine {

struct CudaRunnerOptions {
  int block_size = 16;
  // KV capacity: num_blocks if > 0, else as many blocks as fit in kv_bytes.
  int64_t num_blocks = 0;
  int64_t kv_bytes = int64_t{1} << 30;
  // Decode steps of at most this many sequences replay CUDA graphs (larger
  // ones run eagerly); 0 disables graphs.
  int max_graph_batch = 64;
  // CudaBackend samples on the device (ForwardSample; only token ids come
  // back). false: the engine samples on the host from fp32 logits rows.
  bool device_sampling = true;
  // At load, measure the W4 decode kernel's launch configuration per weight
  // shape for 1..8 rows (DeviceModelWeights::TuneDecode; 0.17-0.66 s
  // measured, SmolLM2 the longest) instead of the cost model's guess
  // (docs/results/gpu.md, v23: decode steps 0.3-6.4 % faster on the 8B
  // shape, 4.6-6.5 % on the 1B shape).
  bool tune_decode = true;
  // At load, measure the prefill path's main GEMM (dequantize + cuBLAS or a
  // wgmma kernel straight from the W4 layout) per weight shape for launches
  // of 64 up to this many rows (DeviceModelWeights::TunePrefill; v34,
  // docs/results/gpu.md); 0: off (dequantize + cuBLAS). CreateEngine sets
  // it to EngineOptions::max_batch_tokens (default 512), the most rows a
  // step's GEMMs take.
  int64_t tune_prefill_max_m = 512;
};

class CudaModelRunner {
 public:
  // Uploads the weights (DeviceModelWeights::Create's errors), allocates
  // the KV cache and scratch. Unavailable when no CUDA device is present.
  static absl::StatusOr<std::unique_ptr<CudaModelRunner>> Create(const model::LoadedModel* model,
                                                                 const CudaRunnerOptions& options);
  ~CudaModelRunner();
  CudaModelRunner(const CudaModelRunner&) = delete;
  CudaModelRunner& operator=(const CudaModelRunner&) = delete;

  // Runs the batch, writes its K/V into the device cache; then, if `out`
  // is set, the requested logits rows (fp32, as ModelRunner::Forward) are
  // copied to the host, and if `argmax` is set, the argmax of every logits
  // row is computed on the device and copied (argmax->size() = rows); if
  // `sample` is set (one RowSampling per logits row, kLast / kNone chunks
  // only), every row is sampled on the device (kernels::cuda::SampleRows,
  // after the step, outside its graph) and the ids are copied into
  // `sampled` (sampled->size() = rows).
  // InvalidArgument (before touching the cache) as ModelRunner::Forward, or
  // for a `sample` that does not match the rows; Internal for CUDA / cuBLAS
  // errors.
  absl::Status Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out,
                       std::vector<int32_t>* argmax = nullptr,
                       const std::vector<RowSampling>* sample = nullptr,
                       std::vector<int32_t>* sampled = nullptr);

  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }
  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t BlocksFor(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  const model::LoadedModel& model() const { return *model_; }
  const DeviceModelWeights& weights() const { return *weights_; }

  // Counters for tests and benchmarks.
  int64_t graphs_captured() const { return graphs_captured_; }
  int64_t graph_replays() const { return graph_replays_; }

 private:
  struct Plan;  // one forward's sizes (cuda_model_runner.cc)
  CudaModelRunner(const model::LoadedModel* model, int block_size, int64_t num_blocks);
  absl::Status Init(const CudaRunnerOptions& options);
  absl::Status Validate(const std::vector<SeqChunk>& batch) const;
  // Grows scratch for T tokens / R logits rows / tables of `stride`; any
  // reallocation drops the graphs (they hold the old pointers).
  absl::Status EnsureCapacity(int64_t T, int64_t R, int64_t stride, int64_t bucket);
  absl::Status ReadEcFlags(std::vector<uint8_t>* flags) const;
  // Device sampling of rows R (history tokens H) after the step's logits.
  absl::Status EnqueueSampling(const std::vector<RowSampling>& rows, int64_t R);
  // Enqueues the whole forward on stream_ (capturable when p.graph).
  absl::Status Enqueue(const Plan& p);
  // norm_weight (v49): x = RMSNorm(residual_) with this weight, computed by
  // the GEMM's kernels where they can (W4CudaParams::norm_h), else written
  // into x first (x must then be h16_). swiglu (v51): x = SiluMul of gu_'s
  // gate and up halves, likewise (W4CudaParams::swiglu_gu; x must be act_).
  absl::Status RunLinear(const DeviceLinear& lin, const uint16_t* x, int64_t m, int64_t ldx,
                         uint16_t* y16, float* y32, int64_t ldy, bool accumulate,
                         kernels::cuda::W4Workspace* ws, const float* norm_weight = nullptr,
                         bool swiglu = false);
  void DropGraphs();
  void NotifyGateObservers(int64_t T);

  const model::LoadedModel* model_;
  const int block_size_;
  const int64_t num_blocks_;
  BlockAllocator allocator_;
  std::unique_ptr<DeviceModelWeights> weights_;
  int max_graph_batch_ = 0;
  std::vector<float> inv_freq_host_;

  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_ws_ = nullptr;
  // Graph-path workspace (reserved for max_graph_batch rows at Init, never
  // grows) and the eager one (grows for large prefills).
  std::unique_ptr<kernels::cuda::W4Workspace> ws_graph_, ws_eager_;

  // Device KV cache: per layer K and V, fp16 [num_blocks, block, n_kv, hd].
  std::vector<uint16_t*> k_cache_, v_cache_;
  float* inv_freq_ = nullptr;

  // Scratch (device), sized for cap_tokens_ rows.
  int64_t cap_tokens_ = 0, cap_rows_ = 0, cap_ints_ = 0;
  size_t cap_attn_ws_ = 0;
  float* residual_ = nullptr;
  uint16_t *h16_ = nullptr, *qkv_ = nullptr, *attn_ = nullptr, *gu_ = nullptr, *act_ = nullptr,
           *sel_ = nullptr;
  float* logits_ = nullptr;
  int32_t* next_ = nullptr;
  int32_t* inputs_ = nullptr;       // device: ids, positions, slots, lens, tables
  int32_t* inputs_host_ = nullptr;  // pinned staging of the same
  void* attn_ws_ = nullptr;
  // Device sampling: per-row parameters, history ids and their logits,
  // the kept tokens of each row (ids, keys, masses: [rows][4 vocab] int32s),
  // the sampled ids; pinned host staging of the parameters + history.
  int64_t samp_rows_ = 0, samp_hist_cap_ = 0;
  unsigned char* samp_params_ = nullptr;
  int32_t *samp_hist_ = nullptr, *samp_cand_ = nullptr, *samp_out_ = nullptr;
  float* samp_hvals_ = nullptr;
  unsigned char* samp_host_ = nullptr;
  int64_t samp_host_bytes_ = 0;

  // EC flags (one per decoder linear module, ForEachLinear order) the
  // graphs were captured with.
  std::vector<uint8_t> ec_flags_;
  // Gate observers (model::W4Linear::set_gate_observer, e.g. the worker's
  // gate statistics): while any is installed, every EC writes its gate
  // values into gate_dev_ [cap_tokens_][gate_cols] and Forward hands each
  // module its columns after the step.
  bool observe_gates_ = false;
  float* gate_dev_ = nullptr;
  std::vector<float> gate_host_, gate_slice_;
  // (batch, context bucket) -> graph.
  std::map<std::pair<int64_t, int64_t>, cudaGraphExec_t> graphs_;
  int64_t graphs_captured_ = 0, graph_replays_ = 0;
};

}  // namespace spear::engine
