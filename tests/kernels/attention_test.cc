// cpu::Attention vs ref::Attention over a paged KV cache with a shuffled
// block table, for every ISA variant.
#include <algorithm>
#include <numeric>

#include "ops_harness.h"

namespace spear::kernels::testing {
namespace {

// float32 dot products and softmax (polynomial exp, < 2e-7 relative) vs a
// double reference; outputs are convex combinations of values in [-1, 1].
constexpr double kAttnTol = 1e-5, kAttnNmse = 1e-10;

struct AttnCase {
  int n_heads, n_kv_heads, head_dim;
  int64_t m, q_start;
  int block = 16;  // cache block size (positions)
};

class AttentionTest : public OpsTest {
 protected:
  void RunCase(const AttnCase& c) {
    SCOPED_TRACE(::testing::Message() << "n_heads=" << c.n_heads << " n_kv=" << c.n_kv_heads
                                      << " head_dim=" << c.head_dim << " m=" << c.m
                                      << " q_start=" << c.q_start << " block=" << c.block
                                      << " seed=" << seed_);
    const int kBlock = c.block;
    const int64_t positions = c.q_start + c.m;
    const int64_t used_blocks = (positions + kBlock - 1) / kBlock;
    const int64_t cache_blocks = used_blocks + 5;  // some never referenced
    const int64_t kv_row = int64_t{c.n_kv_heads} * c.head_dim;

    // Shuffled, non-contiguous block table.
    std::vector<int32_t> perm(cache_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng_);
    std::vector<int32_t> table(perm.begin(), perm.begin() + used_blocks);

    // Only live positions get data; unreferenced blocks and slots past the
    // causal end stay NaN, so reading them would poison the output.
    std::vector<float> kc(cache_blocks * kBlock * kv_row, kPoison);
    std::vector<float> vc(kc.size(), kPoison);
    std::uniform_real_distribution<float> dist(-1.f, 1.f);
    for (int64_t pos = 0; pos < positions; ++pos) {
      const int64_t slot = int64_t{table[pos / kBlock]} * kBlock + pos % kBlock;
      for (int64_t e = 0; e < kv_row; ++e) {
        kc[slot * kv_row + e] = 2.f * dist(rng_);
        vc[slot * kv_row + e] = dist(rng_);
      }
    }
    const int64_t width = int64_t{c.n_heads} * c.head_dim;
    const int64_t ldq = width + 4, ldo = width + 1;
    std::vector<float> q = RandomRows(c.m, width, ldq);
    std::vector<float> out_ref(c.m * ldo, kPoison), out_cpu(c.m * ldo, kPoison);

    AttentionParams p;
    p.q = q.data();
    p.m = c.m;
    p.ldq = ldq;
    p.n_heads = c.n_heads;
    p.n_kv_heads = c.n_kv_heads;
    p.head_dim = c.head_dim;
    p.k_cache = kc.data();
    p.v_cache = vc.data();
    p.block_size = kBlock;
    p.block_table = table.data();
    p.num_blocks_in_table = used_blocks;
    p.num_cache_blocks = cache_blocks;
    p.q_start = c.q_start;
    p.scale = 1.f / std::sqrt(static_cast<float>(c.head_dim));
    p.ldo = ldo;
    p.out = out_ref.data();
    ASSERT_TRUE(ref::Attention(p).ok());
    p.out = out_cpu.data();
    ASSERT_TRUE(cpu::Attention(p, pool()).ok());
    EXPECT_TRUE(Close(out_cpu, out_ref, c.m, width, ldo, kAttnTol, kAttnNmse));
  }
};

// Every GQA ratio (a kv head's query heads are one work item); m > 1 takes
// the prefill tiles (24 / ratio tokens a tile: several tiles, a partial
// last one, head dims that are no multiple of the vector width), m = 1 the
// decode form.
TEST_P(AttentionTest, Prefill) {
  for (int ratio : {1, 3, 4, 5, 8}) {
    for (int head_dim : {8, 24, 64}) {
      for (int64_t m : {1, 3, 17}) {
        RunCase({2 * ratio, 2, head_dim, m, 0});
      }
    }
  }
  RunCase({6, 2, 33, 70, 100});
  RunCase({8, 2, 128, 50, 0});
  RunCase({9, 3, 64, 130, 7});
  RunCase({32, 1, 256, 9, 40});  // MQA, one token a tile, a wide head
}

// Cache blocks of 1, 5 and 48 positions: runs of rows, prefetches and the
// prefill tiles' key blocks cross block edges everywhere.
TEST_P(AttentionTest, BlockSizes) {
  for (int block : {1, 5, 48}) {
    RunCase({6, 2, 64, 1, 300, block});
    RunCase({6, 2, 64, 30, 70, block});
    RunCase({4, 4, 40, 17, 0, block});
  }
}

TEST_P(AttentionTest, ChunkedPrefill) {
  for (int ratio : {1, 3}) {
    for (int64_t q_start : {5, 16, 37, 300}) {
      RunCase({3 * ratio, 3, 64, 17, q_start});
      RunCase({ratio, 1, 40, 5, q_start});
    }
  }
}

TEST_P(AttentionTest, Decode) {
  for (int ratio : {1, 3, 4, 8}) {
    for (int64_t q_start : {0, 15, 16, 700, 2047}) {
      RunCase({3 * ratio, 3, 64, 1, q_start});  // SmolLM2-like heads
    }
    RunCase({ratio, 1, 128, 1, 1500});  // few heads: exercises the key split
    RunCase({2 * ratio, 2, 33, 1, 999});
  }
}

// Batched chunk where some rows are short and some long: with few heads the
// key range is split, leaving empty splits for the short rows.
TEST_P(AttentionTest, SplitWithShortRows) { RunCase({1, 1, 16, 2, 600}); }

INSTANTIATE_TEST_SUITE_P(Variants, AttentionTest, ::testing::ValuesIn(AllVariants()),
                         VariantName);

}  // namespace
}  // namespace spear::kernels::testing
