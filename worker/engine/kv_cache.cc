#include "worker/engine/kv_cache.h"

#include <new>

#include "absl/strings/str_cat.h"

namespace spear::engine {

BlockAllocator::BlockAllocator(int64_t num_blocks) : num_blocks_(num_blocks) {
  absl::MutexLock lock(&mu_);
  in_use_.assign(num_blocks, false);
  free_.reserve(num_blocks);
  // Stack order: block 0 is handed out first.
  for (int64_t i = num_blocks - 1; i >= 0; --i) free_.push_back(static_cast<int32_t>(i));
}

absl::Status BlockAllocator::Allocate(int64_t n, std::vector<int32_t>* table) {
  if (n < 0) return absl::InvalidArgumentError("BlockAllocator: negative block count");
  absl::MutexLock lock(&mu_);
  if (static_cast<int64_t>(free_.size()) < n) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: need ", n,
                                                     " blocks, ", free_.size(), " of ",
                                                     num_blocks_, " free"));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    in_use_[b] = true;
    table->push_back(b);
  }
  return absl::OkStatus();
}

absl::Status BlockAllocator::Free(const std::vector<int32_t>& blocks) {
  absl::MutexLock lock(&mu_);
  absl::Status status;
  for (int32_t b : blocks) {
    if (b < 0 || b >= num_blocks_ || !in_use_[b]) {
      status = absl::InvalidArgumentError(absl::StrCat("BlockAllocator: freeing block ", b,
                                                       " which is not allocated"));
      continue;
    }
    in_use_[b] = false;
    free_.push_back(b);
  }
  return status;
}

int64_t BlockAllocator::num_free() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(free_.size());
}

int64_t KvCache::BytesPerBlock(const model::ModelConfig& c, int block_size) {
  return 2 * c.num_layers * static_cast<int64_t>(block_size) * c.num_kv_heads * c.head_dim * 4;
}

KvCache::KvCache(int block_size, int64_t num_blocks, int64_t num_layers, int64_t kv_dim)
    : block_size_(block_size),
      num_blocks_(num_blocks),
      num_layers_(num_layers),
      kv_dim_(kv_dim),
      layer_elems_(num_blocks * block_size * kv_dim),
      allocator_(num_blocks) {}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const model::ModelConfig& c,
                                                         const KvCacheOptions& o) {
  if (o.block_size <= 0 || c.num_layers <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0) {
    return absl::InvalidArgumentError("KvCache: block_size and model sizes must be positive");
  }
  const int64_t per_block = BytesPerBlock(c, o.block_size);
  const int64_t blocks = o.num_blocks > 0 ? o.num_blocks : o.bytes / per_block;
  if (blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache: capacity ", o.bytes,
                                                   " bytes holds no block of ", per_block,
                                                   " bytes"));
  }
  if (blocks > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError("KvCache: too many blocks for int32 block ids");
  }
  std::unique_ptr<KvCache> cache(
      new KvCache(o.block_size, blocks, c.num_layers, c.num_kv_heads * c.head_dim));
  const int64_t total = 2 * c.num_layers * cache->layer_elems_;
  // Zero-filled so unused slots never hold NaNs that a kernel could read.
  cache->data_ = kernels::AllocateAlignedFloats(total);
  if (cache->data_ == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("KvCache: cannot allocate ", total * 4,
                                                     " bytes"));
  }
  return cache;
}

}  // namespace spear::engine
