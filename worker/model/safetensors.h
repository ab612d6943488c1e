// safetensors reader (mmap; single file or sharded with *.index.json) and
// writer. Validation is strict: header length and JSON, dtype names, shapes,
// data_offsets inside the data section, sizes equal to numel * element
// size, no overlapping tensors, no duplicate names. Any violation is an
// InvalidArgument naming the file and the tensor.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/mapped_file.h"
#include "worker/model/tensor.h"

namespace spear::model {

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory buffer (used by the fuzzer); `data` must outlive the object.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBuffer(const uint8_t* data,
                                                                     size_t size,
                                                                     const std::string& name);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;  // nullptr if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::unique_ptr<MappedFile> file_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint made of one or more safetensors files. `path` may be a
// .safetensors file, a *.safetensors.index.json, or a directory holding
// model.safetensors or model.safetensors.index.json.
class SafetensorsCheckpoint {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& path);
  const TensorInfo* Find(const std::string& name) const;
  std::vector<const TensorInfo*> tensors() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const TensorInfo*> by_name_;
};

// One tensor to write; data is copied from `data` (nbytes must match).
struct TensorToWrite {
  std::string name;
  TensorType type;  // kF32, kF16, kBF16, kI8, kI32, kU8, ...
  std::vector<int64_t> shape;
  const void* data;
  size_t nbytes;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata);

}  // namespace spear::model
