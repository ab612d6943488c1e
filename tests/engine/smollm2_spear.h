// The SmolLM2 W4+EC .spear that the GPU tests compare against the CPU
// backend (the demo's `smollm2-135m-w4-spear.spear`).
#pragma once

#include <cstdlib>
#include <string>

#include "worker/model/model_cache.h"

namespace spear::testing {

// $SPEAR_TEST_SPEAR_MODEL if set, else the model cache's copy
// ($SPEAR_HOME/models, model::SpearHome()). Not checked for existence.
inline std::string SmolLm2SpearPath() {
  if (const char* e = std::getenv("SPEAR_TEST_SPEAR_MODEL"); e != nullptr && *e) return e;
  return model::SpearHome() + "/models/smollm2-135m-w4-spear.spear";
}

}  // namespace spear::testing
