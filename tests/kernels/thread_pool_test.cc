// ThreadPool: coverage, chunk sizes, nested and repeated calls.
#include "kernels/thread_pool.h"

#include <atomic>
#include <vector>

#include "gtest/gtest.h"

namespace spear::kernels {
namespace {

TEST(ThreadPoolTest, SizeIncludesCaller) {
  EXPECT_EQ(ThreadPool(1).size(), 1);
  EXPECT_EQ(ThreadPool(3).size(), 3);
  EXPECT_GE(ThreadPool(0).size(), 1);
}

TEST(ThreadPoolTest, CoversEveryIndexOnceWithLargeEnoughChunks) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 2, 3, 7, 64, 1000, 1001}) {
      for (int64_t grain : {0, 1, 2, 5, 64, 2000}) {
        SCOPED_TRACE(::testing::Message() << "threads=" << threads << " n=" << n
                                          << " grain=" << grain);
        std::vector<std::atomic<int>> hits(n);
        std::atomic<int> small_chunks{0};
        pool.ParallelFor(n, grain, [&](int64_t b, int64_t e) {
          ASSERT_LE(0, b);
          ASSERT_LT(b, e);
          ASSERT_LE(e, n);
          if (e - b < grain && e != n) ++small_chunks;  // only the last may be short
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i;
        EXPECT_EQ(small_chunks.load(), 0);
      }
    }
  }
}

TEST(ThreadPoolTest, ManySerialCalls) {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  for (int rep = 0; rep < 2000; ++rep) {
    pool.ParallelFor(10, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sum += i;
    });
  }
  EXPECT_EQ(sum.load(), 2000 * 45);
}

TEST(ThreadPoolTest, NestedCallRunsInline) {
  ThreadPool pool(3);
  constexpr int64_t kOuter = 6, kInner = 50;
  std::vector<std::atomic<int>> hits(kOuter * kInner);
  pool.ParallelFor(kOuter, 1, [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      pool.ParallelFor(kInner, 1, [&](int64_t ib, int64_t ie) {
        for (int64_t i = ib; i < ie; ++i) hits[o * kInner + i].fetch_add(1);
      });
    }
  });
  for (auto& h : hits) EXPECT_EQ(h.load(), 1);
}

TEST(ThreadPoolTest, UsesWorkersWhenWorkIsSplit) {
  // Not a timing test: only checks that more than one thread can take part.
  ThreadPool pool(3);
  std::atomic<int> inside{0}, max_inside{0};
  for (int rep = 0; rep < 50 && max_inside.load() < 2; ++rep) {
    pool.ParallelFor(3, 1, [&](int64_t, int64_t) {
      const int now = ++inside;
      int seen = max_inside.load();
      while (now > seen && !max_inside.compare_exchange_weak(seen, now)) {
      }
      std::atomic<int> spin{0};
      while (spin.fetch_add(1, std::memory_order_relaxed) < 200000) {
      }
      --inside;
    });
  }
  EXPECT_GE(max_inside.load(), 2);
}

}  // namespace
}  // namespace spear::kernels
