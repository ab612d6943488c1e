// libFuzzer target: the .spear loader (LoadSpearModel) on a fuzzed
// model.safetensors beside a fixed one-layer manifest (tests/fuzz/
// make_seeds.py's "some": gated fp16 ECs on four of seven modules, tokenizer
// null; kept equal to it by hand). Every input must give a Status, never a
// crash; an accepted model has its one layer, the embeddings, the LM head
// and all seven linears.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "worker/model/spear_checkpoint.h"

namespace {

constexpr char kManifest[] = R"json({
 "format": "spear",
 "format_version": 1,
 "architecture": {
  "architecture": "llama",
  "vocab_size": 16,
  "hidden_size": 16,
  "intermediate_size": 32,
  "num_layers": 1,
  "num_heads": 2,
  "num_kv_heads": 1,
  "head_dim": 8,
  "rms_eps": 1e-05,
  "rope_theta": 10000.0,
  "rope_scaling": {
   "kind": "none",
   "factor": 1.0,
   "low_freq_factor": 1.0,
   "high_freq_factor": 4.0,
   "original_max_position": 2048
  },
  "max_position": 2048,
  "tie_word_embeddings": true,
  "attention_bias": false,
  "bos_token_id": 1,
  "eos_token_ids": [
   2
  ]
 },
 "weights": "model.safetensors",
 "tokenizer": null,
 "sizes": {
  "w4_model_bytes": 100000,
  "ec_bytes": 1000,
  "ec_pct": 1.0
 },
 "modules": [
  {
   "name": "model.layers.0.self_attn.q_proj",
   "shape": [
    16,
    16
   ],
   "quantization": {
    "bits": 4,
    "group_size": 16,
    "symmetric": false,
    "act_scale": false
   },
   "bias": false,
   "ec": {
    "rank": 2,
    "gate_hidden": 16,
    "gated": true
   }
  },
  {
   "name": "model.layers.0.self_attn.k_proj",
   "shape": [
    8,
    16
   ],
   "quantization": {
    "bits": 4,
    "group_size": 16,
    "symmetric": false,
    "act_scale": false
   },
   "bias": false,
   "ec": null
  },
  {
   "name": "model.layers.0.self_attn.v_proj",
   "shape": [
    8,
    16
   ],
   "quantization": {
    "bits": 4,
    "group_size": 16,
    "symmetric": false,
    "act_scale": false
   },
   "bias": false,
   "ec": {
    "rank": 2,
    "gate_hidden": 16,
    "gated": true
   }
  },
  {
   "name": "model.layers.0.self_attn.o_proj",
   "shape": [
    16,
    16
   ],
   "quantization": {
    "bits": 4,
    "group_size": 16,
    "symmetric": false,
    "act_scale": false
   },
   "bias": false,
   "ec": null
  },
  {
   "name": "model.layers.0.mlp.gate_proj",
   "shape": [
    32,
    16
   ],
   "quantization": {
    "bits": 4,
    "group_size": 16,
    "symmetric": false,
    "act_scale": false
   },
   "bias": false,
   "ec": {
    "rank": 2,
    "gate_hidden": 16,
    "gated": true
   }
  },
  {
   "name": "model.layers.0.mlp.up_proj",
   "shape": [
    32,
    16
   ],
   "quantization": {
    "bits": 4,
    "group_size": 16,
    "symmetric": false,
    "act_scale": false
   },
   "bias": false,
   "ec": null
  },
  {
   "name": "model.layers.0.mlp.down_proj",
   "shape": [
    16,
    32
   ],
   "quantization": {
    "bits": 4,
    "group_size": 32,
    "symmetric": false,
    "act_scale": false
   },
   "bias": false,
   "ec": {
    "rank": 2,
    "gate_hidden": 16,
    "gated": true
   }
  }
 ],
 "provenance": {
  "tool": "seed"
 }
})json";

bool WriteFile(const std::string& path, const void* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(data, 1, size, f) == size;
  return std::fclose(f) == 0 && ok;
}

// One directory for the run: spear.json written once, model.safetensors per
// input.
const std::string& Dir() {
  static const std::string dir = [] {
    char tmpl[] = "/tmp/fuzz_spear_checkpoint.XXXXXX";
    const char* d = mkdtemp(tmpl);
    if (d == nullptr) __builtin_trap();
    const std::string s(d);
    if (!WriteFile(s + "/spear.json", kManifest, sizeof(kManifest) - 1)) __builtin_trap();
    return s;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = Dir();
  if (!WriteFile(dir + "/model.safetensors", data, size)) __builtin_trap();
  spear::model::LoadOptions opts;
  opts.load_tokenizer = false;
  auto m = spear::model::LoadSpearModel(dir, opts);
  if (!m.ok()) return 0;
  spear::model::LlamaWeights& w = (*m)->weights;
  if (w.layers.size() != 1 || w.embed == nullptr || w.lm_head == nullptr) __builtin_trap();
  int linears = 0;
  w.ForEachLinear([&](const std::string&, std::unique_ptr<spear::model::Linear>& lin) {
    if (lin == nullptr) __builtin_trap();
    ++linears;
  });
  if (linears != 7) __builtin_trap();
  return 0;
}
