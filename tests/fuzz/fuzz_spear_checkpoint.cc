// libFuzzer target: the .spear loader (LoadSpearModel) on a fuzzed
// model.safetensors beside a fixed one-layer manifest
// (tests/fuzz/spear_seed_manifest.json, the file make_seeds.py builds the seed
// shard from: gated fp16 ECs on four of seven modules, tokenizer null). Every
// input must give a Status, never a crash; an accepted model has its one
// layer, the embeddings, the LM head and all seven linears.
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "worker/model/spear_checkpoint.h"

namespace {

bool WriteFile(const std::string& path, const void* data, size_t size) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const bool ok = std::fwrite(data, 1, size, f) == size;
  return std::fclose(f) == 0 && ok;
}

// One directory for the run (under $TMPDIR, else the system's temporary
// directory): the seed manifest copied in once, model.safetensors written
// per input; removed when the process exits normally (libFuzzer's -runs /
// -max_total_time end, or a merge), so runs do not pile up directories.
std::string& DirName() {
  static std::string dir;
  return dir;
}
void RemoveDir() {
  std::error_code ec;
  if (!DirName().empty()) std::filesystem::remove_all(DirName(), ec);
}
const std::string& Dir() {
  static const bool made = [] {
    std::error_code ec;
    const std::filesystem::path base = std::filesystem::temp_directory_path(ec);
    if (ec) __builtin_trap();
    std::string tmpl = (base / "fuzz_spear_checkpoint.XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) __builtin_trap();
    DirName() = tmpl;
    std::atexit(RemoveDir);
    std::filesystem::copy_file(SPEAR_FUZZ_SEED_MANIFEST, tmpl + "/spear.json", ec);
    if (ec) __builtin_trap();
    return true;
  }();
  (void)made;
  return DirName();
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
