// The extension's persistent thread pools, side by side, with what they share: thread start and
// unwinding, the limits on thread counts, the process-wide instances.
//   ThreadPool: workers sleep between calls; parallel_for hands out indices dynamically. The packer's:
//               long calls, and a converter's other threads need the cores in between.
//   SpinPool:   run(body) runs body once on each thread; after a call the workers spin for
//               tuning().spin_us before they sleep. The MoE engine's: decode calls come back to back,
//               and a sleeping pool's wake-ups cost tens of microseconds per call on 16 threads.
// In both the calling thread takes part as thread 0, calls on one pool are serialized, and the
// first exception of a call is rethrown to the caller.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <emmintrin.h>

namespace kt {

// Thread counts a caller may ask for (0 = every hardware thread); larger ones are refused up front
// (std::invalid_argument naming the range) instead of failing somewhere in thread creation.
constexpr int kMaxThreads = 4096;
int hardware_threads();
int checked_thread_count(int64_t num_threads);  // 0 -> hardware_threads(); throws outside [0, kMaxThreads]

// The OS refused a thread (RLIMIT_NPROC, address space for its stack, ...). The threads a pool had
// already started are stopped and joined before this is thrown: nothing is left running or waiting.
class ThreadStartError : public std::runtime_error {
 public:
  ThreadStartError(const char* pool, int requested, int started, const std::string& why);
  int requested, started;
};

// One step of waiting for another thread's progress: pause, and yield once the wait grows long
// (an oversubscribed machine: let the thread we wait for run).
inline void spin_backoff(int64_t& spins) {
  if (++spins < (1 << 10)) {
    _mm_pause();
  } else {
    std::this_thread::yield();
  }
}

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // throws ThreadStartError
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Runs fn(i, thread_index) for every i in [0, count); rethrows the first exception.
  void parallel_for(int64_t count, const std::function<void(int64_t, int)>& fn);

 private:
  void worker_loop(int thread_index);
  void run_tasks(int thread_index);
  void stop();

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  int active_ = 0;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

class SpinPool {
 public:
  explicit SpinPool(int num_threads);  // throws ThreadStartError
  SpinPool(const SpinPool&) = delete;
  SpinPool& operator=(const SpinPool&) = delete;

  int size() const { return n_; }
  // Runs body(tid) once on each of the size() threads (the caller is tid 0); rethrows the first exception.
  void run(const std::function<void(int)>& body);

 private:
  void loop(int tid);
  void invoke(int tid);
  void stop();

  const int n_;
  std::vector<std::thread> workers_;
  std::mutex call_m_, m_, err_m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<bool> stop_{false};  // only while a failed constructor unwinds
  std::atomic<int> done_{0};
  const std::function<void(int)>* body_ = nullptr;
  std::exception_ptr error_;
};

// The process-wide pool of `num_threads` threads (0 = every hardware thread), created on first use
// (ThreadStartError leaves no pool behind: a later call tries again) and kept for the process.
ThreadPool& shared_pool(int num_threads);
// Never destroyed: its workers may still be spinning when the process exits.
SpinPool& spin_pool(int num_threads);

}  // namespace kt
