#include "worker/engine/block_manager.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace spear::engine {
namespace {

// splitmix64 finaliser: a fixed, well-mixed 64-bit permutation.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t BlockHash(uint64_t parent, std::span<const int32_t> tokens) {
  uint64_t h = Mix(parent ^ 0x5350454152ull);  // "SPEAR"
  for (int32_t t : tokens) h = Mix(h ^ static_cast<uint32_t>(t));
  // 0 means "root" in the chain; never produce it.
  return h == 0 ? 1 : h;
}

BlockManager::BlockManager(BlockAllocator* allocator, int block_size, Options options)
    : alloc_(allocator),
      options_(options),
      block_size_(block_size),
      num_blocks_(allocator->num_blocks()) {
  absl::MutexLock lock(&mu_);
  blocks_.resize(num_blocks_);
}

int64_t BlockManager::num_used() const {
  absl::MutexLock lock(&mu_);
  return used_;
}

int64_t BlockManager::num_available() const {
  absl::MutexLock lock(&mu_);
  return alloc_->num_free() + static_cast<int64_t>(evictable_.size());
}

int64_t BlockManager::num_evictable() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(evictable_.size());
}

int32_t BlockManager::ref_count(int32_t block) const {
  absl::MutexLock lock(&mu_);
  if (block < 0 || block >= num_blocks_) return -1;
  return blocks_[block].refs;
}

void BlockManager::UnhashLocked(int32_t b) {
  BlockInfo& info = blocks_[b];
  if (!info.hashed) return;
  auto it = by_hash_.find(info.hash);
  if (it != by_hash_.end() && it->second == b) by_hash_.erase(it);
  info.hashed = false;
  info.tokens.clear();
}

absl::Status BlockManager::AllocateLocked(int64_t n, std::vector<int32_t>* table) {
  if (n <= 0) return absl::OkStatus();
  BlockAllocator& alloc = *alloc_;
  const int64_t free = alloc.num_free();
  if (free + static_cast<int64_t>(evictable_.size()) < n) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: need ", n, " blocks, ",
                                                     free + evictable_.size(), " of ",
                                                     num_blocks_, " available"));
  }
  // Evict least recently released cached blocks until the allocator has n.
  std::vector<int32_t> evicted;
  for (int64_t i = free; i < n; ++i) {
    const int32_t b = evictable_.front();
    evictable_.pop_front();
    UnhashLocked(b);
    evicted.push_back(b);
  }
  if (!evicted.empty()) (void)alloc.Free(evicted);
  const size_t before = table->size();
  if (absl::Status s = alloc.Allocate(n, table); !s.ok()) return s;
  for (size_t i = before; i < table->size(); ++i) {
    blocks_[(*table)[i]].refs = 1;
    ++used_;
  }
  return absl::OkStatus();
}

int64_t BlockManager::BlocksNeeded(const Sequence& seq, int64_t positions) const {
  const int64_t want = (positions + block_size_ - 1) / block_size_;
  return std::max<int64_t>(0, want - static_cast<int64_t>(seq.block_table().size()));
}

absl::Status BlockManager::EnsureCapacity(Sequence* seq, int64_t positions) {
  const int64_t need = BlocksNeeded(*seq, positions);
  if (need == 0) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  return AllocateLocked(need, &seq->block_table());
}

int64_t BlockManager::AcquirePrefix(Sequence* seq) {
  if (!options_.prefix_caching || !seq->block_table().empty() || seq->num_computed() != 0) {
    return 0;
  }
  std::span<const int32_t> toks = seq->tokens();
  // Leave at least one token to compute: its logits start the generation.
  const int64_t max_blocks = (static_cast<int64_t>(toks.size()) - 1) / block_size_;
  absl::MutexLock lock(&mu_);
  uint64_t parent = 0;
  int64_t matched = 0;
  for (int64_t i = 0; i < max_blocks; ++i) {
    std::span<const int32_t> bt = toks.subspan(i * block_size_, block_size_);
    const uint64_t h = BlockHash(parent, bt);
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) break;
    BlockInfo& info = blocks_[it->second];
    if (info.parent != parent || !std::equal(bt.begin(), bt.end(), info.tokens.begin())) break;
    if (info.refs == 0) {
      evictable_.erase(info.lru);
      ++used_;
    }
    ++info.refs;
    seq->block_table().push_back(it->second);
    parent = h;
    ++matched;
  }
  seqs_[seq->id()] = SeqState{matched, parent};
  seq->MarkComputed(matched * block_size_);
  return matched * block_size_;
}

void BlockManager::CommitComputed(const Sequence& seq) {
  if (!options_.prefix_caching) return;
  const int64_t full = std::min<int64_t>(seq.num_computed() / block_size_,
                                         static_cast<int64_t>(seq.block_table().size()));
  absl::MutexLock lock(&mu_);
  SeqState& st = seqs_[seq.id()];
  std::span<const int32_t> toks = seq.tokens();
  for (int64_t i = st.hashed_blocks; i < full; ++i) {
    std::span<const int32_t> bt = toks.subspan(i * block_size_, block_size_);
    const uint64_t h = BlockHash(st.last_hash, bt);
    const int32_t b = seq.block_table()[i];
    BlockInfo& info = blocks_[b];
    // A block already cached under this hash (another sequence computed the
    // same prefix at the same time) keeps its place; this one stays
    // unhashed and is freed normally.
    if (!info.hashed && !by_hash_.contains(h)) {
      info.hashed = true;
      info.hash = h;
      info.parent = st.last_hash;
      info.tokens.assign(bt.begin(), bt.end());
      by_hash_[h] = b;
    }
    st.last_hash = h;
    st.hashed_blocks = i + 1;
  }
}

void BlockManager::Release(Sequence* seq) {
  absl::MutexLock lock(&mu_);
  seqs_.erase(seq->id());
  std::vector<int32_t> to_free;
  // Deepest blocks first: they are evicted before their parents (a chain
  // without its root can never be matched again).
  const std::vector<int32_t>& table = seq->block_table();
  for (auto rit = table.rbegin(); rit != table.rend(); ++rit) {
    const int32_t b = *rit;
    if (b < 0 || b >= num_blocks_) continue;
    BlockInfo& info = blocks_[b];
    if (info.refs <= 0) continue;  // programmer error; never free twice
    if (--info.refs > 0) continue;
    --used_;
    if (info.hashed) {
      evictable_.push_back(b);
      info.lru = std::prev(evictable_.end());
    } else {
      to_free.push_back(b);
    }
  }
  seq->block_table().clear();
  if (!to_free.empty()) (void)alloc_->Free(to_free);
}

}  // namespace spear::engine
