// Private to the .spear implementation (spear_checkpoint*.cc, spear_manifest.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "worker/model/config.h"

namespace spear::model::internal {

// Every ModelConfig field, names as in the manifest's "architecture".
nlohmann::ordered_json ConfigToJson(const ModelConfig& c);
// Strict: every field present with the right type; then Validate().
absl::StatusOr<ModelConfig> ConfigFromJson(const nlohmann::ordered_json& j);

struct ModuleShape {
  std::string name;
  int64_t n, k;
};
// The transformer linears the architecture implies, in ForEachLinear order.
std::vector<ModuleShape> ExpectedModules(const ModelConfig& c);

}  // namespace spear::model::internal
