// A fixed-size pool of worker threads with a blocking ParallelFor.
// Thread-safety: ParallelFor may be called from one thread at a time (the
// engine's loop); it is not re-entrant. The calling thread takes part in the
// work, so a pool of size 1 runs everything inline.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace spear::kernels {

class ThreadPool {
 public:
  // num_threads <= 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, n) into contiguous chunks of at least `grain` items and calls
  // fn(begin, end) for each, on the pool and the calling thread; returns when
  // all chunks are done.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop(int index);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_;
  std::condition_variable cv_done_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;  // guarded by mu_
  int64_t n_ = 0, chunk_ = 0, num_chunks_ = 0;                  // guarded by mu_
  int64_t next_chunk_ = 0;                                      // guarded by mu_
  int64_t pending_ = 0;                                         // guarded by mu_
  uint64_t generation_ = 0;                                     // guarded by mu_
  bool stop_ = false;                                           // guarded by mu_
};

}  // namespace spear::kernels
