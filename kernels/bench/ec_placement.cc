#include "ec_placement.h"

#include <charconv>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "worker/model/spear_checkpoint.h"

namespace spear::kernels::bench {

absl::StatusOr<EcPlacement> ReadEcPlacement(const std::string& path) {
  std::filesystem::path dir(path);
  if (dir.filename() == model::kSpearManifestFile) dir = dir.parent_path();
  // The checkpoint's own validated reader: version, architecture, modules.
  auto m = model::ReadSpearManifest(dir.string());
  if (!m.ok()) {
    return absl::Status(m.status().code(),
                        absl::StrCat("EC placement: ", m.status().message()));
  }
  EcPlacement out;
  out.num_layers = static_cast<int>(m->config.num_layers);
  if (m->w4_model_bytes > 0) out.ec_pct = 100.0 * m->ec_bytes / m->w4_model_bytes;
  out.ranks.assign(static_cast<size_t>(out.num_layers), {});
  static const char* kNames[kNumMembers] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"};
  const std::string pre = "model.layers.";
  for (const model::SpearModuleInfo& mod : m->modules) {
    if (mod.ec_rank <= 0) continue;
    const std::string& name = mod.name;
    const auto bad = [&] {
      return absl::InvalidArgumentError(
          absl::StrCat("EC placement: an EC on ", name, ", not a decoder layer's linear"));
    };
    if (name.rfind(pre, 0) != 0) return bad();
    const size_t dot = name.find('.', pre.size());
    int layer = -1;
    if (dot == std::string::npos ||
        std::from_chars(name.data() + pre.size(), name.data() + dot, layer).ptr !=
            name.data() + dot ||
        layer < 0 || layer >= out.num_layers) {
      return bad();
    }
    int member = -1;
    for (int i = 0; i < kNumMembers; ++i) {
      const std::string suffix = std::string(".") + kNames[i];
      if (name.size() > suffix.size() &&
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        member = i;
      }
    }
    if (member < 0) return bad();
    out.ranks[static_cast<size_t>(layer)][member] = static_cast<int>(mod.ec_rank);
    ++out.num_ecs;
  }
  return out;
}

}  // namespace spear::kernels::bench
