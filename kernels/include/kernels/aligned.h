// Zero-filled float arrays on 64-byte (cache-line) boundaries: the CPU KV
// cache and buffers that stand in for it, so that a head's row of a multiple
// of 16 floats touches exactly its own cache lines (cpu::Attention's loads
// and prefetches).
#pragma once

#include <cstdint>
#include <memory>
#include <new>

namespace spear::kernels {

inline constexpr std::align_val_t kCacheLineAlign{64};

struct AlignedFloatsDelete {
  void operator()(float* p) const { ::operator delete[](p, kCacheLineAlign); }
};
using AlignedFloats = std::unique_ptr<float[], AlignedFloatsDelete>;

// n zeroed floats, 64-byte aligned; null if the allocation fails.
inline AlignedFloats AllocateAlignedFloats(int64_t n) {
  return AlignedFloats(new (kCacheLineAlign, std::nothrow) float[static_cast<size_t>(n)]());
}

}  // namespace spear::kernels
