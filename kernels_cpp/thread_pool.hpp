// A persistent thread pool: workers sleep between calls, parallel_for hands out indices
// dynamically, and the calling thread takes part. Calls on one pool are serialized.
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

namespace kt {

// Thread counts a caller may ask for (0 = every hardware thread); larger ones are refused up front
// (std::invalid_argument naming the range) instead of failing somewhere in thread creation.
constexpr int kMaxThreads = 4096;
int checked_thread_count(int64_t num_threads);  // 0 -> hardware_threads(); throws outside [0, kMaxThreads]

// The OS refused a thread (RLIMIT_NPROC, address space for its stack, ...). The threads a pool had
// already started are stopped and joined before this is thrown: nothing is left running or waiting.
class ThreadStartError : public std::runtime_error {
 public:
  ThreadStartError(const char* pool, int requested, int started, const std::string& why);
  int requested, started;
};

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
  void stop_and_join();

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

int hardware_threads();
// The process-wide pool with `num_threads` threads (0 = all hardware threads); created on first use.
ThreadPool& shared_pool(int num_threads);

}  // namespace kt
