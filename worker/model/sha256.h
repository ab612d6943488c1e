// SHA-256 (FIPS 180-4), incremental, for checkpoint provenance. Our own
// small implementation (no crypto library dependency); tested against the
// FIPS/NIST example vectors in tests/model/spear_checkpoint_test.cc.
// Not constant-time and not meant for secrets: it fingerprints files.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace spear::model {

class Sha256 {
 public:
  Sha256();
  void Update(const void* data, size_t len);
  void Update(std::string_view s) { Update(s.data(), s.size()); }
  // Finishes and returns the 32-byte digest; the object is reset afterwards.
  std::array<uint8_t, 32> Finish();
  // Finish() as 64 lowercase hex digits.
  std::string FinishHex();

 private:
  void Reset();
  void Block(const uint8_t* p);

  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_bytes_ = 0;
};

std::string Sha256Hex(std::string_view data);
// Digest of a whole file, read in 1 MiB chunks. NotFound if it cannot be
// opened, DataLoss on a read error.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace spear::model
