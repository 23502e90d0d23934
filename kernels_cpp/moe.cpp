// MoE orchestration (baseline x86-64): routing, task split over the shared pool, data movement.
// The int32 dot products (moe_ref.cpp / moe_avx512.cpp / moe_amx.cpp) and the float stages
// (Epilogue: moe_epilogue.cpp reference, moe_epilogue_avx512.cpp) are ISA specific; both give
// bit-identical results on every path.
#include "moe.hpp"

#include <emmintrin.h>
#include <xmmintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "numerics.hpp"
#include "thread_pool.hpp"

namespace kt {
namespace moe {

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

DotFn dot_for(Isa isa) {
  switch (isa) {
    case Isa::Amx: return amx::dot_rowgroup_nocfg;  // tiles configured once per thread and region
    case Isa::Avx512: return avx512::dot_rowgroup;
    case Isa::Avx2: return avx2::dot_rowgroup;
    default: return ref::dot_rowgroup;
  }
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

}  // namespace

namespace amx {
namespace {
std::atomic<int> g_min_tokens{16};
}
int min_tokens() { return g_min_tokens.load(std::memory_order_relaxed); }
void set_min_tokens(int m) { g_min_tokens.store(m < 1 ? 1 : m, std::memory_order_relaxed); }
}  // namespace amx

void validate_config(const Config& cfg) {
  const MethodInfo info = method_info(cfg.method);
  auto fail = [](const std::string& m) { throw std::invalid_argument(m); };
  if (cfg.hidden <= 0 || cfg.intermediate <= 0 || cfg.numa <= 0 || cfg.experts <= 0)
    fail("hidden, intermediate, numa and experts must be positive");
  if (cfg.intermediate % cfg.numa != 0)
    fail("intermediate size " + std::to_string(cfg.intermediate) + " is not divisible by threadpool_count " +
         std::to_string(cfg.numa));
  const int64_t il = cfg.i_local();
  if (cfg.hidden % info.k_align != 0 || cfg.hidden % TILE_ROWS != 0)
    fail("hidden size " + std::to_string(cfg.hidden) + " must be a multiple of " + std::to_string(info.k_align));
  if (il % info.k_align != 0 || il % TILE_ROWS != 0)
    fail("intermediate size per NUMA slice " + std::to_string(il) + " must be a multiple of " +
         std::to_string(info.k_align));
  if (cfg.clamp && !(cfg.limit > 0.f && std::isfinite(cfg.limit)))
    fail("swiglu_limit must be a positive finite number");
}

namespace {

// ---- a spinning pool for the MoE forward (decode calls come back to back: a sleeping pool's
// condition-variable wake-ups cost tens of microseconds per call on 16 threads). Workers spin
// for KT_MOE_SPIN_US microseconds (default 2000) after a call, then sleep on a condition variable.
inline void cpu_relax() { _mm_pause(); }

inline void backoff(int64_t& spins) {
  if (++spins < (1 << 10)) {
    cpu_relax();
  } else {
    std::this_thread::yield();  // oversubscribed machine: let the thread we wait for run
  }
}

int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* v = std::getenv("KT_MOE_SPIN_US");
    const long us = v ? std::strtol(v, nullptr, 10) : 2000;
    return static_cast<int64_t>(us < 0 ? 0 : us) * 1000;
  }();
  return ns;
}

class MoePool {
 public:
  explicit MoePool(int n) : n_(n < 1 ? 1 : n) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  // Pools live for the whole process (never destroyed: workers may still spin at exit).
  int size() const { return n_; }

  // Runs body(tid) once on each of the n threads (the caller is tid 0); rethrows the first exception.
  void run(const std::function<void(int)>& body) {
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
    while (done_.load(std::memory_order_acquire) != n_ - 1) backoff(spins);
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void invoke(int tid) {
    try {
      (*body_)(tid);
    } catch (...) {
      std::lock_guard<std::mutex> l(err_m_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void loop(int tid) {
    uint64_t seen = 0;
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      int64_t spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        if ((++spins & 255) == 0) {
          const int64_t el =
              std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
          if (el >= spin_ns()) {
            std::unique_lock<std::mutex> l(m_);
            cv_.wait(l, [&] { return gen_.load(std::memory_order_acquire) != seen; });
            break;
          }
          if (spins > (1 << 16)) std::this_thread::yield();
        }
        cpu_relax();
      }
      seen = gen_.load(std::memory_order_acquire);
      invoke(tid);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  const int n_;
  std::vector<std::thread> workers_;
  std::mutex call_m_, m_, err_m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> done_{0};
  const std::function<void(int)>* body_ = nullptr;
  std::exception_ptr error_;
};

MoePool& moe_pool(int num_threads) {
  static std::mutex m;
  static std::map<int, MoePool*> pools;
  const int n = num_threads > 0 ? num_threads : hardware_threads();
  std::lock_guard<std::mutex> l(m);
  MoePool*& p = pools[n];
  if (!p) p = new MoePool(n);
  return *p;
}

// Hands out tasks 0..total-1 in index order to every pool thread (tasks may wait on earlier ones);
// the first exception stops the hand-out, is flagged in `abort` for waiting tasks, and is rethrown.
template <class RunTask>
void run_tasks_in_order(MoePool& pool, int64_t total, bool amx_cfg, std::atomic<int64_t>& next,
                        std::atomic<bool>& abort, RunTask& run_task) {
  pool.run([&](int tid) {
    if (amx_cfg) amx::configure_thread();
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


// Rows of H per down task when each (expert, column chunk) is its own task.
int64_t down_chunk_rows(int64_t H, int64_t A, int threads) {
  for (int64_t dr : {128, 64}) {
    if (H % dr == 0 && A * (H / dr) >= 8 * threads) return dr;
  }
  return 32;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Prefill schedule (many rows per expert).

namespace {

std::atomic<bool> g_profiling{false};
std::mutex g_prof_m;
std::vector<std::pair<const char*, double>> g_last_prof;

enum Stage { kStSerial, kStQ, kStGDot, kStGEpi, kStS, kStDDot, kStDEpi, kStWait, kStages };
const char* const kStageNames[kStages] = {"serial", "q", "g_dot", "g_epi", "s", "d_dot", "d_epi", "wait"};

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

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

// Buffers of one prefill call, kept between calls (no page faults on the hot path); concurrent
// calls take different workspaces.
struct Workspace {
  Buf xpan, xd, xs, act, apan, ad, as, acc, dacc, y, qtmp, prof;
};
std::mutex g_ws_m;
std::vector<std::unique_ptr<Workspace>> g_ws_free;

struct WorkspaceLease {
  std::unique_ptr<Workspace> ws;
  WorkspaceLease() {
    std::lock_guard<std::mutex> l(g_ws_m);
    if (!g_ws_free.empty()) {
      ws = std::move(g_ws_free.back());
      g_ws_free.pop_back();
    } else {
      ws.reset(new Workspace);
    }
  }
  ~WorkspaceLease() {
    std::lock_guard<std::mutex> l(g_ws_m);
    if (g_ws_free.size() < 4) g_ws_free.push_back(std::move(ws));
  }
};

// Groups (32 rows of I_l) per gate/up task: the largest of 8, 4, 2, 1 that still gives >= 8 tasks
// per thread.
int64_t gate_groups_per_task(int64_t A, int64_t T, int64_t groups1, int threads) {
  for (int64_t gc : {8, 4, 2}) {
    if (gc <= groups1 && A * T * ((groups1 + gc - 1) / gc) >= 8 * threads) return gc;
  }
  return 1;
}

// Columns of H per down task (all experts): the largest of 256, 128, 64 dividing H with >= 4
// tasks per thread; else 32.
int64_t down_cols_per_task(int64_t H, int threads) {
  for (int64_t dc : {256, 128, 64}) {
    if (H % dc == 0 && H / dc >= 4 * threads) return dc;
  }
  return 32;
}

void forward_prefill(const Weights& weights, const float* x, int64_t tokens, int64_t topk, float* out,
                     DotFn dot, const Epilogue& epi, bool amx_cfg, MoePool& pool, const std::vector<int64_t>& active, const std::vector<int64_t>& m_of,
                     const std::vector<int64_t>& row0, const std::vector<int64_t>& row_token,
                     const std::vector<float>& row_weight, const std::vector<int64_t>& dest, double t_call) {
  const Config& cfg = weights.cfg;
  const int64_t H = cfg.hidden, T = cfg.numa, IL = cfg.i_local();
  const int64_t A = static_cast<int64_t>(active.size());
  const int64_t R = row0[A];
  const int P = pool.size();
  const bool prof = g_profiling.load(std::memory_order_relaxed);
  const int64_t mmax = *std::max_element(m_of.begin(), m_of.end());

  // ---- per-expert panels: rows padded to 16 (the AMX kernel reads whole 16-row tiles)
  std::vector<int64_t> pan0(A + 1, 0), row_slot(R);
  for (int64_t a = 0; a < A; ++a) {
    pan0[a + 1] = pan0[a] + round_up(m_of[a], 16);
    for (int64_t r = row0[a]; r < row0[a + 1]; ++r) row_slot[r] = a;
  }
  const int64_t NP = pan0[A];
  const ALayout LX = ALayout::panel(H), LA = ALayout::panel(IL);

  WorkspaceLease lease;
  Workspace& ws = *lease.ws;
  int8_t* xpan = ws.xpan.get<int8_t>(NP * H);  // expert a: rows pan0[a].., layout LX
  float* xd = ws.xd.get<float>(R);
  int32_t* xs = ws.xs.get<int32_t>(R);
  float* act = ws.act.get<float>(R * T * IL);    // [a][t][m][IL]
  int8_t* apan = ws.apan.get<int8_t>(NP * T * IL);  // (a, t): rows (pan0[a]*T + t*mpad) .., layout LA
  float* ad = ws.ad.get<float>(R * T);
  int32_t* as = ws.as.get<int32_t>(R * T);
  const int64_t acc_stride = round_up(mmax, 32) * 32;
  int32_t* acc_all = ws.acc.get<int32_t>(P * 2 * acc_stride);
  const int64_t DC = down_cols_per_task(H, P), DG = DC / 32;
  int32_t* dacc_all = ws.dacc.get<int32_t>(P * DG * acc_stride);
  float* y_all = ws.y.get<float>(T > 1 ? P * DG * acc_stride : 1);
  const int64_t qstride = round_up(std::max(H, IL), 64);
  int8_t* qtmp_all = ws.qtmp.get<int8_t>(P * qstride);
  double* prof_all = ws.prof.get<double>(P * 16);  // 16 doubles = 128 bytes per thread
  std::fill(prof_all, prof_all + P * 16, 0.0);
  auto pan_rows = [&](int64_t a) { return pan0[a + 1] - pan0[a]; };

  // ---- tasks, claimed in index order (a task only waits for tasks of lower index)
  //   Q: quantize kQ tokens once each and scatter them into the panels of their experts
  //   G: gate/up of (expert a, slice t, gc 32-row groups), a-major; SiLU-gate into act
  //   S: re-quantize kS rows of the intermediate of (a, t) into its panel once G of (a, t) is done
  //   D: DC columns of H over every expert (after every S task): zero out, then out += w * y in
  //      expert order, the order of the decode schedule.
  constexpr int64_t kQ = 4, kS = 16;
  const int64_t nQ = (tokens + kQ - 1) / kQ;
  const int64_t groups1 = IL / 32;
  const int64_t gc = gate_groups_per_task(A, T, groups1, P);
  const int64_t gchunks = (groups1 + gc - 1) / gc;
  const int64_t nG = A * T * gchunks;
  std::vector<int64_t> s0(A + 1, 0);
  for (int64_t a = 0; a < A; ++a) s0[a + 1] = s0[a] + T * ((m_of[a] + kS - 1) / kS);
  const int64_t nS = s0[A];
  const int64_t nD = H / DC;
  const int64_t q_end = nQ, g_end = q_end + nG, s_end = g_end + nS, total = s_end + nD;

  std::atomic<int64_t> q_left{nQ}, s_all{nS};
  std::unique_ptr<std::atomic<int64_t>[]> g_left(new std::atomic<int64_t>[A * T]);
  for (int64_t i = 0; i < A * T; ++i) g_left[i].store(gchunks, std::memory_order_relaxed);
  std::atomic<int64_t> next{0};
  std::atomic<bool> abort{false};

  auto run_task = [&](int64_t task, int tid) {
    int32_t* acc = acc_all + static_cast<int64_t>(tid) * 2 * acc_stride;
    int8_t* qtmp = qtmp_all + static_cast<int64_t>(tid) * qstride;
    double* pr = prof_all + tid * 16;
    double tp = prof ? now_s() : 0;
    auto mark = [&](int stage) {
      if (prof) {
        const double t = now_s();
        pr[stage] += t - tp;
        tp = t;
      }
    };
    auto wait_zero = [&](const std::atomic<int64_t>& c) {
      int64_t spins = 0;
      while (c.load(std::memory_order_acquire) != 0) {
        if (abort.load(std::memory_order_relaxed)) throw std::runtime_error("MoE forward aborted");
        backoff(spins);
      }
      mark(kStWait);
    };
    if (task < q_end) {  // ---- Q
      const int64_t t1 = std::min(tokens, (task + 1) * kQ);
      for (int64_t tk = task * kQ; tk < t1; ++tk) {
        int32_t qs;
        const float d = epi.quantize(x + tk * H, H, qtmp, &qs);
        for (int64_t j = 0; j < topk; ++j) {
          const int64_t r = dest[tk * topk + j];
          const int64_t a = row_slot[r];
          int8_t* dst = xpan + pan0[a] * H;
          const int64_t i = r - row0[a];
          for (int64_t c = 0; c < H; c += 64) std::memcpy(LX.at(dst, i, c), qtmp + c, 64);
          xd[r] = d;
          xs[r] = qs;
        }
      }
      mark(kStQ);
      q_left.fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < g_end) {  // ---- G
      wait_zero(q_left);
      const int64_t i1 = task - q_end;
      const int64_t ch = i1 % gchunks, at = i1 / gchunks, t = at % T, a = at / T;
      const int64_t m = m_of[a];
      const ExpertShard& sh = weights.shards[active[a] * T + t];
      int32_t* ag = acc;
      int32_t* au = acc + acc_stride;
      const int8_t* xa = xpan + pan0[a] * H;
      const float* xda = xd + row0[a];
      const int32_t* xsa = xs + row0[a];
      float* act_at = act + (row0[a] * T + t * m) * IL;
      for (int64_t g = ch * gc; g < std::min(groups1, (ch + 1) * gc); ++g) {
        const int64_t r0 = g * 32;
        dot(cfg.method, sh.gate.w, IL, H, r0, xa, LX, xsa, m, ag);
        dot(cfg.method, sh.up.w, IL, H, r0, xa, LX, xsa, m, au);
        mark(kStGDot);
        epi.silu_gate(ag, au, m, xda, sh.gate.s + r0, sh.up.s + r0, cfg.clamp, cfg.limit, act_at + r0, IL);
        mark(kStGEpi);
      }
      g_left[at].fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < s_end) {  // ---- S
      const int64_t i1 = task - g_end;
      const int64_t a = static_cast<int64_t>(std::upper_bound(s0.begin(), s0.end(), i1) - s0.begin()) - 1;
      const int64_t m = m_of[a], per_t = (m + kS - 1) / kS;
      const int64_t t = (i1 - s0[a]) / per_t, c = (i1 - s0[a]) % per_t;
      wait_zero(g_left[a * T + t]);
      const int64_t base = row0[a] * T + t * m;
      const float* act_at = act + base * IL;
      int8_t* q = apan + (pan0[a] * T + t * pan_rows(a)) * IL;
      for (int64_t i = c * kS; i < std::min(m, (c + 1) * kS); ++i) {
        ad[base + i] = epi.quantize(act_at + i * IL, IL, qtmp, &as[base + i]);
        for (int64_t cc = 0; cc < IL; cc += 64) std::memcpy(LA.at(q, i, cc), qtmp + cc, 64);
      }
      mark(kStS);
      s_all.fetch_sub(1, std::memory_order_acq_rel);
    } else {  // ---- D: columns c0 .. c0+DC over every expert
      wait_zero(s_all);
      const int64_t c0 = (task - s_end) * DC;
      for (int64_t tk = 0; tk < tokens; ++tk) std::fill(out + tk * H + c0, out + tk * H + c0 + DC, 0.f);
      // 32-column group g of the chunk: int32 sums at dacc + g*acc_stride, partial sums over the
      // slices (T > 1) at y + g*acc_stride; out rows are then updated DC contiguous columns at a time.
      int32_t* dacc = dacc_all + static_cast<int64_t>(tid) * DG * acc_stride;
      float* y = y_all + static_cast<int64_t>(tid) * DG * acc_stride;
      for (int64_t a = 0; a < A; ++a) {
        const int64_t m = m_of[a];
        // y[i*32+j] = Σ_t down_t rows r0..r0+31, in t order, from zero (as the decode schedule)
        for (int64_t t = 0; t < T; ++t) {
          const ExpertShard& sh = weights.shards[active[a] * T + t];
          const int64_t base = row0[a] * T + t * m;
          const int8_t* ap = apan + (pan0[a] * T + t * pan_rows(a)) * IL;
          for (int64_t g = 0; g < DG; ++g)
            dot(cfg.method, sh.down.w, H, IL, c0 + g * 32, ap, LA, as + base, m, dacc + g * acc_stride);
          mark(kStDDot);
          if (t + 1 < T) {
            for (int64_t g = 0; g < DG; ++g)
              epi.down(dacc + g * acc_stride, m, ad + base, sh.down.s + c0 + g * 32, y + g * acc_stride, 32, t == 0);
          } else {  // last slice: fused with out[token] += w * y
            epi.down_out(dacc, acc_stride, DG, m, ad + base, sh.down.s + c0, t == 0 ? nullptr : y,
                         row_weight.data() + row0[a], row_token.data() + row0[a], out + c0, H);
          }
          mark(kStDEpi);
        }
      }
    }
  };

  const double t_region = prof ? now_s() : 0;
  run_tasks_in_order(pool, total, amx_cfg, next, abort, run_task);
  if (prof) {
    const double t_end = now_s();
    std::vector<std::pair<const char*, double>> r;
    r.emplace_back("wall", t_end - t_call);
    double sum[kStages] = {};
    for (int p = 0; p < P; ++p)
      for (int st = 0; st < kStages; ++st) sum[st] += prof_all[p * 16 + st];
    sum[kStSerial] = t_region - t_call;
    for (int st = 0; st < kStages; ++st) r.emplace_back(kStageNames[st], sum[st]);
    r.emplace_back("region", t_end - t_region);
    r.emplace_back("threads", P);
    r.emplace_back("gate_groups_per_task", static_cast<double>(gc));
    r.emplace_back("down_cols_per_task", static_cast<double>(DC));
    std::lock_guard<std::mutex> l(g_prof_m);
    g_last_prof = std::move(r);
  }
}

}  // namespace

void set_profiling(bool on) { g_profiling.store(on, std::memory_order_relaxed); }
std::vector<std::pair<const char*, double>> last_profile() {
  std::lock_guard<std::mutex> l(g_prof_m);
  return g_last_prof;
}

int64_t prefill_min_avg_rows = 8;

int64_t per_expert_down_limit_bytes = int64_t(8) << 20;

void forward(const Weights& weights, const float* x, int64_t tokens, const int64_t* ids, const float* topk_w,
             int64_t topk, float* out, Isa isa, int num_threads) {
  const Config& cfg = weights.cfg;
  const int64_t H = cfg.hidden, T = cfg.numa, IL = cfg.i_local(), E = cfg.experts;
  const double t_call = g_profiling.load(std::memory_order_relaxed) ? now_s() : 0;
  if (tokens == 0 || topk == 0) {
    std::fill(out, out + tokens * H, 0.f);
    return;
  }
  const DotFn dot = dot_for(isa);
  const Epilogue& epi = epilogue_for(isa);
  // The AMX kernel reads whole 16-row tiles: rows past a block's end belong to the next block
  // or to 16 rows of slack at the end of the buffer; they only feed output rows it discards.
  constexpr int64_t kSlackRows = 16;
  MoePool& pool = moe_pool(num_threads);
  const int P = pool.size();

  // ---- routing: rows grouped by expert, experts in ascending id order
  std::vector<int64_t> count(E, 0);
  for (int64_t i = 0; i < tokens * topk; ++i) ++count[ids[i]];
  std::vector<int64_t> active;  // expert ids with tokens
  std::vector<int64_t> slot_of(E, -1);
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) {
      slot_of[e] = static_cast<int64_t>(active.size());
      active.push_back(e);
    }
  const int64_t A = static_cast<int64_t>(active.size());
  std::vector<int64_t> m_of(A), row0(A + 1, 0);  // rows, row offsets
  for (int64_t a = 0; a < A; ++a) {
    m_of[a] = count[active[a]];
    row0[a + 1] = row0[a] + m_of[a];
  }
  const int64_t R = row0[A];
  std::vector<int64_t> row_token(R);
  std::vector<float> row_weight(R);
  std::vector<int64_t> dest(tokens * topk);  // row index of (token, j)
  {
    std::vector<int64_t> fill(A, 0);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < topk; ++j) {
        const int64_t a = slot_of[ids[t * topk + j]];
        const int64_t r = fill[a]++;
        row_token[row0[a] + r] = t;
        row_weight[row0[a] + r] = topk_w[t * topk + j];
        dest[t * topk + j] = row0[a] + r;
      }
  }
  if (R >= prefill_min_avg_rows * A) {
    forward_prefill(weights, x, tokens, topk, out, dot, epi, isa == Isa::Amx, pool, active, m_of, row0, row_token, row_weight, dest, t_call);
    return;
  }
  std::fill(out, out + tokens * H, 0.f);
  const int64_t mmax = *std::max_element(m_of.begin(), m_of.end());

  // ---- buffers
  AlignedArray<int8_t> xq(static_cast<size_t>((R + kSlackRows) * H));  // [row][H]
  std::vector<float> xd(R, 0.f);
  std::vector<int32_t> xs(R, 0);
  std::memset(xq.p + R * H, 0, kSlackRows * H);
  AlignedArray<float> act(static_cast<size_t>(R * T * IL));                 // [a][t][m][IL]
  AlignedArray<int8_t> aq(static_cast<size_t>((R * T + kSlackRows) * IL));  // [a][t][m][IL]
  std::memset(aq.p + R * T * IL, 0, kSlackRows * IL);
  std::vector<float> ad(R * T, 0.f);
  std::vector<int32_t> as(R * T, 0);
  const int64_t acc_stride = round_up(mmax, 32) * 32;
  AlignedArray<int32_t> acc_all(static_cast<size_t>(P * 2 * acc_stride));
  AlignedArray<float> y_all(static_cast<size_t>(P * mmax * 32));

  // ---- one parallel region, tasks claimed in index order; a task only waits for tasks of
  // lower index (already claimed by running threads), so the waits cannot deadlock.
  //   Q: quantize x (kQ tokens per task)
  //   G: gate/up of (expert a, slice t, 32-row group), a-major; SiLU-gate into act
  //   S: re-quantize the intermediate of (a, t, kS rows) once all groups of (a, t) are done
  //   D: down. Few rows (decode): task (a, chunk of DR rows of H) writes y rows, the last of the
  //      A tasks of a chunk adds them into out in expert order. Many rows: task (32-row chunk)
  //      over all experts, after every S task, straight into out (no y buffer).
  // Every float operation and its order is the same in both modes and for any thread count.
  constexpr int64_t kQ = 4, kS = 16;
  const int64_t nQ = (tokens + kQ - 1) / kQ;
  const int64_t groups1 = IL / 32;
  const int64_t nG = A * T * groups1;
  std::vector<int64_t> s0(A + 1, 0);  // first S task of expert a
  for (int64_t a = 0; a < A; ++a) s0[a + 1] = s0[a] + T * ((m_of[a] + kS - 1) / kS);
  const int64_t nS = s0[A];
  const bool per_expert = R * H * static_cast<int64_t>(sizeof(float)) <= per_expert_down_limit_bytes;
  const int64_t DR = per_expert ? down_chunk_rows(H, A, P) : 32;
  const int64_t chunks = H / DR;
  const int64_t nD = per_expert ? A * chunks : chunks;
  const int64_t q_end = nQ, g_end = q_end + nG, s_end = g_end + nS, total = s_end + nD;

  std::atomic<int64_t> q_left{nQ}, s_all{nS};
  std::unique_ptr<std::atomic<int64_t>[]> g_left(new std::atomic<int64_t>[A * T]);
  for (int64_t i = 0; i < A * T; ++i) g_left[i].store(groups1, std::memory_order_relaxed);
  std::unique_ptr<std::atomic<int64_t>[]> s_left(new std::atomic<int64_t>[A]);
  for (int64_t a = 0; a < A; ++a) s_left[a].store(s0[a + 1] - s0[a], std::memory_order_relaxed);
  std::unique_ptr<std::atomic<int64_t>[]> d_left(new std::atomic<int64_t>[per_expert ? chunks : 1]);
  if (per_expert)
    for (int64_t c = 0; c < chunks; ++c) d_left[c].store(A, std::memory_order_relaxed);
  AlignedArray<float> ybuf(per_expert ? static_cast<size_t>(R * H) : 1);  // [row][H]
  std::atomic<int64_t> next{0};
  std::atomic<bool> abort{false};

  auto wait_zero = [&](const std::atomic<int64_t>& c) {
    int64_t spins = 0;
    while (c.load(std::memory_order_acquire) != 0) {
      if (abort.load(std::memory_order_relaxed)) throw std::runtime_error("MoE forward aborted");
      backoff(spins);
    }
  };

  // y[i*32+j] (i < m) = Σ_t down_t(expert a) rows r0..r0+31, in t order, from zero.
  auto down_rows = [&](int64_t a, int64_t r0, int32_t* acc, float* y, int64_t ystride) {
    const int64_t m = m_of[a];
    for (int64_t t = 0; t < T; ++t) {
      const ExpertShard& sh = weights.shards[active[a] * T + t];
      const int64_t base = row0[a] * T + t * m;
      dot(cfg.method, sh.down.w, H, IL, r0, aq.p + base * IL, ALayout::row_major(IL), as.data() + base, m, acc);
      epi.down(acc, m, ad.data() + base, sh.down.s + r0, y, ystride, t == 0);
    }
  };

  auto run_task = [&](int64_t task, int tid) {
    int32_t* acc = acc_all.p + static_cast<int64_t>(tid) * 2 * acc_stride;
    if (task < q_end) {  // ---- Q
      const int64_t t1 = std::min(tokens, (task + 1) * kQ);
      for (int64_t tk = task * kQ; tk < t1; ++tk) {
        const int64_t r = dest[tk * topk];
        xd[r] = epi.quantize(x + tk * H, H, xq.p + r * H, &xs[r]);
        for (int64_t j = 1; j < topk; ++j) {
          const int64_t r2 = dest[tk * topk + j];
          std::memcpy(xq.p + r2 * H, xq.p + r * H, H);
          xd[r2] = xd[r];
          xs[r2] = xs[r];
        }
      }
      q_left.fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < g_end) {  // ---- G
      wait_zero(q_left);
      const int64_t i1 = task - q_end;
      const int64_t g = i1 % groups1, at = i1 / groups1, t = at % T, a = at / T;
      const int64_t m = m_of[a], r0 = g * 32;
      const ExpertShard& sh = weights.shards[active[a] * T + t];
      int32_t* ag = acc;
      int32_t* au = acc + acc_stride;
      const int8_t* xa = xq.p + row0[a] * H;
      const float* xda = xd.data() + row0[a];
      dot(cfg.method, sh.gate.w, IL, H, r0, xa, ALayout::row_major(H), xs.data() + row0[a], m, ag);
      dot(cfg.method, sh.up.w, IL, H, r0, xa, ALayout::row_major(H), xs.data() + row0[a], m, au);
      float* act_at = act.p + (row0[a] * T + t * m) * IL;
      epi.silu_gate(ag, au, m, xda, sh.gate.s + r0, sh.up.s + r0, cfg.clamp, cfg.limit, act_at + r0, IL);
      g_left[at].fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < s_end) {  // ---- S
      const int64_t i1 = task - g_end;
      const int64_t a = static_cast<int64_t>(std::upper_bound(s0.begin(), s0.end(), i1) - s0.begin()) - 1;
      const int64_t m = m_of[a], per_t = (m + kS - 1) / kS;
      const int64_t t = (i1 - s0[a]) / per_t, c = (i1 - s0[a]) % per_t;
      wait_zero(g_left[a * T + t]);
      const int64_t base = row0[a] * T + t * m;
      const float* act_at = act.p + base * IL;
      int8_t* q = aq.p + base * IL;
      for (int64_t i = c * kS; i < std::min(m, (c + 1) * kS); ++i)
        ad[base + i] = epi.quantize(act_at + i * IL, IL, q + i * IL, &as[base + i]);
      s_left[a].fetch_sub(1, std::memory_order_acq_rel);
      s_all.fetch_sub(1, std::memory_order_acq_rel);
    } else if (per_expert) {  // ---- D, one expert
      const int64_t i1 = task - s_end;
      const int64_t a = i1 / chunks, c = i1 % chunks;
      wait_zero(s_left[a]);
      for (int64_t r0 = c * DR; r0 < (c + 1) * DR; r0 += 32) down_rows(a, r0, acc, ybuf.p + row0[a] * H + r0, H);
      if (d_left[c].fetch_sub(1, std::memory_order_acq_rel) == 1) {  // the last expert of this chunk: reduce
        for (int64_t r = 0; r < R; ++r)
          epi.axpy(out + row_token[r] * H + c * DR, row_weight[r], ybuf.p + r * H + c * DR, DR);
      }
    } else {  // ---- D, all experts
      wait_zero(s_all);
      const int64_t r0 = (task - s_end) * 32;
      float* y = y_all.p + static_cast<int64_t>(tid) * mmax * 32;
      for (int64_t a = 0; a < A; ++a) {
        const int64_t m = m_of[a];
        down_rows(a, r0, acc, y, 32);
        for (int64_t i = 0; i < m; ++i) epi.axpy(out + row_token[row0[a] + i] * H + r0, row_weight[row0[a] + i], y + i * 32, 32);
      }
    }
  };

  run_tasks_in_order(pool, total, isa == Isa::Amx, next, abort, run_task);
}

double read_bandwidth_gbs(const uint8_t* buf, int64_t bytes, int num_threads, int reps) {
  // Streaming read of buf by every thread of the MoE pool (1 MiB chunks handed out dynamically),
  // the same pool and loads as a decode call; best of reps.
  MoePool& pool = moe_pool(num_threads);
  constexpr int64_t kChunk = int64_t(1) << 20;
  const int64_t chunks = bytes / kChunk;
  double best = 0;
  std::vector<int64_t> sink(pool.size() * 8, 0);
  for (int r = 0; r < reps; ++r) {
    std::atomic<int64_t> next{0};
    const auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int tid) {
      __m128i s0 = _mm_setzero_si128(), s1 = s0, s2 = s0, s3 = s0;
      for (;;) {
        const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= chunks) break;
        const __m128i* p = reinterpret_cast<const __m128i*>(buf + c * kChunk);
        for (int64_t i = 0; i < kChunk / 16; i += 8) {
          s0 = _mm_add_epi64(s0, _mm_add_epi64(_mm_load_si128(p + i), _mm_load_si128(p + i + 4)));
          s1 = _mm_add_epi64(s1, _mm_add_epi64(_mm_load_si128(p + i + 1), _mm_load_si128(p + i + 5)));
          s2 = _mm_add_epi64(s2, _mm_add_epi64(_mm_load_si128(p + i + 2), _mm_load_si128(p + i + 6)));
          s3 = _mm_add_epi64(s3, _mm_add_epi64(_mm_load_si128(p + i + 3), _mm_load_si128(p + i + 7)));
        }
      }
      const __m128i v = _mm_add_epi64(_mm_add_epi64(s0, s1), _mm_add_epi64(s2, s3));
      sink[tid * 8] += _mm_cvtsi128_si64(v);
    });
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, chunks * kChunk / dt / 1e9);
  }
  volatile int64_t keep = 0;
  for (int64_t v : sink) keep = keep + v;
  return best;
}

}  // namespace moe
}  // namespace kt
