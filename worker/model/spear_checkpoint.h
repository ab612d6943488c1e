// The .spear checkpoint: a W4 (+EC) model as one directory.
//
//   DIR/spear.json         manifest (format_version 1): architecture (every
//                          ModelConfig field), the module list with each
//                          module's quantization and EC, sizes, provenance
//                          (source path + SHA-256 of its files, the command,
//                          calibration and quantize options, the diagnostic
//                          summary) and an optional "measured" object
//                          (perplexities, filled by evaluation scripts).
//   DIR/model.safetensors  embeddings, norms (F16; embeddings and lm_head
//                          BF16 when the source was BF16), lm_head if untied,
//                          per module the W4 and EC tensors of
//                          kernels/FORMAT.md: <m>.qweight U8 [n, ceil(k/2)],
//                          <m>.scales F16 [n, groups], <m>.zeros U8 [n, groups],
//                          <m>.act_scale F16 [k] (optional), <m>.bias F32 [n]
//                          (optional), <m>.ec.a F16 [r, k], <m>.ec.b F16 [n, r]
//                          and, for a gated EC, <m>.ec.w1 [h, r], .ec.b1 [h],
//                          .ec.w2 [r, h], .ec.b2 [r] (all F16).
//   DIR/tokenizer.json     HF tokenizer (+ tokenizer_config.json), exported
//   (optional)             from the source's tokenizer (ExportHfTokenizer).
//
// Values stored as F16 (EC weights, act scales, norms, embeddings) are
// rounded on save; a model whose values are already fp16 (what the quantizer
// serves) round-trips exactly.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/w4_format.h"
#include "worker/model/config.h"
#include "worker/model/weights.h"

namespace spear::model {

inline constexpr int kSpearFormatVersion = 1;
inline constexpr char kSpearManifestFile[] = "spear.json";
inline constexpr char kSpearWeightsFile[] = "model.safetensors";
inline constexpr char kSpearTokenizerFile[] = "tokenizer.json";

// Where a checkpoint came from and how it was made. The *_json fields are
// JSON object texts copied into the manifest ("" = {}); InvalidArgument if
// one is not a JSON object.
struct SpearProvenance {
  std::string source_path;  // hashed at save time (a file, or every file of a directory)
  std::string command;      // the command line that produced the checkpoint
  std::string calibration_json;
  std::string quantize_options_json;
  std::string diagnostic_json;  // summary of the CKA/entropy diagnostic
  std::string measured_json;    // e.g. {"wikitext2_ppl": 12.3}; "" = absent
};

struct SpearModuleInfo {
  std::string name;  // "model.layers.3.mlp.down_proj"
  int64_t n = 0, k = 0;
  int64_t group_size = 0;
  bool symmetric = false;
  bool act_scale = false;
  bool bias = false;
  int64_t ec_rank = 0;  // 0 = no EC
  int64_t ec_gate_hidden = 0;
  bool ec_gated = false;
  // "factors" of the EC ("f16", the default when absent, or "i8":
  // kernels/w4_format.h EcFactors; the tensors differ, FORMAT.md).
  kernels::EcFactors ec_factors = kernels::EcFactors::kF16;
};

struct SpearManifest {
  int format_version = 0;
  ModelConfig config;
  std::vector<SpearModuleInfo> modules;
  std::string tokenizer_file;  // "" = none
  int64_t w4_model_bytes = 0;
  int64_t ec_bytes = 0;
  std::string provenance_json;  // the "provenance" object as text
  std::string measured_json;    // the "measured" object as text, "" if absent
};

// Served bytes of a model as stored in a .spear checkpoint: W4 linears
// (codes, fp16 scales, u8 zeros, fp16 act scales, f32 biases), embeddings
// and norms (2 bytes each), lm_head (0 when tied); ECs counted apart (fp16).
// Dense (unquantized) linears count at 2 bytes per weight.
struct ServedBytes {
  int64_t w4_model_bytes = 0;  // everything but the ECs
  int64_t ec_bytes = 0;
  double ec_pct() const { return w4_model_bytes ? 100.0 * ec_bytes / w4_model_bytes : 0.0; }
};
ServedBytes ComputeServedBytes(const LoadedModel& model);

// Writes `model` (every transformer linear a W4Linear; FailedPrecondition
// otherwise) to `dir`. Everything is written to "<dir>.tmp" first and
// renamed into place, so `dir` never holds a half-written checkpoint. An
// existing non-empty `dir` is AlreadyExists unless overwrite (then it is
// replaced only after the new checkpoint is complete).
absl::Status SaveSpearModel(const LoadedModel& model, const SpearProvenance& provenance,
                            const std::string& dir, bool overwrite = false);

// True if `path` is a directory holding spear.json.
bool IsSpearDir(const std::string& path);

// Reads and validates spear.json alone (version, config, module list against
// the architecture, per-module settings). NotFound without spear.json,
// InvalidArgument for anything malformed, Unimplemented for another
// format_version.
absl::StatusOr<SpearManifest> ReadSpearManifest(const std::string& dir);
// The same checks on a manifest's text; `path` names it in the errors
// (ReadSpearManifest's parser, apart for tests/fuzz/fuzz_spear_manifest).
absl::StatusOr<SpearManifest> ParseSpearManifest(const std::string& text, const std::string& path);

// Sets measured[key] = value (JSON text, e.g. {"ppl": 12.4, "ctx": 512}) in
// DIR/spear.json, keeping everything else; the manifest is rewritten through
// a temporary file and a rename. NotFound without spear.json,
// InvalidArgument if `value` is not JSON.
absl::Status RecordSpearMeasurement(const std::string& dir, const std::string& key,
                                    const std::string& value_json);

// Loads a .spear directory: the manifest as above, then every tensor checked
// strictly (present, dtype, shape against the manifest, EC ranks, finite
// scales/EC values, zero points <= 15, no unknown tensors). LoadModel calls
// this for a directory with spear.json.
absl::StatusOr<std::unique_ptr<LoadedModel>> LoadSpearModel(const std::string& dir,
                                                            const LoadOptions& options = {});

}  // namespace spear::model
