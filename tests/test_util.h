// Helpers shared by tests: locating fixtures and the real model.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace spear::testing {

// The SmolLM2-135M-Instruct GGUF: $SPEAR_TEST_GGUF, else the model cache
// ($SPEAR_HOME or ~/.cache/spear)/models/smollm2-135m/. Empty if not found;
// tests then GTEST_SKIP() with a message saying how to get it
// (`spear pull smollm2-135m`; scripts/test.sh does it).
inline std::string SmolLm2GgufPath() {
  namespace fs = std::filesystem;
  if (const char* p = std::getenv("SPEAR_TEST_GGUF"); p && *p && fs::exists(p)) return p;
  std::string home;
  if (const char* h = std::getenv("SPEAR_HOME"); h && *h) {
    home = h;
  } else if (const char* u = std::getenv("HOME"); u && *u) {
    home = std::string(u) + "/.cache/spear";
  }
  const std::string path = home + "/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf";
  return fs::exists(path) ? path : std::string();
}

inline std::string TestdataPath(const std::string& rel) {
  return std::string(SPEAR_TESTDATA_DIR) + "/" + rel;
}

}  // namespace spear::testing

#define SPEAR_SKIP_WITHOUT_SMOLLM2(var)                                                    \
  const std::string var = ::spear::testing::SmolLm2GgufPath();                             \
  if (var.empty()) GTEST_SKIP() << "SmolLM2 GGUF not found; run `spear pull smollm2-135m` " \
                                   "or set SPEAR_TEST_GGUF"
