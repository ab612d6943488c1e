// Dequantization of GGML block formats to float32. Layouts follow ggml
// (ggml-common.h); arithmetic follows ggml's reference dequantize_row_* so
// results are bit-identical to it and to gguf-py's numpy implementation
// (scales are multiplied first, then the quant: (d * sc) * q - (dmin * m)).
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "worker/model/gguf.h"

namespace spear::model {
namespace {

uint16_t Load16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
float LoadFp16(const uint8_t* p) { return kernels::HalfToFloat(Load16(p)); }

void DequantQ4_0(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((qs[j] & 0x0F) - 8);
    y[j + 16] = d * static_cast<float>((qs[j] >> 4) - 8);
  }
}

void DequantQ4_1(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const float m = LoadFp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(qs[j] & 0x0F) + m;
    y[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}

void DequantQ5_0(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int x0 = static_cast<int>((qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
    const int x1 = static_cast<int>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
    y[j] = d * static_cast<float>(x0);
    y[j + 16] = d * static_cast<float>(x1);
  }
}

void DequantQ5_1(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const float m = LoadFp16(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const uint32_t x0 = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
    const uint32_t x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * static_cast<float>(x0) + m;
    y[j + 16] = d * static_cast<float>(x1) + m;
  }
}

void DequantQ8_0(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block.
void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void DequantQ4_K(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const float dmin = LoadFp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  int is = 0;
  for (int j = 0; j < 256; j += 64) {
    uint8_t sc, m;
    ScaleMinK4(is + 0, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ScaleMinK4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    q += 32;
    is += 2;
  }
}

void DequantQ5_K(const uint8_t* b, float* y) {
  const float d = LoadFp16(b);
  const float dmin = LoadFp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  int is = 0;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0; j < 256; j += 64) {
    uint8_t sc, m;
    ScaleMinK4(is + 0, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ScaleMinK4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) {
      *y++ = d1 * static_cast<float>((ql[l] & 0x0F) + (qh[l] & u1 ? 16 : 0)) - m1;
    }
    for (int l = 0; l < 32; ++l) {
      *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
    ql += 32;
    is += 2;
    u1 <<= 2;
    u2 <<= 2;
  }
}

void DequantQ6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = LoadFp16(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int>((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l + 0] = (d * static_cast<float>(sc[is + 0])) * static_cast<float>(q1);
      y[l + 32] = (d * static_cast<float>(sc[is + 2])) * static_cast<float>(q2);
      y[l + 64] = (d * static_cast<float>(sc[is + 4])) * static_cast<float>(q3);
      y[l + 96] = (d * static_cast<float>(sc[is + 6])) * static_cast<float>(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn BlockDequantizer(TensorType t) {
  switch (t) {
    case TensorType::kQ4_0:
      return DequantQ4_0;
    case TensorType::kQ4_1:
      return DequantQ4_1;
    case TensorType::kQ5_0:
      return DequantQ5_0;
    case TensorType::kQ5_1:
      return DequantQ5_1;
    case TensorType::kQ8_0:
      return DequantQ8_0;
    case TensorType::kQ4_K:
      return DequantQ4_K;
    case TensorType::kQ5_K:
      return DequantQ5_K;
    case TensorType::kQ6_K:
      return DequantQ6_K;
    default:
      return nullptr;
  }
}

}  // namespace

bool CanDequantize(TensorType t) {
  switch (t) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kBF16:
    case TensorType::kF64:
      return true;
    default:
      return BlockDequantizer(t) != nullptr;
  }
}

absl::Status Dequantize(const TensorInfo& t, float* out) {
  if (!CanDequantize(t.type)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", t.name, "\": cannot dequantize ",
                                                   std::string(TensorTypeName(t.type))));
  }
  // Recompute the element count with overflow checks: a TensorInfo built by
  // hand (or by a buggy reader) must not make us write out of bounds.
  uint64_t numel = 1;
  for (int64_t d : t.shape) {
    if (d < 0 || __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", t.name, "\": bad shape"));
    }
  }
  const uint64_t be = static_cast<uint64_t>(BlockElems(t.type));
  const uint64_t bb = BlockBytes(t.type);
  uint64_t need = 0;
  if (numel % be != 0 || __builtin_mul_overflow(numel / be, bb, &need) || need != t.nbytes ||
      (need > 0 && t.data == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", t.name, "\": ", t.nbytes, " bytes do not hold ", numel, " ",
                     std::string(TensorTypeName(t.type)), " elements"));
  }
  const uint8_t* p = t.data;
  switch (t.type) {
    case TensorType::kF32:
      if (numel > 0) std::memcpy(out, p, numel * 4);
      return absl::OkStatus();
    case TensorType::kF16:
      for (uint64_t i = 0; i < numel; ++i) out[i] = LoadFp16(p + 2 * i);
      return absl::OkStatus();
    case TensorType::kBF16:
      for (uint64_t i = 0; i < numel; ++i) out[i] = kernels::BF16ToFloat(Load16(p + 2 * i));
      return absl::OkStatus();
    case TensorType::kF64:
      for (uint64_t i = 0; i < numel; ++i) {
        double v;
        std::memcpy(&v, p + 8 * i, 8);
        out[i] = static_cast<float>(v);
      }
      return absl::OkStatus();
    default:
      break;
  }
  const BlockFn fn = BlockDequantizer(t.type);
  const uint64_t nblocks = numel / be;
  for (uint64_t i = 0; i < nblocks; ++i) fn(p + i * bb, out + i * be);
  return absl::OkStatus();
}

}  // namespace spear::model
