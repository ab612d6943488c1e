// A fixed-size pool of worker threads with a blocking ParallelFor.
// Thread-safety: ParallelFor may be called from one thread at a time (the
// engine's loop); it is not re-entrant. The calling thread takes part in the
// work, so a pool of size 1 runs everything inline.
//
// Idle workers spin for a while (spin_us, default 100 us; the environment
// variable SPEAR_POOL_SPIN_US overrides it, 0 turns spinning off) before they
// sleep on a condition variable, and the caller spins the same way while it
// waits for chunks still running elsewhere: a decode step issues hundreds of
// short ParallelFors, and a sleeping thread's wake-up (a futex round trip,
// tens of microseconds in a VM) cost more than the work of many of them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace spear::kernels {

class ThreadPool {
 public:
  // num_threads <= 0 means std::thread::hardware_concurrency(). spin_us < 0
  // means the default (SPEAR_POOL_SPIN_US if set, else 100).
  explicit ThreadPool(int num_threads, int spin_us = -1);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  int spin_us() const { return spin_us_; }

  // Splits [0, n) into contiguous chunks of at least `grain` items and calls
  // fn(begin, end) for each, on the pool and the calling thread; returns when
  // all chunks are done.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop(int index);
  // Spins until done() holds or spin_us_ have passed (the caller then
  // checks its condition under the lock and sleeps if it still waits).
  template <class Done>
  void Spin(Done&& done) const;

  int spin_us_ = 100;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_;
  std::condition_variable cv_done_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;  // guarded by mu_
  int64_t n_ = 0, chunk_ = 0, num_chunks_ = 0;                  // guarded by mu_
  int64_t next_chunk_ = 0;                                      // guarded by mu_
  // Written under mu_; atomic so that spinning threads can read them
  // without it.
  std::atomic<int64_t> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace spear::kernels
