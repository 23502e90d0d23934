#include "thread_pool.hpp"

#include <sched.h>

#include <chrono>
#include <map>
#include <memory>

#include "tuning.hpp"

namespace kt {

ThreadStartError::ThreadStartError(const char* pool, int requested_, int started_, const std::string& why)
    : std::runtime_error(std::string("cannot start thread ") + std::to_string(started_ + 1) + " of " +
                         std::to_string(requested_) + " for the " + pool + " (" + why + ")"),
      requested(requested_),
      started(started_) {}

int hardware_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  const unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

int checked_thread_count(int64_t num_threads) {
  if (num_threads < 0 || num_threads > kMaxThreads)
    throw std::invalid_argument("num_threads must be in [0, " + std::to_string(kMaxThreads) +
                                "] (0: every hardware thread), got " + std::to_string(num_threads));
  return num_threads == 0 ? hardware_threads() : static_cast<int>(num_threads);
}

namespace {

// Starts threads 1..n-1 running body(i). When the system refuses one, stop() makes the started
// ones return, they are joined, and ThreadStartError says which thread failed (a half-built pool
// has no destructor to do this, and a joinable std::thread destroyed would terminate the process).
template <class Body, class Stop>
void start_workers(std::vector<std::thread>& workers, int n, const char* pool, Body body, Stop stop) {
  workers.reserve(n - 1);
  try {
    for (int i = 1; i < n; ++i) workers.emplace_back(body, i);
  } catch (const std::exception& e) {  // std::system_error (EAGAIN) from std::thread
    const int started = static_cast<int>(workers.size()) + 1;
    stop();
    for (auto& t : workers) t.join();
    workers.clear();
    throw ThreadStartError(pool, n, started, e.what());
  }
}

}  // namespace

// ---- ThreadPool

ThreadPool::ThreadPool(int num_threads) {
  start_workers(workers_, num_threads < 1 ? 1 : num_threads, "packing thread pool",
                [this](int i) { worker_loop(i); }, [this] { stop(); });
}

ThreadPool::~ThreadPool() {
  stop();
  for (auto& t : workers_) t.join();
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
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

// ---- SpinPool

SpinPool::SpinPool(int num_threads) : n_(num_threads < 1 ? 1 : num_threads) {
  start_workers(workers_, n_, "MoE thread pool", [this](int i) { loop(i); }, [this] { stop(); });
}

void SpinPool::stop() {
  {
    std::lock_guard<std::mutex> l(m_);
    stop_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

void SpinPool::run(const std::function<void(int)>& body) {
  std::lock_guard<std::mutex> call(call_m_);
  if (n_ == 1) {
    body(0);
    return;
  }
  body_ = &body;
  error_ = nullptr;
  done_.store(0, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> l(m_);
    gen_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  invoke(0);
  int64_t spins = 0;
  while (done_.load(std::memory_order_acquire) != n_ - 1) spin_backoff(spins);
  body_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

void SpinPool::invoke(int tid) {
  try {
    (*body_)(tid);
  } catch (...) {
    std::lock_guard<std::mutex> l(err_m_);
    if (!error_) error_ = std::current_exception();
  }
}

void SpinPool::loop(int tid) {
  const Tuning& knobs = tuning();
  uint64_t seen = 0;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t spin_ns = knobs.spin_us.load(std::memory_order_relaxed) * 1000;
    int64_t spins = 0;
    while (gen_.load(std::memory_order_acquire) == seen) {
      if ((++spins & 255) == 0) {
        if (stop_.load(std::memory_order_acquire)) return;
        const int64_t el =
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
        if (el >= spin_ns) {
          std::unique_lock<std::mutex> l(m_);
          cv_.wait(l, [&] { return gen_.load(std::memory_order_acquire) != seen || stop_.load(); });
          break;
        }
        if (spins > (1 << 16)) std::this_thread::yield();
      }
      _mm_pause();
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = gen_.load(std::memory_order_acquire);
    invoke(tid);
    done_.fetch_add(1, std::memory_order_release);
  }
}

// ---- the process-wide pools

ThreadPool& shared_pool(int num_threads) {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<ThreadPool>> pools;
  num_threads = checked_thread_count(num_threads);
  std::lock_guard<std::mutex> lock(mutex);
  auto& pool = pools[num_threads];
  if (!pool) pool = std::make_unique<ThreadPool>(num_threads);
  return *pool;
}

SpinPool& spin_pool(int num_threads) {
  static std::mutex mutex;
  static std::map<int, SpinPool*> pools;
  num_threads = checked_thread_count(num_threads);
  std::lock_guard<std::mutex> lock(mutex);
  SpinPool*& pool = pools[num_threads];
  if (!pool) pool = new SpinPool(num_threads);
  return *pool;
}

}  // namespace kt
