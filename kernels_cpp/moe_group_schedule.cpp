// The schedule of moe::forward() for the group-wise methods (RAWINT4, moe_group.hpp; baseline x86-64), at every
// size. Each token is quantized once and prepared (its even and odd columns apart, 8·Σa per group) into the row
// of each of its slots; a gate/up task covers (expert, NUMA slice, a few 32-row groups) with all the expert's
// rows; the down stage runs per column chunk over every expert, each expert once its intermediate is
// re-quantized, the slices summed in t order and the experts added into out in expert order (a token's out row
// zeroed just before its first expert). The products of an expert with tuning().group_gemm_min_rows rows or
// more run the ISA's GEMM (its 32 weight rows unpacked once per call), of one with fewer the group sums of 16
// rows at a time and their float product. Every ISA, thread count and knob gives the same bits; see
// moe_schedule.hpp for the task stages.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "moe_schedule.hpp"
#include "tuning.hpp"

namespace kt {
namespace moe {
namespace detail {

namespace {

// Buffers of one call, kept between calls (WorkspaceLease).
struct Workspace {
  Buf xq, xd, xs, xsp, xco, act, aq, ad, as, asp, aco, p, y;
};

}  // namespace

void forward_group(const Call& call) {
  const Weights& weights = call.weights;
  const Config& cfg = weights.cfg;
  const Routing& rt = call.route;
  const float* x = call.x;
  float* out = call.out;
  const int64_t tokens = call.tokens, topk = call.topk;
  const GroupKernels& gk = call.k.group;
  const Epilogue& epi = *call.k.epilogue;
  const std::vector<int64_t>& active = rt.active;
  const std::vector<int64_t>& m_of = rt.m_of;
  const std::vector<int64_t>& row0 = rt.row0;
  const int64_t group = method_info(cfg.method).group_size;
  const int64_t H = cfg.hidden, T = cfg.threadpool_count, IL = cfg.i_local(), GH = H / group, GI = IL / group;
  const int64_t A = rt.experts(), R = rt.rows(), mmax = rt.max_rows();
  const int P = call.pool.size();
  StageProfile profile(P, call.t_call);
  const std::vector<int64_t> first_row = first_rows(rt, tokens, out, H);

  // ---- buffers: rows of the activations [row][k] (x) and [a][t][m][k] (the intermediate); the AMX GEMM reads
  // whole 16-row tiles, so 16 zero rows of slack follow each
  constexpr int64_t kSlackRows = 16;
  const int64_t DC = down_chunk(H, {256, 128, 64}, 1, 4 * P), DG = DC / 32;  // all experts a task, >= 4 a thread
  WorkspaceLease<Workspace> lease;
  Workspace& ws = *lease;
  int8_t* xq = ws.xq.get<int8_t>((R + kSlackRows) * H);
  float* xd = ws.xd.get<float>(R);
  int32_t* xs = ws.xs.get<int32_t>(R);
  int8_t* xsp = ws.xsp.get<int8_t>(R * H);
  int32_t* xco = ws.xco.get<int32_t>(R * GH);
  float* act = ws.act.get<float>(R * T * IL);
  int8_t* aq = ws.aq.get<int8_t>((R * T + kSlackRows) * IL);
  float* ad = ws.ad.get<float>(R * T);
  int32_t* as = ws.as.get<int32_t>(R * T);
  int8_t* asp = ws.asp.get<int8_t>(R * T * IL);
  int32_t* aco = ws.aco.get<int32_t>(R * T * GI);
  float* p_all = ws.p.get<float>(P * 2 * mmax * 32);  // a thread's products: gate, up (or down) [m][32]
  float* y_all = ws.y.get<float>(P * mmax * DC);      // a thread's down chunk [m][DC]
  std::memset(xq + R * H, 0, kSlackRows * H);
  std::memset(aq + R * T * IL, 0, kSlackRows * IL);

  const int64_t gemm_min = tuning().group_gemm_min_rows.load(std::memory_order_relaxed);
  // P [m][32] of rows r0.. of (w, st) [n, k] against m prepared rows (a, split, corr)
  auto product = [&](const uint8_t* w, const uint16_t* st, int64_t k, int64_t r0, const int8_t* a, const int8_t* split,
                     const int32_t* corr, int64_t m, float* p) {
    if (m >= gemm_min) {
      gk.gemm(w, st, k, group, r0, a, k, split, corr, m, p);
    } else {
      group_product(gk.dot, gk.scale, w, st, k, group, r0, a, k, split, corr, m, p);
    }
  };

  // ---- tasks, claimed in index order
  //   Q: quantize and prepare kQ tokens, each into the rows of its slots
  //   G: gate/up of (expert a, slice t, gc 32-row groups), a-major; SiLU-gate into act
  //   S: re-quantize and prepare kRows rows of the intermediate of (a, t) once all its groups are done
  //   D: DC columns of H over every expert, each once its S tasks are done: y = Σ_t down_t in t order, then
  //      out += w * y in expert order
  constexpr int64_t kQ = 4;
  const int64_t nQ = (tokens + kQ - 1) / kQ;
  const int64_t groups1 = IL / 32;
  const int64_t gc = gate_groups_per_task(A, T, groups1, P);
  const int64_t gchunks = (groups1 + gc - 1) / gc;
  const int64_t nG = A * T * gchunks;
  const RequantTasks stasks(m_of, T);
  const int64_t nS = stasks.count();
  const int64_t nD = H / DC;
  const int64_t q_end = nQ, g_end = q_end + nG, s_end = g_end + nS, total = s_end + nD;

  std::atomic<int64_t> q_left{nQ};
  const auto g_left = counters(A * T, [&](int64_t) { return gchunks; });
  const auto s_left = counters(A, [&](int64_t a) { return stasks.of_expert(a); });
  std::atomic<int64_t> next{0};
  std::atomic<bool> abort{false};
  GateAct gate_act;  // SiLU and the clamp: no biases (forward refuses them), no gpt_oss or situ (validate_config)
  gate_act.clamp = cfg.clamp;
  gate_act.limit = cfg.limit;

  auto run_task = [&](int64_t task, int tid) {
    float* p0 = p_all + static_cast<int64_t>(tid) * 2 * mmax * 32;
    float* p1 = p0 + mmax * 32;
    StageProfile::Clock clock = profile.clock(tid);
    auto wait = [&](const std::atomic<int64_t>& counter) {
      wait_zero(counter, abort);
      clock.mark(kStWait);
    };
    if (task < q_end) {  // ---- Q
      const int64_t t1 = std::min(tokens, (task + 1) * kQ);
      for (int64_t tk = task * kQ; tk < t1; ++tk)
        token_rows(
            rt, tk, topk,
            [&](int64_t r) {
              xd[r] = epi.quantize(x + tk * H, H, xq + r * H, &xs[r]);
              gk.prepare(xq + r * H, H, 1, H, group, xsp + r * H, xco + r * GH);
            },
            [&](int64_t r, int64_t r2) {
              std::memcpy(xq + r2 * H, xq + r * H, H);
              std::memcpy(xsp + r2 * H, xsp + r * H, H);
              std::memcpy(xco + r2 * GH, xco + r * GH, GH * sizeof(int32_t));
              xd[r2] = xd[r];
            });
      clock.mark(kStQ);
      q_left.fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < g_end) {  // ---- G
      wait(q_left);
      const int64_t i1 = task - q_end;
      const int64_t ch = i1 % gchunks, at = i1 / gchunks, t = at % T, a = at / T;
      const int64_t m = m_of[a], r = row0[a];
      const ExpertShard& sh = weights.shards[active[a] * T + t];
      float* act_at = act + (r * T + t * m) * IL;
      for (int64_t g = ch * gc; g < std::min(groups1, (ch + 1) * gc); ++g) {
        const int64_t r0 = g * 32;
        product(sh.gate.w, sh.gate.gs, H, r0, xq + r * H, xsp + r * H, xco + r * GH, m, p0);
        product(sh.up.w, sh.up.gs, H, r0, xq + r * H, xsp + r * H, xco + r * GH, m, p1);
        clock.mark(kStGDot);
        epi.group_silu_gate(p0, p1, m, xd + r, gate_act, act_at + r0, IL);
        clock.mark(kStGEpi);
      }
      g_left[at].fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < s_end) {  // ---- S
      const RequantTasks::Task s = stasks.task(task - g_end, m_of);
      wait(g_left[s.a * T + s.t]);
      const int64_t base = row0[s.a] * T + s.t * m_of[s.a];
      requantize_rows(epi, act + base * IL, IL, s.i0, s.i1, aq + base * IL, ALayout::row_major(IL), ad + base,
                      as + base, nullptr);
      gk.prepare(aq + (base + s.i0) * IL, IL, s.i1 - s.i0, IL, group, asp + (base + s.i0) * IL,
                 aco + (base + s.i0) * GI);
      clock.mark(kStS);
      s_left[s.a].fetch_sub(1, std::memory_order_acq_rel);
    } else {  // ---- D: columns c0 .. c0+DC over every expert
      const int64_t c0 = (task - s_end) * DC;
      float* y = y_all + static_cast<int64_t>(tid) * mmax * DC;
      for (int64_t a = 0; a < A; ++a) {
        wait(s_left[a]);
        const int64_t m = m_of[a];
        for (int64_t t = 0; t < T; ++t) {
          const ExpertShard& sh = weights.shards[active[a] * T + t];
          const int64_t base = row0[a] * T + t * m;
          for (int64_t g = 0; g < DG; ++g) {
            product(sh.down.w, sh.down.gs, IL, c0 + g * 32, aq + base * IL, asp + base * IL, aco + base * GI, m, p0);
            clock.mark(kStDDot);
            group_down(p0, m, ad + base, y + g * 32, DC, t == 0);
            clock.mark(kStDEpi);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = row0[a] + i, tk = rt.row_token[r];
          float* o = out + tk * H + c0;
          if (first_row[tk] == r) std::fill(o, o + DC, 0.f);
          epi.axpy(o, rt.row_weight[r], y + i * DC, DC);
        }
        clock.mark(kStDEpi);
      }
    }
  };

  profile.region_start();
  run_tasks_in_order(call.pool, total, nullptr, next, abort, run_task);  // the AMX kernels configure their tiles
  profile.publish({{"gate_groups_per_task", static_cast<double>(gc)},
                   {"down_cols_per_task", static_cast<double>(DC)},
                   {"gemm_min_rows", static_cast<double>(gemm_min)}});
}

}  // namespace detail
}  // namespace moe
}  // namespace kt
