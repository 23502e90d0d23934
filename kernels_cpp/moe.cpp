// MoE orchestration (baseline x86-64): routing, activation quantization, task split over the
// shared pool, SiLU-gate, re-quantization, weighted sum. Only the int32 dot products are ISA
// specific (moe_ref.cpp / moe_avx512.cpp / moe_amx.cpp); every float operation lives here so the
// ISA paths agree bit for bit.
#include "moe.hpp"

#include <xmmintrin.h>

#include <algorithm>
#include <atomic>
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
    case Isa::Amx: return amx::dot_rowgroup;
    case Isa::Avx512: return avx512::dot_rowgroup;
    default: return ref::dot_rowgroup;  // no AVX2 kernel: the portable one serves it
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

float quantize_act(const float* x, int64_t k, int8_t* q, int32_t* qsum) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.f ? 1.0f / d : 0.f;
  int32_t s = 0;
  for (int64_t i = 0; i < k; ++i) {
    // cvtss2si: round half to even under the default MXCSR, as kt's _mm512_cvtps_epi32
    int32_t v = _mm_cvtss_si32(_mm_set_ss(x[i] * id));
    v = std::min(127, std::max(-128, v));
    q[i] = static_cast<int8_t>(v);
    s += v;
  }
  *qsum = s;
  return d;
}

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

void forward(const Weights& weights, const float* x, int64_t tokens, const int64_t* ids, const float* topk_w,
             int64_t topk, float* out, Isa isa, int num_threads) {
  const Config& cfg = weights.cfg;
  const int64_t H = cfg.hidden, T = cfg.numa, IL = cfg.i_local(), E = cfg.experts;
  std::fill(out, out + tokens * H, 0.f);
  if (tokens == 0 || topk == 0) return;
  const DotFn dot = dot_for(isa);
  // The AMX kernel reads whole 16-row tiles: rows past a block's end belong to the next block
  // or to 16 rows of slack at the end of the buffer; they only feed output rows it discards.
  auto pad = [](int64_t m) { return m; };
  constexpr int64_t kSlackRows = 16;
  ThreadPool& pool = shared_pool(num_threads);

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
  std::vector<int64_t> m_of(A), row0(A + 1, 0), pad0(A + 1, 0);  // rows, row offsets, padded offsets
  for (int64_t a = 0; a < A; ++a) {
    m_of[a] = count[active[a]];
    row0[a + 1] = row0[a] + m_of[a];
    pad0[a + 1] = pad0[a] + pad(m_of[a]);
  }
  const int64_t R = row0[A], RP = pad0[A];
  std::vector<int64_t> row_token(R);
  std::vector<float> row_weight(R);
  std::vector<int64_t> dest(tokens * topk);  // padded row index of (token, j)
  {
    std::vector<int64_t> fill(A, 0);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t j = 0; j < topk; ++j) {
        const int64_t a = slot_of[ids[t * topk + j]];
        const int64_t r = fill[a]++;
        row_token[row0[a] + r] = t;
        row_weight[row0[a] + r] = topk_w[t * topk + j];
        dest[t * topk + j] = pad0[a] + r;
      }
  }

  // ---- stage 0: quantize x straight into each expert's row block
  AlignedArray<int8_t> xq(static_cast<size_t>((RP + kSlackRows) * H));
  std::vector<float> xd(RP, 0.f);
  std::vector<int32_t> xs(RP, 0);
  std::memset(xq.p + RP * H, 0, kSlackRows * H);
  pool.parallel_for(tokens, [&](int64_t t, int) {
    const int64_t r = dest[t * topk];
    xd[r] = quantize_act(x + t * H, H, xq.p + r * H, &xs[r]);
    for (int64_t j = 1; j < topk; ++j) {
      const int64_t r2 = dest[t * topk + j];
      std::memcpy(xq.p + r2 * H, xq.p + r * H, H);
      xd[r2] = xd[r];
      xs[r2] = xs[r];
    }
  });

  // ---- stage 1: gate/up over (expert, slice, 32-row group); the last task of a (expert, slice)
  // re-quantizes its intermediate.
  const int64_t groups1 = IL / 32;
  AlignedArray<float> act(static_cast<size_t>(R * T * IL));            // [a][t][m][IL]
  AlignedArray<int8_t> aq(static_cast<size_t>((RP * T + kSlackRows) * IL));  // [a][t][m][IL]
  std::memset(aq.p + RP * T * IL, 0, kSlackRows * IL);
  std::vector<float> ad(RP * T, 0.f);
  std::vector<int32_t> as(RP * T, 0);
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[A * T]);
  for (int64_t i = 0; i < A * T; ++i) left[i] = groups1;
  const int64_t mmax = *std::max_element(m_of.begin(), m_of.end());
  std::vector<std::vector<int32_t>> scratch(pool.size());

  pool.parallel_for(A * T * groups1, [&](int64_t task, int tid) {
    const int64_t g = task % groups1, at = task / groups1, t = at % T, a = at / T;
    const int64_t m = m_of[a], r0 = g * 32;
    const ExpertShard& sh = weights.shards[active[a] * T + t];
    std::vector<int32_t>& acc = scratch[tid];
    acc.resize(2 * round_up(mmax, 32) * 32);
    int32_t* ag = acc.data();
    int32_t* au = acc.data() + round_up(mmax, 32) * 32;
    const int8_t* xa = xq.p + pad0[a] * H;
    const float* xda = xd.data() + pad0[a];
    dot(cfg.method, sh.gate.w, IL, H, r0, xa, H, xs.data() + pad0[a], m, ag);
    dot(cfg.method, sh.up.w, IL, H, r0, xa, H, xs.data() + pad0[a], m, au);
    float sg[32], su[32];
    for (int j = 0; j < 32; ++j) {
      sg[j] = sh.gate.s[r0 + j];
      su[j] = sh.up.s[r0 + j];
    }
    float* act_at = act.p + (row0[a] * T + t * m) * IL;
    for (int64_t i = 0; i < m; ++i) {
      float* dst = act_at + i * IL + r0;
      for (int j = 0; j < 32; ++j) {
        float gv = static_cast<float>(ag[i * 32 + j]) * (xda[i] * sg[j]);
        float uv = static_cast<float>(au[i * 32 + j]) * (xda[i] * su[j]);
        if (cfg.clamp) {
          gv = std::min(gv, cfg.limit);
          uv = std::min(std::max(uv, -cfg.limit), cfg.limit);
        }
        dst[j] = gv / (1.0f + std::exp(-gv)) * uv;
      }
    }
    if (left[at].fetch_sub(1, std::memory_order_acq_rel) == 1) {
      const int64_t mp = pad(m);
      int8_t* q = aq.p + (pad0[a] * T + t * mp) * IL;
      const int64_t base = pad0[a] * T + t * mp;
      for (int64_t i = 0; i < m; ++i) ad[base + i] = quantize_act(act_at + i * IL, IL, q + i * IL, &as[base + i]);
    }
  });

  // ---- stage 2: down over 32-row groups of H; each task owns its output columns.
  std::vector<std::vector<float>> yscratch(pool.size());
  pool.parallel_for(H / 32, [&](int64_t g, int tid) {
    const int64_t r0 = g * 32;
    std::vector<int32_t>& acc = scratch[tid];
    acc.resize(round_up(mmax, 32) * 32);
    std::vector<float>& y = yscratch[tid];
    y.resize(mmax * 32);
    for (int64_t a = 0; a < A; ++a) {
      const int64_t m = m_of[a], mp = pad(m);
      std::fill(y.begin(), y.begin() + m * 32, 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const ExpertShard& sh = weights.shards[active[a] * T + t];
        const int64_t base = pad0[a] * T + t * mp;
        dot(cfg.method, sh.down.w, H, IL, r0, aq.p + base * IL, IL, as.data() + base, m, acc.data());
        float sd[32];
        for (int j = 0; j < 32; ++j) sd[j] = sh.down.s[r0 + j];
        for (int64_t i = 0; i < m; ++i)
          for (int j = 0; j < 32; ++j) y[i * 32 + j] += static_cast<float>(acc[i * 32 + j]) * (ad[base + i] * sd[j]);
      }
      for (int64_t i = 0; i < m; ++i) {
        const float w = row_weight[row0[a] + i];
        float* o = out + row_token[row0[a] + i] * H + r0;
        for (int j = 0; j < 32; ++j) o[j] += w * y[i * 32 + j];
      }
    }
  });
}

}  // namespace moe
}  // namespace kt
