// GGUF (v2, v3) reader: metadata key/values, tensor infos, alignment, and
// dequantization to float32 of F32/F16/BF16/Q8_0/Q4_0/Q4_1 (and the other
// types listed in CanDequantize). Every offset and count is checked against
// the file size before use; corrupt files give InvalidArgument, never a crash.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/mapped_file.h"
#include "worker/model/tensor.h"

namespace spear::model {

struct GgufValue;
using GgufArray = std::vector<GgufValue>;
struct GgufValue {
  // uint8..int64 are widened into uint64_t/int64_t, f32/f64 into double.
  std::variant<uint64_t, int64_t, double, bool, std::string, GgufArray> v;
  uint32_t type = 0;  // original GGUF value type id
};

class GgufFile {
 public:
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromBuffer(const uint8_t* data, size_t size,
                                                              const std::string& name);

  uint32_t version() const { return version_; }
  size_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const GgufValue* Get(const std::string& key) const;

  // Typed getters: NotFound if absent, InvalidArgument if the type differs.
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;  // any integer type
  absl::StatusOr<double> GetFloat(const std::string& key) const;  // f32/f64 (ints accepted)
  absl::StatusOr<bool> GetBool(const std::string& key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(const std::string& key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(const std::string& key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(const std::string& key) const;

  // Shapes are reported outermost-first (see TensorInfo).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;

 private:
  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  std::map<std::string, GgufValue> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
};

bool CanDequantize(TensorType t);
// Writes numel() floats to `out`. InvalidArgument for unsupported types or
// inconsistent sizes.
absl::Status Dequantize(const TensorInfo& t, float* out);

}  // namespace spear::model
