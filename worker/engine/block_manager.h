// Paged-KV block manager: reference counts and prefix-hash reuse on top of
// a KV cache's BlockAllocator (a host KvCache's or a backend's, e.g. the
// CUDA runner's device cache).
//
// Every block a sequence holds has a reference count. A FULL block whose
// tokens are all computed gets a content hash: the hash of its parent's
// hash and its own block_size token ids (a chain, so a hash names the whole
// prefix up to and including that block). A new sequence whose prompt
// starts with a cached chain takes references to those blocks instead of
// recomputing them (AcquirePrefix). When the last reference goes, a hashed
// block is not freed but parked in an LRU list of evictable blocks; it
// stays reusable until an allocation needs the space (then the least
// recently released block is evicted and returned to the allocator).
// Unhashed blocks (partial, or duplicates of an already cached block) go
// straight back to the allocator.
//
// Hash collisions cannot corrupt a sequence: a lookup also compares the
// stored parent hash and the block's token ids.
//
// "Used" blocks are blocks with a reference (what the KV usage metric
// reports); evictable cached blocks count as available.
//
// Thread-safety: internally synchronized (one mutex). Sequences passed in
// are touched only by the caller (the engine loop); do not call with the
// same Sequence from two threads.
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "worker/engine/kv_cache.h"
#include "worker/engine/sequence.h"

namespace spear::engine {

// Chain hash of one full block: deterministic across processes and
// platforms (a router can compute the same values for prefix affinity).
uint64_t BlockHash(uint64_t parent, std::span<const int32_t> tokens);

class BlockManager {
 public:
  struct Options {
    bool prefix_caching = true;
  };

  // Borrows the allocator of a cache with blocks of `block_size` positions
  // (must outlive the manager). The manager assumes it is the only user of
  // the allocator.
  BlockManager(BlockAllocator* allocator, int block_size, Options options);
  BlockManager(KvCache* cache, Options options)
      : BlockManager(&cache->allocator(), cache->block_size(), options) {}
  explicit BlockManager(KvCache* cache) : BlockManager(cache, Options()) {}

  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  // Blocks referenced by at least one sequence.
  int64_t num_used() const ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks an allocation can get now: free + evictable cached blocks.
  int64_t num_available() const ABSL_LOCKS_EXCLUDED(mu_);
  // Cached blocks with no reference (reusable until evicted).
  int64_t num_evictable() const ABSL_LOCKS_EXCLUDED(mu_);
  double usage() const { return num_blocks_ ? double(num_used()) / num_blocks_ : 0.0; }

  // For a sequence that holds no blocks and has computed nothing: takes
  // references to the longest cached chain of full blocks that prefixes its
  // tokens, leaving at least one token to compute (its logits are needed),
  // appends them to seq->block_table(), marks their tokens computed and
  // returns the number of tokens reused (0 with prefix caching off).
  int64_t AcquirePrefix(Sequence* seq) ABSL_LOCKS_EXCLUDED(mu_);

  // Makes seq's block table cover `positions` positions, evicting cached
  // blocks if needed. ResourceExhausted (and no change) if the blocks are
  // not available.
  absl::Status EnsureCapacity(Sequence* seq, int64_t positions) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks EnsureCapacity(seq, positions) would have to allocate.
  int64_t BlocksNeeded(const Sequence& seq, int64_t positions) const;

  // Registers the hashes of seq's full blocks whose tokens are all
  // computed, so later sequences can reuse them. Call after each step.
  void CommitComputed(const Sequence& seq) ABSL_LOCKS_EXCLUDED(mu_);

  // Drops seq's references (clears its block table and forgets its hash
  // chain). Safe on a sequence with no blocks.
  void Release(Sequence* seq) ABSL_LOCKS_EXCLUDED(mu_);

  // Reference count of a block (tests and invariants).
  int32_t ref_count(int32_t block) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct BlockInfo {
    int32_t refs = 0;
    bool hashed = false;
    uint64_t hash = 0;
    uint64_t parent = 0;
    std::vector<int32_t> tokens;  // the block's ids while hashed (collision check)
    std::list<int32_t>::iterator lru;  // valid while refs == 0 && hashed
  };
  struct SeqState {
    int64_t hashed_blocks = 0;  // leading blocks of the table already committed
    uint64_t last_hash = 0;     // hash of block hashed_blocks - 1 (0 = root)
  };

  absl::Status AllocateLocked(int64_t n, std::vector<int32_t>* table)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnhashLocked(int32_t block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  BlockAllocator* const alloc_;
  const Options options_;
  const int block_size_;
  const int64_t num_blocks_;

  mutable absl::Mutex mu_;
  std::vector<BlockInfo> blocks_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, int32_t> by_hash_ ABSL_GUARDED_BY(mu_);
  std::list<int32_t> evictable_ ABSL_GUARDED_BY(mu_);  // front = least recently released
  absl::flat_hash_map<int64_t, SeqState> seqs_ ABSL_GUARDED_BY(mu_);
  int64_t used_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace spear::engine
