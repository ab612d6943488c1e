// The device copy of a LoadedModel for the CUDA model runner (built only
// with SPEAR_WITH_CUDA): every decoder linear in the CUDA W4 layout
// (kernels/w4_cuda.h), embeddings / lm_head as fp16, norm weights fp32.
//
// Fusion: q, k, v become ONE W4 weight per layer (rows q, then k, then v)
// and gate, up ONE (rows gate, then up), so a layer runs four W4 GEMMs, as
// the decode-step bench does. Fusing is exact: the backbone rows are
// concatenated, and the per-module ECs are merged into one EC whose A is
// the stacked A's, whose B is block-diagonal and whose gate MLP is
// block-diagonal (W1, W2), so each module's rows see only its own u and its
// own gate. A non-gated module in a gated merge gets zero W2 rows and b2 (its
// gate is 1 + tanh(0) = 1, exactly static); a module without an EC gets no
// columns. Modules that cannot share a weight (different group size,
// symmetric flag or act_scale) stay separate launches into column slices of
// the same output.
//
// Ownership: owns every device allocation; borrows nothing after Create
// except the W4Linear pointers kept for their ec_enabled() flags (the
// LoadedModel must outlive this object). Immutable after Create (and
// TuneDecode, before first use).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/w4_cuda.h"
#include "worker/model/w4_linear.h"
#include "worker/model/weights.h"

namespace spear::engine {

// One logical output ([m, n] = the concatenation of the parts' outputs),
// made of one or more device W4 weights each covering a column slice.
struct DeviceLinear {
  struct Piece {
    std::unique_ptr<kernels::cuda::W4DeviceWeight> w;
    int64_t col0 = 0;       // first output column of this piece
    float* bias = nullptr;  // device fp32 [w->fmt().n], nullable (owned)
    // The modules this piece serves (for their ec_enabled flags).
    std::vector<const model::W4Linear*> modules;
    // With an EC: its first column in the runner's gate buffer [T][gate_cols()]
    // (the merged EC's gate values, modules side by side); -1 without.
    int64_t gate_col = -1;
  };
  std::vector<Piece> pieces;
  int64_t n = 0, k = 0;
};

struct DeviceLayer {
  DeviceLinear qkv, o, gate_up, down;
  float* attn_norm = nullptr;  // device fp32 [hidden]
  float* ffn_norm = nullptr;
};

class DeviceModelWeights {
 public:
  // Unimplemented if a decoder linear is not a model::W4Linear (dense
  // decoders are not served on CUDA yet) or the lm_head is neither dense
  // nor W4; the errors of W4DeviceWeight::Create for formats the kernels do
  // not support; Internal for CUDA errors.
  static absl::StatusOr<std::unique_ptr<DeviceModelWeights>> Create(const model::LoadedModel& m);
  ~DeviceModelWeights();
  DeviceModelWeights(const DeviceModelWeights&) = delete;
  DeviceModelWeights& operator=(const DeviceModelWeights&) = delete;

  const std::vector<DeviceLayer>& layers() const { return layers_; }
  const uint16_t* embed() const { return embed_; }  // fp16 [vocab, hidden]
  const float* final_norm() const { return final_norm_; }
  // lm_head: fp16 [vocab, hidden] (the embedding table when tied) or, for a
  // W4 lm_head, lm_head_w4 (then lm_head_f16 is null).
  const uint16_t* lm_head_f16() const { return lm_head_f16_; }
  const DeviceLinear* lm_head_w4() const { return lm_head_w4_.get(); }
  // Device bytes of the weights (W4 layouts, ECs, fp16 tables, norms).
  size_t bytes() const { return bytes_; }
  // Of those, the ECs' (A fp16, B in the tile layout: int8 codes + scales
  // for int8 ECs, fp16 otherwise, the gate MLPs fp32).
  size_t ec_bytes() const;
  // Number of device W4 weights (launches per forward, lm_head excluded).
  int64_t num_pieces() const;
  // Sum of the ranks of the pieces' ECs (the gate buffer's row length).
  int64_t gate_cols() const { return gate_cols_; }
  // Measures the fold kernel's configurations for decode launches of 1..8
  // rows (kernels::cuda::TuneDecode) over the pieces of each shape (e.g.
  // every layer's qkv) and records them in the pieces. Run once, before
  // any forward (the one exception to "immutable after Create");
  // synchronous on `stream`. Returns the number of shapes tuned.
  absl::StatusOr<int> TuneDecode(kernels::cuda::W4Workspace* ws, cudaStream_t stream);
  // The same for the prefill path's main GEMM at 64..max_m rows
  // (kernels::cuda::TunePrefill: dequantize + cuBLAS or a wgmma kernel,
  // per bucket of m). Returns the number of shapes tuned.
  absl::StatusOr<int> TunePrefill(kernels::cuda::W4Workspace* ws, int64_t max_m,
                                  cudaStream_t stream);

 private:
  // The pieces grouped by shape (n, k, group size, symmetric), model order.
  std::vector<std::vector<kernels::cuda::W4DeviceWeight*>> ShapeGroups();
  int64_t gate_cols_ = 0;
  DeviceModelWeights() = default;
  std::vector<DeviceLayer> layers_;
  uint16_t* embed_ = nullptr;
  uint16_t* lm_head_f16_ = nullptr;  // == embed_ when tied
  std::unique_ptr<DeviceLinear> lm_head_w4_;
  float* final_norm_ = nullptr;
  std::vector<void*> owned_;  // cudaFree'd in the destructor
  size_t bytes_ = 0;
};

// Exposed for tests: the exact merge described above. parts must share k;
// returns the merged EC (A and B as floats: compact int8 parts decoded,
// a single part as it is), or nullopt when no part has one; a corrupt
// compact part's InvalidArgument.
absl::StatusOr<std::optional<kernels::EcWeights>> MergeEcs(
    const std::vector<const model::W4Linear*>& parts);

}  // namespace spear::engine
