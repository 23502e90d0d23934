// What the schedules of moe::forward() share (internal to moe.cpp, moe_decode.cpp, moe_prefill.cpp and
// moe_group_schedule.cpp): the routing of one call, the in-order task hand-out over the spin pool, the
// re-quantize (S) step, aligned buffers kept between calls, the stage profile. Every schedule runs one
// parallel region whose tasks are claimed in index order and wait only for tasks of lower index
// (dependency counters, no barrier):
//   Q  quantize the tokens of x          G  gate/up of (expert, NUMA slice, row groups) + SiLU-gate
//   S  re-quantize the intermediate      D  down, weighted sum into out in expert-id order
// Every float operation and its order is the same in both schedules and for any thread count.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

#include "moe.hpp"
#include "moe_isa.hpp"
#include "thread_pool.hpp"

namespace kt {
namespace moe {
namespace detail {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Columns of H per down-stage task: the first of `sizes` (largest first) that divides H and leaves
// at least `min_tasks` tasks when every chunk makes `tasks_per_chunk` of them; else 32 (a tile row group).
inline int64_t down_chunk(int64_t H, std::initializer_list<int64_t> sizes, int64_t tasks_per_chunk, int64_t min_tasks) {
  for (int64_t c : sizes)
    if (H % c == 0 && tasks_per_chunk * (H / c) >= min_tasks) return c;
  return 32;
}

template <typename T>
struct AlignedArray {
  T* p = nullptr;
  explicit AlignedArray(size_t n) {
    const size_t bytes = round_up(static_cast<int64_t>(std::max<size_t>(n, 1) * sizeof(T)), 64);
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~AlignedArray() { std::free(p); }
  AlignedArray(const AlignedArray&) = delete;
  AlignedArray& operator=(const AlignedArray&) = delete;
};

// Growable 64-byte aligned buffer (contents are not preserved when it grows).
struct Buf {
  void* p = nullptr;
  size_t cap = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  template <typename T>
  T* get(size_t n) {
    const size_t bytes = static_cast<size_t>(round_up(static_cast<int64_t>(std::max<size_t>(n, 1) * sizeof(T)), 64));
    if (bytes > cap) {
      std::free(p);
      p = std::aligned_alloc(64, bytes);
      if (!p) {
        cap = 0;
        throw std::bad_alloc();
      }
      cap = bytes;
    }
    return static_cast<T*>(p);
  }
};

// A schedule's buffers W (a struct of Bufs), kept between calls so that the hot path takes no page faults;
// concurrent calls lease different ones (up to 4 are kept).
template <class W>
class WorkspaceLease {
 public:
  WorkspaceLease() {
    std::lock_guard<std::mutex> l(mu());
    if (!spare().empty()) {
      ws_ = std::move(spare().back());
      spare().pop_back();
    } else {
      ws_.reset(new W);
    }
  }
  ~WorkspaceLease() {
    std::lock_guard<std::mutex> l(mu());
    if (spare().size() < 4) spare().push_back(std::move(ws_));
  }
  W& operator*() { return *ws_; }

 private:
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::unique_ptr<W>>& spare() {
    static std::vector<std::unique_ptr<W>> v;
    return v;
  }
  std::unique_ptr<W> ws_;
};

// The rows of one call ((token, top-k slot) pairs) grouped by expert, experts in ascending id order,
// rows of an expert in token order.
struct Routing {
  std::vector<int64_t> active;      // expert ids with rows
  std::vector<int64_t> m_of;        // rows of active expert a
  std::vector<int64_t> row0;        // first row of active expert a (A + 1 entries)
  std::vector<int64_t> row_token;   // token of row r
  std::vector<float> row_weight;    // top-k weight of row r
  std::vector<int64_t> dest;        // row of (token t, slot j) at t * topk + j
  int64_t experts() const { return static_cast<int64_t>(active.size()); }
  int64_t rows() const { return row0.back(); }
  int64_t max_rows() const { return *std::max_element(m_of.begin(), m_of.end()); }
};
Routing route(const int64_t* ids, const float* topk_w, int64_t tokens, int64_t topk, int64_t experts);

// One forward call as the schedules see it (tokens > 0, topk > 0).
struct Call {
  const Weights& weights;
  const float* x;
  int64_t tokens, topk;
  float* out;
  const IsaKernels& k;  // the ISA's row
  SpinPool& pool;
  const Routing& route;
  double t_call;  // start of the call (profiling only)
};
void forward_decode(const Call& call);   // moe_decode.cpp: tiled methods, few rows per expert
void forward_prefill(const Call& call);  // moe_prefill.cpp: tiled methods, many rows per expert
void forward_group(const Call& call);    // moe_group_schedule.cpp: group-wise methods, every size

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// n dependency counters, each starting at count(i).
template <class Count>
std::unique_ptr<std::atomic<int64_t>[]> counters(int64_t n, Count count) {
  std::unique_ptr<std::atomic<int64_t>[]> c(new std::atomic<int64_t>[n > 0 ? n : 1]);
  for (int64_t i = 0; i < n; ++i) c[i].store(count(i), std::memory_order_relaxed);
  return c;
}

// The rows of token tk, one per slot that is not skipped (id -1): first(r) for its first row, then copy(r, r2)
// for each other one (a token is quantized once, into its first row, and copied into the others).
template <class First, class Copy>
void token_rows(const Routing& rt, int64_t tk, int64_t topk, First first, Copy copy) {
  int64_t r = -1;
  for (int64_t j = 0; j < topk; ++j) {
    const int64_t r2 = rt.dest[tk * topk + j];
    if (r2 < 0) continue;
    if (r < 0) {
      r = r2;
      first(r);
    } else {
      copy(r, r2);
    }
  }
}

// Hands out tasks 0..total-1 in index order to every pool thread (tasks may wait on earlier ones), each
// thread first running prepare_thread (if any); the first exception stops the hand-out, is flagged in
// `abort` for waiting tasks, and is rethrown.
template <class RunTask>
void run_tasks_in_order(SpinPool& pool, int64_t total, void (*prepare_thread)(), std::atomic<int64_t>& next,
                        std::atomic<bool>& abort, RunTask& run_task) {
  pool.run([&](int tid) {
    if (prepare_thread) prepare_thread();
    try {
      for (;;) {
        const int64_t task = next.fetch_add(1, std::memory_order_relaxed);
        if (task >= total) return;
        run_task(task, tid);
      }
    } catch (...) {
      abort.store(true, std::memory_order_relaxed);
      next.store(total, std::memory_order_relaxed);
      throw;
    }
  });
}

// Waits until a dependency counter reaches 0 (its tasks have lower indices, so they are running).
inline void wait_zero(const std::atomic<int64_t>& counter, const std::atomic<bool>& abort) {
  int64_t spins = 0;
  while (counter.load(std::memory_order_acquire) != 0) {
    if (abort.load(std::memory_order_relaxed)) throw std::runtime_error("MoE forward aborted");
    spin_backoff(spins);
  }
}

// The S tasks: the intermediate of each (active expert a, NUMA slice t) is re-quantized kRows rows
// per task, expert-major then slice, once its gate/up groups are done.
struct RequantTasks {
  static constexpr int64_t kRows = 16;
  int64_t T;
  std::vector<int64_t> first;  // first S task of expert a (A + 1 entries)
  RequantTasks(const std::vector<int64_t>& m_of, int64_t threadpool_count) : T(threadpool_count), first(m_of.size() + 1, 0) {
    for (size_t a = 0; a < m_of.size(); ++a) first[a + 1] = first[a] + T * ((m_of[a] + kRows - 1) / kRows);
  }
  int64_t count() const { return first.back(); }
  int64_t of_expert(int64_t a) const { return first[a + 1] - first[a]; }
  struct Task {
    int64_t a, t, i0, i1;  // expert, slice, rows [i0, i1) of its m
  };
  Task task(int64_t i, const std::vector<int64_t>& m_of) const {
    const int64_t a = static_cast<int64_t>(std::upper_bound(first.begin(), first.end(), i) - first.begin()) - 1;
    const int64_t m = m_of[a], per_t = (m + kRows - 1) / kRows;
    const int64_t t = (i - first[a]) / per_t, c = (i - first[a]) % per_t;
    return {a, t, c * kRows, std::min(m, (c + 1) * kRows)};
  }
};

// The S step on rows [i0, i1) of one (expert, slice) intermediate: row i (il floats at act + i*il)
// is quantized like x (epi.quantize: scale ad[i], sum as[i]) into row i of q in layout la. A layout
// whose rows are contiguous is written in place; any other through qtmp (il bytes), 64 bytes at a time.
inline void requantize_rows(const Epilogue& epi, const float* act, int64_t il, int64_t i0, int64_t i1, int8_t* q,
                            ALayout la, float* ad, int32_t* as, int8_t* qtmp) {
  const bool contiguous = la.ks == 64;
  for (int64_t i = i0; i < i1; ++i) {
    if (contiguous) {
      ad[i] = epi.quantize(act + i * il, il, la.at(q, i, 0), &as[i]);
    } else {
      ad[i] = epi.quantize(act + i * il, il, qtmp, &as[i]);
      for (int64_t c = 0; c < il; c += 64) std::memcpy(la.at(q, i, c), qtmp + c, 64);
    }
  }
}

// The first row (in expert order) of each token: where the down stage zeroes the token's out row (H floats)
// before its first expert adds to it. A token with no row (every slot skipped) gets R, and its out row is zeroed
// here.
inline std::vector<int64_t> first_rows(const Routing& rt, int64_t tokens, float* out, int64_t H) {
  std::vector<int64_t> first(tokens, rt.rows());
  for (int64_t r = 0; r < rt.rows(); ++r) first[rt.row_token[r]] = std::min(first[rt.row_token[r]], r);
  for (int64_t t = 0; t < tokens; ++t)
    if (first[t] == rt.rows()) std::fill(out + t * H, out + (t + 1) * H, 0.f);
  return first;
}

// Groups (32 rows of I_l) per gate/up task: the largest of 8, 4, 2, 1 that still gives >= 8 tasks per thread.
inline int64_t gate_groups_per_task(int64_t A, int64_t T, int64_t groups1, int threads) {
  for (int64_t gc : {8, 4, 2}) {
    if (gc <= groups1 && A * T * ((groups1 + gc - 1) / gc) >= 8 * threads) return gc;
  }
  return 1;
}

// The stages a profile times (moe::last_profile's keys).
enum Stage { kStSerial, kStQ, kStPack, kStGDot, kStGEpi, kStS, kStDDot, kStDEpi, kStWait, kStages };

// The stage profile of one call when tuning().profiling is on (else nothing is timed): per thread, the seconds
// of each stage, summed; publish() makes them moe::last_profile().
class StageProfile {
 public:
  StageProfile(int threads, double t_call);
  bool on() const { return on_; }
  // A task's clock: mark(stage) adds the seconds since the task's start or its last mark to that stage.
  class Clock {
   public:
    Clock(double* sums, bool on) : sums_(sums), on_(on), t_(on ? now_s() : 0) {}
    void mark(int stage) {
      if (!on_) return;
      const double t = now_s();
      sums_[stage] += t - t_;
      t_ = t;
    }

   private:
    double* sums_;
    bool on_;
    double t_;
  };
  Clock clock(int tid) { return Clock(on_ ? sums_.data() + tid * 16 : nullptr, on_); }  // 16 doubles (128 bytes) a thread
  void region_start() { t_region_ = on_ ? now_s() : 0; }
  // The call's wall and region times, the stages summed over threads, and the schedule's task sizes.
  void publish(const std::vector<std::pair<const char*, double>>& sizes);

 private:
  bool on_;
  int threads_;
  double t_call_, t_region_ = 0;
  std::vector<double> sums_;
};

}  // namespace detail
}  // namespace moe
}  // namespace kt
