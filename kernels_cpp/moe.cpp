// MoE orchestration (baseline x86-64): configuration checks, routing, the choice of schedule
// (moe_decode.cpp / moe_prefill.cpp for tiled methods, moe_group_schedule.cpp for group-wise ones) and the
// stage profile. The kernels come from the caller's row of the ISA table (moe_isa.hpp); every row gives
// bit-identical results.
#include "moe.hpp"

#include <emmintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>

#include "moe_schedule.hpp"
#include "thread_pool.hpp"
#include "tuning.hpp"

namespace kt {
namespace moe {

void validate_config(const Config& cfg) {
  const MethodInfo info = method_info(cfg.method);
  auto fail = [](const std::string& m) { throw std::invalid_argument(m); };
  if (cfg.hidden <= 0 || cfg.intermediate <= 0 || cfg.threadpool_count <= 0 || cfg.experts <= 0)
    fail("hidden, intermediate, threadpool_count and experts must be positive");
  if (cfg.intermediate % cfg.threadpool_count != 0)
    fail("intermediate size " + std::to_string(cfg.intermediate) + " is not divisible by threadpool_count " +
         std::to_string(cfg.threadpool_count));
  const int64_t il = cfg.i_local();
  if (cfg.hidden % info.k_align != 0 || cfg.hidden % TILE_ROWS != 0)
    fail("hidden size " + std::to_string(cfg.hidden) + " must be a multiple of " + std::to_string(info.k_align));
  if (il % info.k_align != 0 || il % TILE_ROWS != 0)
    fail("intermediate size per NUMA slice " + std::to_string(il) + " must be a multiple of " +
         std::to_string(info.k_align));
  if (cfg.clamp && !(cfg.limit > 0.f && std::isfinite(cfg.limit)))
    fail("swiglu_limit must be a positive finite number");
  if (cfg.gpt_oss && !(std::isfinite(cfg.alpha) && std::isfinite(cfg.up_offset)))
    fail("the gpt_oss activation's alpha and up_offset must be finite numbers");
  if (cfg.situ && !(cfg.beta > 0.f && std::isfinite(cfg.beta) && cfg.linear_beta > 0.f && std::isfinite(cfg.linear_beta)))
    fail("the situ activation's beta and linear_beta must be positive finite numbers");
  // the group-wise schedule (moe_group_schedule.cpp) runs SiLU only, as kt-kernel's RAWINT4 does
  if ((cfg.gpt_oss || cfg.situ) && is_grouped(cfg.method))
    fail(std::string("group-wise INT4 layers run the SiLU activation only, not ") + (cfg.gpt_oss ? "gpt_oss" : "situ") +
         "; use int4 or int8 weights");
}

namespace detail {

Routing route(const int64_t* ids, const float* topk_w, int64_t tokens, int64_t topk, int64_t E) {
  Routing rt;
  std::vector<int64_t> count(E, 0);
  for (int64_t i = 0; i < tokens * topk; ++i)
    if (ids[i] >= 0) ++count[ids[i]];  // id -1: a slot computed elsewhere (the GPU experts), skipped
  std::vector<int64_t> slot_of(E, -1);
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) {
      slot_of[e] = static_cast<int64_t>(rt.active.size());
      rt.active.push_back(e);
    }
  const int64_t A = rt.experts();
  rt.m_of.resize(A);
  rt.row0.assign(A + 1, 0);
  for (int64_t a = 0; a < A; ++a) {
    rt.m_of[a] = count[rt.active[a]];
    rt.row0[a + 1] = rt.row0[a] + rt.m_of[a];
  }
  const int64_t R = rt.row0[A];
  rt.row_token.resize(R);
  rt.row_weight.resize(R);
  rt.dest.resize(tokens * topk);
  std::vector<int64_t> fill(A, 0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < topk; ++j) {
      if (ids[t * topk + j] < 0) {
        rt.dest[t * topk + j] = -1;
        continue;
      }
      const int64_t a = slot_of[ids[t * topk + j]];
      const int64_t r = rt.row0[a] + fill[a]++;
      rt.row_token[r] = t;
      rt.row_weight[r] = topk_w[t * topk + j];
      rt.dest[t * topk + j] = r;
    }
  return rt;
}

}  // namespace detail

namespace {
std::mutex g_prof_m;
std::vector<std::pair<const char*, double>> g_last_prof;
const char* const kStageNames[detail::kStages] = {"serial", "q", "pack", "g_dot", "g_epi", "s", "d_dot", "d_epi", "wait"};
}  // namespace

namespace detail {

StageProfile::StageProfile(int threads, double t_call)
    : on_(tuning().profiling.load(std::memory_order_relaxed) != 0), threads_(threads), t_call_(t_call),
      sums_(on_ ? threads * 16 : 0, 0.0) {}

void StageProfile::publish(const std::vector<std::pair<const char*, double>>& sizes) {
  if (!on_) return;
  const double t_end = now_s();
  std::vector<std::pair<const char*, double>> r;
  r.emplace_back("wall", t_end - t_call_);
  double sum[kStages] = {};
  for (int p = 0; p < threads_; ++p)
    for (int st = 0; st < kStages; ++st) sum[st] += sums_[p * 16 + st];
  sum[kStSerial] = t_region_ - t_call_;
  for (int st = 0; st < kStages; ++st) r.emplace_back(kStageNames[st], sum[st]);
  r.emplace_back("region", t_end - t_region_);
  r.emplace_back("threads", threads_);
  r.insert(r.end(), sizes.begin(), sizes.end());
  std::lock_guard<std::mutex> l(g_prof_m);
  g_last_prof = std::move(r);
}

}  // namespace detail

std::vector<std::pair<const char*, double>> last_profile() {
  std::lock_guard<std::mutex> l(g_prof_m);
  return g_last_prof;
}

int start_pool(int num_threads) { return spin_pool(num_threads).size(); }

void forward(const Weights& weights, const float* x, int64_t tokens, const int64_t* ids, const float* topk_w,
             int64_t topk, float* out, const IsaKernels& kernels, int num_threads) {
  const Tuning& knobs = tuning();
  const double t_call = knobs.profiling.load(std::memory_order_relaxed) ? detail::now_s() : 0;
  if (tokens == 0 || topk == 0) {
    std::fill(out, out + tokens * weights.cfg.hidden, 0.f);
    return;
  }
  SpinPool& pool = spin_pool(num_threads);
  const detail::Routing rt = detail::route(ids, topk_w, tokens, topk, weights.cfg.experts);
  if (rt.experts() == 0) {  // every slot skipped
    std::fill(out, out + tokens * weights.cfg.hidden, 0.f);
    return;
  }
  const detail::Call call{weights, x, tokens, topk, out, kernels, pool, rt, t_call};
  if (is_grouped(weights.cfg.method)) {
    if (!(weights.gate_bias.empty() && weights.up_bias.empty() && weights.down_bias.empty()))
      throw std::invalid_argument("group-wise INT4 layers take no expert biases; use int4 or int8 weights");
    detail::forward_group(call);
  } else if (rt.rows() >= knobs.prefill_min_avg_rows.load(std::memory_order_relaxed) * rt.experts()) {
    detail::forward_prefill(call);
  } else {
    detail::forward_decode(call);
  }
}

double read_bandwidth_gbs(const uint8_t* buf, int64_t bytes, int num_threads, int reps) {
  // Streaming read of buf by every thread of the MoE pool (1 MiB chunks handed out dynamically),
  // the same pool and loads as a decode call; best of reps.
  SpinPool& pool = spin_pool(num_threads);
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
