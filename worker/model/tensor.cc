#include "worker/model/tensor.h"

namespace spear::model {

std::string_view TensorTypeName(TensorType t) {
  switch (t) {
    case TensorType::kF32:
      return "F32";
    case TensorType::kF16:
      return "F16";
    case TensorType::kBF16:
      return "BF16";
    case TensorType::kF64:
      return "F64";
    case TensorType::kI8:
      return "I8";
    case TensorType::kI16:
      return "I16";
    case TensorType::kI32:
      return "I32";
    case TensorType::kI64:
      return "I64";
    case TensorType::kU8:
      return "U8";
    case TensorType::kBool:
      return "BOOL";
    case TensorType::kQ4_0:
      return "Q4_0";
    case TensorType::kQ4_1:
      return "Q4_1";
    case TensorType::kQ5_0:
      return "Q5_0";
    case TensorType::kQ5_1:
      return "Q5_1";
    case TensorType::kQ8_0:
      return "Q8_0";
    case TensorType::kQ2_K:
      return "Q2_K";
    case TensorType::kQ3_K:
      return "Q3_K";
    case TensorType::kQ4_K:
      return "Q4_K";
    case TensorType::kQ5_K:
      return "Q5_K";
    case TensorType::kQ6_K:
      return "Q6_K";
  }
  return "UNKNOWN";
}

int64_t BlockElems(TensorType t) {
  switch (t) {
    case TensorType::kQ4_0:
    case TensorType::kQ4_1:
    case TensorType::kQ5_0:
    case TensorType::kQ5_1:
    case TensorType::kQ8_0:
      return 32;
    case TensorType::kQ2_K:
    case TensorType::kQ3_K:
    case TensorType::kQ4_K:
    case TensorType::kQ5_K:
    case TensorType::kQ6_K:
      return 256;
    default:
      return 1;
  }
}

size_t BlockBytes(TensorType t) {
  switch (t) {
    case TensorType::kF32:
      return 4;
    case TensorType::kF16:
      return 2;
    case TensorType::kBF16:
      return 2;
    case TensorType::kF64:
      return 8;
    case TensorType::kI8:
      return 1;
    case TensorType::kI16:
      return 2;
    case TensorType::kI32:
      return 4;
    case TensorType::kI64:
      return 8;
    case TensorType::kU8:
      return 1;
    case TensorType::kBool:
      return 1;
    case TensorType::kQ4_0:
      return 2 + 16;  // fp16 d, 32 nibbles
    case TensorType::kQ4_1:
      return 2 + 2 + 16;  // fp16 d, fp16 m, 32 nibbles
    case TensorType::kQ5_0:
      return 2 + 4 + 16;  // fp16 d, 32 high bits, nibbles
    case TensorType::kQ5_1:
      return 2 + 2 + 4 + 16;  // fp16 d, m, high bits, nibbles
    case TensorType::kQ8_0:
      return 2 + 32;  // fp16 d, 32 int8
    case TensorType::kQ2_K:
      return 16 + 64 + 2 + 2;  // scales, 2-bit quants, d, dmin
    case TensorType::kQ3_K:
      return 32 + 64 + 12 + 2;  // hmask, quants, scales, d
    case TensorType::kQ4_K:
      return 2 + 2 + 12 + 128;  // d, dmin, 6-bit scales, nibbles
    case TensorType::kQ5_K:
      return 2 + 2 + 12 + 32 + 128;
    case TensorType::kQ6_K:
      return 128 + 64 + 16 + 2;  // ql, qh, int8 scales, d
  }
  return 1;
}

}  // namespace spear::model
