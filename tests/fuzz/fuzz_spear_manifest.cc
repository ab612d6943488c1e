// libFuzzer target: the .spear manifest (spear.json) parser. Every input must
// give a Status, never a crash or an unbounded allocation; an accepted
// manifest lists each linear layer of its architecture once, with sane
// settings.
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>

#include "worker/model/spear_checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto m = spear::model::ParseSpearManifest(text, "fuzz/spear.json");
  if (!m.ok()) return 0;
  if (!m->config.Validate().ok()) __builtin_trap();
  std::set<std::string> names;
  for (const spear::model::SpearModuleInfo& mi : m->modules) {
    if (!names.insert(mi.name).second) __builtin_trap();
    if (mi.n <= 0 || mi.k <= 0 || mi.group_size <= 0 || mi.group_size > mi.k) __builtin_trap();
    if (mi.ec_rank < 0 || mi.ec_rank > mi.n || mi.ec_rank > mi.k) __builtin_trap();
  }
  return 0;
}
