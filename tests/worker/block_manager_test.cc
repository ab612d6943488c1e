// BlockManager: reference counts, prefix-hash reuse, eviction, free.
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "worker/engine/block_manager.h"
#include "worker/engine/kv_cache.h"

namespace spear::engine {
namespace {

constexpr int kBs = 4;

std::unique_ptr<KvCache> MakeCache(int64_t blocks) {
  model::ModelConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.head_dim = 2;
  KvCacheOptions o;
  o.block_size = kBs;
  o.num_blocks = blocks;
  return std::move(*KvCache::Create(c, o));
}

std::unique_ptr<Sequence> Seq(int64_t id, std::vector<int32_t> toks) {
  return std::make_unique<Sequence>(id, std::move(toks), SamplingParams(), GenerateOptions());
}

std::vector<int32_t> Range(int from, int n) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = from + i;
  return v;
}

// Allocates and "computes" the whole sequence, then commits its blocks.
void Compute(BlockManager& bm, Sequence* s) {
  ASSERT_TRUE(bm.EnsureCapacity(s, static_cast<int64_t>(s->tokens().size())).ok());
  s->MarkComputed(s->num_pending());
  bm.CommitComputed(*s);
}

TEST(BlockHashTest, ChainsAndDiffers) {
  std::vector<int32_t> a = {1, 2, 3, 4}, b = {1, 2, 3, 5};
  EXPECT_EQ(BlockHash(0, a), BlockHash(0, a));
  EXPECT_NE(BlockHash(0, a), BlockHash(0, b));
  EXPECT_NE(BlockHash(0, a), BlockHash(BlockHash(0, a), a));
}

TEST(BlockManagerTest, AllocateAndFreeCountsUsage) {
  auto cache = MakeCache(8);
  BlockManager bm(cache.get());
  auto s = Seq(1, Range(0, 10));
  ASSERT_TRUE(bm.EnsureCapacity(s.get(), 10).ok());
  EXPECT_EQ(s->block_table().size(), 3u);
  EXPECT_EQ(bm.num_used(), 3);
  EXPECT_EQ(bm.BlocksNeeded(*s, 12), 0);
  EXPECT_EQ(bm.BlocksNeeded(*s, 13), 1);
  for (int32_t b : s->block_table()) EXPECT_EQ(bm.ref_count(b), 1);
  bm.Release(s.get());
  EXPECT_TRUE(s->block_table().empty());
  EXPECT_EQ(bm.num_used(), 0);
  EXPECT_EQ(bm.num_available(), 8);
}

TEST(BlockManagerTest, ExhaustionIsAllOrNothing) {
  auto cache = MakeCache(4);
  BlockManager bm(cache.get());
  auto s = Seq(1, Range(0, 20));
  absl::Status st = bm.EnsureCapacity(s.get(), 20);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(s->block_table().empty());
  EXPECT_EQ(bm.num_used(), 0);
}

TEST(BlockManagerTest, PrefixReuseSharesFullBlocksAndLeavesOneToken) {
  auto cache = MakeCache(16);
  BlockManager bm(cache.get());
  auto a = Seq(1, Range(100, 10));  // 2 full blocks + 2 tokens
  Compute(bm, a.get());
  // Same 8-token prefix, different tail.
  std::vector<int32_t> tb = Range(100, 8);
  tb.push_back(5);
  auto b = Seq(2, tb);
  EXPECT_EQ(bm.AcquirePrefix(b.get()), 8);
  EXPECT_EQ(b->num_computed(), 8);
  ASSERT_EQ(b->block_table().size(), 2u);
  EXPECT_EQ(b->block_table()[0], a->block_table()[0]);
  EXPECT_EQ(b->block_table()[1], a->block_table()[1]);
  EXPECT_EQ(bm.ref_count(a->block_table()[0]), 2);
  EXPECT_EQ(bm.ref_count(a->block_table()[2]), 1);  // partial block: never shared

  // A prompt that IS exactly the two cached blocks reuses only one: the
  // last token must be computed for its logits.
  auto c = Seq(3, Range(100, 8));
  EXPECT_EQ(bm.AcquirePrefix(c.get()), 4);

  // Different first block: no reuse (chain hash).
  std::vector<int32_t> td = Range(100, 8);
  td[0] = 99;
  auto d = Seq(4, td);
  EXPECT_EQ(bm.AcquirePrefix(d.get()), 0);

  bm.Release(a.get());
  bm.Release(b.get());
  bm.Release(c.get());
  bm.Release(d.get());
  EXPECT_EQ(bm.num_used(), 0);
  // The two hashed blocks stay cached (evictable), the rest went back.
  EXPECT_EQ(bm.num_evictable(), 2);
  EXPECT_EQ(bm.num_available(), 16);
}

TEST(BlockManagerTest, CachedBlocksSurviveReleaseUntilEvicted) {
  auto cache = MakeCache(4);
  BlockManager bm(cache.get());
  auto a = Seq(1, Range(0, 9));  // blocks: full, full, partial
  Compute(bm, a.get());
  bm.Release(a.get());
  EXPECT_EQ(bm.num_evictable(), 2);
  auto b = Seq(2, Range(0, 9));
  EXPECT_EQ(bm.AcquirePrefix(b.get()), 8);
  EXPECT_EQ(bm.num_evictable(), 0);
  EXPECT_EQ(bm.num_used(), 2);
  bm.Release(b.get());
  // A large unrelated sequence evicts the cached blocks (deepest first).
  auto c = Seq(3, Range(50, 16));
  ASSERT_TRUE(bm.EnsureCapacity(c.get(), 16).ok());
  EXPECT_EQ(bm.num_evictable(), 0);
  EXPECT_EQ(bm.num_used(), 4);
  bm.Release(c.get());
  auto d = Seq(4, Range(0, 9));
  EXPECT_EQ(bm.AcquirePrefix(d.get()), 0);  // gone
}

TEST(BlockManagerTest, PrefixCachingOff) {
  auto cache = MakeCache(8);
  BlockManager bm(cache.get(), BlockManager::Options{false});
  auto a = Seq(1, Range(0, 9));
  Compute(bm, a.get());
  auto b = Seq(2, Range(0, 9));
  EXPECT_EQ(bm.AcquirePrefix(b.get()), 0);
  bm.Release(a.get());
  EXPECT_EQ(bm.num_evictable(), 0);
  EXPECT_EQ(bm.num_available(), 8);
}

}  // namespace
}  // namespace spear::engine
