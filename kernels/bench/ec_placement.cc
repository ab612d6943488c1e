#include "ec_placement.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "worker/model/spear_checkpoint.h"
#include "worker/model/weights.h"

namespace spear::kernels::bench {

static_assert(kNumMembers == model::kLayerLinears &&
                  kGate == static_cast<int>(model::LayerLinear::kGate) &&
                  kDown == static_cast<int>(model::LayerLinear::kDown),
              "EcMember follows model::LayerLinear");

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
  out.int8_factors = true;
  for (const model::SpearModuleInfo& mod : m->modules) {
    if (mod.ec_rank <= 0) continue;
    out.int8_factors &= mod.ec_factors == EcFactors::kI8;
    const std::optional<model::LinearName> n = model::ParseLinearName(mod.name);
    if (!n || n->layer >= out.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("EC placement: an EC on ", mod.name, ", not a decoder layer's linear"));
    }
    out.ranks[static_cast<size_t>(n->layer)][static_cast<int>(n->which)] =
        static_cast<int>(mod.ec_rank);
    ++out.num_ecs;
  }
  out.int8_factors &= out.num_ecs > 0;
  return out;
}

}  // namespace spear::kernels::bench
