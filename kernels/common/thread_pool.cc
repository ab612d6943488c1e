#include "kernels/thread_pool.h"

#include <chrono>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace spear::kernels {
namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// SPEAR_POOL_SPIN_US: a whole number of microseconds (0 .. 1000000), else
// the default.
int DefaultSpinUs() {
  constexpr int kDefault = 100;
  const char* e = std::getenv("SPEAR_POOL_SPIN_US");
  if (e == nullptr || *e == '\0') return kDefault;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  if (*end != '\0' || v < 0 || v > 1000000) return kDefault;
  return static_cast<int>(v);
}

// The pool whose ParallelFor the current thread is executing a chunk of, so
// that a nested ParallelFor on the same pool runs inline instead of
// deadlocking on the (non-re-entrant) shared job state.
thread_local const ThreadPool* tls_running_pool = nullptr;

class RunningScope {
 public:
  explicit RunningScope(const ThreadPool* pool) : saved_(tls_running_pool) {
    tls_running_pool = pool;
  }
  ~RunningScope() { tls_running_pool = saved_; }

 private:
  const ThreadPool* saved_;
};

}  // namespace

ThreadPool::ThreadPool(int num_threads, int spin_us)
    : spin_us_(spin_us < 0 ? DefaultSpinUs() : spin_us) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  if (num_threads <= 0) num_threads = 1;
  workers_.reserve(num_threads - 1);
  for (int i = 0; i + 1 < num_threads; ++i) {
    workers_.emplace_back([this, i] { WorkerLoop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (std::thread& t : workers_) t.join();
}

template <class Done>
void ThreadPool::Spin(Done&& done) const {
  if (spin_us_ <= 0) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
  while (std::chrono::steady_clock::now() < until) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return;
      CpuRelax();
    }
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  // One chunk per thread unless that would make chunks smaller than grain.
  // Equal chunks (rather than many small ones) keep each thread streaming a
  // contiguous range, which is what the bandwidth-bound kernels want.
  const int64_t threads = size();
  int64_t chunk = (n + threads - 1) / threads;
  if (chunk < grain) chunk = grain;
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  if (num_chunks == 1 || workers_.empty() || tls_running_pool == this) {
    RunningScope scope(this);
    for (int64_t b = 0; b < n; b += chunk) fn(b, b + chunk < n ? b + chunk : n);
    return;
  }

  std::unique_lock<std::mutex> lock(mu_);
  fn_ = &fn;
  n_ = n;
  chunk_ = chunk;
  num_chunks_ = num_chunks;
  next_chunk_ = 0;
  pending_ = num_chunks;
  ++generation_;
  lock.unlock();
  if (num_chunks - 1 >= static_cast<int64_t>(workers_.size())) {
    cv_work_.notify_all();
  } else {
    for (int64_t i = 0; i + 1 < num_chunks; ++i) cv_work_.notify_one();
  }

  // The caller works too, then waits for chunks still running elsewhere.
  RunningScope scope(this);
  lock.lock();
  while (next_chunk_ < num_chunks_) {
    const int64_t c = next_chunk_++;
    lock.unlock();
    const int64_t b = c * chunk;
    fn(b, b + chunk < n ? b + chunk : n);
    lock.lock();
    --pending_;
  }
  if (pending_.load(std::memory_order_acquire) != 0) {
    lock.unlock();
    Spin([this] { return pending_.load(std::memory_order_acquire) == 0; });
    lock.lock();
    cv_done_.wait(lock, [this] { return pending_ == 0; });
  }
  fn_ = nullptr;
}

void ThreadPool::WorkerLoop(int /*index*/) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (!stop_ && generation_ == seen) {  // idle: spin a while, then sleep
      lock.unlock();
      Spin([&] {
        return stop_.load(std::memory_order_acquire) ||
               generation_.load(std::memory_order_acquire) != seen;
      });
      lock.lock();
    }
    cv_work_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    RunningScope scope(this);
    // fn_, n_ and chunk_ are read under the lock together with the chunk
    // index, so a late worker never mixes two jobs.
    while (fn_ != nullptr && next_chunk_ < num_chunks_) {
      const int64_t c = next_chunk_++;
      const auto* fn = fn_;
      const int64_t n = n_, chunk = chunk_;
      lock.unlock();
      const int64_t b = c * chunk;
      (*fn)(b, b + chunk < n ? b + chunk : n);
      lock.lock();
      if (--pending_ == 0) cv_done_.notify_one();
    }
  }
}

}  // namespace spear::kernels
