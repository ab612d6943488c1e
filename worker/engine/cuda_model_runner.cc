#include "worker/engine/cuda_model_runner.h"

#include "kernels/cuda/cublas_loader.h"
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda_ops.h"

#define SPEAR_CUBLAS_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                        \
    const cublasStatus_t spear_cublas_st_ = (expr);                                           \
    if (spear_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                          \
      return absl::InternalError(absl::StrCat(#expr, " failed at ", __FILE__, ":", __LINE__, \
                                              ": cuBLAS status ",                             \
                                              static_cast<int>(spear_cublas_st_)));           \
    }                                                                                         \
  } while (0)

namespace spear::engine {

namespace kc = kernels::cuda;

namespace {

constexpr size_t kCublasWorkspace = size_t{32} << 20;

template <typename T>
absl::Status DevAlloc(T** p, size_t n) {
  if (*p != nullptr) {
    SPEAR_CUDA_RETURN_IF_ERROR(cudaFree(*p));
    *p = nullptr;
  }
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(p), std::max<size_t>(n, 1) * sizeof(T)));
  return absl::OkStatus();
}

int64_t RoundUpPow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Whether `piece` runs its EC now; *mixed when its fused modules disagree.
bool PieceUseEc(const DeviceLinear::Piece& piece, bool* mixed) {
  int on = 0, with_ec = 0;
  for (const model::W4Linear* m : piece.modules) {
    if (!m->has_ec()) continue;
    ++with_ec;
    on += m->ec_enabled() ? 1 : 0;
  }
  *mixed = on != 0 && on != with_ec;
  return on > 0;
}

// v30: whether x's producer may let the next kernel launch before its own
// wait (early_trigger): where that kernel is a W4 GEMM without an EC (the
// first piece's; measured faster there, slower before an EC prologue:
// docs/results/gpu.md, "v30"). Read at capture; the graph key holds the EC
// states.
bool EarlyBefore(const DeviceLinear& lin) {
  bool mixed = false;
  return !lin.pieces.empty() && !PieceUseEc(lin.pieces.front(), &mixed);
}

}  // namespace

// One forward's sizes. Inputs (int32, device inputs_): ids [T], positions
// [T], slots [T], context lengths [T], page tables [T, stride].
struct CudaModelRunner::Plan {
  int64_t T = 0, R = 0, stride = 0, bucket = 0;
  bool identity_rows = false;  // logits rows are all tokens in order
  // (first token row, count): copied to consecutive rows of sel_.
  std::vector<std::pair<int64_t, int64_t>> sel;
  bool argmax = false;
};

CudaModelRunner::CudaModelRunner(const model::LoadedModel* model, int block_size,
                                 int64_t num_blocks)
    : model_(model), block_size_(block_size), num_blocks_(num_blocks), allocator_(num_blocks) {}

absl::StatusOr<std::unique_ptr<CudaModelRunner>> CudaModelRunner::Create(
    const model::LoadedModel* model, const CudaRunnerOptions& o) {
  if (model == nullptr) return absl::InvalidArgumentError("CudaModelRunner: null model");
  auto n = kc::DeviceCount();
  if (!n.ok() || *n == 0) {
    return absl::UnavailableError(absl::StrCat(
        "CudaModelRunner: no CUDA device (", n.ok() ? "0 devices" : n.status().message(), ")"));
  }
  const model::ModelConfig& c = model->config;
  if (o.block_size <= 0 || o.max_graph_batch < 0) {
    return absl::InvalidArgumentError("CudaModelRunner: bad options");
  }
  if (c.head_dim != 64 && c.head_dim != 128) {
    return absl::UnimplementedError(
        absl::StrCat("CudaModelRunner: head_dim ", c.head_dim, " (the kernels take 64 or 128)"));
  }
  const int64_t per_block = c.num_layers * 2 * int64_t{o.block_size} * c.num_kv_heads * c.head_dim * 2;
  const int64_t blocks = o.num_blocks > 0 ? o.num_blocks : o.kv_bytes / per_block;
  if (blocks <= 0 || blocks > std::numeric_limits<int32_t>::max() / o.block_size) {
    return absl::InvalidArgumentError("CudaModelRunner: KV cache size");
  }
  auto r = std::unique_ptr<CudaModelRunner>(new CudaModelRunner(model, o.block_size, blocks));
  if (absl::Status s = r->Init(o); !s.ok()) return s;
  return r;
}

absl::Status CudaModelRunner::Init(const CudaRunnerOptions& o) {
  const model::ModelConfig& c = model_->config;
  auto w = DeviceModelWeights::Create(*model_);
  if (!w.ok()) return w.status();
  weights_ = std::move(*w);
  max_graph_batch_ = o.max_graph_batch;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  SPEAR_CUBLAS_RETURN_IF_ERROR(kernels::cuda::blas::Create(&cublas_));
  SPEAR_CUBLAS_RETURN_IF_ERROR(kernels::cuda::blas::SetStream(cublas_, stream_));
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&cublas_ws_, kCublasWorkspace));
  SPEAR_CUBLAS_RETURN_IF_ERROR(kernels::cuda::blas::SetWorkspace(cublas_, cublas_ws_, kCublasWorkspace));
  auto wg = kc::W4Workspace::Create();
  if (!wg.ok()) return wg.status();
  ws_graph_ = std::move(*wg);
  auto we = kc::W4Workspace::Create();
  if (!we.ok()) return we.status();
  ws_eager_ = std::move(*we);
  if (o.tune_decode) {
    const auto t0 = std::chrono::steady_clock::now();
    auto tuned = weights_->TuneDecode(ws_eager_.get(), stream_);
    if (!tuned.ok()) return tuned.status();
    spdlog::info("CUDA: decode kernel configurations measured for {} weight shapes in {:.2f} s",
                 *tuned,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  if (o.tune_prefill_max_m != 0) {
    const auto t0 = std::chrono::steady_clock::now();
    auto tuned = weights_->TunePrefill(ws_eager_.get(), o.tune_prefill_max_m, stream_);
    if (!tuned.ok()) return tuned.status();
    spdlog::info("CUDA: prefill GEMM kernels measured for {} weight shapes in {:.2f} s", *tuned,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  // The graph workspace never grows after this (graphs hold its pointers).
  const int64_t reserve_m = std::max(max_graph_batch_, 1);
  auto reserve = [&](const DeviceLinear& lin) -> absl::Status {
    for (const DeviceLinear::Piece& p : lin.pieces) {
      if (absl::Status s = ws_graph_->Reserve(*p.w, reserve_m); !s.ok()) return s;
    }
    return absl::OkStatus();
  };
  for (const DeviceLayer& L : weights_->layers()) {
    for (const DeviceLinear* lin : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
      if (absl::Status s = reserve(*lin); !s.ok()) return s;
    }
  }
  if (weights_->lm_head_w4() != nullptr) {
    if (absl::Status s = reserve(*weights_->lm_head_w4()); !s.ok()) return s;
  }
  const size_t cache_elems =
      static_cast<size_t>(num_blocks_) * block_size_ * c.num_kv_heads * c.head_dim;
  k_cache_.assign(c.num_layers, nullptr);
  v_cache_.assign(c.num_layers, nullptr);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (absl::Status s = DevAlloc(&k_cache_[l], cache_elems); !s.ok()) return s;
    if (absl::Status s = DevAlloc(&v_cache_[l], cache_elems); !s.ok()) return s;
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMemset(k_cache_[l], 0, cache_elems * 2));
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMemset(v_cache_[l], 0, cache_elems * 2));
  }
  inv_freq_host_ = c.RopeInvFreq();
  if (absl::Status s = DevAlloc(&inv_freq_, inv_freq_host_.size()); !s.ok()) return s;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq_, inv_freq_host_.data(),
                                        inv_freq_host_.size() * 4, cudaMemcpyHostToDevice));
  return EnsureCapacity(reserve_m, reserve_m, BlocksFor(256), 256);
}

CudaModelRunner::~CudaModelRunner() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  DropGraphs();
  for (uint16_t* p : k_cache_) cudaFree(p);
  for (uint16_t* p : v_cache_) cudaFree(p);
  for (void* p : std::initializer_list<void*>{inv_freq_, residual_, h16_, qkv_, attn_, gu_, act_,
                                              sel_, logits_, next_, inputs_, attn_ws_,
                                              cublas_ws_, gate_dev_, samp_params_, samp_hist_,
                                              samp_cand_, samp_out_, samp_hvals_}) {
    if (p != nullptr) cudaFree(p);
  }
  if (inputs_host_ != nullptr) cudaFreeHost(inputs_host_);
  if (samp_host_ != nullptr) cudaFreeHost(samp_host_);
  if (cublas_ != nullptr) kernels::cuda::blas::Destroy(cublas_);
  ws_graph_.reset();
  ws_eager_.reset();
  weights_.reset();
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void CudaModelRunner::DropGraphs() {
  for (auto& [key, ge] : graphs_) cudaGraphExecDestroy(ge);
  graphs_.clear();
}

absl::Status CudaModelRunner::Validate(const std::vector<SeqChunk>& batch) const {
  int64_t T = 0;
  if (absl::Status s = ValidateBatch(batch, model_->config.vocab_size, int64_t{1} << 24,
                                     block_size_, num_blocks_, &T);
      !s.ok()) {
    return s;
  }
  if (T > 65535) {
    return absl::InvalidArgumentError("Forward: more than 65535 tokens in one batch");
  }
  for (const SeqChunk& ch : batch) {
    if (ch.hidden) {
      return absl::InvalidArgumentError(
          "Forward: the CUDA runner does not return hidden states (SeqChunk::hidden)");
    }
  }
  return absl::OkStatus();
}

absl::Status CudaModelRunner::EnsureCapacity(int64_t T, int64_t R, int64_t stride,
                                             int64_t bucket) {
  const model::ModelConfig& c = model_->config;
  const int64_t d = c.hidden_size, hd = c.head_dim, qd = c.num_heads * hd,
                qkv_n = (c.num_heads + 2 * c.num_kv_heads) * hd, ff = c.intermediate_size;
  kc::PagedDecodeAttentionParams ap;
  ap.num_seqs = T;
  ap.ldq = qkv_n;
  ap.n_heads = static_cast<int>(c.num_heads);
  ap.n_kv_heads = static_cast<int>(c.num_kv_heads);
  ap.head_dim = static_cast<int>(hd);
  ap.block_size = block_size_;
  ap.num_cache_blocks = num_blocks_;
  ap.max_blocks_per_seq = stride;
  ap.max_context_len = bucket;
  ap.ldo = qd;
  // Validate() inside the size query checks pointers; give it dummies.
  ap.q = ap.k_cache = ap.v_cache = ap.out = reinterpret_cast<uint16_t*>(16);
  ap.block_tables = ap.context_lens = reinterpret_cast<const int32_t*>(16);
  ap.scale = 1.f;
  const size_t attn_ws = kc::PagedDecodeAttentionWorkspaceBytes(ap);
  const int64_t ints = 4 * T + T * stride;
  const bool grow_t = T > cap_tokens_, grow_r = R > cap_rows_, grow_i = ints > cap_ints_,
             grow_a = attn_ws > cap_attn_ws_;
  if (!grow_t && !grow_r && !grow_i && !grow_a) return absl::OkStatus();
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  DropGraphs();
  if (grow_t) {
    const int64_t t = std::max(T, 2 * cap_tokens_);
    if (auto s = DevAlloc(&residual_, t * d); !s.ok()) return s;
    if (auto s = DevAlloc(&h16_, t * d); !s.ok()) return s;
    if (auto s = DevAlloc(&qkv_, t * qkv_n); !s.ok()) return s;
    if (auto s = DevAlloc(&attn_, t * qd); !s.ok()) return s;
    if (auto s = DevAlloc(&gu_, t * 2 * ff); !s.ok()) return s;
    if (auto s = DevAlloc(&act_, t * ff); !s.ok()) return s;
    if (weights_->gate_cols() > 0) {
      if (auto s = DevAlloc(&gate_dev_, t * weights_->gate_cols()); !s.ok()) return s;
    }
    cap_tokens_ = t;
  }
  if (grow_r) {
    const int64_t r = std::max(R, cap_rows_ * 2);
    if (auto s = DevAlloc(&sel_, r * d); !s.ok()) return s;
    if (auto s = DevAlloc(&logits_, r * c.vocab_size); !s.ok()) return s;
    if (auto s = DevAlloc(&next_, r); !s.ok()) return s;
    cap_rows_ = r;
  }
  if (grow_i) {
    const int64_t n = std::max(ints, 2 * cap_ints_);
    if (auto s = DevAlloc(&inputs_, n); !s.ok()) return s;
    if (inputs_host_ != nullptr) SPEAR_CUDA_RETURN_IF_ERROR(cudaFreeHost(inputs_host_));
    inputs_host_ = nullptr;
    SPEAR_CUDA_RETURN_IF_ERROR(
        cudaHostAlloc(reinterpret_cast<void**>(&inputs_host_), n * 4, cudaHostAllocDefault));
    cap_ints_ = n;
  }
  if (grow_a) {
    const size_t b = std::max(attn_ws, 2 * cap_attn_ws_);
    if (attn_ws_ != nullptr) SPEAR_CUDA_RETURN_IF_ERROR(cudaFree(attn_ws_));
    attn_ws_ = nullptr;
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMalloc(&attn_ws_, b));
    cap_attn_ws_ = b;
  }
  return absl::OkStatus();
}

absl::Status CudaModelRunner::ReadEcFlags(std::vector<uint8_t>* flags) const {
  flags->clear();
  bool observed = false;
  for (size_t l = 0; l < weights_->layers().size(); ++l) {
    const DeviceLayer& L = weights_->layers()[l];
    for (const DeviceLinear* lin : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
      for (const DeviceLinear::Piece& p : lin->pieces) {
        bool mixed = false;
        flags->push_back(PieceUseEc(p, &mixed) ? 1 : 0);
        for (const model::W4Linear* m : p.modules) observed |= m->has_ec() && m->has_gate_observer();
        if (mixed) {
          return absl::FailedPreconditionError(absl::StrCat(
              "CUDA runner: layer ", l,
              ": the ECs of modules fused into one GPU weight (q/k/v or gate/up) must be "
              "enabled or disabled together"));
        }
      }
    }
  }
  // Last entry: gate observers installed (the captured graphs then write
  // the gate buffer).
  flags->push_back(observed && weights_->gate_cols() > 0 ? 1 : 0);
  return absl::OkStatus();
}

absl::Status CudaModelRunner::RunLinear(const DeviceLinear& lin, const uint16_t* x, int64_t m,
                                        int64_t ldx, uint16_t* y16, float* y32, int64_t ldy,
                                        bool accumulate, kc::W4Workspace* ws,
                                        const float* norm_weight, bool swiglu) {
  if (norm_weight != nullptr && x != h16_) {
    return absl::InternalError("RunLinear: x = RMSNorm(residual) goes through h16_");
  }
  if (swiglu && (x != act_ || norm_weight != nullptr)) {
    return absl::InternalError("RunLinear: x = SiluMul(gate_up) goes through act_, without a norm");
  }
  // x's producer (v49: the norm; v51: SiluMul), set on a call's parameters:
  // computed in the call's kernels where they can, else written into x first
  // (either way the same bits).
  const int64_t ff = model_->config.intermediate_size;
  auto set_x = [&](kc::W4CudaParams* p) {
    p->x = nullptr;
    if (norm_weight != nullptr) {
      p->norm_h = residual_;
      p->norm_weight = norm_weight;
      p->norm_ld = model_->config.hidden_size;
      p->norm_eps = static_cast<float>(model_->config.rms_eps);
      p->norm_x_out = h16_;
    } else {
      p->swiglu_gu = gu_;
      p->swiglu_ld = 2 * ff;
      p->swiglu_x_out = act_;
    }
  };
  bool produce = norm_weight != nullptr || swiglu;
  if (produce && lin.pieces.size() > 1) {  // one producer launch for all pieces
    kc::W4CudaParams q;
    q.m = m;
    q.ldx = ldx;
    set_x(&q);
    if (absl::Status s = kc::W4LinearXApart(q, ldx, EarlyBefore(lin), stream_); !s.ok()) return s;
    produce = false;
  }
  for (const DeviceLinear::Piece& piece : lin.pieces) {
    bool mixed = false;
    kc::W4CudaParams p;
    p.x = x;
    p.m = m;
    p.ldx = ldx;
    if (produce) set_x(&p);
    p.bias = piece.bias;
    p.y_f16 = y16 != nullptr ? y16 + piece.col0 : nullptr;
    p.y_f32 = y32 != nullptr ? y32 + piece.col0 : nullptr;
    p.ldy = ldy;
    p.accumulate = accumulate;
    p.use_ec = PieceUseEc(piece, &mixed);
    if (observe_gates_ && p.use_ec && piece.gate_col >= 0) {
      p.gate_out = gate_dev_ + piece.gate_col;
      p.gate_ld = weights_->gate_cols();
    }
    if (absl::Status s = kc::W4Linear(*piece.w, p, ws, stream_); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status CudaModelRunner::Enqueue(const Plan& p) {
  const model::ModelConfig& c = model_->config;
  const int64_t T = p.T, d = c.hidden_size, hd = c.head_dim, qd = c.num_heads * hd,
                kvd = c.num_kv_heads * hd, qkv_n = qd + 2 * kvd, ff = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_eps);
  kc::W4Workspace* ws = T <= max_graph_batch_ ? ws_graph_.get() : ws_eager_.get();
  const int32_t* ids = inputs_;
  const int32_t* pos = inputs_ + T;
  const int32_t* slots = inputs_ + 2 * T;
  const int32_t* lens = inputs_ + 3 * T;
  const int32_t* tables = inputs_ + 4 * T;

  kc::EmbeddingParams e;
  e.table = weights_->embed();
  e.vocab = c.vocab_size;
  e.d = d;
  e.ids = ids;
  e.m = T;
  e.y_f32 = residual_;
  e.ldy = d;
  if (absl::Status s = kc::Embedding(e, stream_); !s.ok()) return s;
  for (size_t l = 0; l < weights_->layers().size(); ++l) {
    const DeviceLayer& L = weights_->layers()[l];
    // v49: the attention's RMSNorm inside the qkv GEMM's call (its kernels
    // normalize x themselves at one row; else RmsNormF16 as before).
    if (absl::Status s =
            RunLinear(L.qkv, h16_, T, d, qkv_, nullptr, qkv_n, false, ws, L.attn_norm);
        !s.ok()) {
      return s;
    }
    // RoPE of q and k + the KV append of k and v: one launch.
    kc::RopeKvAppendParams r;
    r.qkv = qkv_;
    r.m = T;
    r.ldqkv = qkv_n;
    r.n_q_heads = static_cast<int>(c.num_heads);
    r.n_kv_heads = static_cast<int>(c.num_kv_heads);
    r.head_dim = static_cast<int>(hd);
    r.positions = pos;
    r.inv_freq = inv_freq_;
    r.slots = slots;
    r.k_cache = k_cache_[l];
    r.v_cache = v_cache_[l];
    r.block_size = block_size_;
    r.num_cache_blocks = num_blocks_;
    if (absl::Status s = kc::RopeKvAppend(r, stream_); !s.ok()) return s;
    kc::PagedDecodeAttentionParams ap;
    ap.q = qkv_;
    ap.num_seqs = T;
    ap.ldq = qkv_n;
    ap.n_heads = static_cast<int>(c.num_heads);
    ap.n_kv_heads = static_cast<int>(c.num_kv_heads);
    ap.head_dim = static_cast<int>(hd);
    ap.k_cache = k_cache_[l];
    ap.v_cache = v_cache_[l];
    ap.block_size = block_size_;
    ap.num_cache_blocks = num_blocks_;
    ap.block_tables = tables;
    ap.max_blocks_per_seq = p.stride;
    ap.context_lens = lens;
    ap.max_context_len = p.bucket;
    ap.scale = 1.f / std::sqrt(static_cast<float>(hd));
    ap.out = attn_;
    ap.ldo = qd;
    ap.workspace = attn_ws_;
    ap.workspace_bytes = cap_attn_ws_;
    ap.early_trigger = EarlyBefore(L.o);
    // No tickets: the combine kernel after the split (the combine inside the
    // split launch measured slower at batch 1 and equal at 8: gpu.md, v13b).
    if (absl::Status s = kc::PagedDecodeAttention(ap, stream_); !s.ok()) return s;
    if (absl::Status s = RunLinear(L.o, attn_, T, qd, nullptr, residual_, d, true, ws); !s.ok()) {
      return s;
    }
    if (absl::Status s =
            RunLinear(L.gate_up, h16_, T, d, gu_, nullptr, 2 * ff, false, ws, L.ffn_norm);
        !s.ok()) {
      return s;
    }
    // v51: down's x = SiluMul(gate_up) inside its call (RunLinear).
    if (absl::Status s =
            RunLinear(L.down, act_, T, ff, nullptr, residual_, d, true, ws, nullptr, true);
        !s.ok()) {
      return s;
    }
  }
  if (p.R == 0) return absl::OkStatus();
  // The final norm (the layers' are inside their qkv / gate_up calls).
  kc::RmsNormF16Params n;
  n.x = residual_;
  n.y = h16_;
  n.m = T;
  n.d = n.ldx = n.ldy = d;
  n.eps = eps;
  n.weight = weights_->final_norm();
  n.early_trigger = false;  // next: row selection copies or the lm_head (not PDL)
  if (absl::Status s = kc::RmsNormF16(n, stream_); !s.ok()) return s;
  const uint16_t* src = h16_;
  if (!p.identity_rows) {
    int64_t r = 0;
    for (const auto& [t0, cnt] : p.sel) {
      SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sel_ + r * d, h16_ + t0 * d, cnt * d * 2,
                                                 cudaMemcpyDeviceToDevice, stream_));
      r += cnt;
    }
    src = sel_;
  }
  if (weights_->lm_head_f16() != nullptr) {
    const float alpha = 1.f, beta = 0.f;
    SPEAR_CUBLAS_RETURN_IF_ERROR(kernels::cuda::blas::GemmEx(
        cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(c.vocab_size), static_cast<int>(p.R),
        static_cast<int>(d), &alpha, weights_->lm_head_f16(), CUDA_R_16F, static_cast<int>(d), src,
        CUDA_R_16F, static_cast<int>(d), &beta, logits_, CUDA_R_32F,
        static_cast<int>(c.vocab_size), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  } else if (absl::Status s = RunLinear(*weights_->lm_head_w4(), src, p.R, d, nullptr, logits_,
                                        c.vocab_size, false, ws);
             !s.ok()) {
    return s;
  }
  if (p.argmax) {
    return kc::Argmax(logits_, p.R, c.vocab_size, c.vocab_size, next_, stream_);
  }
  return absl::OkStatus();
}

// Runs after the step on stream_ (outside its graph): stages the rows'
// parameters and history ids (pinned), then kc::SampleRows over logits_.
// The buffers grow here; the previous Forward ended with a stream sync, so
// nothing still reads the old ones.
absl::Status CudaModelRunner::EnqueueSampling(const std::vector<RowSampling>& rows, int64_t R) {
  const int64_t V = model_->config.vocab_size;
  int64_t H = 0;
  for (const RowSampling& r : rows) H += static_cast<int64_t>(r.history.size());
  const int64_t pbytes = R * static_cast<int64_t>(sizeof(kc::SampleRowParams));
  const int64_t host_bytes = pbytes + 4 * H;
  if (R > samp_rows_) {
    const int64_t r = std::max(R, 2 * samp_rows_);
    if (auto s = DevAlloc(&samp_params_, r * sizeof(kc::SampleRowParams)); !s.ok()) return s;
    if (auto s = DevAlloc(&samp_cand_, r * V * 4); !s.ok()) return s;
    if (auto s = DevAlloc(&samp_out_, r); !s.ok()) return s;
    samp_rows_ = r;
  }
  if (H > samp_hist_cap_) {
    const int64_t h = std::max(H, 2 * samp_hist_cap_);
    if (auto s = DevAlloc(&samp_hist_, h); !s.ok()) return s;
    if (auto s = DevAlloc(&samp_hvals_, h); !s.ok()) return s;
    samp_hist_cap_ = h;
  }
  if (host_bytes > samp_host_bytes_) {
    const int64_t b = std::max(host_bytes, 2 * samp_host_bytes_);
    if (samp_host_ != nullptr) SPEAR_CUDA_RETURN_IF_ERROR(cudaFreeHost(samp_host_));
    samp_host_ = nullptr;
    SPEAR_CUDA_RETURN_IF_ERROR(
        cudaHostAlloc(reinterpret_cast<void**>(&samp_host_), b, cudaHostAllocDefault));
    samp_host_bytes_ = b;
  }
  auto* params = reinterpret_cast<kc::SampleRowParams*>(samp_host_);
  auto* hist = reinterpret_cast<int32_t*>(samp_host_ + pbytes);
  int64_t at = 0;
  for (int64_t i = 0; i < R; ++i) {
    const RowSampling& r = rows[i];
    kc::SampleRowParams& p = params[i];
    p.temperature = r.params.temperature;
    p.top_k = r.params.top_k;
    p.top_p = r.params.top_p;
    p.repetition_penalty = r.params.repetition_penalty;
    p.uniform = r.uniform;
    p.hist_begin = at;
    p.hist_len = static_cast<int64_t>(r.history.size());
    std::copy(r.history.begin(), r.history.end(), hist + at);
    at += p.hist_len;
  }
  SPEAR_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(samp_params_, params, pbytes, cudaMemcpyHostToDevice, stream_));
  if (H > 0) {
    SPEAR_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(samp_hist_, hist, 4 * H, cudaMemcpyHostToDevice, stream_));
  }
  kc::SampleRowsArgs a;
  a.logits = logits_;
  a.m = R;
  a.n = V;
  a.ld = V;
  a.params = reinterpret_cast<const kc::SampleRowParams*>(samp_params_);
  a.hist = samp_hist_;
  a.hist_vals = samp_hvals_;
  a.cand = samp_cand_;
  a.out = samp_out_;
  return kc::SampleRows(a, stream_);
}

absl::Status CudaModelRunner::Forward(const std::vector<SeqChunk>& batch, ForwardOutput* out,
                                      std::vector<int32_t>* argmax,
                                      const std::vector<RowSampling>* sample,
                                      std::vector<int32_t>* sampled) {
  if (absl::Status s = Validate(batch); !s.ok()) return s;
  if ((sample == nullptr) != (sampled == nullptr)) {
    return absl::InvalidArgumentError("Forward: sample and sampled go together");
  }
  if (sample != nullptr) {
    int64_t rows = 0;
    for (const SeqChunk& ch : batch) {
      if (ch.logits == LogitsMode::kAll) {
        return absl::InvalidArgumentError("Forward: device sampling takes kLast / kNone chunks");
      }
      rows += ch.logits == LogitsMode::kLast ? 1 : 0;
    }
    if (rows != static_cast<int64_t>(sample->size())) {
      return absl::InvalidArgumentError(absl::StrCat("Forward: ", sample->size(),
                                                     " sampling rows for ", rows, " logits rows"));
    }
    for (const RowSampling& r : *sample) {
      if (absl::Status s = r.params.Validate(); !s.ok()) return s;
      if (!(r.uniform >= 0.0 && r.uniform < 1.0)) {
        return absl::InvalidArgumentError(absl::StrCat("Forward: uniform draw ", r.uniform,
                                                       " outside [0, 1)"));
      }
    }
  }
  const model::ModelConfig& c = model_->config;
  Plan p;
  int64_t max_end = 0;
  bool decode = true;
  std::vector<int64_t> first_row(batch.size(), -1);
  for (size_t s = 0; s < batch.size(); ++s) {
    const SeqChunk& ch = batch[s];
    const int64_t len = static_cast<int64_t>(ch.tokens.size());
    max_end = std::max(max_end, ch.start_pos + len);
    decode &= len == 1 && ch.logits != LogitsMode::kNone;
    if (ch.logits != LogitsMode::kNone) {
      first_row[s] = p.R;
      const int64_t cnt = ch.logits == LogitsMode::kAll ? len : 1;
      p.sel.push_back({p.T + len - cnt, cnt});
      p.R += cnt;
    }
    p.T += len;
  }
  p.identity_rows = p.R == p.T;  // every row of every chunk, in order
  p.bucket = std::max<int64_t>(RoundUpPow2(max_end), block_size_);
  p.stride = BlocksFor(p.bucket);
  const bool graph = decode && p.T <= max_graph_batch_;
  p.argmax = graph || argmax != nullptr;
  if (absl::Status s = EnsureCapacity(p.T, p.R, p.stride, p.bucket); !s.ok()) return s;

  // Inputs: ids, positions, slots, context lengths, page tables.
  int32_t* ids = inputs_host_;
  int32_t* pos = ids + p.T;
  int32_t* slots = ids + 2 * p.T;
  int32_t* lens = ids + 3 * p.T;
  int32_t* tables = ids + 4 * p.T;
  int64_t t = 0;
  for (const SeqChunk& ch : batch) {
    const int64_t nb = static_cast<int64_t>(ch.block_table.size());
    for (size_t i = 0; i < ch.tokens.size(); ++i, ++t) {
      const int64_t q = ch.start_pos + static_cast<int64_t>(i);
      ids[t] = ch.tokens[i];
      pos[t] = static_cast<int32_t>(q);
      slots[t] = ch.block_table[q / block_size_] * block_size_ + static_cast<int32_t>(q % block_size_);
      lens[t] = static_cast<int32_t>(q + 1);
      int32_t* row = tables + t * p.stride;
      for (int64_t j = 0; j < p.stride; ++j) row[j] = j < nb ? ch.block_table[j] : -1;
    }
  }
  std::vector<uint8_t> flags;
  if (absl::Status s = ReadEcFlags(&flags); !s.ok()) return s;
  if (flags != ec_flags_) {
    SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    DropGraphs();
    ec_flags_ = flags;
  }
  observe_gates_ = flags.back() != 0;
  SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(inputs_, inputs_host_, (4 + p.stride) * p.T * 4,
                                             cudaMemcpyHostToDevice, stream_));
  if (graph) {
    const auto key = std::make_pair(p.T, p.bucket);
    auto it = graphs_.find(key);
    if (it != graphs_.end()) {
      SPEAR_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second, stream_));
      ++graph_replays_;
    } else {
      // Run this step eagerly (first-call setup happens outside capture),
      // then record the same step into a graph for the next replays.
      if (absl::Status s = Enqueue(p); !s.ok()) return s;
      absl::StatusOr<cudaGraphExec_t> ge = kc::CaptureGraph(stream_, [&] { return Enqueue(p); });
      if (!ge.ok()) return ge.status();
      graphs_[key] = *ge;
      ++graphs_captured_;
    }
  } else if (absl::Status s = Enqueue(p); !s.ok()) {
    return s;
  }

  if (out != nullptr) {
    out->vocab = c.vocab_size;
    out->num_rows = p.R;
    out->first_row = first_row;
    if (static_cast<int64_t>(out->logits.size()) < p.R * c.vocab_size) {
      out->logits.resize(p.R * c.vocab_size);
    }
    if (p.R > 0) {
      SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out->logits.data(), logits_,
                                                 p.R * c.vocab_size * 4, cudaMemcpyDeviceToHost,
                                                 stream_));
    }
  }
  if (argmax != nullptr) {
    argmax->resize(p.R);
    if (p.R > 0) {
      SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(argmax->data(), next_, p.R * 4,
                                                 cudaMemcpyDeviceToHost, stream_));
    }
  }
  if (sample != nullptr) {
    sampled->resize(p.R);
    if (p.R > 0) {
      // After the logits were copied out (if asked): the penalty edits them.
      if (absl::Status s = EnqueueSampling(*sample, p.R); !s.ok()) return s;
      SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sampled->data(), samp_out_, p.R * 4,
                                                 cudaMemcpyDeviceToHost, stream_));
    }
  }
  const int64_t G = weights_->gate_cols();
  if (observe_gates_) {
    gate_host_.resize(static_cast<size_t>(p.T * G));
    SPEAR_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(gate_host_.data(), gate_dev_, p.T * G * 4,
                                               cudaMemcpyDeviceToHost, stream_));
  }
  SPEAR_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  if (observe_gates_) NotifyGateObservers(p.T);
  return absl::OkStatus();
}

// Each module with an EC that ran gets its columns of the gate buffer, as
// [T][r] rows (the CPU kernels' observer calls: all tokens of the forward).
void CudaModelRunner::NotifyGateObservers(int64_t T) {
  const int64_t G = weights_->gate_cols();
  for (const DeviceLayer& L : weights_->layers()) {
    for (const DeviceLinear* lin : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
      for (const DeviceLinear::Piece& piece : lin->pieces) {
        bool mixed = false;
        if (piece.gate_col < 0 || !PieceUseEc(piece, &mixed)) continue;
        int64_t col = piece.gate_col;
        for (const model::W4Linear* m : piece.modules) {
          if (!m->has_ec()) continue;
          const int64_t r = m->ec()->rank;
          if (m->has_gate_observer()) {
            gate_slice_.resize(static_cast<size_t>(T * r));
            for (int64_t t = 0; t < T; ++t) {
              std::copy_n(gate_host_.data() + t * G + col, r, gate_slice_.data() + t * r);
            }
            m->ObserveGate(gate_slice_.data(), T, r);
          }
          col += r;
        }
      }
    }
  }
}

}  // namespace spear::engine
