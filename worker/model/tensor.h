// A read-only view of one tensor inside a memory-mapped model file.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace spear::model {

// Storage types a model file may hold. Dense types first, then GGML block
// quantizations (block layouts as in the GGUF specification).
enum class TensorType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  kI8,
  kI16,
  kI32,
  kI64,
  kU8,
  kBool,
  kQ4_0,
  kQ4_1,
  kQ5_0,
  kQ5_1,
  kQ8_0,
  kQ2_K,
  kQ3_K,
  kQ4_K,
  kQ5_K,
  kQ6_K,
};
std::string_view TensorTypeName(TensorType t);
// Storage geometry: a tensor of type t is stored as numel/BlockElems(t)
// blocks of BlockBytes(t) bytes each (1 element and its size for dense types).
int64_t BlockElems(TensorType t);
size_t BlockBytes(TensorType t);

struct TensorInfo {
  std::string name;
  TensorType type = TensorType::kF32;
  // Row-major, outermost dimension first, as PyTorch/HF print it: a linear
  // weight is {out_features, in_features}. (GGUF stores dimensions
  // innermost-first; its reader reverses them into this order.)
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // points into the mapped file; owned by the file object
  size_t nbytes = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

}  // namespace spear::model
