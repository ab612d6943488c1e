// Paged KV cache storage for all layers and a simple block allocator.
//
// Layout (what kernels::AttentionParams expects): for each layer, K and V
// are float32 arrays [num_blocks, block_size, num_kv_heads, head_dim]. A
// sequence owns a block table: logical position p lives in block
// table[p / block_size], slot p % block_size.
//
// Thread-safety: KvCache is a plain buffer (the model runner writes it from
// its one calling thread). BlockAllocator is internally synchronized.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/aligned.h"
#include "worker/model/config.h"

namespace spear::engine {

// Hands out block ids in [0, num_blocks). Allocation is all-or-nothing;
// freeing checks ids (no double free). A later block manager (prefix
// hashing, preemption, ref counts) builds on this.
class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  // Appends n free block ids to *table. ResourceExhausted (and no change)
  // if fewer than n are free.
  absl::Status Allocate(int64_t n, std::vector<int32_t>* table) ABSL_LOCKS_EXCLUDED(mu_);
  // Returns the blocks; InvalidArgument (after freeing the valid ones) for
  // an out-of-range id or a block that is not allocated.
  absl::Status Free(const std::vector<int32_t>& blocks) ABSL_LOCKS_EXCLUDED(mu_);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_free() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const int64_t num_blocks_;
  mutable absl::Mutex mu_;
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);  // stack: last freed reused first
  std::vector<bool> in_use_ ABSL_GUARDED_BY(mu_);
};

struct KvCacheOptions {
  int block_size = 16;
  // Capacity: num_blocks if > 0, else as many blocks as fit in `bytes`.
  int64_t num_blocks = 0;
  int64_t bytes = 256ll << 20;
};

class KvCache {
 public:
  // InvalidArgument for non-positive sizes; ResourceExhausted if the
  // buffer cannot be allocated.
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const model::ModelConfig& config,
                                                         const KvCacheOptions& options);

  // Bytes of one block across all layers, K and V.
  static int64_t BytesPerBlock(const model::ModelConfig& config, int block_size);

  float* k(int64_t layer) { return data_.get() + (2 * layer) * layer_elems_; }
  float* v(int64_t layer) { return data_.get() + (2 * layer + 1) * layer_elems_; }
  const float* k(int64_t layer) const { return data_.get() + (2 * layer) * layer_elems_; }
  const float* v(int64_t layer) const { return data_.get() + (2 * layer + 1) * layer_elems_; }

  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_layers() const { return num_layers_; }
  int64_t kv_dim() const { return kv_dim_; }  // num_kv_heads * head_dim
  int64_t bytes() const { return 2 * num_layers_ * layer_elems_ * 4; }
  // Blocks needed to hold `tokens` positions.
  int64_t BlocksFor(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

  BlockAllocator& allocator() { return allocator_; }
  const BlockAllocator& allocator() const { return allocator_; }

 private:
  KvCache(int block_size, int64_t num_blocks, int64_t num_layers, int64_t kv_dim);

  int block_size_;
  int64_t num_blocks_, num_layers_, kv_dim_, layer_elems_;
  // 64-byte aligned (every row of a head starts on a cache line when
  // head_dim is a multiple of 16: the attention's prefetches and loads touch
  // head_dim / 16 lines, not one more).
  kernels::AlignedFloats data_;
  BlockAllocator allocator_;
};

}  // namespace spear::engine
