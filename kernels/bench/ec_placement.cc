#include "ec_placement.h"

#include <charconv>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace spear::kernels::bench {

absl::StatusOr<EcPlacement> ReadEcPlacement(const std::string& path) {
  std::filesystem::path p(path);
  if (std::filesystem::is_directory(p)) p /= "spear.json";
  std::ifstream f(p);
  if (!f) return absl::NotFoundError(absl::StrCat("EC placement: cannot read ", p.string()));
  nlohmann::json m = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(p.string(), ": not JSON"));
  const auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(p.string(), ": ", what));
  };
  if (!m.contains("architecture") || !m["architecture"].contains("num_layers") ||
      !m["architecture"]["num_layers"].is_number_integer()) {
    return bad("no architecture.num_layers");
  }
  if (!m.contains("modules") || !m["modules"].is_array()) return bad("no modules list");
  EcPlacement out;
  out.num_layers = m["architecture"]["num_layers"].get<int>();
  if (out.num_layers < 1 || out.num_layers > 100000) return bad("bad num_layers");
  if (m.contains("sizes") && m["sizes"].contains("ec_pct") && m["sizes"]["ec_pct"].is_number()) {
    out.ec_pct = m["sizes"]["ec_pct"].get<double>();
  }
  out.ranks.assign(static_cast<size_t>(out.num_layers), {});
  static const char* kNames[kNumMembers] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                            "gate_proj", "up_proj", "down_proj"};
  for (const auto& mod : m["modules"]) {
    if (!mod.contains("name") || !mod["name"].is_string()) return bad("a module without a name");
    if (!mod.contains("ec") || mod["ec"].is_null()) continue;
    const std::string name = mod["name"].get<std::string>();
    const std::string pre = "model.layers.";
    if (name.rfind(pre, 0) != 0) return bad(absl::StrCat("EC on ", name, ": not a decoder linear"));
    const size_t dot = name.find('.', pre.size());
    if (dot == std::string::npos) return bad(absl::StrCat("module name ", name));
    int layer = -1;
    const char* b = name.data() + pre.size();
    if (std::from_chars(b, name.data() + dot, layer).ptr != name.data() + dot) {
      return bad(absl::StrCat("module name ", name));
    }
    if (layer < 0 || layer >= out.num_layers) return bad(absl::StrCat("layer of ", name));
    int member = -1;
    for (int i = 0; i < kNumMembers; ++i) {
      const std::string suffix = std::string(".") + kNames[i];
      if (name.size() > suffix.size() &&
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        member = i;
      }
    }
    if (member < 0) return bad(absl::StrCat("EC on ", name, ": not a decoder linear"));
    if (!mod["ec"].contains("rank") || !mod["ec"]["rank"].is_number_integer()) {
      return bad(absl::StrCat("EC of ", name, " without a rank"));
    }
    const int r = mod["ec"]["rank"].get<int>();
    if (r < 1) return bad(absl::StrCat("EC of ", name, ": rank ", r));
    out.ranks[static_cast<size_t>(layer)][member] = r;
    ++out.num_ecs;
  }
  return out;
}

}  // namespace spear::kernels::bench
