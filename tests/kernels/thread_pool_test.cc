// ThreadPool: coverage, chunk sizes, nested and repeated calls.
#include "kernels/thread_pool.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
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

// Spinning (idle workers and the waiting caller, for spin_us) changes when
// threads sleep, not what runs: every index once, back-to-back calls with
// and without sleeping in between, for no spin, the default and a long one.
TEST(ThreadPoolTest, SpinSettingsCoverEveryIndex) {
  for (int spin : {0, 100, 5000}) {
    ThreadPool pool(3, spin);
    EXPECT_EQ(pool.spin_us(), spin);
    for (int rep = 0; rep < 300; ++rep) {
      const int64_t n = 1 + rep % 37;
      std::vector<std::atomic<int>> hits(n);
      pool.ParallelFor(n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "spin " << spin;
      // Now and then a pause longer than the spin, so the workers sleep.
      if (rep % 50 == 49) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
}

// A pool whose workers are spinning (a 10 s spin) shuts down at once.
TEST(ThreadPoolTest, DestructorStopsSpinningWorkers) {
  const auto t0 = std::chrono::steady_clock::now();
  {
    ThreadPool pool(3, 10'000'000);
    std::atomic<int> sum{0};
    pool.ParallelFor(8, 1, [&](int64_t b, int64_t e) { sum += static_cast<int>(e - b); });
    EXPECT_EQ(sum.load(), 8);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

// SPEAR_POOL_SPIN_US sets the default; values that are not a whole number
// of microseconds in 0 .. 1,000,000 are ignored (the default, 100, stays).
TEST(ThreadPoolTest, SpinFromEnvironment) {
  const char* saved = std::getenv("SPEAR_POOL_SPIN_US");
  const std::string keep = saved ? saved : "";
  const std::pair<const char*, int> cases[] = {{"0", 0},        {"250", 250}, {"1000000", 1000000},
                                               {"-5", 100},     {"12x", 100}, {"", 100},
                                               {"1000001", 100}};
  for (const auto& [value, want] : cases) {
    ASSERT_EQ(setenv("SPEAR_POOL_SPIN_US", value, 1), 0);
    EXPECT_EQ(ThreadPool(2).spin_us(), want) << "'" << value << "'";
    EXPECT_EQ(ThreadPool(2, 7).spin_us(), 7) << "an explicit value wins";
  }
  if (saved) {
    setenv("SPEAR_POOL_SPIN_US", keep.c_str(), 1);
  } else {
    unsetenv("SPEAR_POOL_SPIN_US");
  }
}

}  // namespace
}  // namespace spear::kernels
