#include "thread_pool.hpp"

#include <map>
#include <memory>
#include <sched.h>

namespace kt {

ThreadStartError::ThreadStartError(const char* pool, int requested, int started_, const std::string& why)
    : std::runtime_error(std::string("cannot start thread ") + std::to_string(started_ + 1) + " of " +
                         std::to_string(requested) + " for the " + pool + " (" + why + ")"),
      requested(requested),
      started(started_) {}

int checked_thread_count(int64_t num_threads) {
  if (num_threads < 0 || num_threads > kMaxThreads)
    throw std::invalid_argument("num_threads must be in [0, " + std::to_string(kMaxThreads) +
                                "] (0: every hardware thread), got " + std::to_string(num_threads));
  return num_threads == 0 ? hardware_threads() : static_cast<int>(num_threads);
}

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads < 1) num_threads = 1;
  workers_.reserve(num_threads - 1);
  try {
    for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  } catch (const std::exception& e) {  // std::system_error (EAGAIN) from std::thread
    const int started = static_cast<int>(workers_.size()) + 1;
    stop_and_join();  // a destructor does not run for a half-built object
    throw ThreadStartError("packing thread pool", num_threads, started, e.what());
  }
}

ThreadPool::~ThreadPool() { stop_and_join(); }

void ThreadPool::stop_and_join() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::run_tasks(int thread_index) {
  for (;;) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= count_) return;
    try {
      (*fn_)(i, thread_index);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_.store(count_, std::memory_order_relaxed);  // stop handing out work
    }
  }
}

void ThreadPool::worker_loop(int thread_index) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    run_tasks(thread_index);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--active_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t count, const std::function<void(int64_t, int)>& fn) {
  if (count <= 0) return;
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  if (workers_.empty() || count == 1) {
    for (int64_t i = 0; i < count; ++i) fn(i, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = &fn;
    count_ = count;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    active_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  run_tasks(0);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return active_ == 0; });
    fn_ = nullptr;
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

int hardware_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  const unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

ThreadPool& shared_pool(int num_threads) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<ThreadPool>> pools;
  num_threads = checked_thread_count(num_threads);
  std::lock_guard<std::mutex> lock(mutex);
  auto& pool = pools[num_threads];
  if (!pool) pool = std::make_unique<ThreadPool>(num_threads);  // on failure the slot stays empty
  return *pool;
}

}  // namespace kt
