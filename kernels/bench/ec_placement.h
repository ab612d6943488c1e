// The EC placement of a .spear checkpoint (its spear.json manifest), read
// for the GPU decode-step benchmark: which decoder modules of which layer
// carry an EC, at what rank, and the EC memory as % of the served W4 model.
#pragma once

#include <array>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace spear::kernels::bench {

// Member order of one decoder layer's linears: model::LayerLinear's.
enum EcMember { kQ, kK, kV, kO, kGate, kUp, kDown, kNumMembers };

struct EcPlacement {
  int num_layers = 0;
  double ec_pct = 0;  // the manifest's EC bytes / W4 model bytes, in %
  // ranks[l][member]: 0 = no EC.
  std::vector<std::array<int, kNumMembers>> ranks;
  int num_ecs = 0;
  // Every EC stored as int8 factors (`--ec-factors i8`): its 1 % buys
  // about twice the ranks of fp16 factors, and the GPU serves the codes.
  bool int8_factors = false;
};

// `path`: a .spear directory or its spear.json, read and validated by
// model::ReadSpearManifest (its NotFound / InvalidArgument / Unimplemented,
// prefixed); InvalidArgument for an EC on a module that is not one of a
// decoder layer's seven linears.
absl::StatusOr<EcPlacement> ReadEcPlacement(const std::string& path);

}  // namespace spear::kernels::bench
